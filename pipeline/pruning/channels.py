"""Channel dependency analysis: which output channels can be removed, and what must follow them.

A *producer* (Conv, Gemm, or MatMul with a constant weight) creates a channel *space*: the
output channels it computes. The walk follows each space forward through ops that keep channels
apart (activations, pools, BatchNorm, depthwise Conv, elementwise ops with constants), through
Concat (as offsets) and a Flatten / Reshape into a Gemm (as blocks of spatial positions), to
*sinks* that reduce over channels (the next Conv, Gemm or MatMul, whose input-channel weights
are sliced). Elementwise ops between two pruned tensors (residual Adds, gating Muls) tie their
spaces together: they must lose the same channels. A space reaching anything else (a graph
output, LayerNorm, a Reshape that splits heads, Softmax, ...) is *blocked* with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

# Ops that act on each channel separately and keep the tensor's layout (output 0 only).
_PER_CHANNEL_UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
        "Softplus", "Softsign", "Erf", "Gelu", "Mish", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp",
        "Log", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Dropout", "Cast",
        "Clip", "ThresholdedRelu",
    }
)  # fmt: skip
# Elementwise ops whose operands broadcast against each other.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"})
# Pools keep channels apart on an NCHW tensor (channel axis 1).
_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
# Per-channel parameter inputs of normalisations over axis 1.
_CHANNEL_PARAMETERS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


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


def layer_name(node: ir.Node) -> str:
    """A readable layer name: the weight's name (``features.3``), the bias's, or the node's."""
    for value in node.inputs[1:]:
        if value is not None and value.is_initializer() and not (value.name or "").startswith("val_"):
            return _strip_suffix(value.name or "")
    for consumer in node.outputs[0].consumers():
        if consumer.op_type == "Add":
            for value in consumer.inputs:
                if value is not None and value.is_initializer() and (value.name or "").endswith(".bias"):
                    return _strip_suffix(value.name or "")
    return node.name or node.op_type


def _strip_suffix(name: str) -> str:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data, if it is a constant (initializer) and not an overridable input."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


