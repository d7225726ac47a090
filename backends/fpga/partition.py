"""The partitioner: which nodes of a QDQ model run on the accelerator, which fall back to the CPU, and why."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from backends.base import QDQ_OPS
from backends.fpga.fixed_point import Fixed, align_channels, fraction_bits
from backends.fpga.profile import Arithmetic, FpgaProfile, OpLimits

CPU = "CPUExecutionProvider"

# What each input of a supported op must be: an int8 activation (DequantizeLinear of int8), a
# constant int8 weight, a constant int32 bias, a plain constant (axes, clip bounds), or a shape
# (a constant, or an integer tensor the CPU computed from dynamic dimensions).
Role = Literal["activation", "weight", "bias", "constant", "shape"]
_ROLES: dict[str, tuple[Role, ...]] = {
    "Conv": ("activation", "weight", "bias"),
    "Gemm": ("activation", "weight", "bias"),
    "MatMul": ("activation", "weight"),
    "Add": ("activation", "activation"),
    "Mul": ("activation", "activation"),
    "LayerNormalization": ("activation", "weight", "bias"),
    "Reshape": ("activation", "shape"),
    "Squeeze": ("activation", "constant"),
    "Unsqueeze": ("activation", "constant"),
    "Clip": ("activation", "constant", "constant"),
}
_SPATIAL = {"Conv", "MaxPool", "AveragePool"}


@dataclass
class AcceleratorNode:
    """A compute node the accelerator runs on integers.

    Attributes:
        node: The ONNX node (its float inputs are DequantizeLinear outputs).
        inputs: Per input: the integer tensor it reads, or None for a plain constant / absent input.
        outputs: The int8 tensors (QuantizeLinear outputs of its result) it writes directly.
        float_output: The float result it writes from its int32 accumulators (dequantized, for
            the CPU to read), when float nodes read the result; profiles say which ops may.
    """

    node: onnx.NodeProto
    inputs: list[Fixed | None]
    outputs: list[Fixed]
    float_output: str | None = None


@dataclass
class Segment:
    """A run of consecutive nodes (in graph order) on one device.

    Attributes:
        device: "accelerator" or "cpu".
        cpu_nodes: The nodes of a CPU segment.
        accelerator_nodes: The nodes of an accelerator segment.
    """

    device: Literal["accelerator", "cpu"]
    cpu_nodes: list[onnx.NodeProto] = field(default_factory=list)
    accelerator_nodes: list[AcceleratorNode] = field(default_factory=list)


@dataclass
class PartitionPlan:
    """The partition of one model.

    Attributes:
        decisions: Per node name: (device, reason); device is "accelerator", "cpu" or "absorbed"
            (a Q/DQ node the accelerator does not need: int8 flows between its own nodes).
        segments: What to run, in order.
        constants: Every constant of the graph by name (initializers and Constant nodes).
    """

    decisions: dict[str, tuple[str, str]]
    segments: list[Segment]
    constants: dict[str, np.ndarray]


class _Graph:
    """Producers, consumers and constants of a graph, looked up by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.outputs = {output.name for output in graph.output}
        self.opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)
        self.constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in self.nodes:
            value = _constant_value(node) if node.op_type == "Constant" else None
            if value is not None:
                self.constants[node.output[0]] = value
        self.producer = {name: node for node in self.nodes for name in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)

    def fixed_scale(
        self, node: onnx.NodeProto, dtypes: tuple[type[np.integer], ...], per_channel: bool = False
    ) -> tuple[int | np.ndarray, int] | str:
        """(Fraction bits, integer width) of a Q/DQ node's scale: one count, or one per channel when
        `per_channel` allows it; else why it does not fit the accelerator."""
        scale = self.constants.get(node.input[1])
        zero = self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or zero is None:
            return "its scale or zero point is not a constant"
        if scale.size != 1 and not per_channel:
            return "it has per-channel scales (the accelerator takes one scale per tensor)"
        if zero.dtype not in [np.dtype(dtype) for dtype in dtypes] or np.any(zero != 0):
            names = " or ".join(np.dtype(dtype).name for dtype in dtypes)
            return f"it is not symmetric {names} (zero point 0)"
        fracs = fraction_bits(scale)
        if fracs is None:
            return f"its scale {float(scale.reshape(-1)[0]):g} is not a power of two"
        return (int(fracs[0]) if scale.size == 1 else fracs), 8 * zero.dtype.itemsize

    def aligned(self, source: str, fracs: np.ndarray, dequantize: onnx.NodeProto) -> Fixed | str:
        """A per-channel constant as one tensor at its finest channel scale (kept with the constants)."""
        values = self.constants[source]
        axis = next((attr.i for attr in dequantize.attribute if attr.name == "axis"), 1) % max(values.ndim, 1)
        found = align_channels(values, fracs, axis)
        if found is None:
            return "its per-channel scales differ by more than the accelerator's alignment shift"
        aligned, frac_bits = found
        name = f"{source}@aligned"
        self.constants[name] = aligned
        return Fixed(name, frac_bits, 8 * values.dtype.itemsize)


