"""The transformer units of the accelerator, bit-accurate: int8 x int8 products and layouts, and the
fixed-point LayerNorm, Softmax and GELU units a transformer profile lists.

Each kernel takes the node and its integer inputs with their fraction bits and returns an exact
integer result with its fraction bits; the emulator requantizes it to the int8 output, as for the
CNN kernels. The nonlinear units follow the profile's `Units` (table sizes, fraction bits); their
error bounds against the exact function are stated in backends/fpga/profiles/npu-int8.toml.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from backends.fpga.mac_kernels import narrow_inputs
from backends.fpga.profile import FpgaProfile, Rounding

Wide = tuple[np.ndarray, int]  # an exact int64 result and its fraction bits
Kernel = Callable[[onnx.NodeProto, list[Wide | None]], Wide]

_SQRT_N_BITS = 16  # fraction bits of the per-row constant sqrt(N) in LayerNorm


def shift_round_rows(values: np.ndarray, shifts: np.ndarray, rounding: Rounding) -> np.ndarray:
    """values * 2**-shifts with a per-element (broadcast) right shift > 0, rounded as the shifter does."""
    values = values.astype(np.int64, copy=False)
    shifts = shifts.astype(np.int64, copy=False)
    floor = values >> shifts
    if rounding == "floor":
        return floor
    half = np.int64(1) << (shifts - 1)
    remainder = values - (floor << shifts)
    if rounding == "half_up":
        return floor + (remainder >= half)
    return floor + ((remainder > half) | ((remainder == half) & ((floor & 1) == 1)))


class TransformerUnits:
    """Kernels for the ops a transformer profile adds: Mul, Transpose, Reshape (computed shapes),
    Softmax, LayerNormalization and Gelu. Tables are built once per node and input scale."""

    def __init__(self, profile: FpgaProfile, constants: Mapping[str, np.ndarray]) -> None:
        self._units = profile.units
        self._rounding = profile.arithmetic.rounding
        self._constants = constants
        self._tables: dict[tuple[str, int, int], np.ndarray] = {}

    def kernels(self) -> dict[str, Kernel]:
        """The kernels by op type, for the emulator's table."""
        return {
            "Mul": self._mul,
            "Transpose": self._transpose,
            "Reshape": self._reshape,
            "Softmax": self._softmax,
            "LayerNormalization": self._layer_norm,
            "Gelu": self._gelu,
        }

    def _mul(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        (a, fa), (b, fb) = _present(inputs[0]), _present(inputs[1])
        return a * b, fa + fb

    @narrow_inputs  # layouts move values, no arithmetic: the stored int8 / int16 serve
    def _transpose(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        x, frac = _present(inputs[0])
        perm = _attributes(node).get("perm")
        return np.transpose(x, perm if perm else None), frac

    @narrow_inputs
    def _reshape(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        x, frac = _present(inputs[0])
        shape_input = inputs[1] if len(inputs) > 1 else None
        shape = shape_input[0] if shape_input is not None else self._constants[node.input[1]]
        dims = [int(d) for d in np.asarray(shape).reshape(-1)]
        allow_zero = int(_attributes(node).get("allowzero", 0))
        return x.reshape([x.shape[i] if d == 0 and not allow_zero else d for i, d in enumerate(dims)]), frac

    def _gelu(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        """One table entry per input code (256 for int8, 65536 for int16): GELU of its value, with
        `lut_fraction_bits`."""
        x, frac = _present(inputs[0])
        bits = self._units.lut_fraction_bits
        half = _half_range(x)
        key = (node.name, frac, half)
        if key not in self._tables:
            tanh = _attributes(node).get("approximate", b"none") in (b"tanh", "tanh")
            codes = np.arange(-half, half, dtype=np.float64) * 2.0**-frac
            self._tables[key] = np.rint(_gelu(codes, tanh) * 2.0**bits).astype(np.int64)
        return self._tables[key][x + half], bits

    def _softmax(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        """exp(x - max) from a table indexed by the (integer) distance to the row's maximum, summed in
        integers, times the fixed-point reciprocal of the sum."""
        x, frac = _present(inputs[0])
        exp_bits, reciprocal_bits = self._units.exp_fraction_bits, self._units.reciprocal_bits
        half = _half_range(x)
        key = (node.name, frac, half)
        if key not in self._tables:
            distances = np.arange(0, 2 * half, dtype=np.float64) * 2.0**-frac
            self._tables[key] = np.rint(np.exp(-distances) * 2.0**exp_bits).astype(np.int64)
        exps = self._tables[key][x.max(axis=-1, keepdims=True) - x]
        total = exps.sum(axis=-1, keepdims=True)  # >= 2**exp_bits: the maximum's own entry
        reciprocal = ((np.int64(1) << reciprocal_bits) + total // 2) // total
        return exps * reciprocal, reciprocal_bits

    def _layer_norm(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in integers.

        With c = N x - sum(x) (exact) and D = sum(c**2) + eps N**3 4**frac, the normalised value is
        c sqrt(N) / sqrt(D); 1 / sqrt(D) comes from a table on D's mantissa.
        """
        x, frac = _present(inputs[0])
        gamma, gamma_frac = _present(inputs[1])
        count = x.shape[-1]
        centred = count * x - x.sum(axis=-1, keepdims=True)
        epsilon = float(_attributes(node).get("epsilon", 1e-5))
        # Squares summed after dropping `drop` low bits of c when full precision would overflow int64
        # (int16 inputs over wide rows); the variance is then D / 4**drop.
        largest = int(np.abs(centred).max(initial=0))
        drop = max(0, math.ceil((2 * largest.bit_length() + count.bit_length() - 62) / 2))
        reduced = shift_round_rows(centred, np.array(drop), self._rounding) if drop else centred
        offset = round(epsilon * count**3 * 4.0 ** (frac - drop))
        variance = np.maximum((reduced * reduced).sum(axis=-1, keepdims=True) + offset, 1)
        table_value, exponent = self._rsqrt(variance)
        exponent = exponent + 2 * drop  # 1/sqrt(D) = table_value * 2**-(16 + exponent/2)
        sqrt_count = round(math.sqrt(count) * 2**_SQRT_N_BITS)
        # sqrt(N) / sqrt(D) * 2**16 first, so that its product with c stays far inside int64.
        factor = shift_round_rows(table_value * sqrt_count, np.array(_SQRT_N_BITS), self._rounding)
        norm_bits = self._units.norm_fraction_bits
        normalised = shift_round_rows(centred * factor, 16 + exponent // 2 - norm_bits, self._rounding)
        result, result_frac = normalised * gamma, norm_bits + gamma_frac
        bias = inputs[2] if len(inputs) > 2 else None
        if bias is not None:
            values, bias_frac = bias
            result = result + _aligned(values, bias_frac, result_frac, self._rounding)
        return result, result_frac

    def _rsqrt(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A table of 1 / sqrt on the leading `rsqrt_table_bits` of each value's mantissa.

        values = m * 2**e with e even and m in [1, 4); returns (round(2**16 / sqrt(m')), e), m' the
        middle of m's table interval.
        """
        bits = self._units.rsqrt_table_bits
        key = ("rsqrt", bits, 0)
        if key not in self._tables:
            index = np.arange(1 << bits, 4 << bits, dtype=np.float64) + 0.5
            table = np.zeros(4 << bits, dtype=np.int64)
            table[1 << bits :] = np.rint(2.0**16 / np.sqrt(index / 2.0**bits))
            self._tables[key] = table
        # frexp is exact on integers below 2**53 (every variance sum here); e = floor(log2) rounded down to even.
        exponent = np.frexp(values.astype(np.float64))[1].astype(np.int64) - 1
        exponent -= exponent & 1
        shift = exponent - bits
        index = np.where(shift >= 0, values >> np.maximum(shift, 0), values << np.maximum(-shift, 0))
        return self._tables[key][index], exponent


def _aligned(values: np.ndarray, frac: int, target_frac: int, rounding: Rounding) -> np.ndarray:
    """An integer tensor with `frac` fraction bits moved to `target_frac`."""
    if frac <= target_frac:
        return values.astype(np.int64) << (target_frac - frac)
    return shift_round_rows(values, np.array(frac - target_frac), rounding)


def _gelu(values: np.ndarray, tanh: bool) -> np.ndarray:
    if tanh:
        return 0.5 * values * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (values + 0.044715 * values**3)))
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * values * (1.0 + erf(values / math.sqrt(2.0)))


def _half_range(codes: np.ndarray) -> int:
    """128 for int8 codes, 32768 when any code is beyond int8 (an int16 activation)."""
    return 128 if codes.size == 0 or (int(codes.min()) >= -128 and int(codes.max()) <= 127) else 32768


def _present(item: Wide | None) -> Wide:
    assert item is not None
    return item


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
