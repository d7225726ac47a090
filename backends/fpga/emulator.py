"""The bit-accurate integer emulator of the accelerator: int8 x int8 -> wide accumulation, shift requantization.

Every kernel returns its exact integer result and that result's fraction bits; one requantization
step (shift with the profile's rounding, then saturation to int8) writes each output. Products are
summed in float64 BLAS calls: int8 x int8 products and their sums stay far below 2**53, so the
sums are exact integers, bit for bit what an integer MAC array computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from backends.fpga.partition import AcceleratorNode
from backends.fpga.profile import FpgaProfile, Rounding

logger = logging.getLogger(__name__)

INT8_MIN, INT8_MAX = -128, 127
# Padding value for max pooling: below every int8.
_MAX_POOL_PAD = -(1 << 20)

Wide = tuple[np.ndarray, int]  # an exact int64 result and its fraction bits


def shift_round(values: np.ndarray, shift: int, rounding: Rounding) -> np.ndarray:
    """values * 2**-shift, rounded as the accelerator's shifter does (a left shift when shift < 0)."""
    values = values.astype(np.int64, copy=False)
    if shift <= 0:
        return values << -shift
    if rounding == "floor":
        return values >> shift
    half = np.int64(1) << (shift - 1)
    if rounding == "half_up":
        return (values + half) >> shift
    floor = values >> shift
    remainder = values - (floor << shift)
    round_up = (remainder > half) | ((remainder == half) & ((floor & 1) == 1))
    return floor + round_up


def requantize(values: np.ndarray, frac_bits: int, out_frac_bits: int, rounding: Rounding) -> np.ndarray:
    """A wide result with `frac_bits` to int8 with `out_frac_bits`: shift, round, saturate."""
    shifted = shift_round(values, frac_bits - out_frac_bits, rounding)
    return np.clip(shifted, INT8_MIN, INT8_MAX).astype(np.int8)