def partition(model: onnx.ModelProto, profile: FpgaProfile) -> PartitionPlan:
    """Split a (QDQ) model into accelerator and CPU segments, with a reason for every CPU node.

    Decisions are keyed by node name, so unnamed (or twice-named) nodes of `model` are named in place.
    """
    name_nodes(model)
    graph = _Graph(model)
    decisions: dict[str, tuple[str, str]] = {}
    accelerated: dict[str, AcceleratorNode] = {}
    for node in graph.nodes:
        if node.op_type in QDQ_OPS or node.op_type == "Constant":
            continue
        found = _accelerate(graph, node, profile)
        if isinstance(found, str):
            decisions[node.name] = ("cpu", found)
        else:
            decisions[node.name] = ("accelerator", "")
            accelerated[node.name] = found
    # A Q/DQ node is not needed when only accelerator nodes touch it: int8 flows between them directly.
    for node in graph.nodes:
        if node.op_type == "Constant":
            known = node.output[0] in graph.constants
            decisions[node.name] = ("absorbed", "a constant") if known else ("cpu", "")
        elif node.op_type == "QuantizeLinear":
            producer = graph.producer.get(node.input[0])
            on_chip = producer is not None and producer.name in accelerated
            decisions[node.name] = ("absorbed", "written by the accelerator") if on_chip else ("cpu", "")
        elif node.op_type == "DequantizeLinear":
            users = graph.consumers[node.output[0]]
            on_chip = bool(users) and all(user.name in accelerated for user in users)
            on_chip = on_chip and node.output[0] not in graph.outputs
            decisions[node.name] = ("absorbed", "read by the accelerator as int8") if on_chip else ("cpu", "")
    return PartitionPlan(decisions, _segments(graph, decisions, accelerated), graph.constants)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed or duplicate-named node a stable name: ``<op or name>_<index>``."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_{index}"
        seen.add(node.name)


def _segments(
    graph: _Graph, decisions: dict[str, tuple[str, str]], accelerated: dict[str, AcceleratorNode]
) -> list[Segment]:
    """Consecutive nodes of one device, in graph (topological) order."""
    segments: list[Segment] = []
    for node in graph.nodes:
        device = decisions[node.name][0]
        if device == "absorbed":
            continue
        if not segments or segments[-1].device != device:
            segments.append(Segment("accelerator" if device == "accelerator" else "cpu"))
        if device == "accelerator":
            segments[-1].accelerator_nodes.append(accelerated[node.name])
        else:
            segments[-1].cpu_nodes.append(node)
    return segments


def _accelerate(graph: _Graph, node: onnx.NodeProto, profile: FpgaProfile) -> AcceleratorNode | str:
    """The node as the accelerator runs it, or why it cannot."""
    limits = profile.ops.get(node.op_type)
    if limits is None:
        return f"{node.op_type} is not in profile {profile.name}'s operators"
    problem = _attribute_problem(graph, node, limits)
    if problem:
        return problem
    inputs: list[Fixed | None] = []
    roles = _ROLES.get(node.op_type, ())
    if node.op_type == "MatMul" and limits.operands == "any" and _constant_behind(graph, node.input[1]) is None:
        roles = ("activation", "activation")  # attention: both operands are activations
    for index, name in enumerate(node.input):
        role = roles[index] if index < len(roles) else "activation"
        found = _input(graph, name, role, profile.arithmetic)
        if isinstance(found, str):
            return f"input {index} ({name}): {found}"
        inputs.append(found)
    return _with_outputs(graph, node, inputs, profile.arithmetic, limits.outputs == "int8_or_int32")