class _Walk:
    """One pass over the graph in topological order, tracking channel layouts."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.layouts: dict[ir.Value, Layout] = {}
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.blocked: dict[int, str] = {}
        self.partitions: dict[int, int] = {}
        self.producers: dict[int, list[ir.Node]] = {}
        self.sinks: list[Sink] = []
        self.records: list[SliceRecord] = []
        self.depthwise: list[tuple[ir.Node, Layout]] = []
        self.reshapes: list[tuple[ir.Node, int, Layout]] = []

    # -- spaces ------------------------------------------------------------------------------

    def new_space(self, size: int, producer: ir.Node) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        space = len(self.parent) - 1
        self.producers[space] = [producer]
        return space

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        low, high = min(ra, rb), max(ra, rb)
        self.parent[high] = low
        self.producers[low] = self.producers.get(low, []) + self.producers.pop(high, [])
        self.partitions[low] = math.lcm(self.partitions.get(low, 1), self.partitions.pop(high, 1))
        if high in self.blocked:
            self.blocked.setdefault(low, self.blocked.pop(high))

    def partition(self, space: int, groups: int, node: ir.Node) -> None:
        """Require the space's channels to be removed equally from each of `groups` blocks."""
        root = self.find(space)
        combined = math.lcm(self.partitions.get(root, 1), groups)
        if self.sizes[root] % combined:
            self.blocked.setdefault(root, f"Conv node {node.name} groups them in blocks that do not divide evenly")
        else:
            self.partitions[root] = combined

    def block(self, layout: Layout, reason: str) -> None:
        for segment in layout.segments:
            if segment.space is not None:
                self.blocked.setdefault(self.find(segment.space), reason)

    def merge(self, layouts: list[Layout], node: ir.Node) -> Layout | None:
        """Tie the spaces of operands that meet elementwise; None (and blocked) if they differ."""
        first = layouts[0]
        for other in layouts[1:]:
            shapes_match = other.axis == first.axis and [(s.size, s.repeat) for s in other.segments] == [
                (s.size, s.repeat) for s in first.segments
            ]
            if not shapes_match or any(
                (a.space is None) != (b.space is None) for a, b in zip(first.segments, other.segments, strict=True)
            ):
                for layout in layouts:
                    self.block(layout, f"{node.op_type} node {node.name} combines differently laid out channels")
                return None
            for a, b in zip(first.segments, other.segments, strict=True):
                if a.space is not None and b.space is not None:
                    self.union(a.space, b.space)
        return first

    # -- the walk ----------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph:
            tracked = [(index, self.layouts[v]) for index, v in enumerate(node.inputs) if v in self.layouts]
            if tracked:
                self.visit(node, tracked)
            self.maybe_produce(node)
        for value in self.graph.outputs:
            if value in self.layouts:
                self.block(self.layouts[value], f"reaches the graph output {value.name}")

    def visit(self, node: ir.Node, tracked: list[tuple[int, Layout]]) -> None:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        layout = tracked[0][1]
        data_only = [index for index, _ in tracked] == [0]
        if op in _PER_CHANNEL_UNARY and data_only:
            if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
                self.block(layout, f"{op} node {node.name} has a second output in use")
            else:
                self.layouts[node.outputs[0]] = layout
        elif op in _POOLS and data_only and self._channel_first(node.inputs[0], layout):
            if len(node.outputs) > 1 and node.outputs[1].uses():
                self.block(layout, f"{op} node {node.name} returns indices")
            else:
                self.layouts[node.outputs[0]] = layout
        elif op in _CHANNEL_PARAMETERS and data_only and self._channel_first(node.inputs[0], layout):
            if not all(constant(node.inputs[i]) is not None for i in _CHANNEL_PARAMETERS[op]):
                self.block(layout, f"{op} node {node.name} has non-constant parameters")
                return
            for index in _CHANNEL_PARAMETERS[op]:
                self.records.append(SliceRecord(node, index, 0, layout, "follower"))
            self.layouts[node.outputs[0]] = layout
        elif op in _ELEMENTWISE:
            self.elementwise(node, tracked)
        elif op == "Concat":
            self.concat(node, tracked)
        elif op in ("Flatten", "Reshape") and data_only:
            self.flatten(node, layout)
        elif op == "Conv" and data_only:
            self.conv_input(node, layout)
        elif op in ("Gemm", "MatMul") and data_only:
            self.matmul_input(node, layout)
        else:
            for _, each in tracked:
                self.block(each, f"feeds {op} node {node.name}")

    def maybe_produce(self, node: ir.Node) -> None:
        """Give a Conv / Gemm / MatMul with constant weights a new output channel space."""
        if node.domain not in ("", "ai.onnx") or not node.outputs or node.inputs[0] is None:
            return
        weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim < 2:
            return
        output = node.outputs[0]
        rank = len(output.shape) if output.shape is not None else None
        if node.op_type == "Conv" and rank is not None:
            group = attribute(node, "group", 1)
            if _is_depthwise(node, weight):
                return  # its channels are its input's (handled in conv_input)
            space = self.new_space(weight.shape[0], node)
            if group > 1:  # each group keeps the same number of output channels
                self.partition(space, group, node)
            layout = Layout((Segment(space, weight.shape[0]),), 1 - rank)
            self.records.append(SliceRecord(node, 1, 0, layout, "producer"))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self.records.append(SliceRecord(node, 2, 0, layout, "producer"))
            self.layouts[output] = layout
        elif node.op_type == "Gemm" and not attribute(node, "transA", 0) and weight.ndim == 2:
            out_axis = weight_axes(node)[1]
            channels = weight.shape[out_axis]
            space = self.new_space(channels, node)
            layout = Layout((Segment(space, channels),), -1)
            self.records.append(SliceRecord(node, 1, out_axis, layout, "producer"))
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and constant(bias) is None:
                self.block(layout, f"Gemm node {node.name} adds a non-constant C")
            elif bias is not None:
                self._follow_constant(node, 2, layout)
            self.layouts[output] = layout
        elif node.op_type == "MatMul" and weight.ndim == 2:
            space = self.new_space(weight.shape[1], node)
            layout = Layout((Segment(space, weight.shape[1]),), -1)
            self.records.append(SliceRecord(node, 1, 1, layout, "producer"))
            self.layouts[output] = layout

    def elementwise(self, node: ir.Node, tracked: list[tuple[int, Layout]]) -> None:
        layouts = [layout for _, layout in tracked]
        tracked_indices = {index for index, _ in tracked}
        for index, value in enumerate(node.inputs):
            if index not in tracked_indices and value is not None and constant(value) is None:
                for layout in layouts:
                    self.block(layout, f"{node.op_type} node {node.name} mixes them with channels that are not pruned")
                return
        merged = self.merge(layouts, node)
        if merged is None:
            return
        for index, value in enumerate(node.inputs):
            if index not in tracked_indices and value is not None:
                if not self._follow_constant(node, index, merged):
                    return
        self.layouts[node.outputs[0]] = merged

    def _follow_constant(self, node: ir.Node, index: int, layout: Layout) -> bool:
        """Slice a broadcast constant operand along the channel axis when it has one."""
        array = constant(node.inputs[index])
        assert array is not None
        axis = array.ndim + layout.axis
        if axis < 0 or array.shape[axis] == 1:
            return True  # broadcast over channels: nothing to slice
        if array.shape[axis] != layout.width:
            self.block(layout, f"{node.op_type} node {node.name} has a constant of another channel count")
            return False
        self.records.append(SliceRecord(node, index, axis, layout, "follower"))
        return True

    def concat(self, node: ir.Node, tracked: list[tuple[int, Layout]]) -> None:
        output = node.outputs[0]
        rank = len(output.shape) if output.shape is not None else None
        axis = attribute(node, "axis", 0)
        layouts = dict(tracked)
        channel_axis = tracked[0][1].axis
        if rank is None or (axis - rank if axis >= 0 else axis) != channel_axis:
            for _, layout in tracked:
                self.block(layout, f"Concat node {node.name} joins along another axis")
            return
        segments: list[Segment] = []
        for index, value in enumerate(node.inputs):
            if index in layouts and layouts[index].axis == channel_axis:
                segments.extend(layouts[index].segments)
                continue
            width = _static_dim(value, channel_axis)
            if index in layouts or width is None:
                for _, layout in tracked:
                    self.block(layout, f"Concat node {node.name} has an input of unknown channel count")
                return
            segments.append(Segment(None, width))
        self.layouts[output] = Layout(tuple(segments), channel_axis)

    def flatten(self, node: ir.Node, layout: Layout) -> None:
        """Flatten / Reshape that merges the channel axis with everything after it (into a Gemm)."""
        source = node.inputs[0]
        rank = len(source.shape) if source is not None and source.shape is not None else None
        why = f"{node.op_type} node {node.name} reshapes the channel axis"
        if rank is None:
            self.block(layout, why)
            return
        first = rank + layout.axis
        trailing = [_static_dim(source, axis - rank) for axis in range(first + 1, rank)]
        if any(dim is None for dim in trailing):
            self.block(layout, why)
            return
        spatial = math.prod(dim for dim in trailing if dim is not None)
        if node.op_type == "Flatten":
            ok = attribute(node, "axis", 1) in (first, first - rank)
        else:
            shape = constant(node.inputs[1])
            ok = (
                shape is not None
                and shape.ndim == 1
                and len(shape) == first + 1
                and int(shape[first]) in (-1, layout.width * spatial)
                and all(
                    int(d) == -1
                    or (int(d) == 0 and not attribute(node, "allowzero", 0))
                    or int(d) == _static_dim(source, i - rank)
                    for i, d in enumerate(shape[:first])
                )
            )
            if ok:
                self.reshapes.append((node, first, Layout(layout.segments, layout.axis)))
        if not ok:
            self.block(layout, why)
            return
        segments = tuple(Segment(s.space, s.size, s.repeat * spatial) for s in layout.segments)
        self.layouts[node.outputs[0]] = Layout(segments, -1)

    def conv_input(self, node: ir.Node, layout: Layout) -> None:
        weight = constant(node.inputs[1])
        if weight is None or not self._channel_first(node.inputs[0], layout):
            self.block(layout, f"Conv node {node.name} has no constant weight or another layout")
            return
        group = attribute(node, "group", 1)
        if group == 1 and weight.shape[1] == layout.width:
            self.records.append(SliceRecord(node, 1, 1, layout, "sink"))
            self.sinks.append(Sink(node, layout))
        elif _is_depthwise(node, weight) and weight.shape[0] == layout.width:
            self.records.append(SliceRecord(node, 1, 0, layout, "follower"))
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self.records.append(SliceRecord(node, 2, 0, layout, "follower"))
            self.depthwise.append((node, layout))
            self.layouts[node.outputs[0]] = layout
        elif group > 1 and weight.shape[1] * group == layout.width and self._single_space(layout):
            # Each output group reads its own block of inputs: blocks must lose equally.
            self.partition(layout.segments[0].space, group, node)  # type: ignore[arg-type]
            self.records.append(SliceRecord(node, 1, 1, layout, "sink", groups=group))
            self.sinks.append(Sink(node, layout))
        else:
            self.block(layout, f"Conv node {node.name} groups them in a way not followed (group={group})")

    @staticmethod
    def _single_space(layout: Layout) -> bool:
        """One run of one pruned space, one position per channel."""
        return len(layout.segments) == 1 and layout.segments[0].space is not None and layout.segments[0].repeat == 1

    def matmul_input(self, node: ir.Node, layout: Layout) -> None:
        weight = constant(node.inputs[1])
        if layout.axis != -1 or weight is None or weight.ndim != 2:
            self.block(
                layout, f"{node.op_type} node {node.name} multiplies them with a non-constant or by another axis"
            )
            return
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            self.block(layout, f"Gemm node {node.name} transposes its input")
            return
        self.records.append(SliceRecord(node, 1, weight_axes(node)[0], layout, "sink"))
        self.sinks.append(Sink(node, layout))

    def _channel_first(self, value: ir.Value | None, layout: Layout) -> bool:
        """Whether the layout's axis is axis 1 (NCHW channels) of `value`."""
        return value is not None and value.shape is not None and len(value.shape) + layout.axis == 1


