"""Block-wise weight codes and their two ONNX forms: ONNX Runtime's ``MatMulNBits`` and blocked QDQ.

A [K, N] MatMul weight is cut along K (the input channels) into blocks of `block_size` rows; each
block of each output column has a scale and (asymmetric) a zero point: ``w = (code - zero) *
scale`` with unsigned codes in ``[0, 2**bits)``. Symmetric weights have no zero point tensor: the
zero is implied, ``2**(bits - 1)`` (8 for int4, 128 for int8), as ``MatMulNBits`` assumes.

`BlockCodes` is the one form every method returns (round-to-nearest and HQQ from ONNX Runtime's
``matmul_nbits_quantizer``, our GPTQ); the packers write it as ``MatMulNBits`` inputs
(``B`` uint8 [N, blocks, block_size * bits / 8], low nibble first; ``scales`` [N, blocks];
``zero_points`` packed two per byte for int4, per column) or as a blocked ``DequantizeLinear``
(opset 21: int4 / uint4 / int8 / uint8 data [K, N], scales and zero points [blocks, N]).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np

# MLAS's block quantizer takes powers of two from 16 (measured on ORT 1.32: 24 raises in
# MlasQuantizeBlockwise); MatMulNBits' kernels are built for these.
BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class BlockCodes:
    """A [K, N] weight quantized block-wise along K.

    Attributes:
        codes: uint8 [K, N], each in ``[0, 2**bits)``.
        scales: [blocks, N] in the weight's float type (may be negative: ORT's symmetric
            quantizer maps each block's extreme value to the lowest code).
        zero_points: uint8 [blocks, N], float [blocks, N] (HQQ's fractional zeros), or None
            (symmetric: the implied ``2**(bits - 1)``).
        bits: 4 or 8.
        block_size: Rows per block.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the weight."""
        rows, cols = self.codes.shape
        return int(rows), int(cols)

    @property
    def blocks(self) -> int:
        """Blocks along K."""
        return int(self.scales.shape[0])

    def zeros(self) -> np.ndarray:
        """The zero point of every block as float [blocks, N] (the implied one when symmetric)."""
        if self.zero_points is None:
            return np.full(self.scales.shape, 2 ** (self.bits - 1), dtype=np.float32)
        return self.zero_points.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """The weight these codes stand for, float32 [K, N]."""
        rows = self.shape[0]
        scales = np.repeat(self.scales.astype(np.float32), self.block_size, axis=0)[:rows]
        zeros = np.repeat(self.zeros(), self.block_size, axis=0)[:rows]
        return (self.codes.astype(np.float32) - zeros) * scales

    @classmethod
    def side_by_side(cls, parts: Sequence[BlockCodes]) -> BlockCodes:
        """The codes of the weights `parts` stand for, concatenated along N (one [K, sum N] weight).

        Blocks run along K, so each column keeps its codes, scales and zero points: the joined
        weight dequantizes to the parts' weights side by side, exactly.

        Raises:
            ValueError: The parts differ in K, bits, block size or zero-point form.
        """
        first = parts[0]
        forms = {
            (p.shape[0], p.bits, p.block_size, None if p.zero_points is None else p.zero_points.dtype) for p in parts
        }
        if len(forms) != 1:
            raise ValueError(f"codes of different forms cannot be joined: {sorted(map(str, forms))}")
        stored = [p.zero_points for p in parts if p.zero_points is not None]
        zeros = np.concatenate(stored, axis=1) if stored else None
        return cls(
            np.concatenate([p.codes for p in parts], axis=1),
            np.concatenate([p.scales for p in parts], axis=1),
            zeros,
            first.bits,
            first.block_size,
        )

    def nbytes(self) -> int:
        """Bytes of the packed form (codes at `bits` each, scales, zero points)."""
        cols = self.shape[1]
        code_bytes = cols * self.blocks * self.block_size * self.bits // 8
        if self.zero_points is None:
            zero_bytes = 0
        elif self.zero_points.dtype == np.uint8:
            zero_bytes = cols * -(-self.blocks * self.bits // 8)
        else:
            zero_bytes = self.zero_points.nbytes
        return int(code_bytes + self.scales.nbytes + zero_bytes)


def _ort_quantizers() -> ModuleType:
    """ONNX Runtime's ``matmul_nbits_quantizer``, imported without its side effect: importing it
    calls ``logging.basicConfig(level=INFO)``, which would print every INFO record of the process
    (onnxforge's API prints nothing unless asked)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return matmul_nbits_quantizer


def _config(bits: int, block_size: int, symmetric: bool) -> Any:
    module = _ort_quantizers()
    return module.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)


def rtn_codes(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> BlockCodes:
    """Round-to-nearest block quantization with ONNX Runtime's C++ kernel (MLAS).

    The numbers are exactly those ``MatMulNBitsQuantizer`` with ``DefaultWeightOnlyQuantConfig``
    writes: it is the same call (`DefaultWeightOnlyQuantizer.qbits_block_quant`), one weight at
    a time.
    """
    quantizer = _ort_quantizers().DefaultWeightOnlyQuantizer(_config(bits, block_size, symmetric))
    packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(weight))
    rows = weight.shape[0]
    return from_matmul_nbits(packed, scales, None if symmetric else zero_points, bits, block_size, rows)


def hqq_codes(weight: np.ndarray, bits: int, block_size: int) -> BlockCodes:
    """HQQ (half-quadratic, data-free) block quantization with ONNX Runtime's implementation.

    Always asymmetric, with fractional (float) zero points, which ``MatMulNBits`` takes for int4.
    """
    import torch

    module = _ort_quantizers()
    quantizer = module.HQQWeightOnlyQuantizer(module.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    tensor = torch.from_numpy(np.array(weight, dtype=np.float32).T.copy())
    codes, scales, zeros = quantizer.quantize_internal(tensor, bits=bits, group_size=block_size)
    rows = weight.shape[0]
    return BlockCodes(
        codes=codes.numpy().T[:rows].astype(np.uint8),
        scales=scales.numpy().T.astype(weight.dtype),
        zero_points=zeros.numpy().T.astype(weight.dtype),
        bits=bits,
        block_size=block_size,
    )


def from_matmul_nbits(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int, rows: int
) -> BlockCodes:
    """Codes from ``MatMulNBits`` inputs (B [N, blocks, blob], scales, zero points or None)."""
    cols, blocks = int(packed.shape[0]), int(packed.shape[1])
    per_column = _unpack(packed.reshape(cols, -1), bits)[:, : blocks * block_size]
    codes = np.ascontiguousarray(per_column[:, :rows].T)
    scale_grid = np.ascontiguousarray(scales.reshape(cols, blocks).T)
    zeros: np.ndarray | None = None
    if zero_points is not None:
        if zero_points.dtype == np.uint8:
            zeros = np.ascontiguousarray(_unpack(zero_points.reshape(cols, -1), bits)[:, :blocks].T)
        else:
            zeros = np.ascontiguousarray(zero_points.reshape(cols, blocks).T)
    return BlockCodes(codes, scale_grid, zeros, bits, block_size)


def to_matmul_nbits(codes: BlockCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``MatMulNBits`` inputs: B uint8 [N, blocks, blob], scales [N, blocks], zero points or None."""
    rows, cols = codes.shape
    padded = np.zeros((cols, codes.blocks * codes.block_size), dtype=np.uint8)
    padded[:, :rows] = codes.codes.T
    packed = _pack(padded, codes.bits).reshape(cols, codes.blocks, codes.block_size * codes.bits // 8)
    scales = np.ascontiguousarray(codes.scales.T)
    zeros: np.ndarray | None = None
    if codes.zero_points is not None:
        column_zeros = np.ascontiguousarray(codes.zero_points.T)
        # ONNX Runtime fills an odd column's last nibble with the implied zero point, 8.
        uint = column_zeros.dtype == np.uint8
        zeros = _pack(column_zeros, codes.bits, pad=8) if uint else column_zeros
    return packed, scales, zeros


def to_qdq(codes: BlockCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocked ``DequantizeLinear`` inputs along axis 0: data [K, N], scales [blocks, N], zero points.

    Symmetric codes become signed (int4 / int8, no zero point); asymmetric ones stay unsigned
    with a zero point of the same type. Fractional zero points (HQQ's) are rounded to the nearest
    code, as ``DequantizeLinear`` takes only integer ones (which is why settings refuse HQQ as QDQ).
    """
    if codes.zero_points is None:
        signed = codes.codes.astype(np.int16) - 2 ** (codes.bits - 1)
        return signed.astype(_signed_type(codes.bits)), codes.scales, None
    unsigned = _unsigned_type(codes.bits)
    zeros = np.clip(np.rint(codes.zero_points.astype(np.float32)), 0, 2**codes.bits - 1)
    return codes.codes.astype(unsigned), codes.scales, zeros.astype(np.uint8).astype(unsigned)


def gather_tensors(codes: BlockCodes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``GatherBlockQuantized`` inputs for a [V, H] table quantized as its transpose ([H, V] codes).

    Data [V, H] (int4 / uint4 for 4 bits, uint8 with ``bits = 8``), scales and zero points [V, blocks].
    """
    data, scales, zeros = to_qdq(codes)
    if codes.bits == 8:
        data = codes.codes
        zeros = None if codes.zero_points is None else codes.zero_points.astype(np.uint8)
    table = np.ascontiguousarray(data.T)
    return table, np.ascontiguousarray(scales.T), None if zeros is None else np.ascontiguousarray(zeros.T)


def _signed_type(bits: int) -> np.dtype:
    return np.dtype(ml_dtypes.int4) if bits == 4 else np.dtype(np.int8)


def _unsigned_type(bits: int) -> np.dtype:
    return np.dtype(ml_dtypes.uint4) if bits == 4 else np.dtype(np.uint8)


def _pack(values: np.ndarray, bits: int, pad: int = 0) -> np.ndarray:
    """Rows of codes, packed per row (two 4-bit codes a byte, the first in the low nibble; an odd
    row ends with `pad` in the last high nibble)."""
    if bits == 8:
        return np.ascontiguousarray(values, dtype=np.uint8)
    rows, width = values.shape
    if width % 2:
        values = np.concatenate([values, np.full((rows, 1), pad, dtype=values.dtype)], axis=1)
    pairs = values.astype(np.uint8)
    return np.ascontiguousarray((pairs[:, 0::2] & 0x0F) | ((pairs[:, 1::2] & 0x0F) << 4))


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `_pack`, per row."""
    if bits == 8:
        return packed.astype(np.uint8)
    rows, width = packed.shape
    out = np.empty((rows, width * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out
