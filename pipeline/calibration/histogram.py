"""A mergeable, growing histogram of one tensor's values, with min/max and non-finite counts.

Bins are uniform over ``[-R, R)`` where R is a power of two. When a value falls outside, R
doubles and every pair of bins merges into one: an exact operation, so histograms built on
different workers (or batches) merge exactly once brought to the same R. Memory is fixed per
tensor (`BINS` counts), whatever the number of samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BINS = 4096
# Values beyond this magnitude are treated like infinities: attention masks use finfo.min.
HUGE = 1e30
# At most about this many values of one update (the collector: of one calibration batch) go into
# the bins: a million or more per tensor over a calibration set, plenty for the range searches, at
# a fraction of the cost. Minimum and maximum always see every value.
HISTOGRAM_SAMPLE = 2**17
# The sample is evenly spaced contiguous blocks of this many values, not every k-th value: a
# stride that shares a factor with the channel count would only ever see some channels (and miss
# the outlier channels that set a transformer's ranges), and a strided read touches every cache
# line of the tensor.
SAMPLE_BLOCK = 4096
_SMALLEST_HALF_RANGE = 2.0**-24


@dataclass
class TensorHistogram:
    """Streaming statistics of one tensor.

    Attributes:
        half_range: R, the histogram covers ``[-R, R)``.
        counts: Counts per bin (`BINS` of them).
        minimum: Smallest finite, non-huge value seen.
        maximum: Largest finite, non-huge value seen.
        finite: Number of values seen (minimum and maximum are over all of them; the bins hold
            a sample of evenly spaced blocks of each update larger than its `sample`).
        nonfinite: NaN and infinite values seen (left out of every statistic).
        huge: Finite values beyond `HUGE` in magnitude (left out too).
    """

    half_range: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    minimum: float = math.inf
    maximum: float = -math.inf
    finite: int = 0
    nonfinite: int = 0
    huge: int = 0

    def update(self, values: np.ndarray, with_histogram: bool = True, sample: int = HISTOGRAM_SAMPLE) -> None:
        """Add a batch of values (any shape).

        Args:
            values: The tensor's values.
            with_histogram: Bin them too, not only min / max and counts.
            sample: Bin about this many of them (whole `SAMPLE_BLOCK` blocks, evenly spaced).
        """
        flat = values.reshape(-1)
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        if flat.size == 0:
            return
        low, high = float(flat.min()), float(flat.max())
        # Fast path: every value finite and ordinary (min/max are NaN or beyond HUGE otherwise).
        if not (-HUGE <= low and high <= HUGE):
            flat = self._drop_irregular(flat)
            if flat.size == 0:
                return
            low, high = float(flat.min()), float(flat.max())
        self.minimum = min(self.minimum, low)
        self.maximum = max(self.maximum, high)
        self.finite += int(flat.size)
        if with_histogram:
            self._grow_to(max(-low, high))
            self._add(_sample(flat, sample))

    def _drop_irregular(self, flat: np.ndarray) -> np.ndarray:
        """Count and remove NaN, infinities and huge values (e.g. masks filled with finfo.min)."""
        finite = np.isfinite(flat)
        regular = finite & (np.abs(flat, where=finite, out=np.zeros_like(flat)) <= HUGE)
        nonfinite = flat.size - int(np.count_nonzero(finite))
        self.nonfinite += nonfinite
        self.huge += flat.size - nonfinite - int(np.count_nonzero(regular))
        return flat[regular]

    def merge(self, other: TensorHistogram) -> None:
        """Add another histogram of the same tensor (from another batch or worker)."""
        self.nonfinite += other.nonfinite
        self.huge += other.huge
        if other.finite == 0:
            return
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)
        self.finite += other.finite
        if other.half_range == 0:
            return
        incoming = other.copy()
        target = max(self.half_range, incoming.half_range)
        self._widen_to(target)
        incoming._widen_to(target)
        self.counts += incoming.counts

    def copy(self) -> TensorHistogram:
        """An independent copy."""
        return TensorHistogram(
            self.half_range, self.counts.copy(), self.minimum, self.maximum, self.finite, self.nonfinite, self.huge
        )

    @property
    def edges(self) -> np.ndarray:
        """The `BINS + 1` bin edges."""
        return np.linspace(-self.half_range, self.half_range, BINS + 1)

    def _grow_to(self, magnitude: float) -> None:
        """Make R the smallest power of two above `magnitude` (values must fall inside [-R, R))."""
        if self.half_range == 0:
            self.half_range = 2.0 ** math.ceil(math.log2(max(magnitude, _SMALLEST_HALF_RANGE)))
            if magnitude >= self.half_range:
                self.half_range *= 2
            return
        needed = self.half_range
        while magnitude >= needed:
            needed *= 2
        self._widen_to(needed)

    def _widen_to(self, half_range: float) -> None:
        """Double R up to `half_range` (a power of two), merging bin pairs each time: exact."""
        if self.half_range == 0:
            self.half_range = half_range
            return
        while self.half_range < half_range:
            merged = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.zeros(BINS, dtype=np.int64)
            self.counts[BINS // 4 : 3 * BINS // 4] = merged
            self.half_range *= 2

    def _add(self, values: np.ndarray) -> None:
        # scale is a power of two, so values * scale is exact in float32 and floor() puts every
        # value in the same bin whatever R was when it arrived (merging stays exact).
        scale = np.float32(BINS / (2 * self.half_range))
        scaled = values * scale
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.int32).reshape(-1)
        index += BINS // 2
        np.clip(index, 0, BINS - 1, out=index)
        self.counts += np.bincount(index, minlength=BINS)


def _sample(flat: np.ndarray, size: int) -> np.ndarray:
    """About `size` values of `flat` (at least two blocks): evenly spaced `SAMPLE_BLOCK` blocks.

    A read-only view (blocks x SAMPLE_BLOCK) over `flat`; `flat` itself when it is small enough.
    """
    blocks = max(2, -(-size // SAMPLE_BLOCK))
    if flat.size <= blocks * SAMPLE_BLOCK:
        return flat
    step = (flat.size - SAMPLE_BLOCK) // (blocks - 1)
    return np.lib.stride_tricks.as_strided(
        flat, shape=(blocks, SAMPLE_BLOCK), strides=(step * flat.itemsize, flat.itemsize), writeable=False
    )
