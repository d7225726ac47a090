"""The channel analysis' records: how channel axes map to spaces, what to slice, which groups tie."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from pipeline.pruning.nodes import layer_name


@dataclass(frozen=True)
class Segment:
    """A run of positions along a tensor's channel axis that come from one space.

    Attributes:
        space: The channel space (None: channels from an unpruned source, always kept).
        size: Channels in the run.
        repeat: Consecutive positions per channel (H*W after flattening NCHW, else 1).
    """

    space: int | None
    size: int
    repeat: int = 1

    @property
    def width(self) -> int:
        """Positions the run occupies."""
        return self.size * self.repeat


@dataclass(frozen=True)
class Layout:
    """How a tensor's channel axis maps to channel spaces.

    Attributes:
        segments: The runs along the axis, in order.
        axis: The channel axis, counted from the end (negative), which broadcasting preserves.
    """

    segments: tuple[Segment, ...]
    axis: int

    @property
    def width(self) -> int:
        """Length of the channel axis."""
        return sum(segment.width for segment in self.segments)

    def positions(self, kept: dict[int, np.ndarray]) -> np.ndarray | None:
        """Indices along the axis that survive when each space keeps `kept[space]`.

        Returns:
            The surviving positions, ascending; None when nothing is removed.
        """
        parts, offset, removed = [], 0, False
        for segment in self.segments:
            channels = kept.get(segment.space) if segment.space is not None else None
            if channels is None:
                channels = np.arange(segment.size)
            else:
                removed = removed or len(channels) < segment.size
            runs = offset + channels[:, None] * segment.repeat + np.arange(segment.repeat)[None, :]
            parts.append(runs.reshape(-1))
            offset += segment.width
        return np.concatenate(parts).astype(np.int64) if removed else None


@dataclass(frozen=True)
class SliceRecord:
    """A constant input of a node to slice along one axis when channels go.

    Attributes:
        node: The node reading the constant.
        input_index: Which input.
        axis: The constant's axis that indexes the channels.
        layout: The channel layout of that axis.
        role: ``producer`` (output channels), ``sink`` (input channels of a reducing layer)
            or ``follower`` (per-channel parameters on the way).
        groups: For the input channels of a grouped Conv: its group count (the weight holds
            each output group's own slice of the inputs).
    """

    node: ir.Node
    input_index: int
    axis: int
    layout: Layout
    role: Literal["producer", "sink", "follower"]
    groups: int = 1


@dataclass(frozen=True)
class Sink:
    """A layer that reduces over pruned channels: its weights can be re-fitted (recovery).

    Attributes:
        node: The Conv (group 1), Gemm or MatMul.
        layout: The layout of its data input's channel axis.
    """

    node: ir.Node
    layout: Layout


@dataclass
class ChannelGroup:
    """Spaces tied together: they keep and lose the same channels.

    Attributes:
        space: The group's representative space.
        channels: Channels in the group.
        producers: The nodes that compute these channels.
        blocked: Why the channels cannot be removed (None: prunable).
        sinks: Layers reading these channels (for the activation score and recovery).
        partitions: Grouped convolutions split the channels into this many equal blocks, and
            each block must lose the same number of channels.
    """

    space: int
    channels: int
    producers: list[ir.Node] = field(default_factory=list)
    blocked: str | None = None
    sinks: list[Sink] = field(default_factory=list)
    partitions: int = 1

    @property
    def name(self) -> str:
        """The first producer's layer name."""
        return layer_name(self.producers[0])

    def names(self) -> set[str]:
        """Every name a job may use for this group: producers' layer and node names."""
        return {layer_name(node) for node in self.producers} | {node.name or "" for node in self.producers}


@dataclass
class ChannelAnalysis:
    """The result of the walk: spaces, what to slice, and what blocks.

    Attributes:
        groups: One per set of tied spaces, in graph order of their first producer.
        records: Constant slices to apply.
        depthwise: Depthwise Convs whose ``group`` follows the channel count.
        reshapes: Reshapes into a Gemm whose target shape holds the flattened width.
        space_of: Each space's group representative.
    """

    groups: list[ChannelGroup]
    records: list[SliceRecord]
    depthwise: list[tuple[ir.Node, Layout]]
    reshapes: list[tuple[ir.Node, int, Layout]]
    space_of: dict[int, int]

    def group(self, space: int) -> ChannelGroup:
        """The group a space belongs to."""
        root = self.space_of[space]
        return next(group for group in self.groups if group.space == root)
