"""Unit tests of `TensorHistogram`: exact counts, irregular values, growth, merging, fixed memory."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipeline.calibration.histogram import BINS, HISTOGRAM_SAMPLE, HUGE, SAMPLE_BLOCK, TensorHistogram


def histogram_of(*chunks: np.ndarray) -> TensorHistogram:
    """One histogram updated with `chunks` in sequence, every value binned."""
    histogram = TensorHistogram()
    for chunk in chunks:
        histogram.update(chunk, sample=chunk.size)
    return histogram


def coarsened(histogram: TensorHistogram, half_range: float) -> np.ndarray:
    """The histogram's counts re-binned over ``[-half_range, half_range)`` (a bigger power of two).

    Computed here independently of the class: doubling R k times sums runs of 2**k bins into the
    middle ``BINS / 2**k`` bins.
    """
    factor = int(half_range / histogram.half_range)
    assert factor * histogram.half_range == half_range and factor & (factor - 1) == 0
    merged = histogram.counts.reshape(-1, factor).sum(axis=1)
    counts = np.zeros(BINS, dtype=np.int64)
    start = (BINS - merged.size) // 2
    counts[start : start + merged.size] = merged
    return counts


def bin_of(histogram: TensorHistogram, value: float) -> int:
    """The index of the bin holding `value`, in exact (float64) arithmetic."""
    return math.floor((value + histogram.half_range) * BINS / (2 * histogram.half_range))


# Chunks of very different magnitudes: each forces the range of a shared histogram to grow.
MAGNITUDES = (0.01, 300.0, 1.0, 5000.0, 0.2)


@pytest.fixture(scope="module")
def chunks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.normal(size=4000) * scale).astype(np.float32) for scale in MAGNITUDES]


@pytest.fixture(scope="module")
def dyadic_chunks() -> list[np.ndarray]:
    """Like `chunks`, but every value a multiple of 1/64: binning them involves no rounding at all."""
    rng = np.random.default_rng(1)
    return [(np.round(rng.normal(size=4000) * scale * 64) / 64).astype(np.float32) for scale in MAGNITUDES]


def test_min_max_and_counts_are_exact() -> None:
    values = np.random.default_rng(2).normal(size=(10, 37, 3)).astype(np.float32)

    histogram = histogram_of(values[:4], values[4:])

    assert histogram.minimum == float(values.min())
    assert histogram.maximum == float(values.max())
    assert histogram.finite == values.size
    assert histogram.counts.sum() == values.size
    assert histogram.nonfinite == histogram.huge == 0
    assert histogram.maximum < histogram.half_range and -histogram.half_range <= histogram.minimum
    assert math.log2(histogram.half_range).is_integer()


def test_every_value_lands_in_its_bin() -> None:
    values = np.array([-1.5, -0.25, -0.0009, 0.0, 0.001, 0.75, 1.99], dtype=np.float32)

    histogram = histogram_of(values)

    expected = np.zeros(BINS, dtype=np.int64)
    for value in values:
        expected[bin_of(histogram, float(value))] += 1
    np.testing.assert_array_equal(histogram.counts, expected)


def test_nan_inf_and_huge_values_are_counted_and_left_out() -> None:
    regular = np.array([1.0, -3.0, 0.5, 2.0], dtype=np.float32)
    irregular = np.array([np.nan, np.inf, -np.inf, np.nan], dtype=np.float32)
    huge = np.array([2e30, -5e30, np.finfo(np.float32).min, np.finfo(np.float32).max], dtype=np.float32)
    values = np.concatenate([regular[:2], irregular, huge, regular[2:]])

    histogram = histogram_of(values)

    assert histogram.nonfinite == 4
    assert histogram.huge == 4
    assert histogram.finite == 4
    assert histogram.counts.sum() == 4
    assert (histogram.minimum, histogram.maximum) == (-3.0, 2.0)
    assert histogram.half_range == 4.0  # sized by the regular values only
    assert np.array_equal(histogram.counts, histogram_of(regular).counts)


def test_values_at_the_huge_limit_are_still_regular() -> None:
    limit = np.float32(HUGE)  # float32(1e30) is a little below 1e30: regular

    histogram = histogram_of(np.array([limit, -limit, 1.0], dtype=np.float32))

    assert histogram.huge == 0 and histogram.finite == 3
    assert histogram.maximum == float(limit)


def test_a_batch_of_only_irregular_values_leaves_the_statistics_empty() -> None:
    histogram = histogram_of(np.array([np.nan, -np.inf, 1e35], dtype=np.float32))

    assert (histogram.nonfinite, histogram.huge, histogram.finite) == (2, 1, 0)
    assert histogram.half_range == 0
    assert histogram.counts.sum() == 0
    assert histogram.minimum == math.inf and histogram.maximum == -math.inf


def test_other_dtypes_are_read_as_float32() -> None:
    values = np.array([[0.5, -1.25], [3.0, 2.0]])

    for dtype, minimum in ((np.float16, -1.25), (np.float64, -1.25), (np.int32, -1.0)):
        histogram = histogram_of(values.astype(dtype))
        assert histogram.finite == 4
        assert histogram.minimum == minimum
        assert histogram.maximum == 3.0


def test_without_histogram_only_min_max_and_counts_are_kept() -> None:
    histogram = TensorHistogram()
    histogram.update(np.array([-2.0, 7.0, np.inf], dtype=np.float32), with_histogram=False)

    assert (histogram.minimum, histogram.maximum, histogram.finite, histogram.nonfinite) == (-2.0, 7.0, 2, 1)
    assert histogram.half_range == 0
    assert histogram.counts.sum() == 0


def test_range_doubles_as_bigger_values_arrive_and_counts_are_kept() -> None:
    histogram = histogram_of(np.array([0.5, -0.3], dtype=np.float32))
    assert histogram.half_range == 1.0
    first = histogram.counts.copy()

    histogram.update(np.array([3.0], dtype=np.float32))

    assert histogram.half_range == 4.0  # two doublings
    assert histogram.counts.sum() == 3
    assert histogram.counts[bin_of(histogram, 0.5)] == 1
    assert histogram.counts[bin_of(histogram, -0.3)] == 1
    assert histogram.counts[bin_of(histogram, 3.0)] == 1
    # The old bins were merged, not re-counted: the old counts coarsened by 4 are the new ones.
    np.testing.assert_array_equal(
        histogram.counts - np.eye(1, BINS, bin_of(histogram, 3.0), dtype=np.int64)[0],
        coarsened(TensorHistogram(1.0, first), 4.0),
    )


def test_range_grows_step_by_step_and_never_shrinks(chunks: list[np.ndarray]) -> None:
    histogram = TensorHistogram()
    total = 0
    for chunk in chunks:
        before = histogram.half_range
        histogram.update(chunk)
        total += chunk.size
        magnitude = float(np.abs(chunk).max())
        assert histogram.half_range >= before
        assert magnitude < histogram.half_range  # covers the new values ...
        assert histogram.half_range / 2 <= max(magnitude, before)  # ... with no doubling to spare
        assert histogram.counts.sum() == histogram.finite == total


def test_a_value_equal_to_the_range_triggers_growth() -> None:
    histogram = histogram_of(np.float32([1.0]))  # R = 2: the histogram covers [-2, 2)
    assert histogram.half_range == 2.0

    histogram.update(np.float32([2.0]))

    assert histogram.half_range == 4.0
    assert histogram.counts[BINS - 1] == 0  # nothing piled up in the last bin by clipping


def test_counts_over_an_interval_match_numpy() -> None:
    values = np.random.default_rng(3).normal(loc=0.3, scale=1.7, size=200_000).astype(np.float32)
    histogram = histogram_of(values[:50_000], values[50_000:])
    edges = histogram.edges
    width = edges[1] - edges[0]

    for low, high in [(-0.7, 1.3), (-3.1, -2.2), (0.0, 0.05), (2.5, 6.0)]:
        first, last = bin_of(histogram, low), bin_of(histogram, high)
        counted = int(histogram.counts[first : last + 1].sum())
        exact = int(np.count_nonzero((values >= low) & (values <= high)))
        # Only the two partial bins at the ends (and values on their edges) may differ.
        inner = int(np.count_nonzero((values >= edges[first + 1]) & (values < edges[last])))
        outer = int(np.count_nonzero((values >= edges[first] - width) & (values < edges[last + 1] + width)))
        assert inner <= counted <= outer
        edge_effects = int(np.count_nonzero((values >= edges[first]) & (values < edges[first + 1])))
        edge_effects += int(np.count_nonzero((values >= edges[last]) & (values < edges[last + 1])))
        assert abs(counted - exact) <= edge_effects


def test_memory_is_fixed_whatever_the_data_size() -> None:
    rng = np.random.default_rng(4)
    small = histogram_of(np.float32([1.0]))
    big = histogram_of(*(rng.normal(scale=10.0**k, size=250_000).astype(np.float32) for k in range(-3, 5)))

    for histogram in (small, big, TensorHistogram()):
        assert histogram.counts.shape == (BINS,)
        assert histogram.counts.dtype == np.int64
    assert big.counts.nbytes == small.counts.nbytes
    assert big.counts.sum() == 8 * 250_000


def test_copy_is_independent() -> None:
    original = histogram_of(np.float32([1.0, 2.0]))
    duplicate = original.copy()

    duplicate.update(np.float32([100.0, np.nan]))

    assert original.half_range == 4.0 and original.counts.sum() == 2 and original.nonfinite == 0
    assert duplicate.counts.sum() == 3


def test_merge_keeps_every_scalar_exact_in_any_order(chunks: list[np.ndarray]) -> None:
    irregular = np.array([np.nan, np.inf, 1e31], dtype=np.float32)
    pieces = [*chunks, irregular]
    sequential = histogram_of(*pieces)
    parts = [histogram_of(piece) for piece in pieces]

    for order in itertools.permutations(range(len(parts))):
        merged = TensorHistogram()
        for index in order:
            merged.merge(parts[index])
        assert merged.finite == sequential.finite == sum(chunk.size for chunk in chunks)
        assert merged.counts.sum() == sequential.finite
        assert (merged.minimum, merged.maximum) == (sequential.minimum, sequential.maximum)
        assert (merged.nonfinite, merged.huge) == (2, 1)


def test_merged_counts_are_exact_once_at_the_same_range(dyadic_chunks: list[np.ndarray]) -> None:
    # Whatever R the merge ends at, re-binning the one-pass histogram to it must give the same counts.
    sequential = histogram_of(*dyadic_chunks)
    parts = [histogram_of(chunk) for chunk in dyadic_chunks]

    for order in [(0, 1, 2, 3, 4), (4, 3, 2, 1, 0), (3, 0, 4, 1, 2), (1, 3, 0, 2, 4)]:
        merged = parts[order[0]].copy()
        for index in order[1:]:
            merged.merge(parts[index])
        assert merged.half_range >= sequential.half_range
        np.testing.assert_array_equal(merged.counts, coarsened(sequential, merged.half_range))


def test_merge_of_histograms_at_the_same_range_keeps_that_range() -> None:
    one = histogram_of(np.float32([1.5, -0.5]))
    other = histogram_of(np.float32([-1.25, 0.75]))
    assert one.half_range == other.half_range == 2.0

    one.merge(other)

    assert one.half_range == 2.0
    np.testing.assert_array_equal(one.counts, histogram_of(np.float32([1.5, -0.5, -1.25, 0.75])).counts)


def test_small_negative_values_land_below_zero_after_growth() -> None:
    histogram = histogram_of(np.float32([3000.0]))  # R = 4096, bins of width 2
    assert histogram.half_range == 4096.0

    histogram.update(np.float32([-1e-4, -1e-5]))

    assert histogram.counts[BINS // 2 - 1] == 2  # [-2, 0)
    assert histogram.counts[BINS // 2] == 0  # [0, 2)


def test_update_order_does_not_change_the_counts(chunks: list[np.ndarray]) -> None:
    reference = histogram_of(*chunks)

    for order in [(4, 3, 2, 1, 0), (3, 0, 1, 2, 4), (1, 3, 4, 0, 2)]:
        reordered = histogram_of(*(chunks[index] for index in order))
        assert reordered.half_range == reference.half_range
        np.testing.assert_array_equal(reordered.counts, reference.counts)


def test_merging_chunk_histograms_equals_one_pass(chunks: list[np.ndarray]) -> None:
    sequential = histogram_of(*chunks)
    parts = [histogram_of(chunk) for chunk in chunks]

    for order in [(0, 1, 2, 3, 4), (4, 3, 2, 1, 0), (3, 0, 4, 1, 2), (2, 4, 1, 0, 3)]:
        merged = TensorHistogram()
        for index in order:
            merged.merge(parts[index])
        assert merged.half_range == sequential.half_range
        assert (merged.minimum, merged.maximum, merged.finite) == (
            sequential.minimum,
            sequential.maximum,
            sequential.finite,
        )
        np.testing.assert_array_equal(merged.counts, sequential.counts)


def test_a_sampled_update_sees_every_channel() -> None:
    # A transformer-like activation: 384 channels, one of them an outlier channel. A sample of
    # every k-th value would only ever see the channels k divides; blocks see them all.
    rows, channels, outlier = 6_000, 384, 7
    values = np.random.default_rng(5).normal(size=(rows, channels)).astype(np.float32)
    values[:, outlier] *= 100.0
    histogram = TensorHistogram()
    histogram.update(values)

    assert values.size > 8 * HISTOGRAM_SAMPLE
    assert HISTOGRAM_SAMPLE <= histogram.counts.sum() < HISTOGRAM_SAMPLE + SAMPLE_BLOCK
    far = np.abs(histogram.edges[:-1]) > 20.0  # only the outlier channel reaches here
    expected_share = np.count_nonzero(np.abs(values) > 20.0) / values.size
    assert histogram.counts[far].sum() / histogram.counts.sum() == pytest.approx(expected_share, rel=0.2)
    assert (histogram.minimum, histogram.maximum) == (float(values.min()), float(values.max()))
