"""Activation ranges from streaming statistics: MinMax, Percentile, Entropy (KL) and MSE-optimal."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from pipeline.calibration.histogram import BINS, TensorHistogram

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
# Candidate clipping thresholds tried by the entropy and MSE searches.
_CANDIDATES = 256


def compute_range(
    histogram: TensorHistogram, method: RangeMethod, *, percentile: float = 99.999, levels: int = 256
) -> tuple[float, float]:
    """The [low, high] range a tensor is quantized to.

    Args:
        histogram: The tensor's statistics.
        method: "minmax" (observed extremes), "percentile" (two-sided, ``(100 - p) / 2`` % in
            each tail), "entropy" (the threshold minimising the KL divergence between the
            clipped and the quantized distribution, TensorRT-style) or "mse" (the range
            minimising the expected squared quantization error, rounding plus clipping).
        percentile: For "percentile".
        levels: Quantization levels (256 for 8 bits).

    Returns:
        (low, high), always within the observed [minimum, maximum]; (0, 0) when no finite value
        was seen.
    """
    if histogram.finite == 0:
        return 0.0, 0.0
    observed = (histogram.minimum, histogram.maximum)
    if method == "minmax" or histogram.half_range == 0 or histogram.maximum == histogram.minimum:
        return observed
    if method == "percentile":
        low, high = _percentile(histogram, percentile)
    elif method == "entropy":
        threshold = _entropy_threshold(histogram, levels // 2)
        # A threshold on |x| clips only the side(s) the data reaches, never past the other bound.
        low = -threshold if observed[0] < 0 else observed[0]
        high = threshold if observed[1] > 0 else observed[1]
        if high <= low:
            low, high = observed
    else:
        low, high = _mse_range(histogram, levels)
    return max(low, observed[0]), min(high, observed[1])


def _centers(histogram: TensorHistogram) -> np.ndarray:
    edges = histogram.edges
    return (edges[:-1] + edges[1:]) / 2


def _percentile(histogram: TensorHistogram, percentile: float) -> tuple[float, float]:
    tail = (100.0 - percentile) / 200.0 * histogram.counts.sum()
    cumulative = np.cumsum(histogram.counts)
    edges = histogram.edges
    low_index = int(np.searchsorted(cumulative, tail, side="right"))
    high_index = int(np.searchsorted(cumulative, cumulative[-1] - tail, side="left"))
    return float(edges[low_index]), float(edges[min(high_index + 1, BINS)])


def _folded(histogram: TensorHistogram) -> np.ndarray:
    """Counts of |x| over [0, R): bins mirrored around zero and added."""
    half = BINS // 2
    return histogram.counts[half:] + histogram.counts[:half][::-1]


def _entropy_threshold(histogram: TensorHistogram, quantized_bins: int) -> float:
    """TensorRT's calibration: the |x| threshold whose clipped distribution loses least (KL) to
    its `quantized_bins`-level quantization."""
    folded = _folded(histogram).astype(np.float64)
    # The KL estimate needs counts in the bins: coarsen to ~16 values per bin on average; with
    # too few values for `quantized_bins` bins there is nothing to estimate, so no clipping.
    usable_bins = 2 ** int(math.log2(max(folded.sum() / 16, 1)))
    if usable_bins <= quantized_bins:
        return max(-histogram.minimum, histogram.maximum)
    if usable_bins < folded.size:
        folded = folded.reshape(usable_bins, -1).sum(axis=1)
    # The exact zeros of a ReLU output (or a sparse input) pile up in the first bin and would
    # dominate P: like NVIDIA's implementation, count that bin as its neighbour does.
    folded[0] = folded[1]
    width = histogram.half_range / folded.size
    best, best_threshold = np.inf, histogram.half_range
    for stop in np.unique(np.linspace(quantized_bins, folded.size, _CANDIDATES).astype(int)):
        kept = folded[:stop]
        reference = kept.copy()
        reference[-1] += folded[stop:].sum()  # outliers fold into the last kept bin
        if reference.sum() == 0:
            continue
        # Q quantizes the kept bins *without* the outliers (TensorRT's algorithm): clipping then
        # costs divergence. Built from the folded reference, Q would equal P when `stop` equals
        # `quantized_bins`, and the smallest threshold would always win.
        candidate = _quantize_and_expand(kept, quantized_bins)
        divergence = _kl(reference, candidate)
        if divergence < best:
            best, best_threshold = divergence, stop * width
    return float(best_threshold)


def _quantize_and_expand(counts: np.ndarray, levels: int) -> np.ndarray:
    """Merge `counts` into `levels` groups, then spread each group evenly over its non-empty bins."""
    starts = np.linspace(0, counts.size, levels, endpoint=False).astype(int)
    nonzero = counts > 0
    totals = np.add.reduceat(counts, starts)
    occupied = np.add.reduceat(nonzero.astype(np.int64), starts)
    per_bin = np.divide(totals, occupied, out=np.zeros_like(totals, dtype=np.float64), where=occupied > 0)
    group_of_bin = np.repeat(np.arange(levels), np.diff(np.append(starts, counts.size)))
    return np.where(nonzero, per_bin[group_of_bin], 0.0)


def _kl(reference: np.ndarray, candidate: np.ndarray, epsilon: float = 1e-4) -> float:
    """KL(p || q), with q smoothed where it is empty but p is not (as ONNX Runtime does)."""
    p = reference / reference.sum()
    total = candidate.sum()
    if total == 0:
        return np.inf
    q = candidate / total
    q = np.where((q == 0) & (p > 0), epsilon / p.size, q)
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _mse_range(histogram: TensorHistogram, levels: int) -> tuple[float, float]:
    """The [low, high] minimising rounding error (step^2 / 12 inside) plus clipping error (outside)."""
    # Empty bins add nothing to any candidate's error: leave them out of the matrices.
    occupied = histogram.counts > 0
    centers = _centers(histogram)[occupied]
    counts = histogram.counts[occupied].astype(np.float64)
    magnitude = max(abs(histogram.minimum), abs(histogram.maximum))
    thresholds = np.linspace(magnitude / _CANDIDATES, magnitude, _CANDIDATES)
    lows = np.maximum(histogram.minimum, -thresholds)[:, None]
    highs = np.minimum(histogram.maximum, thresholds)[:, None]
    step = (highs - lows) / (levels - 1)
    clipped = np.clip(centers[None, :], lows, highs)
    inside = (centers[None, :] >= lows) & (centers[None, :] <= highs)
    error = np.where(inside, step**2 / 12.0, (centers[None, :] - clipped) ** 2)
    best = int(np.argmin(error @ counts))
    return float(lows[best, 0]), float(highs[best, 0])
