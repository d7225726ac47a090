"""Channel importance: weight norms, or each channel's measured contribution to the next layers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import onnx_ir as ir

from pipeline.pruning.channels import ChannelAnalysis, ChannelGroup, Layout, attribute, constant, weight_axes
from pipeline.pruning.probe import Probe, channel_rows

Criterion = Literal["l1", "l2", "activation"]


def weight_scores(group: ChannelGroup, norm: Literal["l1", "l2"]) -> np.ndarray:
    """Per-channel weight norm of the group's producers, each normalised to mean 1, summed.

    Normalising lets producers tied by a residual connection count equally whatever their scale.
    """
    total = np.zeros(group.channels)
    for node in group.producers:
        weight = constant(node.inputs[1])
        assert weight is not None
        moved = np.moveaxis(weight.astype(np.float64), weight_axes(node)[1], 0).reshape(group.channels, -1)
        per_channel = np.abs(moved).sum(axis=1) if norm == "l1" else np.sqrt((moved**2).sum(axis=1))
        total += per_channel / max(per_channel.mean(), 1e-30)
    return total


def activation_scores(
    model: ir.Model,
    analysis: ChannelAnalysis,
    groups: list[ChannelGroup],
    batches: Iterable[Mapping[str, np.ndarray]],
    mask_input: str | None = None,
) -> dict[int, np.ndarray]:
    """Each channel's mean |activation| at the layers that read it, times their weights on it.

    That product estimates how much each channel adds to the next layers' outputs on real data,
    so a channel with large weights that is never active scores low.

    Args:
        model: The (shape-inferred) model before pruning.
        analysis: Its channel analysis.
        groups: The groups to score (prunable ones).
        batches: Calibration feed dicts.
        mask_input: The input holding a [batch, sequence] token mask: padding tokens are left
            out of the averages.

    Returns:
        Scores per group space.
    """
    sinks = {_input_name(sink.node): sink for group in groups for sink in group.sinks}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    probe = Probe(model, list(sinks))
    for feeds in batches:
        mask = feeds.get(mask_input) if mask_input else None
        for name, array in probe.run(feeds).items():
            rows = np.abs(channel_rows(array, sinks[name].layout.axis, mask)).astype(np.float64)
            sums[name] = sums.get(name, 0) + rows.sum(axis=0)
            counts[name] = counts.get(name, 0) + rows.shape[0]
    scores: dict[int, np.ndarray] = {}
    for group in groups:
        total = np.zeros(group.channels)
        for sink in group.sinks:
            name = _input_name(sink.node)
            mean_activation = sums[name] / max(counts[name], 1)
            contribution = mean_activation * _input_weight_norms(sink.node, sink.layout)
            total += _channels_of(contribution, sink.layout, group, analysis)
        scores[group.space] = total
    return scores


def _input_name(node: ir.Node) -> str:
    data = node.inputs[0]
    assert data is not None and data.name is not None
    return data.name


def _input_weight_norms(node: ir.Node, layout: Layout) -> np.ndarray:
    """L2 norm of a sink's weights on each input position."""
    weight = constant(node.inputs[1])
    assert weight is not None
    groups = attribute(node, "group", 1) if node.op_type == "Conv" else 1
    if groups > 1:
        # Each output group's rows read its own block of inputs.
        rows = weight.astype(np.float64).reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
        return np.sqrt((rows**2).sum(axis=(1, 3))).reshape(layout.width)
    moved = np.moveaxis(weight.astype(np.float64), weight_axes(node)[0], 0).reshape(layout.width, -1)
    return np.sqrt((moved**2).sum(axis=1))


def _channels_of(
    per_position: np.ndarray, layout: Layout, group: ChannelGroup, analysis: ChannelAnalysis
) -> np.ndarray:
    """Sum position scores into the group's channels (a flattened channel spans `repeat` positions)."""
    total = np.zeros(group.channels)
    offset = 0
    for segment in layout.segments:
        if segment.space is not None and analysis.space_of[segment.space] == group.space:
            block = per_position[offset : offset + segment.width].reshape(segment.size, segment.repeat)
            total += block.sum(axis=1)
        offset += segment.width
    return total
