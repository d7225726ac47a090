"""Parameters and multiply-accumulates (MACs) per layer, at one concrete input shape."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pipeline.pruning.channels import constant, layer_name
from pipeline.pruning.probe import Probe

_LAYERS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerCost:
    """One Conv / Gemm / MatMul at the measured input shape.

    Attributes:
        node: Node name.
        layer: Readable layer name.
        inputs: Input channels (features) it reduces over.
        outputs: Output channels.
        parameters: Weight and bias elements.
        macs: Multiply-accumulates for one sample.
    """

    node: str
    layer: str
    inputs: int
    outputs: int
    parameters: int
    macs: int


def layer_costs(model: ir.Model, example: Mapping[str, np.ndarray]) -> dict[str, LayerCost]:
    """Cost of every Conv / Gemm / MatMul node for one sample shaped like `example`'s first.

    Shapes come from running the sample (ONNX shape inference loses dims through broadcasts),
    with each layer's input and output exposed.

    Args:
        model: The model (value types inferred).
        example: A feed dict; its first sample is run.

    Returns:
        Costs by node name.
    """
    layers = [
        node
        for node in model.graph
        if node.op_type in _LAYERS and node.domain in ("", "ai.onnx") and node.inputs[0] is not None
    ]
    if not layers:
        return {}
    names = list(
        dict.fromkeys(str(v.name) for node in layers for v in (node.inputs[0], node.outputs[0]) if v is not None)
    )
    shapes = {
        name: array.shape for name, array in Probe(model, names).run({k: v[:1] for k, v in example.items()}).items()
    }
    costs = {}
    for node in layers:
        cost = _cost(node, shapes[node.inputs[0].name], shapes[node.outputs[0].name])  # type: ignore[union-attr,index]
        if cost is not None:
            costs[cost.node] = cost
    return costs


def _cost(node: ir.Node, data: tuple[int, ...], output: tuple[int, ...]) -> LayerCost | None:
    parameters = sum(int(c.size) for c in (constant(v) for v in node.inputs[1:]) if c is not None)
    if node.op_type == "Conv":
        weight = constant(node.inputs[1])
        if weight is None:
            return None
        reduce = math.prod(weight.shape[1:])
        macs = math.prod(output) * reduce
        inputs, outputs = int(data[1]), int(output[1])
    else:
        transposed = node.attributes.get("transA")
        reduce = int(data[-2] if node.op_type == "Gemm" and transposed is not None and transposed.value else data[-1])
        macs = math.prod(output) * reduce
        inputs, outputs = reduce, int(output[-1])
    return LayerCost(node.name or "", layer_name(node), inputs, outputs, parameters, int(macs))
