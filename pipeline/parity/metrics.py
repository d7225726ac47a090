"""Streaming parity metrics: compare a candidate's outputs with a reference's, batch by batch."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

# Relative error divides by |reference| floored at this, so near-zero references stay finite.
_REL_FLOOR = 1e-6


# Error histogram: 20 bins per decade from 1e-9 to 1e3 (a bin's edges differ by 12%).
_LOW_EXPONENT, _PER_DECADE, _DECADES = -9, 20, 12
_BINS = _PER_DECADE * _DECADES


class WorstElement(BaseModel):
    """The element that needs the largest absolute tolerance to pass.

    Attributes:
        index: Its index in the output, the sample axis counted across all batches.
        reference: The reference value there.
        candidate: The candidate value there.
    """

    model_config = ConfigDict(ser_json_inf_nan="strings")

    index: list[int]
    reference: float
    candidate: float


class ErrorHistogram(BaseModel):
    """Absolute errors in log-spaced bins: bin i spans [10^(low + i/per_decade), 10^(low + (i+1)/per_decade)).

    Attributes:
        low_exponent: log10 of the first bin's lower edge (smaller non-zero errors count in bin 0).
        per_decade: Bins per factor of ten.
        counts: Elements per bin (errors past the last edge count in the last bin).
        zeros: Elements with no error at all.
    """

    low_exponent: int
    per_decade: int
    counts: list[int]
    zeros: int

    def edges(self) -> np.ndarray:
        """The bins' edges, one more than the bins."""
        return 10.0 ** (self.low_exponent + np.arange(len(self.counts) + 1) / self.per_decade)

    def quantile(self, q: float) -> float:
        """An upper bound of the q-quantile of the errors: the upper edge of the bin holding it."""
        total = self.zeros + sum(self.counts)
        rank = q * total
        if total == 0 or rank <= self.zeros:
            return 0.0
        cumulative = self.zeros + np.cumsum(self.counts)
        return float(self.edges()[1 + int(np.searchsorted(cumulative, rank))])


class OutputMetrics(BaseModel):
    """How one output of a candidate compares to the reference over all evaluation samples.

    Attributes:
        samples: Samples compared (first axis, summed over batches).
        elements: Elements compared.
        max_abs: Largest absolute error.
        max_rel: Largest relative error ``|c - r| / max(|r|, 1e-6)``.
        mean_abs: Mean absolute error.
        p99_abs: 99th percentile of the absolute error (upper bound from the histogram: at most
            12% above the exact value).
        cosine_mean: Mean over samples of the cosine similarity of each flattened sample. For
            outputs with one value per sample (a per-sample cosine is only a sign), the cosine of
            the whole output instead.
        cosine_min: Lowest per-sample cosine similarity (the whole output's, as above).
        snr_db: Signal-to-noise ratio ``10 log10(sum r^2 / sum (c - r)^2)`` (inf when equal).
        top1_agreement: Share of samples with the same argmax over the last axis, for classifier
            outputs shaped [samples, classes]; None otherwise.
        nan_count: NaN values in the candidate.
        inf_count: Infinite values in the candidate.
        min_atol: The smallest atol with which ``|c - r| <= atol + rtol * |r|`` holds everywhere,
            for the rtol the metrics were computed with.
        rtol: The rtol `min_atol` refers to.
        worst: The element that sets `min_atol`.
        error_histogram: The absolute errors, binned (for plots).
    """

    model_config = ConfigDict(ser_json_inf_nan="strings")

    samples: int
    elements: int
    max_abs: float
    max_rel: float
    mean_abs: float
    p99_abs: float = 0.0
    cosine_mean: float
    cosine_min: float
    snr_db: float
    top1_agreement: float | None
    nan_count: int
    inf_count: int
    min_atol: float
    rtol: float
    worst: WorstElement | None
    error_histogram: ErrorHistogram | None = None


