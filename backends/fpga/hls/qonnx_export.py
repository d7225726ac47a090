"""The accelerator partition of an int8 model written as a QONNX model with power-of-two scales.

The QONNX graph is the integer graph between the partition's int8 inputs and outputs: each graph
input is quantized by a ``Quant`` node with the input's scale (an exact identity on the values the
CPU part hands over); every accelerator node reads ``Quant``-ed initializers (int8 weights, int32
biases, their values the integers times their power-of-two scales) and its result is quantized by
a ``Quant`` node per output (8 bits, or 16 for an int16 activation), rounding as the profile's
shifter does. hls4ml reads each ``Quant`` as an ``ap_fixed<bits, bits - frac_bits>`` type, so the
fixed-point types follow from the scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from backends.errors import BackendError
from backends.fpga.fixed_point import Fixed
from backends.fpga.partition import AcceleratorNode, PartitionPlan, Segment
from backends.fpga.profile import Rounding

QUANT_DOMAIN = "qonnx.custom_op.general"
# The default-domain opset of the QONNX graph: what qonnx's transforms and hls4ml's reader expect.
OPSET = 13
# Quant's rounding_mode for the profile's rounding; hls4ml maps ROUND to AP_RND_CONV, FLOOR to AP_TRN.
QUANT_ROUNDING: dict[str, str] = {"half_even": "ROUND", "floor": "FLOOR"}
EXPORTABLE_OPS = ("Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Add", "Reshape", "Flatten")
HINT = f"set hls = false for this target; the export takes one accelerator partition of {', '.join(EXPORTABLE_OPS)}"


@dataclass(frozen=True)
class QonnxPartition:
    """The exported partition.

    Attributes:
        model: The QONNX model (channels first as in the int8 model, batch 1).
        inputs: The int8 tensors of the int8 model it reads, in the order of its graph inputs.
        outputs: The int8 tensors it writes, in the order of its graph outputs.
        nodes: The int8 model's accelerator nodes it holds, in order.
    """

    model: onnx.ModelProto
    inputs: tuple[Fixed, ...]
    outputs: tuple[Fixed, ...]
    nodes: tuple[str, ...]


def export_problem(message: str) -> BackendError:
    """The error for a partition the export cannot write (exit 2, with what to do)."""
    return BackendError("fpga", f"cannot export the accelerator partition to hls4ml: {message}", HINT)


def accelerator_segment(plan: PartitionPlan) -> Segment:
    """The model's one accelerator segment.

    Raises:
        BackendError: Nothing runs on the accelerator, or it runs several separate segments.
    """
    segments = [segment for segment in plan.segments if segment.device == "accelerator"]
    if not segments:
        raise export_problem("no node of the model runs on the accelerator (everything falls back to the CPU)")
    if len(segments) > 1:
        spans = "; ".join(
            f"{s.accelerator_nodes[0].node.name} .. {s.accelerator_nodes[-1].node.name}" for s in segments
        )
        raise export_problem(
            f"the accelerator runs {len(segments)} separate segments ({spans}) with CPU nodes between them; "
            "the export writes one contiguous partition"
        )
    return segments[0]


def boundary(model: onnx.ModelProto, plan: PartitionPlan, segment: Segment) -> tuple[list[Fixed], list[Fixed]]:
    """The int8 tensors a segment reads from outside and those read after it (by CPU nodes or as graph outputs)."""
    produced = {fixed.tensor: fixed for item in segment.accelerator_nodes for fixed in item.outputs}
    inputs: dict[str, Fixed] = {}
    for item in segment.accelerator_nodes:
        for fixed in item.inputs:
            if fixed is not None and fixed.tensor not in plan.constants and fixed.tensor not in produced:
                inputs.setdefault(fixed.tensor, fixed)
    read_outside = {value.name for value in model.graph.output}
    for node in model.graph.node:
        if plan.decisions.get(node.name, ("cpu", ""))[0] == "cpu":
            read_outside.update(node.input)
    outputs = [fixed for name, fixed in produced.items() if name in read_outside]
    return list(inputs.values()), outputs


class _Writer:
    """Collects the QONNX graph's nodes and initializers."""

    def __init__(self, plan: PartitionPlan, rounding: str) -> None:
        self.plan = plan
        self.rounding = rounding
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.setdefault(name, numpy_helper.from_array(array, name))
        return name

    def quant(self, source: str, target: str, frac_bits: int, bits: int) -> str:
        """``target = Quant(source)`` to `bits` signed bits with scale 2**-frac_bits."""
        suffix = f"m{-frac_bits}" if frac_bits < 0 else str(frac_bits)
        scale = self.constant(f"quant_scale_{suffix}", np.array(2.0**-frac_bits, dtype=np.float32))
        zero = self.constant("quant_zero", np.array(0.0, dtype=np.float32))
        width = self.constant(f"quant_bits_{bits}", np.array(float(bits), dtype=np.float32))
        self.nodes.append(
            helper.make_node(
                "Quant",
                [source, scale, zero, width],
                [target],
                name=f"{target}_quant",
                domain=QUANT_DOMAIN,
                signed=1,
                narrow=0,
                rounding_mode=self.rounding,
            )
        )
        return target

    def parameter(self, fixed: Fixed) -> str:
        """A Quant-ed initializer: the integers times their scale, quantized back to their width."""
        integers = self.plan.constants[fixed.tensor]
        bits = max(fixed.bits, _signed_bits(integers))
        values = (integers.astype(np.float64) * 2.0**-fixed.frac_bits).astype(np.float32)
        source = self.constant(f"{fixed.tensor}_value", values)
        return self.quant(source, f"{fixed.tensor}_quantized_value", fixed.frac_bits, bits)

    def node(self, item: AcceleratorNode) -> None:
        """One accelerator node on Quant-ed inputs, its result quantized once per int8 output."""
        node = item.node
        inputs = []
        for name, fixed in zip(node.input, item.inputs, strict=False):
            if fixed is None:
                inputs.append(self.constant(name, self.plan.constants[name]) if name else "")
            elif fixed.tensor in self.plan.constants:
                inputs.append(self.parameter(fixed))
            else:
                inputs.append(fixed.tensor)
        result = f"{node.output[0]}_wide"
        self.nodes.append(helper.make_node(node.op_type, inputs, [result], name=node.name, **_attributes(item, self)))
        for fixed in item.outputs:
            self.quant(result, fixed.tensor, fixed.frac_bits, fixed.bits)


