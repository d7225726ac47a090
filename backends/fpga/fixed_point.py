"""Power-of-two scales of Q / DQ nodes as fraction bits, and per-channel weights aligned to one scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The most a per-channel weight may be shifted to share its largest channel scale: beyond it the
# aligned codes would leave the 32-bit range the emulator keeps weights in.
MAX_ALIGN_SHIFT = 23


@dataclass(frozen=True)
class Fixed:
    """An integer tensor with a power-of-two scale: value = tensor * 2**-frac_bits.

    Attributes:
        tensor: Name of the integer tensor (a QuantizeLinear output or an initializer).
        frac_bits: Fraction bits: the scale is 2**-frac_bits.
        bits: Width of the integers (8 or 16 for activations; 8 for weights, 32 for biases; an
            aligned per-channel weight keeps its stored width).
    """

    tensor: str
    frac_bits: int
    bits: int = 8


def fraction_bits(scale: np.ndarray) -> np.ndarray | None:
    """The fraction bits f with scale = 2**-f, element-wise; None when any scale is not a power of two."""
    flat = np.asarray(scale, dtype=np.float64).reshape(-1)
    mantissas, exponents = np.frexp(flat)
    if flat.size == 0 or np.any(mantissas != 0.5):
        return None
    return (1 - exponents).astype(np.int64)


def align_channels(values: np.ndarray, fracs: np.ndarray, axis: int) -> tuple[np.ndarray, int] | None:
    """A per-channel integer tensor moved to its finest channel scale, exactly (a left shift per
    channel): the same products, one fraction-bit count for the whole tensor.

    Args:
        values: The stored integers (int8 weights, int32 biases).
        fracs: Fraction bits per channel along `axis`.
        axis: The channel axis.

    Returns:
        (aligned integers, fraction bits), or None when a channel would shift by more than
        `MAX_ALIGN_SHIFT` bits.
    """
    target = int(fracs.max())
    shifts = target - fracs
    if int(shifts.max(initial=0)) > MAX_ALIGN_SHIFT:
        return None
    shape = [1] * values.ndim
    shape[axis] = -1
    aligned = values.astype(np.int64) << shifts.reshape(shape)
    return aligned, target
