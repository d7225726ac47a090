"""The graph side of weight-only quantization, on onnx-ir: what can be quantized, and the rewrites.

`find_targets` lists the MatMuls with a constant 2-D float weight, the embedding Gathers, and
the LM head (the MatMul that produces the logits). The rewrites replace a MatMul by ONNX
Runtime's ``MatMulNBits`` or feed it a blocked ``DequantizeLinear`` (QDQ), and a Gather by
``GatherBlockQuantized`` or a ``DequantizeLinear`` of its table. Weights are read from the
loaded model, where onnx-ir memory-maps external data: one weight at a time is in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pipeline.quantization.weight_only_blocks import BlockCodes, gather_tensors, to_matmul_nbits, to_qdq

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Blocked DequantizeLinear and int4 tensors: opset 21, IR version 10.
QDQ_OPSET = 21
INT4_IR_VERSION = 10
# From opset 18 (reductions' axes as inputs) to 21 no op this pipeline's exports use changed
# meaning, so a model of opset 18 to 20 is declared 21 for the QDQ form, as ONNX Runtime's
# quantizer does; an older one is refused.
LOWEST_BUMPABLE_OPSET = 18
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
# Ops between the LM head's MatMul and the logits output that do not change which MatMul it is.
_PASS_THROUGH = frozenset({"Add", "Cast", "Div", "Identity", "Mul", "Reshape", "Squeeze", "Tanh", "Unsqueeze"})


@dataclass(frozen=True)
class MatMulTarget:
    """A MatMul whose second input is a constant [K, N] float weight.

    Attributes:
        node: Node name.
        weight: The weight initializer's name.
        activation: The first input's name (what calibration measures).
        rows: K, the input channels.
        cols: N, the output channels.
    """

    node: str
    weight: str
    activation: str
    rows: int
    cols: int


@dataclass(frozen=True)
class GatherTarget:
    """A Gather on a constant [V, H] float table (an embedding).

    Attributes:
        node: Node name.
        table: The table initializer's name.
        rows: V.
        cols: H (the axis blocks run along).
    """

    node: str
    table: str
    rows: int
    cols: int


@dataclass(frozen=True)
class Targets:
    """What a model offers weight-only quantization.

    Attributes:
        matmuls: MatMuls with constant weights, in graph order.
        embeddings: Gathers on constant tables.
        lm_head: The MatMul that produces the logits (None: none found).
        skipped: MatMuls left alone, with why (activation x activation ones are not listed).
    """

    matmuls: list[MatMulTarget]
    embeddings: list[GatherTarget]
    lm_head: str | None
    skipped: dict[str, str] = field(default_factory=dict)

    def matmul(self, name: str) -> MatMulTarget:
        """The target of a node name."""
        return next(target for target in self.matmuls if target.node == name)


def name_nodes(model: ir.Model) -> None:
    """Give unnamed nodes a name from their op type and graph position (stable across loads)."""
    for index, node in enumerate(model.graph):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def constant_matrix(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer that is a 2-D float matrix and not also a graph input."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor.dtype not in _FLOAT_TYPES or len(tensor.shape) != 2:
        return None
    return tensor


def find_targets(model: ir.Model, logits: str = "logits") -> Targets:
    """The MatMuls, embeddings and LM head of a model whose nodes are named (`name_nodes`)."""
    matmuls: list[MatMulTarget] = []
    embeddings: list[GatherTarget] = []
    skipped: dict[str, str] = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) == 2:
            weight = node.inputs[1]
            tensor = constant_matrix(weight)
            if weight is not None and weight.const_value is not None and tensor is None:
                skipped[node.name or ""] = "weight is not a 2-D float32 / float16 matrix"
            elif tensor is not None and weight is not None and node.inputs[0] is not None:
                rows, cols = tensor.shape.numpy()
                matmuls.append(MatMulTarget(node.name or "", weight.name or "", node.inputs[0].name or "", rows, cols))
        elif node.op_type == "Gather" and node.domain == "" and node.attributes.get_int("axis", 0) == 0:
            tensor = constant_matrix(node.inputs[0])
            if tensor is not None and node.inputs[0] is not None:
                rows, cols = tensor.shape.numpy()
                embeddings.append(GatherTarget(node.name or "", node.inputs[0].name or "", rows, cols))
    names = {target.node for target in matmuls}
    head = _lm_head(model, logits)
    return Targets(matmuls, embeddings, head if head in names else None, skipped)


def _lm_head(model: ir.Model, logits: str) -> str | None:
    outputs = [value for value in model.graph.outputs if value.name == logits] or list(model.graph.outputs[:1])
    value: ir.Value | None = outputs[0] if outputs else None
    while value is not None and value.producer() is not None:
        node = value.producer()
        assert node is not None
        if node.op_type in ("MatMul", "Gemm"):
            return node.name
        if node.op_type not in _PASS_THROUGH:
            return None
        value = next((v for v in node.inputs if v is not None and v.const_value is None), None)
    return None


def weight_array(model: ir.Model, name: str) -> np.ndarray:
    """An initializer as numpy (a read-only memory map when it lives in external data)."""
    tensor = model.graph.initializers[name].const_value
    assert tensor is not None
    return tensor.numpy()


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(value.const_value.dtype)  # type: ignore[union-attr]
    model.graph.register_initializer(value)
    return value


def _unique(model: ir.Model, base: str) -> str:
    name, index = base, 1
    while name in model.graph.initializers:
        name, index = f"{base}_{index}", index + 1
    return name


def _drop_if_unused(model: ir.Model, name: str) -> None:
    value = model.graph.initializers.get(name)
    if value is not None and not value.uses() and not value.is_graph_output():
        del model.graph.initializers[name]


def to_matmul_nbits_node(model: ir.Model, node: ir.Node, codes: BlockCodes, accuracy_level: int) -> None:
    """Replace a MatMul by ``MatMulNBits`` (com.microsoft) holding `codes`."""
    weight = node.inputs[1]
    assert weight is not None and weight.name is not None
    new = _matmul_nbits(model, node.inputs[0], codes, accuracy_level, weight.name, f"{node.name}_Q{codes.bits}")
    _swap(model, node, new)
    _drop_if_unused(model, weight.name)


def to_joined_matmul_nbits(
    model: ir.Model, nodes: Sequence[ir.Node], parts: Sequence[BlockCodes], accuracy_level: int
) -> None:
    """Replace MatMuls of one activation (a layer's query, key and value projections; its gate and
    up projections) by one ``MatMulNBits`` over their weights side by side and a ``Split`` of its
    output: one kernel call instead of several at each decode step, on the same codes."""
    first = nodes[0]
    weights = [node.inputs[1] for node in nodes]
    names = [str(weight.name) for weight in weights if weight is not None]
    joined = BlockCodes.side_by_side(parts)
    fused_name = "+".join(str(node.name) for node in nodes) + f"_Q{joined.bits}"
    fused = _matmul_nbits(model, first.inputs[0], joined, accuracy_level, f"{names[0]}_joined", fused_name)
    widths = ir.tensor(np.array([part.shape[1] for part in parts], dtype=np.int64))
    sizes = ir.node("Constant", [], {"value": widths}, name=f"{fused_name}_widths")
    split = ir.node(
        "Split", [fused.outputs[0], sizes.outputs[0]], {"axis": -1}, num_outputs=len(parts), name=f"{fused_name}_split"
    )
    model.graph.insert_before(first, [fused, sizes, split])
    for node, part in zip(nodes, split.outputs, strict=True):
        before = node.outputs[0]
        part.type, part.shape, name = before.type, before.shape, before.name
        before.replace_all_uses_with(part, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        part.name = name
    for name in names:
        _drop_if_unused(model, name)


def _matmul_nbits(
    model: ir.Model, activation: ir.Value | None, codes: BlockCodes, accuracy_level: int, weight: str, name: str
) -> ir.Node:
    """A ``MatMulNBits`` node on `activation` holding `codes` (its initializers named after `weight`)."""
    packed, scales, zeros = to_matmul_nbits(codes)
    inputs = [
        activation,
        _initializer(model, _unique(model, f"{weight}_Q{codes.bits}"), packed),
        _initializer(model, _unique(model, f"{weight}_scales"), scales),
    ]
    if zeros is not None:
        inputs.append(_initializer(model, _unique(model, f"{weight}_zero_points"), zeros))
    rows, cols = codes.shape
    attributes: dict[str, int] = {"K": rows, "N": cols, "bits": codes.bits, "block_size": codes.block_size}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return ir.node("MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=name)


def to_qdq_matmul(model: ir.Model, node: ir.Node, codes: BlockCodes) -> None:
    """Feed a MatMul a blocked ``DequantizeLinear`` of `codes` instead of its float weight."""
    weight = node.inputs[1]
    assert weight is not None and weight.name is not None
    dequantize = _dequantize(model, weight.name, codes, to_qdq(codes), axis=0, name=f"{node.name}_DQ")
    model.graph.insert_before(node, dequantize)
    node.replace_input_with(1, dequantize.outputs[0])
    _drop_if_unused(model, weight.name)


def to_gather_block_quantized(model: ir.Model, node: ir.Node, codes: BlockCodes) -> None:
    """Replace an embedding Gather by ``GatherBlockQuantized`` (codes are of the table's transpose)."""
    table = node.inputs[0]
    assert table is not None and table.name is not None
    data, scales, zeros = gather_tensors(codes)
    inputs = [
        _initializer(model, _unique(model, f"{table.name}_Q{codes.bits}"), data),
        node.inputs[1],
        _initializer(model, _unique(model, f"{table.name}_scales"), scales),
    ]
    if zeros is not None:
        inputs.append(_initializer(model, _unique(model, f"{table.name}_zero_points"), zeros))
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": codes.block_size}
    if codes.bits == 8:
        attributes["bits"] = 8
    new = ir.node("GatherBlockQuantized", inputs, attributes, domain=MS_DOMAIN, name=f"{node.name}_Q{codes.bits}")
    _swap(model, node, new)
    _drop_if_unused(model, table.name)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)