def _input(graph: _Graph, name: str, role: Role, arithmetic: Arithmetic) -> Fixed | None | str:
    if not name:
        return None
    if role == "constant":
        return None if name in graph.constants else "must be a constant"
    producer = graph.producer.get(name)
    if role == "shape":
        if name in graph.constants:
            return None
        if producer is not None and producer.op_type in QDQ_OPS:
            return "a shape must be an integer tensor, not a quantized one"
        return Fixed(name, 0)  # computed on the CPU from dynamic dimensions; read as integers
    if producer is None or producer.op_type != "DequantizeLinear":
        return "is float (not quantized)" if name not in graph.constants else "is a float constant (not quantized)"
    source = producer.input[0]
    if role in ("weight", "bias") and source not in graph.constants:
        kind = "weight" if role == "weight" else "bias"
        return f"the {kind} is computed (the accelerator needs a constant {kind})"
    per_channel = role in ("weight", "bias") and arithmetic.per_channel_weights
    found = graph.fixed_scale(producer, _dtypes(role, arithmetic), per_channel)
    if isinstance(found, str):
        return found
    frac_bits, bits = found
    if isinstance(frac_bits, np.ndarray):
        return graph.aligned(source, frac_bits, producer)
    return Fixed(source, frac_bits, bits)


def _dtypes(role: Role, arithmetic: Arithmetic) -> tuple[type[np.integer], ...]:
    """The integer types an input of this role may have on the profile's datapath."""
    if role == "bias":
        return (np.int32,)
    if role == "weight":
        return (np.int8,)
    return (np.int8, np.int16) if 16 in arithmetic.activation_bits else (np.int8,)


def _with_outputs(
    graph: _Graph, node: onnx.NodeProto, inputs: list[Fixed | None], arithmetic: Arithmetic, wide_output: bool
) -> AcceleratorNode | str:
    used = [name for name in node.output[1:] if name and (graph.consumers[name] or name in graph.outputs)]
    if used:
        return f"its extra output {used[0]} is used"
    result = node.output[0]
    float_readers = [user for user in graph.consumers[result] if user.op_type != "QuantizeLinear"]
    read_in_float = bool(float_readers) or result in graph.outputs
    if read_in_float and not wide_output:
        if result in graph.outputs:
            return f"its output {result} is a graph output in float"
        user = float_readers[0]
        return f"its output {result} is read in float by {user.op_type} node {user.name}"
    outputs = []
    for user in graph.consumers[result]:
        if user.op_type != "QuantizeLinear":
            continue
        found = graph.fixed_scale(user, _dtypes("activation", arithmetic))
        if isinstance(found, str):
            return f"the QuantizeLinear of its output: {found}"
        frac_bits, bits = found
        assert isinstance(frac_bits, int)  # one scale: per-channel was not allowed
        outputs.append(Fixed(user.output[0], frac_bits, bits))
    if not outputs and not read_in_float:
        return f"its output {result} is not quantized"
    return AcceleratorNode(node, inputs, outputs, result if read_in_float else None)


def _attribute_problem(graph: _Graph, node: onnx.NodeProto, limits: OpLimits) -> str:
    """Why the node's attributes are beyond the profile's limits ("" when they are not).

    Spatial ops (Conv, pools) first pass the checks they share (padding mode, a 2-D kernel, the
    profile's size limits); then the op's own check in `_OP_CHECKS`, if it has one, runs.
    """
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type in _SPATIAL:
        problem = _spatial_problem(graph, node, attrs, limits)
        if problem:
            return problem
    check = _OP_CHECKS.get(node.op_type)
    return check(graph, node, attrs, limits) if check is not None else ""


