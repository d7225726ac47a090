"""The accelerator's cost and memory model: cycles per node, latency per partition, and a liveness-based
activation memory plan (a pool with offsets reused once a tensor is dead) checked against the on-chip buffer."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from backends.estimate import AcceleratorPlan, Buffer, NodeCost, SegmentCost
from backends.fpga.partition import AcceleratorNode, PartitionPlan
from backends.fpga.profile import Compute, FpgaProfile

logger = logging.getLogger(__name__)

ALIGNMENT = 64  # bytes: buffer offsets are aligned to the memory port width
_LAYOUT_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # views: no data moves, no new buffer
_MAC_OPS = {"Conv", "Gemm", "MatMul"}

Shapes = Mapping[str, tuple[int, ...]]


def static_shapes(model: onnx.ModelProto, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes with every symbolic input dimension fixed (named in `dims`, else 1).

    ONNX's shape inference first; where it stops (contrib ops it does not know, such as a fused
    Gelu, or shapes computed from data), one ONNX Runtime run on zero inputs of those shapes
    measures the rest.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = dims.get(dim.dim_param, 1)
    del fixed.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape.dim):
            shapes[value.name] = tuple(d.dim_value for d in shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    missing = [name for node in model.graph.node for name in node.output if name and name not in shapes]
    if missing:
        shapes.update(_measured_shapes(fixed, missing))
    return shapes


def _measured_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of `names` in one CPU run of `model` (static input shapes) on zero inputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {value.name for value in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in known)
    feeds = {}
    for value in probe.graph.input:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[value.name] = np.zeros([d.dim_value for d in tensor.shape.dim], dtype=dtype)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception as e:  # noqa: BLE001 - the estimate then lacks these shapes; the partition stands
        logger.info("could not measure %d shapes for the cost estimate: %s", len(names), e)
        return {}
    return {name: tuple(value.shape) for name, value in zip(names, values, strict=True)}


def model_macs(model: onnx.ModelProto, shapes: Shapes) -> int | None:
    """Multiply-accumulates of every Conv / Gemm / MatMul, wherever it runs (None: a shape is unknown)."""
    total = 0
    for node in model.graph.node:
        if node.op_type in _MAC_OPS:
            macs = _macs(node, shapes)
            if macs is None:
                return None
            total += macs
    return total


def _macs(node: onnx.NodeProto, shapes: Shapes) -> int | None:
    out = shapes.get(node.output[0])
    operand = shapes.get(node.input[1] if node.op_type == "Conv" else node.input[0])
    if out is None or operand is None:
        return None
    if node.op_type == "Conv":
        return math.prod(out) * math.prod(operand[1:])  # input channels per group x kernel area
    transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
    return math.prod(out) * operand[-2 if transposed else -1]


def node_cost(item: AcceleratorNode, shapes: Shapes, compute: Compute) -> NodeCost:
    """MACs and cycles of one node on the profile's array (pixels x input channels x output channels)."""
    node = item.node
    out = shapes.get(node.output[0])
    operands = [shapes.get(name) for name in node.input[:2] if name]
    if out is None or (node.op_type in _MAC_OPS and None in operands):
        return NodeCost(node=node.name, op_type=node.op_type, macs=None, cycles=None)
    pp, icp, ocp = compute.pixel_parallelism, compute.input_channel_parallelism, compute.output_channel_parallelism
    elements = math.prod(out)
    if node.op_type == "Conv":
        weight = shapes[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        batch, channels, pixels = out[0], out[1], math.prod(out[2:])
        kernel_in = math.prod(weight[1:])  # input channels per group x kernel area
        macs = elements * kernel_in
        per_group_out = channels // group
        if group > 1 and weight[1] == 1:  # depthwise: one input channel per output channel
            cycles = batch * _up(pixels, pp) * _up(channels, ocp) * math.prod(weight[2:])
        else:
            cycles = batch * _up(pixels, pp) * group * _up(per_group_out, ocp) * _up(weight[1], icp)
            cycles *= math.prod(weight[2:])
    elif node.op_type in ("Gemm", "MatMul"):
        depth = shapes[node.input[0]][-1]
        rows = elements // out[-1]
        macs = elements * depth
        cycles = _up(rows, pp) * _up(out[-1], ocp) * _up(depth, icp)
    elif node.op_type in _LAYOUT_OPS:
        macs, cycles = 0, 0
    else:
        window = _window(node, shapes)
        macs = 0
        cycles = _up(elements, pp * ocp) * window
    return NodeCost(node=node.name, op_type=node.op_type, macs=macs, cycles=cycles)


def accelerator_plan(
    model: onnx.ModelProto, plan: PartitionPlan, profile: FpgaProfile, dims: Mapping[str, int]
) -> AcceleratorPlan:
    """Cycles, latency and the activation memory plan of every accelerator partition."""
    shapes = static_shapes(model, dims)
    segments: list[SegmentCost] = []
    costs: list[NodeCost] = []
    for index, segment in enumerate(plan.segments):
        if segment.device != "accelerator":
            continue
        items = segment.accelerator_nodes
        node_costs = [node_cost(item, shapes, profile.compute) for item in items]
        costs += node_costs
        buffers = plan_buffers(items, shapes, plan.constants)
        cycles = sum(c.cycles or 0 for c in node_costs)
        peak = max((b.offset + b.bytes for b in buffers), default=0)
        segments.append(
            SegmentCost(
                index=index,
                nodes=[item.node.name for item in items],
                macs=sum(c.macs or 0 for c in node_costs),
                cycles=cycles,
                latency_us=round(cycles / profile.compute.clock_mhz, 3),
                peak_activation_bytes=peak,
                unshared_activation_bytes=sum(b.bytes for b in buffers),
                fits=peak <= profile.memory.activation_buffer_kib * 1024,
                buffers=buffers,
                weight_bytes=_weight_bytes(items, plan.constants),
            )
        )
    cycles = sum(s.cycles for s in segments)
    macs = sum(s.macs for s in segments)
    weight_bytes = sum(s.weight_bytes for s in segments)
    return AcceleratorPlan(
        profile=profile.name,
        description=profile.description,
        dims=dict(dims),
        segments=segments,
        node_costs=costs,
        cycles=cycles,
        latency_us=round(cycles / profile.compute.clock_mhz, 3),
        macs=macs,
        utilization=round(macs / (cycles * profile.compute.macs_per_cycle), 4) if cycles else 0.0,
        peak_activation_bytes=max((s.peak_activation_bytes for s in segments), default=0),
        activation_buffer_bytes=profile.memory.activation_buffer_kib * 1024,
        fits=all(s.fits for s in segments),
        weight_bytes=weight_bytes,
        weight_buffer_bytes=profile.memory.weight_buffer_kib * 1024,
        weights_fit=weight_bytes <= profile.memory.weight_buffer_kib * 1024,
        unknown_shapes=[c.node for c in costs if c.cycles is None],
        model_macs=(total := model_macs(model, shapes)),
        mac_share=round(macs / total, 4) if total else None,
    )


def plan_buffers(items: list[AcceleratorNode], shapes: Shapes, constants: Mapping[str, np.ndarray]) -> list[Buffer]:
    """Place a partition's int8 activations in one pool: each lives from the step that writes it (0 for
    the partition's inputs) to the last step that reads it (the end for its outputs); a tensor takes the
    lowest aligned offset free for its whole life (first fit); views (reshapes) share their input's buffer."""
    steps = len(items)
    root: dict[str, str] = {}  # a view's tensor -> the tensor that owns the buffer
    life: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    written = {out.tensor for item in items for out in item.outputs}
    for step, item in enumerate(items):
        # (int8 tensor, the float tensor its shape is recorded under) for each activation read.
        activations = [
            (fixed.tensor, item.node.input[index])
            for index, fixed in enumerate(item.inputs)
            if fixed is not None and fixed.tensor not in constants
        ]
        for name, float_name in activations:
            owner = root.get(name, name)
            life.setdefault(owner, [0, step])[1] = step
            sizes.setdefault(owner, _bytes(float_name, shapes))
        for out in item.outputs:
            if item.node.op_type in _LAYOUT_OPS and activations:
                root[out.tensor] = root.get(activations[0][0], activations[0][0])
                continue
            life[out.tensor] = [step, step]
            sizes[out.tensor] = _bytes(item.node.output[0], shapes)
    read_inside = {f.tensor for item in items for f in item.inputs if f is not None}
    for name in written - read_inside:  # results that leave the partition stay until it ends
        owner = root.get(name, name)
        if owner in life:
            life[owner][1] = steps
    placed: list[Buffer] = []
    for name in sorted(life, key=lambda n: (life[n][0], -sizes[n])):
        first, last = life[name]
        busy = sorted((b.offset, b.offset + b.bytes) for b in placed if b.first_step <= last and first <= b.last_step)
        offset = 0
        for start, end in busy:
            if offset + sizes[name] <= start:
                break
            offset = max(offset, _align(end))
        placed.append(Buffer(tensor=name, bytes=sizes[name], offset=offset, first_step=first, last_step=last))
    return placed


def _bytes(name: str, shapes: Shapes) -> int:
    shape = shapes.get(name)
    return math.prod(shape) if shape is not None else 0  # int8: one byte per element


def _weight_bytes(items: list[AcceleratorNode], constants: Mapping[str, np.ndarray]) -> int:
    total = 0
    for item in items:
        if item.node.op_type in ("Conv", "Gemm", "MatMul"):
            for fixed in item.inputs[1:]:
                if fixed is not None and fixed.tensor in constants:
                    total += constants[fixed.tensor].nbytes
    return total


def _window(node: onnx.NodeProto, shapes: Shapes) -> int:
    if node.op_type == "GlobalAveragePool":
        return math.prod(shapes.get(node.input[0], (1, 1))[2:])
    kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [])
    return math.prod(kernel) if kernel else 1


def _up(count: int, parallelism: int) -> int:
    return -(-count // parallelism)


def _align(offset: int) -> int:
    return _up(offset, ALIGNMENT) * ALIGNMENT