class OutputComparator:
    """Accumulates the metrics of one output across batches in constant memory.

    Args:
        rtol: The relative tolerance `min_atol` is computed for.
        classifier: The output holds class scores, so top-1 agreement means something.
    """

    def __init__(self, rtol: float, classifier: bool = True) -> None:
        self._rtol = rtol
        self._samples = 0
        self._elements = 0
        self._max_abs = 0.0
        self._max_rel = 0.0
        self._sum_abs = 0.0
        self._sum_sq_ref = 0.0
        self._sum_sq_err = 0.0
        self._cosine_sum = 0.0
        self._cosine_min = math.inf
        self._sum_products = 0.0
        self._sum_sq_cand = 0.0
        self._top1_matches: int | None = 0 if classifier else None
        self._nan = 0
        self._inf = 0
        self._worst_needed = -math.inf
        self._worst: WorstElement | None = None
        self._histogram = np.zeros(_BINS, dtype=np.int64)
        self._zeros = 0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Add one batch of outputs (same shape; first axis = samples)."""
        if reference.shape != candidate.shape:
            raise ValueError(f"shape mismatch: reference {reference.shape}, candidate {candidate.shape}")
        ref = reference.astype(np.float64, copy=False)
        cand = candidate.astype(np.float64, copy=False)
        self._nan += int(np.isnan(cand).sum())
        self._inf += int(np.isinf(cand).sum())
        finite = np.isfinite(ref) & np.isfinite(cand)
        # Like np.allclose: equal infinities and NaN against NaN are no error (e.g. -inf mask values).
        same_special = (ref == cand) | (np.isnan(ref) & np.isnan(cand))
        with np.errstate(invalid="ignore", over="ignore"):
            error = np.where(finite, np.abs(cand - ref), np.where(same_special, 0.0, np.inf))
        self._track_worst(ref, cand, error)
        finite_error = np.where(finite, error, 0.0)
        self._bin(error)
        self._max_abs = max(self._max_abs, float(error.max(initial=0.0)))
        self._max_rel = max(self._max_rel, float((error / np.maximum(np.abs(ref), _REL_FLOOR)).max(initial=0.0)))
        self._sum_abs += float(finite_error.sum())
        self._sum_sq_ref += float(np.square(np.where(finite, ref, 0.0)).sum())
        self._sum_sq_err += float(np.square(finite_error).sum())
        self._update_per_sample(np.where(finite, ref, 0.0), np.where(finite, cand, 0.0))
        self._elements += ref.size
        self._samples += ref.shape[0] if ref.ndim else 1

    def _bin(self, error: np.ndarray) -> None:
        flat = error.ravel()
        nonzero = flat[flat > 0]
        self._zeros += int(flat.size - nonzero.size)
        with np.errstate(divide="ignore"):
            index = np.floor((np.log10(nonzero) - _LOW_EXPONENT) * _PER_DECADE)
        index = np.clip(np.nan_to_num(index, posinf=_BINS - 1), 0, _BINS - 1).astype(np.int64)
        self._histogram += np.bincount(index, minlength=_BINS)

    def _track_worst(self, ref: np.ndarray, cand: np.ndarray, error: np.ndarray) -> None:
        if error.size == 0:
            return
        with np.errstate(invalid="ignore"):
            needed = error - self._rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))
            needed = np.nan_to_num(needed, nan=np.inf, posinf=np.inf)
        flat = int(np.argmax(needed))
        value = float(needed.flat[flat])
        # Strictly greater: the first of equal candidates wins, in one batch or streamed.
        if value > self._worst_needed:
            index = list(np.unravel_index(flat, ref.shape)) if ref.ndim else []
            if index:
                index[0] += self._samples
            self._worst_needed = value
            self._worst = WorstElement(
                index=[int(i) for i in index], reference=float(ref.flat[flat]), candidate=float(cand.flat[flat])
            )

    def _update_per_sample(self, ref: np.ndarray, cand: np.ndarray) -> None:
        rows_ref = ref.reshape(ref.shape[0], -1) if ref.ndim else ref.reshape(1, -1)
        rows_cand = cand.reshape(rows_ref.shape)
        norm_ref = np.linalg.norm(rows_ref, axis=1)
        norm_cand = np.linalg.norm(rows_cand, axis=1)
        denominator = norm_ref * norm_cand
        dots = np.einsum("ij,ij->i", rows_ref, rows_cand)
        cosine = np.divide(dots, denominator, out=np.zeros_like(dots), where=denominator > 0)
        cosine[(norm_ref == 0) & (norm_cand == 0)] = 1.0  # two all-zero samples are identical
        cosine = np.clip(cosine, -1.0, 1.0)  # rounding can step just past 1
        self._sum_products += float(dots.sum())
        self._sum_sq_cand += float(np.square(norm_cand).sum())
        self._cosine_sum += float(cosine.sum())
        self._cosine_min = min(self._cosine_min, float(cosine.min(initial=math.inf)))
        if self._top1_matches is not None and ref.ndim == 2 and ref.shape[1] > 1:
            self._top1_matches += int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())
        else:
            self._top1_matches = None

    def result(self) -> OutputMetrics:
        """The metrics over everything added so far."""
        samples = max(self._samples, 1)
        histogram = ErrorHistogram(
            low_exponent=_LOW_EXPONENT, per_decade=_PER_DECADE, counts=self._histogram.tolist(), zeros=self._zeros
        )
        if self._elements > self._samples:
            cosine_mean, cosine_min = self._cosine_sum / samples, self._cosine_min if self._samples else 1.0
        else:
            cosine_mean = cosine_min = self._whole_output_cosine()
        if self._sum_sq_err == 0:
            snr = math.inf
        elif self._sum_sq_ref == 0:
            snr = -math.inf
        else:
            snr = 10.0 * math.log10(self._sum_sq_ref / self._sum_sq_err)
        return OutputMetrics(
            samples=self._samples,
            elements=self._elements,
            max_abs=self._max_abs,
            max_rel=self._max_rel,
            mean_abs=self._sum_abs / max(self._elements, 1),
            cosine_mean=cosine_mean,
            cosine_min=cosine_min,
            snr_db=snr,
            top1_agreement=None if self._top1_matches is None else self._top1_matches / samples,
            nan_count=self._nan,
            inf_count=self._inf,
            min_atol=max(self._worst_needed, 0.0),
            rtol=self._rtol,
            worst=self._worst,
            p99_abs=histogram.quantile(0.99),
            error_histogram=histogram,
        )

    def _whole_output_cosine(self) -> float:
        denominator = math.sqrt(self._sum_sq_ref * self._sum_sq_cand)
        if denominator == 0:
            return 1.0 if self._sum_sq_ref == self._sum_sq_cand else 0.0
        return max(-1.0, min(1.0, self._sum_products / denominator))


class AccuracyCounter:
    """Top-1 accuracy of a classifier output against integer labels, across batches."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """Add one batch: logits [samples, classes], labels [samples]."""
        self.correct += int((logits.argmax(axis=-1) == labels).sum())
        self.total += int(labels.shape[0])

    @property
    def accuracy(self) -> float:
        """Share of samples whose argmax equals the label."""
        return self.correct / self.total if self.total else math.nan
