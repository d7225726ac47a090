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

from pipeline.quantization.fusions import fuse_gelu

_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# The weight axis ONNX Runtime quantizes per channel, by op type (Gemm depends on transB).
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}
# Ops whose third input ONNX Runtime's QDQ quantizer writes as an int32 bias.
_BIAS_OPS = frozenset({"Conv", "Gemm", "LayerNormalization", "InstanceNormalization", "BatchNormalization"})


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
        fuse_gelu: After the rewrite, fuse float GELUs into ONNX Runtime's contrib kernels
            (every target runs them).
    """

    per_channel: bool
    activation_type: str
    weight_type: str
    activation_symmetric: bool
    reduce_range: bool
    power_of_two: bool = False
    fuse_gelu: bool = False


def quantize_qdq(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    settings: QdqSettings,
    op_types: tuple[str, ...] | None,
    exclude: list[str],
    only: list[str] | None = None,
    quantize_outputs: bool = True,
    wide: frozenset[str] = frozenset(),
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
        wide: Activations quantized to int16 instead of 8 bits (mixed int8 / int16 activations,
            for targets that run int16 x int8 products: the tensors int8 damages most).
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
        extra_options["TensorQuantOverrides"] = _power_of_two_overrides(working, ranges, op_types, settings, wide)
    elif wide:
        extra_options["TensorQuantOverrides"] = {name: [{"quant_type": QuantType.QInt16}] for name in sorted(wide)}
    if wide and _onnx_opset(working) < 21:
        extra_options["UseQDQContribOps"] = True  # 16-bit Q / DQ are standard ONNX only from opset 21
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
    quantized = quantizer.model.model
    if settings.fuse_gelu:
        fuse_gelu(quantized)
    return quantized


def power_of_two_scale(magnitude: float, levels: int = 127) -> float:
    """The smallest power of two s with ``magnitude <= s * levels`` (so nothing clips)."""
    if magnitude <= 0:
        return 1.0
    scale = 2.0 ** math.ceil(math.log2(magnitude / levels))
    return scale * 2 if scale * levels < magnitude else scale  # log2 can round down by an ulp


def _power_of_two_overrides(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    op_types: tuple[str, ...] | None,
    settings: QdqSettings,
    wide: frozenset[str] = frozenset(),
) -> dict[str, list[dict[str, object]]]:
    """Scale and zero point for every activation and every quantizable constant: powers of two,
    zero point 0 (int16 for the `wide` activations). (Biases of Conv / Gemm are int32 with scale
    input x weight: a power of two too.) Values are 0-d arrays, the form ONNX Runtime's overrides
    accept."""
    overrides: dict[str, list[dict[str, object]]] = {
        name: [_wide(max(-low, high)) if name in wide else _symmetric(power_of_two_scale(max(-low, high)))]
        for name, (low, high) in ranges.items()
    }
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        for index, name in enumerate(node.input):
            constant = initializers.get(name)
            # ONNX Runtime quantizes these as int32 biases with scale input x weight (a power of two too).
            is_bias = node.op_type in _BIAS_OPS and index == 2
            if constant is None or is_bias or constant.data_type != onnx.TensorProto.FLOAT:
                continue
            values = np.abs(numpy_helper.to_array(constant))
            if settings.per_channel and index == _WEIGHT_INPUT.get(node.op_type) and values.ndim > 1:
                axis = _channel_axis(node, values.ndim)
                maxima = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).max(axis=1)
                overrides[name] = [{"axis": axis, **_symmetric(power_of_two_scale(float(m)))} for m in maxima]
            else:
                overrides[name] = [_symmetric(power_of_two_scale(float(values.max(initial=0.0))))]
    return overrides


def _symmetric(scale: float) -> dict[str, object]:
    return {
        "scale": np.array(scale, dtype=np.float32),
        "zero_point": np.array(0, dtype=np.int8),
        "quant_type": QuantType.QInt8,
    }


def _wide(magnitude: float) -> dict[str, object]:
    return {
        "scale": np.array(power_of_two_scale(magnitude, levels=32767), dtype=np.float32),
        "zero_point": np.array(0, dtype=np.int16),
        "quant_type": QuantType.QInt16,
    }


def _onnx_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)


def _channel_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Gemm":
        trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return rank - 1
    return 0
