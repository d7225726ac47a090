"""Reading ONNX nodes for the channel analysis: layer names, constants, attributes, weight axes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


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


def is_depthwise(node: ir.Node, weight: np.ndarray) -> bool:
    """Whether a Conv is depthwise: one group per input channel, one input channel per group."""
    group = attribute(node, "group", 1)
    return group > 1 and weight.shape[1] == 1 and weight.shape[0] == group


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    """A value's dimension at a negative axis, when static."""
    if value is None or value.shape is None or len(value.shape) < -axis:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None
