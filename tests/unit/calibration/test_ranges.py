"""Unit tests of `compute_range`: MinMax, Percentile, Entropy (KL) and MSE on known distributions."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from pipeline.calibration.histogram import BINS, TensorHistogram
from pipeline.calibration.ranges import RangeMethod, compute_range

METHODS: tuple[RangeMethod, ...] = ("minmax", "percentile", "entropy", "mse")
OUTLIER = 50.0  # in standard deviations


def histogram_of(values: np.ndarray) -> TensorHistogram:
    """Every value binned."""
    histogram = TensorHistogram()
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    histogram.update(flat, sample=flat.size)
    return histogram


def bin_width(histogram: TensorHistogram) -> float:
    return 2 * histogram.half_range / BINS


@pytest.fixture(scope="module")
def normal() -> np.ndarray:
    return np.random.default_rng(5).normal(size=1_000_000).astype(np.float32)


@pytest.fixture(scope="module")
def normal_histogram(normal: np.ndarray) -> TensorHistogram:
    return histogram_of(normal)


def with_outliers(values: np.ndarray, per_side: int) -> np.ndarray:
    far = np.full(per_side, OUTLIER, dtype=np.float32)
    return np.concatenate([values, far, -far])


def test_minmax_returns_the_observed_extremes(normal: np.ndarray, normal_histogram: TensorHistogram) -> None:
    assert compute_range(normal_histogram, "minmax") == (float(normal.min()), float(normal.max()))
    skewed = np.float32([0.25, 3.5, 7.0, 1.0])
    assert compute_range(histogram_of(skewed), "minmax") == (0.25, 7.0)


def test_a_sampled_update_keeps_percentiles_close(normal: np.ndarray) -> None:
    # One 1M-value update bins HISTOGRAM_SAMPLE of it (evenly spaced blocks): a few bins of sampling error.
    sampled = TensorHistogram()
    sampled.update(normal)
    assert sampled.counts.sum() < normal.size and sampled.finite == normal.size
    width = bin_width(sampled)
    low, high = compute_range(sampled, "percentile", percentile=99.9)
    empirical_low, empirical_high = np.quantile(normal, [0.0005, 0.9995])
    assert abs(low - empirical_low) <= 8 * width
    assert abs(high - empirical_high) <= 8 * width
    assert (sampled.minimum, sampled.maximum) == (float(normal.min()), float(normal.max()))


@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_percentile_matches_the_normal_quantiles(
    normal: np.ndarray, normal_histogram: TensorHistogram, percentile: float
) -> None:
    width = bin_width(normal_histogram)
    tail = (100.0 - percentile) / 200.0
    analytic = NormalDist().inv_cdf(1.0 - tail)
    empirical_low, empirical_high = np.quantile(normal, [tail, 1.0 - tail])

    low, high = compute_range(normal_histogram, "percentile", percentile=percentile)

    # Against the sample's own quantiles: the bin holding each of them, no more.
    assert abs(low - empirical_low) <= width
    assert abs(high - empirical_high) <= width
    # Against the distribution: within two bins (sampling noise included).
    assert abs(low + analytic) <= 2 * width
    assert abs(high - analytic) <= 2 * width


def test_a_higher_percentile_gives_a_wider_range(normal_histogram: TensorHistogram) -> None:
    ranges = [compute_range(normal_histogram, "percentile", percentile=p) for p in (90.0, 99.0, 99.9, 99.999)]

    for (low, high), (wider_low, wider_high) in zip(ranges, ranges[1:], strict=False):
        assert wider_low < low and high < wider_high


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_far_outliers_are_clipped(normal: np.ndarray, method: RangeMethod) -> None:
    histogram = histogram_of(with_outliers(normal, per_side=2))

    low, high = compute_range(histogram, method)

    assert (histogram.minimum, histogram.maximum) == (-OUTLIER, OUTLIER)
    assert -OUTLIER / 2 < low < 0 < high < OUTLIER / 2  # well inside the outliers
    covered = np.count_nonzero((normal >= low) & (normal <= high)) / normal.size
    assert covered > 0.999  # still the bulk of the distribution


def test_entropy_clips_far_outliers_on_a_smaller_sample(normal: np.ndarray) -> None:
    histogram = histogram_of(with_outliers(normal[:200_000], per_side=1))

    low, high = compute_range(histogram, "entropy")

    assert -OUTLIER / 2 < low < 0 < high < OUTLIER / 2


def test_mse_clips_less_than_entropy_and_percentile_less_than_minmax(normal: np.ndarray) -> None:
    histogram = histogram_of(with_outliers(normal, per_side=2))

    widths = {method: np.subtract(*compute_range(histogram, method)[::-1]) for method in METHODS}

    assert widths["minmax"] == 2 * OUTLIER
    assert widths["percentile"] < widths["minmax"]
    assert widths["entropy"] < widths["mse"] < widths["minmax"]


def _distributions() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    base = rng.normal(size=50_000).astype(np.float32)
    return {
        "normal": base,
        "relu": np.maximum(base, 0) * 3,
        "negative": -np.abs(base) - 2,
        "uniform_offset": rng.uniform(2.0, 5.0, size=50_000).astype(np.float32),
        "heavy_tail": rng.standard_t(2, size=50_000).astype(np.float32),
        "outliers": with_outliers(base, per_side=3),
        "two_values": np.float32([1.0, 1.0001] * 10),
        "tiny": base * np.float32(1e-6),
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(_distributions()))
def test_every_range_lies_within_the_observed_extremes(name: str, method: RangeMethod) -> None:
    histogram = histogram_of(_distributions()[name])

    low, high = compute_range(histogram, method)

    assert math.isfinite(low) and math.isfinite(high)
    assert histogram.minimum <= low <= high <= histogram.maximum
    if method != "minmax":
        # A range that keeps nothing would quantize the tensor to a constant.
        assert high > low


@pytest.mark.parametrize("method", METHODS)
def test_constant_and_empty_histograms(method: RangeMethod) -> None:
    assert compute_range(histogram_of(np.full(1000, 2.5)), method) == (2.5, 2.5)
    assert compute_range(histogram_of(np.zeros(10)), method) == (0.0, 0.0)
    assert compute_range(TensorHistogram(), method) == (0.0, 0.0)
    assert compute_range(histogram_of(np.float32([np.nan, -np.inf])), method) == (0.0, 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_min_max_only_statistics_give_the_observed_range(method: RangeMethod) -> None:
    histogram = TensorHistogram()
    histogram.update(np.float32([-1.0, 4.0, 0.5]), with_histogram=False)

    assert compute_range(histogram, method) == (-1.0, 4.0)


@pytest.mark.parametrize("masked", [-np.inf, np.finfo(np.float32).min])
@pytest.mark.parametrize("method", METHODS)
def test_attention_mask_values_give_finite_ranges(method: RangeMethod, masked: float) -> None:
    # Scores plus a mask: -inf (or finfo.min) wherever a position is masked out.
    rng = np.random.default_rng(7)
    scores = rng.normal(scale=3.0, size=(64, 12, 32)).astype(np.float32)
    mask = np.where(rng.random(size=(64, 1, 32)) < 0.3, masked, 0.0).astype(np.float32)
    histogram = histogram_of(scores + mask)
    mask_only = histogram_of(mask)

    low, high = compute_range(histogram, method)
    mask_low, mask_high = compute_range(mask_only, method)

    assert histogram.nonfinite + histogram.huge > 0
    assert math.isfinite(low) and math.isfinite(high)
    assert -30.0 < low < 0 < high < 30.0  # the scores' range, untouched by the mask value
    assert (mask_low, mask_high) == (0.0, 0.0)  # the mask's finite values are all zeros


def test_entropy_keeps_the_bulk_of_a_relu_output() -> None:
    # Half exact zeros, half |N(0, 1)|: a ReLU output. The zeros must not drag the threshold down
    # (it fell to 0.5 for such tensors, and the digits CNN to chance accuracy, before the fix).
    rng = np.random.default_rng(7)
    values = np.concatenate([np.zeros(100_000), np.abs(rng.normal(size=100_000))]).astype(np.float32)

    low, high = compute_range(histogram_of(values), "entropy")

    assert low == 0.0
    assert np.count_nonzero(values <= high) / values.size > 0.995


def test_entropy_does_not_clip_a_bounded_sparse_input() -> None:
    # Pixel intensities in [0, 1], most of them 0: nothing is an outlier, nothing may be clipped away.
    rng = np.random.default_rng(8)
    values = np.where(rng.random(200_000) < 0.6, 0.0, rng.random(200_000)).astype(np.float32)

    low, high = compute_range(histogram_of(values), "entropy")

    assert (low, high) == (0.0, pytest.approx(values.max(), rel=0.05))