def to_qdq_gather(model: ir.Model, node: ir.Node, codes: BlockCodes) -> None:
    """Feed an embedding Gather a ``DequantizeLinear`` of its table, blocked along the hidden axis."""
    table = node.inputs[0]
    assert table is not None and table.name is not None
    data, scales, zeros = to_qdq(codes)
    transposed = (data.T, scales.T, None if zeros is None else zeros.T)
    dequantize = _dequantize(model, table.name, codes, transposed, axis=1, name=f"{node.name}_DQ")
    model.graph.insert_before(node, dequantize)
    node.replace_input_with(0, dequantize.outputs[0])
    _drop_if_unused(model, table.name)


def _dequantize(
    model: ir.Model,
    weight: str,
    codes: BlockCodes,
    tensors: tuple[np.ndarray, np.ndarray, np.ndarray | None],
    axis: int,
    name: str,
) -> ir.Node:
    data, scales, zeros = (None if t is None else np.ascontiguousarray(t) for t in tensors)
    assert data is not None and scales is not None
    inputs = [
        _initializer(model, _unique(model, f"{weight}_DQ_Q{codes.bits}"), data),
        _initializer(model, _unique(model, f"{weight}_DQ_scales"), scales),
    ]
    if zeros is not None:
        inputs.append(_initializer(model, _unique(model, f"{weight}_DQ_zero_points"), zeros))
    node = ir.node("DequantizeLinear", inputs, {"axis": axis, "block_size": codes.block_size}, name=name)
    output = node.outputs[0]
    output.name = f"{weight}_dequantized"
    output.type = ir.TensorType(ir.DataType.from_numpy(scales.dtype))
    output.shape = ir.Shape(data.shape)
    model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)
    return node