def export_qonnx(
    model: onnx.ModelProto, plan: PartitionPlan, rounding: Rounding, shapes: Mapping[str, Sequence[int]]
) -> QonnxPartition:
    """Write the model's accelerator partition as a QONNX model.

    Args:
        model: The int8 (QDQ) model, as partitioned.
        plan: Its partition.
        rounding: The profile's rounding of requantization shifts.
        shapes: The shape of each tensor at the partition's boundary (from a run; the batch
            dimension is set to 1).

    Raises:
        BackendError: The partition cannot be exported (none or several accelerator segments, an
            operator or attribute the hls4ml reader does not take, a rounding it has no type for).
    """
    if rounding not in QUANT_ROUNDING:
        raise export_problem(
            f"the profile rounds requantization {rounding}; hls4ml's QONNX reader has fixed-point types only for "
            "half_even (Quant ROUND, AP_RND_CONV) and floor (Quant FLOOR, AP_TRN)"
        )
    segment = accelerator_segment(plan)
    for item in segment.accelerator_nodes:
        problem = _unsupported(item, plan)
        if problem:
            raise export_problem(f"node {item.node.name} ({item.node.op_type}): {problem}")
    inputs, outputs = boundary(model, plan, segment)
    writer = _Writer(plan, QUANT_ROUNDING[rounding])
    for fixed in inputs:
        writer.quant(f"{fixed.tensor}_input", fixed.tensor, fixed.frac_bits, fixed.bits)
    for item in segment.accelerator_nodes:
        writer.node(item)
    graph = helper.make_graph(
        writer.nodes,
        f"{model.graph.name or 'model'}_accelerator",
        [_value_info(f"{fixed.tensor}_input", shapes[fixed.tensor]) for fixed in inputs],
        [_value_info(fixed.tensor, shapes[fixed.tensor]) for fixed in outputs],
        initializer=list(writer.initializers.values()),
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(QUANT_DOMAIN, 1)]
    qonnx = helper.make_model(graph, opset_imports=opsets, producer_name="onnxforge")
    nodes = tuple(item.node.name for item in segment.accelerator_nodes)
    return QonnxPartition(qonnx, tuple(inputs), tuple(outputs), nodes)


