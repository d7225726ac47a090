"""Structured pruning: choose the channels each group keeps, then remove the rest from the graph."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from pipeline.pruning.channels import ChannelAnalysis, constant


def kept_count(channels: int, ratio: float, round_to: int) -> int:
    """Channels to keep when removing `ratio` of them, rounded to a multiple of `round_to`.

    The count is rounded to the nearest multiple (at least one multiple, at most all channels),
    so hardware that computes `round_to` channels at a time is never left with a partial block.
    """
    keep = channels * (1.0 - ratio)
    if round_to > 1:
        keep = round(keep / round_to) * round_to
        keep = max(keep, round_to)
    return int(min(channels, max(1, math.floor(keep + 0.5))))


def global_kept_counts(scores: dict[int, np.ndarray], ratio: float, multiples: dict[int, int]) -> dict[int, int]:
    """Channels each group keeps when the lowest-scoring `ratio` of all their channels go.

    Each group's scores are divided by their mean first, since layers differ in scale; a group
    whose channels all rank low still keeps one block (or one channel).

    Args:
        scores: Channel scores by group space.
        ratio: Share of all the groups' channels to remove.
        multiples: Per group space, kept counts are rounded to a multiple of this.

    Returns:
        Kept channel count by group space.
    """
    normalised = {space: values / max(float(values.mean()), 1e-30) for space, values in scores.items()}
    pool = np.concatenate(list(normalised.values())) if normalised else np.zeros(0)
    removed = int(round(ratio * pool.size))
    if removed == 0:
        return {space: len(values) for space, values in normalised.items()}
    threshold = np.partition(pool, removed - 1)[removed - 1]
    counts = {}
    for space, values in normalised.items():
        share_removed = 1.0 - float((values > threshold).sum()) / len(values)
        counts[space] = kept_count(len(values), min(share_removed, 1.0 - 1e-9), multiples[space])
    return counts


def choose_channels(scores: np.ndarray, keep: int, partitions: int = 1) -> np.ndarray:
    """Indices of the `keep` highest-scoring channels, ascending (ties go to the lower index).

    With `partitions`, the channels form that many equal blocks (a grouped convolution's) and
    each block keeps the same number, its own best; `keep` must then be a multiple of it.
    """
    size, each = len(scores) // partitions, keep // partitions
    chosen = [
        block * size + np.argsort(-scores[block * size : (block + 1) * size], kind="stable")[:each]
        for block in range(partitions)
    ]
    return np.sort(np.concatenate(chosen))


def remove_channels(model: ir.Model, analysis: ChannelAnalysis, kept: dict[int, np.ndarray]) -> None:
    """Slice every constant the analysis recorded, update attributes and shapes, in place.

    Args:
        model: The model the analysis was made on.
        analysis: Its channel analysis.
        kept: Channels kept, by group space; groups not listed keep all their channels.
    """
    per_space = {space: kept[root] for space, root in analysis.space_of.items() if root in kept}
    for record in analysis.records:
        positions = record.layout.positions(per_space)
        if positions is not None:
            array = constant(own_input(model.graph, record.node, record.input_index))
            assert array is not None
            sliced = (
                _grouped_inputs(array, positions, record.layout.width, record.groups)
                if record.groups > 1
                else np.take(array, positions, axis=record.axis)
            )
            set_constant(record.node.inputs[record.input_index], sliced)
    for node, layout in analysis.depthwise:
        positions = layout.positions(per_space)
        if positions is not None:
            node.attributes["group"] = ir.AttrInt64("group", len(positions))
    for node, axis, layout in analysis.reshapes:
        positions = layout.positions(per_space)
        shape = constant(node.inputs[1])
        if positions is not None and shape is not None and int(shape[axis]) != -1:
            spatial = int(shape[axis]) // layout.width
            updated = shape.copy()
            updated[axis] = len(positions) * spatial
            own_input(model.graph, node, 1)
            set_constant(node.inputs[1], updated)
    refresh_shapes(model)


def _grouped_inputs(weight: np.ndarray, positions: np.ndarray, width: int, groups: int) -> np.ndarray:
    """A grouped Conv's weight [out, in/groups, ...] with each output group's own inputs kept."""
    per_group_in, per_group_out = width // groups, weight.shape[0] // groups
    blocks = []
    for group in range(groups):
        local = positions[(positions >= group * per_group_in) & (positions < (group + 1) * per_group_in)]
        rows = weight[group * per_group_out : (group + 1) * per_group_out]
        blocks.append(np.take(rows, local - group * per_group_in, axis=1))
    return np.concatenate(blocks, axis=0)


def refresh_shapes(model: ir.Model) -> None:
    """Forget the inferred shapes of intermediate values and infer them again."""
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for value in node.outputs:
            if value not in outputs:
                value.shape = None
    ShapeInferencePass()(model)


def own_input(graph: ir.Graph, node: ir.Node, index: int) -> ir.Value:
    """The node's constant input, copied first if other nodes read it too (they keep theirs)."""
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    if len(value.uses()) == 1:
        return value
    array = value.const_value.numpy().copy()
    copy = ir.Value(name=f"{value.name}.{node.name}", shape=ir.Shape(array.shape), type=value.type)
    copy.const_value = ir.tensor(array, name=copy.name)
    graph.register_initializer(copy)
    node.replace_input_with(index, copy)
    return copy


def set_constant(value: ir.Value | None, array: np.ndarray) -> None:
    """Replace a constant's data (and its shape)."""
    assert value is not None
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)