def analyse_channels(model: ir.Model) -> ChannelAnalysis:
    """Find every channel group of a (shape-inferred) model and what removing its channels touches.

    Args:
        model: The model; value shapes should be inferred (ranks and static spatial sizes).

    Returns:
        The analysis; apply it with `pipeline.pruning.structured.remove_channels`.
    """
    walk = _Walk(model.graph)
    walk.run()
    space_of = {space: walk.find(space) for space in range(len(walk.parent))}
    groups: dict[int, ChannelGroup] = {}
    for root in space_of.values():
        if root not in groups:
            groups[root] = ChannelGroup(
                space=root,
                channels=walk.sizes[root],
                producers=walk.producers.get(root, []),
                blocked=walk.blocked.get(root),
                partitions=walk.partitions.get(root, 1),
            )
    for sink in walk.sinks:
        for root in {space_of[s.space] for s in sink.layout.segments if s.space is not None}:
            groups[root].sinks.append(sink)
    return ChannelAnalysis(
        groups=sorted(groups.values(), key=lambda g: g.space),
        records=walk.records,
        depthwise=walk.depthwise,
        reshapes=walk.reshapes,
        space_of=space_of,
    )


def attribute(node: ir.Node, name: str, default: int) -> int:
    """An integer attribute of a node, or `default` when it is not set."""
    value = node.attributes.get(name)
    return int(value.value) if value is not None else default


def weight_axes(node: ir.Node) -> tuple[int, int]:
    """(input-channel axis, output-channel axis) of a Conv, Gemm or MatMul's weight (input 1).

    Conv: [out, in / group, *kernel]; Gemm with transB: [out, in]; Gemm and MatMul: [in, out].
    """
    if node.op_type == "Conv" or (node.op_type == "Gemm" and attribute(node, "transB", 0)):
        return 1, 0
    return 0, 1


def _is_depthwise(node: ir.Node, weight: np.ndarray) -> bool:
    group = attribute(node, "group", 1)
    return group > 1 and weight.shape[1] == 1 and weight.shape[0] == group


def _static_dim(value: ir.Value | None, axis: int) -> int | None:
    """A value's dimension at a negative axis, when static."""
    if value is None or value.shape is None or len(value.shape) < -axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None
