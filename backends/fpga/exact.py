"""Exact integer arithmetic in floating point: when a float type holds every sum of int8 products
exactly, and requantizing such exact sums without leaving floating point.

A float type represents every integer up to 2**(mantissa bits + 1) in magnitude exactly: 2**24 for
float32, 2**53 for float64. A BLAS matrix product of integer-valued operands computes each output
as some sum (in an order and blocking of its choosing, fused multiply-adds included) of the exact
products; every intermediate is the sum of a subset of those products, so if the sum of their
magnitudes stays within that limit, every intermediate and the result are exact integers, bit for
bit what an integer MAC array computes. With int8 activations (|x| <= 128) and constant weights
the bound ``128 * sum|w| + |bias|`` per output channel is known before the first run.

Requantizing an exact sum S by 2**-shift in floating point is exact too: S * 2**-shift only moves
the exponent, and ``rint`` (round half to even), ``floor`` and the half-up correction below
produce the integer the integer shifter does.
"""

from __future__ import annotations

import numpy as np

from backends.fpga.profile import Rounding

FLOAT32_EXACT = 1 << 24
"""Every integer of at most this magnitude is a float32."""

FLOAT64_EXACT = 1 << 53
"""Every integer of at most this magnitude is a float64."""

_MAX_FLOAT_SHIFT = 64
"""Shifts beyond this requantize on integers: scaling by 2**-shift stays a normal float within it."""

_SMALL_INTEGER_BYTES = 2
"""Integer tensors this narrow (int8, int16) are exact in float32 whatever their values."""

_SLICE_ELEMENTS = 1 << 16
"""Elements requantized at a time: a float32 slice and its temporaries stay in a core's L2 cache."""

_NARROW_SHIFT_MAX = 14
"""Right shifts of int8 / int16 up to this run in int16 / int32: the rounding offset 2**(shift - 1)
added to the value stays within the wider type."""

ExactType = type[np.float32] | type[np.float64] | type[np.int64]


def magnitude(dtype: np.dtype) -> int:
    """The largest |value| of an integer type (128 for int8)."""
    info = np.iinfo(dtype)
    return max(-int(info.min), int(info.max))


def exact_type(bound: int) -> ExactType:
    """The cheapest type whose sums are exact when no partial sum exceeds `bound` in magnitude:
    float32 within 2**24, float64 within 2**53, else int64 (numpy's integer matmul, exact, slow)."""
    if bound <= FLOAT32_EXACT:
        return np.float32
    if bound <= FLOAT64_EXACT:
        return np.float64
    return np.int64


def sum_bound(weights: np.ndarray, activation_magnitude: int, bias: np.ndarray | None = None) -> int:
    """The largest |sum| any output of ``x @ weights + bias`` can reach (partial sums included),
    for activations of at most `activation_magnitude`.

    Args:
        weights: Integer weights, [..., K, outputs]: each output sums over the K axis.
        activation_magnitude: The largest |x| (128 for int8 activations).
        bias: Integer bias per output (already aligned to the products' fraction bits), or None;
            for grouped weights [groups, K, outputs per group], in output order (group-major).
    """
    per_output = activation_magnitude * np.abs(weights.astype(np.int64)).sum(axis=-2)
    if bias is not None:
        per_output = per_output + np.abs(bias.astype(np.int64)).reshape(per_output.shape)
    return int(per_output.max(initial=0))


def requantize_exact(values: np.ndarray, shift: int, rounding: Rounding) -> np.ndarray | None:
    """Exact integers (float, or integers narrow enough for float32) times 2**-shift, rounded as
    `rounding` says and saturated to int8, computed in floating point; None where that would not
    be exact (a shift beyond `_MAX_FLOAT_SHIFT`, or wide integers: the caller shifts integers then).

    The memory order of `values` is kept (a transposed view stays one), so a channels-last result
    seen as channels-first stays cheap to read channels-last. Large tensors go in slices along
    the first axis: each pass then runs in cache, and the temporaries stay small (ones as large as
    the tensor were fresh memory each run: page faults, 15 MiB a run on the digits CNN).
    """
    if abs(shift) > _MAX_FLOAT_SHIFT:
        return None
    if values.dtype.kind in "iu":
        if values.dtype.itemsize > _SMALL_INTEGER_BYTES:
            return None
        narrow = 0 < shift <= _NARROW_SHIFT_MAX
    elif values.dtype.kind == "f":
        narrow = False
    else:
        return None
    shape = values.shape
    values = values.reshape(1) if values.ndim == 0 else values
    result = np.empty_like(values, dtype=np.int8)  # the same memory order
    step = max(1, _SLICE_ELEMENTS // max(1, values[0].size))
    for start in range(0, len(values), step):
        part, out = values[start : start + step], result[start : start + step]
        if narrow:
            _shift_narrow(part, shift, rounding, out)
        else:
            _round_float(part if part.dtype.kind == "f" else part.astype(np.float32), shift, rounding, out)
    return result.reshape(shape)


def _round_float(values: np.ndarray, shift: int, rounding: Rounding, out: np.ndarray) -> None:
    """Exact float integers times 2**-shift, rounded and saturated into `out` (int8, the same shape)."""
    # A power-of-two factor only moves the exponent: exact (within the shift limit, no underflow).
    scaled = np.multiply(values, values.dtype.type(2.0**-shift))
    if rounding == "floor":
        np.floor(scaled, out=scaled)
    elif rounding == "half_even":
        np.rint(scaled, out=scaled)  # rint rounds half to even
    else:  # floor(v) + (v - floor(v) >= 1/2)
        floored = np.floor(scaled)
        # v - floor(v) is exact for |v| >= 1 (Sterbenz) and for 0 <= v < 1 (v itself); for
        # -1 <= v < 0 it is 1 + v, exact below 1/2 and rounded only above it: the comparison holds.
        np.subtract(scaled, floored, out=scaled)
        np.greater_equal(scaled, 0.5, out=scaled)
        scaled += floored
    np.clip(scaled, -128, 127, out=scaled)
    np.copyto(out, scaled, casting="unsafe")


def _shift_narrow(values: np.ndarray, shift: int, rounding: Rounding, out: np.ndarray) -> None:
    """int8 / int16 `values` shifted right by 0 < `shift` <= 14 in the next wider integer type,
    rounded as `rounding` says, saturated into `out` (int8; fewer bytes moved than float32 or int64)."""
    wide: np.ndarray = values.astype(np.int16 if values.dtype.itemsize == 1 else np.int32)
    if rounding == "half_up":
        np.add(wide, 1 << (shift - 1), out=wide)
    elif rounding == "half_even":
        # floor((v + half - 1 + q_odd) / 2**shift), q_odd the lowest bit of floor(v / 2**shift): a
        # tie goes up exactly when that quotient is odd, everything else rounds to nearest.
        odd = np.bitwise_and(np.right_shift(wide, shift), 1)
        np.add(wide, (1 << (shift - 1)) - 1, out=wide)
        np.add(wide, odd, out=wide)
    np.right_shift(wide, shift, out=wide)
    np.clip(wide, -128, 127, out=wide)
    np.copyto(out, wide, casting="unsafe")
