"""The QDQ rewrite: our ranges into ONNX Runtime's QDQ quantizer (it does the graph surgery)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType
from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# The weight axis ONNX Runtime quantizes per channel, by op type (Gemm depends on transB).
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


@dataclass(frozen=True)
class QdqSettings:
    """How tensors are quantized.

    Attributes:
        per_channel: One weight scale per output channel.
        activation_type: "uint8" or "int8".
        weight_type: "int8" or "uint8".
        activation_symmetric: Activations get zero point 0 (symmetric range).
        reduce_range: 7-bit weights (for CPUs without VNNI).
        power_of_two: Every scale is a power of two (shift-based requantization); implies
            symmetric int8.
    """

    per_channel: bool
    activation_type: str
    weight_type: str
    activation_symmetric: bool
    reduce_range: bool
    power_of_two: bool = False


def quantize_qdq(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    settings: QdqSettings,
    op_types: tuple[str, ...] | None,
    exclude: list[str],
    only: list[str] | None = None,
    quantize_outputs: bool = True,
) -> onnx.ModelProto:
    """Return a QDQ copy of `model` (which must carry shape-inferred value_info).

    Args:
        model: The float model.
        ranges: Activation range per tensor name.
        settings: How to quantize.
        op_types: Op types to quantize (None: all ONNX Runtime supports).
        exclude: Node names kept float.
        only: Quantize just these nodes (None: every node of `op_types` not excluded).
        quantize_outputs: Also quantize the outputs of quantized nodes.
    """
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    working = onnx.ModelProto()
    working.CopyFrom(model)
    data = TensorsData(
        CalibrationMethod.MinMax, {name: (np.float32(low), np.float32(high)) for name, (low, high) in ranges.items()}
    )
    extra_options: dict[str, object] = {
        "ActivationSymmetric": settings.activation_symmetric or settings.power_of_two,
        "WeightSymmetric": True,
    }
    if not quantize_outputs and op_types:
        extra_options["OpTypesToExcludeOutputQuantization"] = list(op_types)
    if settings.power_of_two:
        extra_options["TensorQuantOverrides"] = _power_of_two_overrides(working, ranges, op_types, settings)
    quantizer = QDQQuantizer(
        working,
        settings.per_channel,
        settings.reduce_range,
        _QUANT_TYPES[settings.weight_type],
        _QUANT_TYPES["int8" if settings.power_of_two else settings.activation_type],
        data,
        list(only or []),
        list(exclude),
        list(op_types) if op_types else sorted(set(QDQRegistry) | set(QLinearOpsRegistry)),
        extra_options,
    )
    quantizer.quantize_model()
    quantizer.model.topological_sort()  # the rewrite appends Q/DQ nodes; the checker wants order
    return quantizer.model.model


def power_of_two_scale(magnitude: float, levels: int = 127) -> float:
    """The smallest power of two s with ``magnitude <= s * levels`` (so nothing clips)."""
    if magnitude <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(magnitude / levels))


def _power_of_two_overrides(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    op_types: tuple[str, ...] | None,
    settings: QdqSettings,
) -> dict[str, list[dict[str, object]]]:
    """Scale and zero point for every activation and weight: powers of two, zero point 0."""
    int8 = QuantType.QInt8
    overrides: dict[str, list[dict[str, object]]] = {
        name: [{"scale": np.float32(power_of_two_scale(max(-low, high))), "zero_point": np.int8(0), "quant_type": int8}]
        for name, (low, high) in ranges.items()
    }
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or (op_types and node.op_type not in op_types) or len(node.input) <= index:
            continue
        weight = initializers.get(node.input[index])
        if weight is None:
            continue
        values = np.abs(numpy_helper.to_array(weight).astype(np.float32))
        axis = _channel_axis(node, values.ndim)
        if settings.per_channel:
            maxima = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).max(axis=1)
            overrides[weight.name] = [
                {"axis": axis, "scale": np.float32(power_of_two_scale(float(m))), "zero_point": np.int8(0)}
                for m in maxima
            ]
        else:
            scale = power_of_two_scale(float(values.max()))
            overrides[weight.name] = [{"scale": np.float32(scale), "zero_point": np.int8(0)}]
    return overrides


def _channel_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Gemm":
        trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return rank - 1
    return 0