def _swap(model: ir.Model, old: ir.Node, new: ir.Node) -> None:
    """Put `new` where `old` was, its output taking the old output's name, type and shape."""
    before, after = old.outputs[0], new.outputs[0]
    model.graph.insert_before(old, new)
    after.type, after.shape = before.type, before.shape
    name = before.name
    before.replace_all_uses_with(after, replace_graph_outputs=True)
    model.graph.remove(old, safe=True)
    after.name = name


def qdq_opset_problem(model: ir.Model) -> str | None:
    """Why a model cannot take blocked QDQ (None: it can, after `declare_qdq_opset`)."""
    opset = model.opset_imports.get("", 1)
    if opset < LOWEST_BUMPABLE_OPSET:
        return (
            f"the model is opset {opset}; blocked DequantizeLinear needs opset {QDQ_OPSET} "
            f"(export at opset {LOWEST_BUMPABLE_OPSET} or later, or use format = 'matmulnbits')"
        )
    return None


def declare_qdq_opset(model: ir.Model) -> None:
    """Declare opset 21 (blocked DequantizeLinear) for a model of opset 18 to 20."""
    if model.opset_imports.get("", 1) < QDQ_OPSET:
        logger.info("weight-only QDQ: declaring opset %d (was %d)", QDQ_OPSET, model.opset_imports.get("", 1))
        model.opset_imports[""] = QDQ_OPSET
    model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)
