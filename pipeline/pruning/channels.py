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

import numpy as np
import onnx_ir as ir

# The records and node helpers live beside the walk; importers keep reading them from here.
from pipeline.pruning.groups import ChannelAnalysis, ChannelGroup, Layout, Segment, Sink, SliceRecord
from pipeline.pruning.nodes import attribute, constant, is_depthwise, layer_name, static_dim, weight_axes

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "Layout",
    "Segment",
    "SliceRecord",
    "Sink",
    "analyse_channels",
    "attribute",
    "constant",
    "layer_name",
    "weight_axes",
]

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
        """Carry the layouts of a node's tracked inputs to its output, or block them."""
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        data_only = [index for index, _ in tracked] == [0]
        if data_only and self.visit_data_input(node, op, tracked[0][1]):
            return
        if op in _ELEMENTWISE:
            self.elementwise(node, tracked)
        elif op == "Concat":
            self.concat(node, tracked)
        else:
            for _, each in tracked:
                self.block(each, f"feeds {op} node {node.name}")

    def visit_data_input(self, node: ir.Node, op: str, layout: Layout) -> bool:
        """Follow a layout that reaches only the node's data input (input 0).

        Returns:
            Whether the op is one followed this way (False: the caller handles it or blocks).
        """
        if op in _PER_CHANNEL_UNARY:
            self.keep_layout(node, layout, f"{op} node {node.name} has a second output in use")
        elif op in _POOLS and self._channel_first(node.inputs[0], layout):
            self.keep_layout(node, layout, f"{op} node {node.name} returns indices")
        elif op in _CHANNEL_PARAMETERS and self._channel_first(node.inputs[0], layout):
            self.normalisation(node, op, layout)
        elif op in ("Flatten", "Reshape"):
            self.flatten(node, layout)
        elif op == "Conv":
            self.conv_input(node, layout)
        elif op in ("Gemm", "MatMul"):
            self.matmul_input(node, layout)
        else:
            return False
        return True

    def keep_layout(self, node: ir.Node, layout: Layout, extra_output: str) -> None:
        """A per-channel op: output 0 has the input's layout; blocked (`extra_output`) when a further
        output (a pool's indices, say) is in use, since it is not followed."""
        if any(output.uses() for output in node.outputs[1:]):
            self.block(layout, extra_output)
        else:
            self.layouts[node.outputs[0]] = layout

    def normalisation(self, node: ir.Node, op: str, layout: Layout) -> None:
        """BatchNormalization / InstanceNormalization over axis 1: its per-channel parameters follow."""
        if not all(constant(node.inputs[i]) is not None for i in _CHANNEL_PARAMETERS[op]):
            self.block(layout, f"{op} node {node.name} has non-constant parameters")
            return
        for index in _CHANNEL_PARAMETERS[op]:
            self.records.append(SliceRecord(node, index, 0, layout, "follower"))
        self.layouts[node.outputs[0]] = layout

    def maybe_produce(self, node: ir.Node) -> None:
        """Give a Conv / Gemm / MatMul with constant weights a new output channel space."""
        if node.domain not in ("", "ai.onnx") or not node.outputs or node.inputs[0] is None:
            return
        weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim < 2:
            return
        shape = node.outputs[0].shape
        if node.op_type == "Conv" and shape is not None:
            self.produce_conv(node, weight, len(shape))
        elif node.op_type == "Gemm" and not attribute(node, "transA", 0) and weight.ndim == 2:
            self.produce_gemm(node, weight)
        elif node.op_type == "MatMul" and weight.ndim == 2:
            space = self.new_space(weight.shape[1], node)
            layout = Layout((Segment(space, weight.shape[1]),), -1)
            self.records.append(SliceRecord(node, 1, 1, layout, "producer"))
            self.layouts[node.outputs[0]] = layout

    def produce_conv(self, node: ir.Node, weight: np.ndarray, rank: int) -> None:
        """A Conv's output channels (weight axis 0, and the bias) as a new space."""
        if is_depthwise(node, weight):
            return  # its channels are its input's (handled in conv_input)
        group = attribute(node, "group", 1)
        space = self.new_space(weight.shape[0], node)
        if group > 1:  # each group keeps the same number of output channels
            self.partition(space, group, node)
        layout = Layout((Segment(space, weight.shape[0]),), 1 - rank)
        self.records.append(SliceRecord(node, 1, 0, layout, "producer"))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.records.append(SliceRecord(node, 2, 0, layout, "producer"))
        self.layouts[node.outputs[0]] = layout

    def produce_gemm(self, node: ir.Node, weight: np.ndarray) -> None:
        """A Gemm's output channels as a new space; a constant C follows them."""
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
        self.layouts[node.outputs[0]] = layout

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
            width = static_dim(value, channel_axis)
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
        trailing = [static_dim(source, axis - rank) for axis in range(first + 1, rank)]
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
                    or int(d) == static_dim(source, i - rank)
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
        elif is_depthwise(node, weight) and weight.shape[0] == layout.width:
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
