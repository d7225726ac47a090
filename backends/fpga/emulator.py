"""The bit-accurate integer emulator of the accelerator: int8 x int8 -> wide accumulation, shift requantization.

Every kernel returns its exact integer result and that result's fraction bits; one requantization
step (shift with the profile's rounding, then saturation to int8) writes each output. The
multiply-accumulate kernels (backends/fpga/mac_kernels.py) sum products on float BLAS, float32
where a bound on the weights proves every sum exact (backends/fpga/exact.py), so the sums are exact
integers, bit for bit what an integer MAC array computes.

Kernels get their inputs as int64 copies, unless marked `narrow_inputs` (then as stored: int8
activations, int8 / int32 constants); they may return integers or floats holding exact integers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from backends.fpga.exact import requantize_exact
from backends.fpga.mac_kernels import NARROW_INPUTS, MacKernels, narrow_inputs
from backends.fpga.partition import AcceleratorNode
from backends.fpga.profile import FpgaProfile, Rounding
from backends.fpga.units import TransformerUnits

logger = logging.getLogger(__name__)

INT8_MIN, INT8_MAX = -128, 127

Wide = tuple[np.ndarray, int]  # exact integers (int64, or as `narrow_inputs` says) and their fraction bits


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


def requantize(
    values: np.ndarray, frac_bits: int, out_frac_bits: int, rounding: Rounding, bits: int = 8
) -> np.ndarray:
    """A wide result with `frac_bits` to int8 with `out_frac_bits`: shift, round, saturate.

    `values` are integers, or floats holding exact integers (as the float-BLAS kernels return);
    int8 already at the output's fraction bits comes back as it is (not copied).
    """
    shift = frac_bits - out_frac_bits
    if bits == 16:  # an int16 activation (profiles with activation_bits = [8, 16])
        return np.clip(shift_round(values.astype(np.int64), shift, rounding), -32768, 32767).astype(np.int16)
    if shift == 0 and values.dtype == np.int8:
        return values
    exact = requantize_exact(values, shift, rounding)
    if exact is not None:
        return exact
    shifted = shift_round(values.astype(np.int64), shift, rounding)
    return np.clip(shifted, INT8_MIN, INT8_MAX).astype(np.int8)


class Emulator:
    """Runs accelerator nodes on integers, as the profile's hardware would.

    Attributes:
        profile: The device profile (rounding, accumulator width).
        saturated: Accumulations that overflowed the accumulator and were saturated, per node.
    """

    def __init__(self, profile: FpgaProfile, constants: Mapping[str, np.ndarray], threads: int = 0) -> None:
        self.profile = profile
        self._constants = constants
        self.saturated: dict[str, int] = {}
        self._wide_constants: dict[str, np.ndarray] = {}
        self._kernels: dict[str, Callable[[onnx.NodeProto, list[Wide | None]], Wide]] = {
            # Conv, Gemm, MatMul, Relu, MaxPool; products with weights on `threads` (0: the job's budget)
            **MacKernels(profile, shift_round, self._accumulate, constants, threads).kernels(),
            "Clip": self._clip,
            "Add": self._add,
            "AveragePool": self._average_pool,
            "GlobalAveragePool": self._global_average_pool,
            "Concat": self._concat,
            "Reshape": self._layout,
            "Flatten": self._layout,
            "Squeeze": self._layout,
            "Unsqueeze": self._layout,
        }
        self._kernels.update(TransformerUnits(profile, constants).kernels())

    def run(self, item: AcceleratorNode, env: dict[str, np.ndarray]) -> None:
        """Run one node: read its int8 inputs from `env` (or the constants), write its int8 outputs."""
        kernel = self._kernels[item.node.op_type]
        narrow = getattr(kernel, NARROW_INPUTS, False)
        inputs: list[Wide | None] = [
            None if fixed is None else (self._lookup(fixed.tensor, env, narrow), fixed.frac_bits)
            for fixed in item.inputs
        ]
        values, frac_bits = kernel(item.node, inputs)
        for output in item.outputs:
            rounding = self.profile.arithmetic.rounding
            env[output.tensor] = requantize(values, frac_bits, output.frac_bits, rounding, output.bits)
        if item.float_output is not None:  # int32 accumulators, dequantized for the CPU to read
            env[item.float_output] = (np.asarray(values, dtype=np.float64) * 2.0**-frac_bits).astype(np.float32)

    def _lookup(self, name: str, env: Mapping[str, np.ndarray], narrow: bool) -> np.ndarray:
        """A tensor as stored (`narrow`), else as int64: activations copied per run, constants once
        (read-only: a kernel writing into its input would change every later run)."""
        found = env.get(name)
        if found is not None:
            return found if narrow else found.astype(np.int64)
        if narrow:
            return self._constants[name]
        wide = self._wide_constants.get(name)
        if wide is None:
            wide = self._wide_constants[name] = self._constants[name].astype(np.int64)
            wide.flags.writeable = False
        return wide

    def _accumulate(self, node: onnx.NodeProto, total: np.ndarray) -> np.ndarray:
        """Saturate to the accumulator width, counting overflows (real MAC arrays saturate or wrap)."""
        limit = (1 << (self.profile.arithmetic.accumulator_bits - 1)) - 1
        overflow = int(np.count_nonzero((total > limit) | (total < -limit - 1)))
        if overflow:
            self.saturated[node.name] = self.saturated.get(node.name, 0) + overflow
            logger.debug("%s: %d accumulations saturated", node.name, overflow)
            total = np.clip(total, -limit - 1, limit)
        return total

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

    @narrow_inputs
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