class Emulator:
    """Runs accelerator nodes on integers, as the profile's hardware would.

    Attributes:
        profile: The device profile (rounding, accumulator width).
        saturated: Accumulations that overflowed the accumulator and were saturated, per node.
    """

    def __init__(self, profile: FpgaProfile, constants: Mapping[str, np.ndarray]) -> None:
        self.profile = profile
        self._constants = constants
        self.saturated: dict[str, int] = {}
        self._kernels: dict[str, Callable[[onnx.NodeProto, list[Wide | None]], Wide]] = {
            "Conv": self._conv,
            "Gemm": self._gemm,
            "MatMul": self._matmul,
            "Relu": lambda node, ins: (np.maximum(_value(ins[0]), 0), _frac(ins[0])),
            "Clip": self._clip,
            "Add": self._add,
            "MaxPool": self._max_pool,
            "AveragePool": self._average_pool,
            "GlobalAveragePool": self._global_average_pool,
            "Concat": self._concat,
            "Reshape": self._layout,
            "Flatten": self._layout,
            "Squeeze": self._layout,
            "Unsqueeze": self._layout,
        }

    def run(self, item: AcceleratorNode, env: dict[str, np.ndarray]) -> None:
        """Run one node: read its int8 inputs from `env` (or the constants), write its int8 outputs."""
        inputs: list[Wide | None] = [
            None if fixed is None else (self._lookup(fixed.tensor, env), fixed.frac_bits) for fixed in item.inputs
        ]
        values, frac_bits = self._kernels[item.node.op_type](item.node, inputs)
        for output in item.outputs:
            env[output.tensor] = requantize(values, frac_bits, output.frac_bits, self.profile.arithmetic.rounding)

    def _lookup(self, name: str, env: Mapping[str, np.ndarray]) -> np.ndarray:
        found = env.get(name)
        if found is None:
            found = self._constants[name]
        return found.astype(np.int64)

    def _accumulate(self, node: onnx.NodeProto, total: np.ndarray) -> np.ndarray:
        """Saturate to the accumulator width, counting overflows (real MAC arrays saturate or wrap)."""
        limit = (1 << (self.profile.arithmetic.accumulator_bits - 1)) - 1
        overflow = int(np.count_nonzero((total > limit) | (total < -limit - 1)))
        if overflow:
            self.saturated[node.name] = self.saturated.get(node.name, 0) + overflow
            logger.debug("%s: %d accumulations saturated", node.name, overflow)
            total = np.clip(total, -limit - 1, limit)
        return total

    def _with_bias(self, node: onnx.NodeProto, products: np.ndarray, frac_bits: int, bias: Wide | None) -> Wide:
        """Add the int32 bias, aligned to the products' fraction bits."""
        if bias is not None:
            aligned = shift_round(_value(bias), _frac(bias) - frac_bits, self.profile.arithmetic.rounding)
            shape = (1, -1) + (1,) * (products.ndim - 2) if node.op_type == "Conv" else (-1,)
            products = products + aligned.reshape(shape)
        return self._accumulate(node, products), frac_bits

    def _conv(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        x, w = _value(inputs[0]), _value(inputs[1])
        attrs = _attributes(node)
        group = int(attrs.get("group", 1))
        strides = list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        top, left, bottom, right = list(attrs.get("pads", [0, 0, 0, 0]))
        padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        kh, kw = w.shape[2:]
        span = ((kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1)
        windows = sliding_window_view(padded, span, axis=(2, 3))[
            :, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]
        ]  # [N, C, Ho, Wo, kh, kw]
        per_group_in = x.shape[1] // group
        per_group_out = w.shape[0] // group
        results = []
        for g in range(group):
            cols = windows[:, g * per_group_in : (g + 1) * per_group_in]
            cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(*cols.shape[:1], *cols.shape[2:4], -1)
            kernel = w[g * per_group_out : (g + 1) * per_group_out].reshape(per_group_out, -1)
            results.append(_exact_matmul(cols, kernel.T))  # [N, Ho, Wo, Cout_g]
        products = np.concatenate(results, axis=-1).transpose(0, 3, 1, 2)
        return self._with_bias(node, products, _frac(inputs[0]) + _frac(inputs[1]), _optional(inputs, 2))

    def _gemm(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        w = _value(inputs[1])
        if _attributes(node).get("transB", 0):
            w = w.T
        products = _exact_matmul(_value(inputs[0]), w)
        return self._with_bias(node, products, _frac(inputs[0]) + _frac(inputs[1]), _optional(inputs, 2))

    def _matmul(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        products = _exact_matmul(_value(inputs[0]), _value(inputs[1]))
        return self._accumulate(node, products), _frac(inputs[0]) + _frac(inputs[1])

    def _add(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        frac_bits = max(_frac(inputs[0]), _frac(inputs[1]))
        a, b = (_value(item) << (frac_bits - _frac(item)) for item in inputs[:2])
        return self._accumulate(node, a + b), frac_bits

    def _concat(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        present = [item for item in inputs if item is not None]
        frac_bits = max(_frac(item) for item in present)
        parts = [_value(item) << (frac_bits - _frac(item)) for item in present]
        return np.concatenate(parts, axis=int(_attributes(node)["axis"])), frac_bits

    def _clip(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        x, frac_bits = _value(inputs[0]), _frac(inputs[0])
        bounds = [self._constants.get(name) if name else None for name in list(node.input[1:3]) + [""] * 2][:2]
        # Bounds in the input's fixed point, rounded inwards so the clipped value stays in range.
        low = None if bounds[0] is None else int(np.ceil(float(bounds[0]) * 2.0**frac_bits))
        high = None if bounds[1] is None else int(np.floor(float(bounds[1]) * 2.0**frac_bits))
        return np.clip(x, low, high), frac_bits

    def _max_pool(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        windows = _pool_windows(_value(inputs[0]), _attributes(node), _MAX_POOL_PAD)
        return windows.max(axis=(-2, -1)), _frac(inputs[0])

    def _average_pool(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        attrs = _attributes(node)
        windows = _pool_windows(_value(inputs[0]), attrs, 0)
        return self._mean(windows.sum(axis=(-2, -1)), int(np.prod(attrs["kernel_shape"])), _frac(inputs[0]))

    def _global_average_pool(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        x = _value(inputs[0])
        area = int(np.prod(x.shape[2:]))
        return self._mean(x.sum(axis=tuple(range(2, x.ndim)), keepdims=True), area, _frac(inputs[0]))

    def _mean(self, total: np.ndarray, count: int, frac_bits: int) -> Wide:
        """total / count as total x round(2**R / count), R the profile's reciprocal bits."""
        bits = self.profile.arithmetic.reciprocal_bits
        reciprocal = ((1 << bits) + count // 2) // count
        return total * reciprocal, frac_bits + bits

    def _layout(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        x = _value(inputs[0])
        attrs = _attributes(node)
        if node.op_type == "Flatten":
            axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
            shaped = x.reshape(int(np.prod(x.shape[:axis])), -1)
        elif node.op_type == "Reshape":
            shape = [int(d) for d in self._constants[node.input[1]]]
            shaped = x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])
        else:
            axes = self._axes(node, attrs)
            if node.op_type == "Squeeze":
                shaped = np.squeeze(x, axis=axes) if axes else np.squeeze(x)
            else:
                shaped = np.expand_dims(x, axis=axes or ())
        return shaped, _frac(inputs[0])

    def _axes(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> tuple[int, ...]:
        if len(node.input) > 1 and node.input[1]:
            return tuple(int(a) for a in self._constants[node.input[1]])
        axes = attrs.get("axes")
        return tuple(int(a) for a in axes) if isinstance(axes, list) else ()


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matrix product, exact: float64 holds every int8 x int8 sum of fewer than 2**38 terms."""
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def _pool_windows(x: np.ndarray, attrs: dict[str, Any], pad_value: int) -> np.ndarray:
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    top, left, bottom, right = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value)
    return sliding_window_view(padded, kernel, axis=(2, 3))[:, :, :: strides[0], :: strides[1]]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _value(item: Wide | None) -> np.ndarray:
    assert item is not None
    return item[0]


def _frac(item: Wide | None) -> int:
    assert item is not None
    return item[1]


def _optional(inputs: list[Wide | None], index: int) -> Wide | None:
    return inputs[index] if index < len(inputs) else None