def _signed_bits(integers: np.ndarray) -> int:
    """The fewest signed bits that hold every value (an aligned per-channel weight may outgrow its type)."""
    if integers.size == 0:
        return 1
    high, low = int(integers.max()), int(integers.min())
    return max(high.bit_length(), (-low - 1).bit_length()) + 1


def _value_info(name: str, shape: Sequence[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, *list(shape)[1:]])


def _unsupported(item: AcceleratorNode, plan: PartitionPlan) -> str:
    """Why hls4ml's reader cannot take this node as the emulator runs it ("" when it can)."""
    node = item.node
    if node.op_type not in EXPORTABLE_OPS:
        return f"{node.op_type} has no layer in hls4ml's ONNX reader that the export maps to"
    if item.float_output is not None:
        return "its result leaves the accelerator in float (dequantized int32 accumulators); the export writes int8"
    attrs = _raw_attributes(node)
    if node.op_type == "Conv" and int(attrs.get("group", 1)) != 1:
        return "grouped convolution (the export writes plain convolutions only)"
    if node.op_type == "MaxPool" and any(attrs.get("pads", [])):
        return "padded MaxPool (hls4ml pads with zeros, the accelerator with the lowest value)"
    if node.op_type == "Reshape":
        shape = plan.constants.get(node.input[1])
        if shape is None or (attrs.get("allowzero", 0) and 0 in shape.tolist()):
            return "its shape is computed or has allowzero = 1 with a 0 dimension"
    weight = item.inputs[1] if node.op_type in ("Conv", "Gemm", "MatMul") and len(item.inputs) > 1 else None
    if weight is not None and weight.tensor not in plan.constants:
        return "both operands are activations (the export maps constant weights only, to hls4ml's Dense / Conv)"
    return ""


def _raw_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def _attributes(item: AcceleratorNode, writer: _Writer) -> dict[str, Any]:
    """The node's attributes as opset 13 spells them, defaults made explicit (hls4ml reads them all)."""
    node = item.node
    attrs = _raw_attributes(node)
    if node.op_type == "Conv":
        weight = writer.plan.constants[_fixed(item, 1).tensor]
        kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
        return {
            "kernel_shape": kernel,
            "strides": list(attrs.get("strides", [1] * len(kernel))),
            "dilations": list(attrs.get("dilations", [1] * len(kernel))),
            "pads": list(attrs.get("pads", [0] * 2 * len(kernel))),
            "group": 1,
        }
    if node.op_type == "MaxPool":
        kernel = list(attrs["kernel_shape"])
        return {
            "kernel_shape": kernel,
            "strides": list(attrs.get("strides", [1] * len(kernel))),
            "pads": [0] * 2 * len(kernel),
        }
    if node.op_type == "Gemm":
        return {"transB": int(attrs.get("transB", 0))}
    if node.op_type == "Flatten":
        return {"axis": int(attrs.get("axis", 1))}
    return {}


def _fixed(item: AcceleratorNode, index: int) -> Fixed:
    found = item.inputs[index]
    assert found is not None, f"{item.node.name}: input {index} is no integer tensor"
    return found
