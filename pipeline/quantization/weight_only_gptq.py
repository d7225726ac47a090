"""GPTQ (Frantar et al., 2022) for block-wise int4 / int8 weights, in numpy.

Ours, not ONNX Runtime's: ``GPTQWeightOnlyQuantConfig`` in ORT 1.32 (its Intel Neural
Compressor port, ``neural_compressor.weight_only.gptq``) propagates each row's rounding error
along a column of the upper Cholesky factor of ``H^-1`` (``Hinv1[i:, i]``) instead of its row,
and a column of an upper-triangular matrix is zero below the diagonal: no error is propagated,
and its asymmetric result is round-to-nearest, bit for bit (measured; its symmetric result is
worse than RTN, because it then re-quantizes GPTQ's output on a new grid). It also writes
8-bit GPTQ as a float weight (no ``MatMulNBits``), and runs the whole model once per MatMul
input per calibration batch.

Here, for a [K, N] weight and ``H = X^T X / tokens`` of its input: rows are quantized in order,
each block's grid (scale, zero point) chosen from the rows as updated by the rows before; each
row's error, divided by the Cholesky diagonal, is spread over the rows not yet quantized
(immediately within a lazy batch of 128 rows, by one matrix product beyond it). The codes
returned are those of the grid they were rounded on, so packing loses nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.quantization.weight_only_blocks import BlockCodes

logger = logging.getLogger(__name__)

# Rows whose updates are applied one by one before the rest of the matrix gets them at once.
LAZY_ROWS = 128
# Dampening: this share of the mean Hessian diagonal is added to it (GPTQ's default); raised
# tenfold, up to three times, when the matrix is not positive definite.
DAMP = 0.01
_DAMP_RETRIES = 3


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one input's Hessian, shared by the MatMuls that read that input.

    Attributes:
        upper: The upper Cholesky factor ``U`` of the dampened ``H^-1`` (``H^-1 = U^T U``), [K, K].
        dead: Input channels that were always zero (their weight rows are zeroed).
    """

    upper: np.ndarray
    dead: np.ndarray


def hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> HessianFactor:
    """Factor ``H = X^T X / tokens`` once: one Cholesky and one triangular inverse.

    With ``J`` the reversal permutation and ``J H J = M M^T`` (M lower), ``H^-1 = U^T U`` for
    ``U = J M^-1 J``, upper-triangular: the factor GPTQ's original computes with two Cholesky
    decompositions and an inverse.
    """
    matrix = np.array(hessian, dtype=np.float64)
    dead = np.diag(matrix) == 0
    matrix[dead, dead] = 1.0
    mean = float(np.mean(np.diag(matrix)))
    for attempt in range(_DAMP_RETRIES + 1):
        dampened = matrix + np.eye(matrix.shape[0]) * damp * mean * 10**attempt
        try:
            lower = np.linalg.cholesky(dampened[::-1, ::-1])
        except np.linalg.LinAlgError:
            logger.info("GPTQ: Hessian not positive definite at dampening %.0e; raising it", damp * 10**attempt)
            continue
        return HessianFactor(np.ascontiguousarray(np.linalg.inv(lower)[::-1, ::-1]), dead)
    logger.warning("GPTQ: Hessian not positive definite even dampened; its weights are rounded to nearest")
    return HessianFactor(np.eye(matrix.shape[0]), dead)


def gptq_codes(weight: np.ndarray, factor: HessianFactor, bits: int, block_size: int, symmetric: bool) -> BlockCodes:
    """Quantize a [K, N] weight block-wise along K, minimising ``||X (W - Q)||``.

    Args:
        weight: The float weight [K, N].
        factor: Its input's `hessian_factor`.
        bits: 4 or 8.
        block_size: Rows per block (a power of two).
        symmetric: No zero points (the implied ``2**(bits - 1)``); else asymmetric min / max grids.

    Returns:
        The codes, their scales (in the weight's float type) and zero points.
    """
    rows, cols = weight.shape
    work = np.array(weight, dtype=np.float64)
    work[factor.dead, :] = 0.0
    upper = factor.upper
    blocks = -(-rows // block_size)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    scales = np.ones((blocks, cols), dtype=np.float64)
    zeros = np.zeros((blocks, cols), dtype=np.float64)
    step = max(LAZY_ROWS, block_size)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        errors = _quantize_rows(work, upper, start, stop, (codes, scales, zeros), bits, block_size, symmetric)
        work[stop:] -= upper[start:stop, stop:].T @ errors
    return BlockCodes(
        codes=codes,
        scales=scales.astype(weight.dtype),
        zero_points=None if symmetric else zeros.astype(np.uint8),
        bits=bits,
        block_size=block_size,
    )


def _quantize_rows(
    work: np.ndarray,
    upper: np.ndarray,
    start: int,
    stop: int,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
    bits: int,
    block_size: int,
    symmetric: bool,
) -> np.ndarray:
    """Quantize rows [start, stop) of `work` in place; return their scaled errors."""
    codes, scales, zeros = out
    rows = work[start:stop].copy()
    factor = upper[start:stop, start:stop]
    errors = np.zeros_like(rows)
    top = 2**bits - 1
    scale = zero = np.zeros(0)
    for i in range(stop - start):
        row = start + i
        if row % block_size == 0:
            scale, zero = _grid(rows[i : i + block_size], bits, symmetric)
            scales[row // block_size], zeros[row // block_size] = scale, zero
        code = np.clip(np.rint(rows[i] / scale) + zero, 0, top)
        codes[row] = code
        error = (rows[i] - (code - zero) * scale) / factor[i, i]
        rows[i + 1 :] -= factor[i, i + 1 :, None] * error
        errors[i] = error
    return errors


def _grid(block: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each column of a block of rows.

    Symmetric: the column's value of largest magnitude maps to code 0 (``scale = value / -2**(bits
    - 1)``, as ONNX Runtime's symmetric quantizer does), so the other extreme gets the one code
    more. Asymmetric: min and max (each widened to include 0) span the codes.
    """
    top = 2**bits - 1
    if symmetric:
        extreme = block[np.argmax(np.abs(block), axis=0), np.arange(block.shape[1])]
        scale = extreme / -(2 ** (bits - 1))
        scale[scale == 0] = 1.0
        return scale, np.full(block.shape[1], 2 ** (bits - 1), dtype=np.float64)
    low = np.minimum(block.min(axis=0), 0.0)
    high = np.maximum(block.max(axis=0), 0.0)
    scale = (high - low) / top
    scale[scale == 0] = 1.0
    return scale, np.clip(np.rint(-low / scale), 0, top)