def _spatial_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    """What Conv, MaxPool and AveragePool share: explicit pads, floor mode, a 2-D kernel within limits."""
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return "auto_pad is set (export with explicit pads)"
    if attrs.get("ceil_mode", 0):
        return "ceil_mode = 1"
    kernel = list(attrs.get("kernel_shape", []))
    weight = _constant_behind(graph, node.input[1]) if node.op_type == "Conv" else None
    if weight is not None:
        kernel = kernel or list(weight.shape[2:])
    if len(kernel) != 2:
        return f"only 2-D {node.op_type} runs on the accelerator (kernel {kernel})"
    checks = (
        ("kernel", kernel, limits.kernel_max),
        ("stride", attrs.get("strides", []), limits.stride_max),
        ("dilation", attrs.get("dilations", []), limits.dilation_max),
        ("pad", attrs.get("pads", []), limits.pad_max),
    )
    for what, values, limit in checks:
        if limit is not None and values and max(values) > limit:
            return f"{what} {list(values)} exceeds the profile's {what}_max {limit}"
    return ""


def _matmul_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    if limits.operands == "any":
        return ""
    weight = _constant_behind(graph, node.input[1])
    if weight is None:
        return "both inputs are activations (e.g. attention scores); the accelerator's MatMul needs constant weights"
    if weight.ndim != 2:
        return f"its weight has rank {weight.ndim}; the accelerator's MatMul is a 2-D fully connected layer"
    return ""


def _gemm_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return "Gemm with transA, alpha or beta other than the defaults"
    return ""


def _average_pool_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    if any(attrs.get("pads", [])) and not attrs.get("count_include_pad", 0):
        return "padded AveragePool without count_include_pad"
    return ""


def _max_pool_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    return "dilated MaxPool" if any(d != 1 for d in attrs.get("dilations", [])) else ""


def _conv_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    return _group_problem(int(attrs.get("group", 1)), _constant_behind(graph, node.input[1]), limits)


def _last_axis_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    """LayerNormalization and Softmax run over the last axis only (the default of both since opset 13)."""
    axis = int(attrs.get("axis", -1))
    if node.op_type == "Softmax" and "axis" not in attrs and graph.opset < 13:
        return "Softmax before opset 13 flattens its input; the accelerator's unit runs over the last axis"
    if axis != -1:
        return f"{node.op_type} over axis {axis}; the accelerator's unit runs over the last axis (-1) only"
    return ""


def _gelu_problem(graph: _Graph, node: onnx.NodeProto, attrs: Mapping[str, Any], limits: OpLimits) -> str:
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return f"Gelu of domain {node.domain!r}"
    approximate = attrs.get("approximate", b"none")
    if approximate not in (b"none", b"tanh", "none", "tanh"):
        return f"Gelu with approximate = {approximate!r}"
    return ""


_OpCheck = Callable[[_Graph, onnx.NodeProto, Mapping[str, Any], OpLimits], str]
# Per op, what its own attributes must satisfy (after `_spatial_problem` for spatial ops).
_OP_CHECKS: dict[str, _OpCheck] = {
    "MatMul": _matmul_problem,
    "Gemm": _gemm_problem,
    "AveragePool": _average_pool_problem,
    "MaxPool": _max_pool_problem,
    "Conv": _conv_problem,
    "LayerNormalization": _last_axis_problem,
    "Softmax": _last_axis_problem,
    "Gelu": _gelu_problem,
}


def _group_problem(group: int, weight: np.ndarray | None, limits: OpLimits) -> str:
    if group == 1 or limits.groups == "any":
        return ""
    depthwise = weight is not None and weight.shape[1] == 1
    if limits.groups == "one_or_depthwise" and depthwise:
        return ""
    return f"grouped convolution (group {group}) beyond the profile's groups = {limits.groups!r}"


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node given as a tensor or as float / int scalars or lists (else None)."""
    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    dtypes = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    if attr.name in dtypes:
        return np.array(onnx.helper.get_attribute_value(attr), dtype=dtypes[attr.name])
    return None


def _constant_behind(graph: _Graph, name: str) -> np.ndarray | None:
    """The constant a tensor is, directly or through one DequantizeLinear (None if computed)."""
    if name in graph.constants:
        return graph.constants[name]
    producer = graph.producer.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return graph.constants.get(producer.input[0])
    return None
