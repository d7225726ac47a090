"""Unit tests of the streaming parity metrics in `pipeline.parity.metrics`.

Every expected figure is computed by hand (or with plain numpy) from small arrays built in
the test, so a regression in `OutputComparator` or `AccuracyCounter` shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.parity.metrics import AccuracyCounter, OutputComparator, OutputMetrics

RTOL = 1e-3


def compare(reference: np.ndarray, candidate: np.ndarray, rtol: float = RTOL) -> OutputMetrics:
    """Metrics of one batch."""
    comparator = OutputComparator(rtol)
    comparator.update(reference, candidate)
    return comparator.result()


def compare_in_batches(
    reference: np.ndarray, candidate: np.ndarray, bounds: list[int], rtol: float = RTOL
) -> OutputMetrics:
    """Metrics of the same data fed in batches split at `bounds` along the first axis."""
    comparator = OutputComparator(rtol)
    for ref, cand in zip(np.split(reference, bounds), np.split(candidate, bounds), strict=True):
        comparator.update(ref, cand)
    return comparator.result()


def test_identical_outputs_are_perfect() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(6, 5)).astype(np.float32)

    metrics = compare(reference, reference.copy())

    assert metrics.samples == 6
    assert metrics.elements == 30
    assert metrics.max_abs == 0.0
    assert metrics.max_rel == 0.0
    assert metrics.mean_abs == 0.0
    assert metrics.cosine_mean == pytest.approx(1.0, abs=1e-12)
    assert metrics.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert metrics.snr_db == math.inf
    assert metrics.min_atol == 0.0
    assert metrics.top1_agreement == 1.0
    assert metrics.nan_count == 0
    assert metrics.inf_count == 0
    assert metrics.rtol == RTOL


def test_known_perturbation_gives_hand_computed_figures() -> None:
    reference = np.array([[1.0, -2.0], [4.0, 0.5]])
    candidate = np.array([[1.1, -2.0], [4.0, 0.0]])
    # Errors: 0.1 at [0, 0], 0.5 at [1, 1]; zero elsewhere.

    metrics = compare(reference, candidate)

    assert metrics.max_abs == pytest.approx(0.5)
    assert metrics.max_rel == pytest.approx(1.0)  # 0.5 / |0.5|
    assert metrics.mean_abs == pytest.approx((0.1 + 0.5) / 4)
    signal = 1.0 + 4.0 + 16.0 + 0.25
    noise = 0.1**2 + 0.5**2
    assert metrics.snr_db == pytest.approx(10 * math.log10(signal / noise))
    # The element needing most atol: 0.5 - rtol * 0.5 at [1, 1] (vs 0.1 - rtol * 1 at [0, 0]).
    assert metrics.min_atol == pytest.approx(0.5 - RTOL * 0.5)
    assert metrics.worst is not None
    assert metrics.worst.index == [1, 1]
    assert metrics.worst.reference == pytest.approx(0.5)
    assert metrics.worst.candidate == pytest.approx(0.0)
    # Top-1: sample 0 argmax 0 in both, sample 1 argmax 0 in both.
    assert metrics.top1_agreement == 1.0


def test_relative_error_floors_tiny_references() -> None:
    metrics = compare(np.array([[0.0, 1.0]]), np.array([[1e-3, 1.0]]))

    assert metrics.max_rel == pytest.approx(1e-3 / 1e-6)


def test_streaming_equals_one_big_batch() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(10, 4, 3))
    candidate = reference + rng.normal(scale=1e-2, size=reference.shape)
    # Put the worst element in the last batch, so its sample index must be offset by 7.
    candidate[8, 2, 1] = reference[8, 2, 1] + 1.0

    whole = compare(reference, candidate)
    streamed = compare_in_batches(reference, candidate, [2, 7])  # batches of 2, 5 and 3 samples

    assert streamed.samples == whole.samples == 10
    assert streamed.elements == whole.elements == 120
    for name in ("max_abs", "max_rel", "mean_abs", "cosine_mean", "cosine_min", "snr_db", "min_atol"):
        assert getattr(streamed, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
    assert whole.worst is not None and streamed.worst is not None
    assert whole.worst.index == [8, 2, 1]
    assert streamed.worst == whole.worst


def test_worst_index_is_offset_when_worst_is_in_a_middle_batch() -> None:
    reference = np.zeros((9, 2))
    candidate = np.zeros((9, 2))
    candidate[4, 1] = 0.25  # batch 2 (samples 3..6), local index [1, 1]
    candidate[7, 0] = 0.125  # a smaller error in a later batch must not replace it

    streamed = compare_in_batches(reference, candidate, [3, 7])

    assert streamed.worst is not None
    assert streamed.worst.index == [4, 1]
    assert streamed.min_atol == pytest.approx(0.25)


def test_streaming_top1_agreement_counts_across_batches() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    candidate = reference.copy()
    candidate[1] = [1.0, 0.0]  # disagree
    candidate[4] = [0.0, 1.0]  # disagree

    streamed = compare_in_batches(reference, candidate, [2, 3])

    assert streamed.top1_agreement == pytest.approx(3 / 5)


# numpy warns while the comparator squares the huge finite stand-ins it uses for inf.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_nan_and_inf_in_candidate_are_counted() -> None:
    reference = np.ones((3, 4), dtype=np.float32)
    candidate = reference.copy()
    candidate[0, 1] = np.nan
    candidate[1, 2] = np.inf
    candidate[2, 0] = -np.inf
    candidate[2, 3] = np.nan

    metrics = compare(reference, candidate)

    assert metrics.nan_count == 2
    assert metrics.inf_count == 2
    assert metrics.max_abs == math.inf
    assert metrics.min_atol == math.inf


def test_nan_in_both_reference_and_candidate_is_not_an_error() -> None:
    reference = np.array([[1.0, np.nan]])
    candidate = np.array([[1.0, np.nan]])

    metrics = compare(reference, candidate)

    assert metrics.nan_count == 1
    assert metrics.max_abs == 0.0
    assert metrics.min_atol == 0.0


@pytest.mark.parametrize("rtol", [0.0, 1e-3, 0.05])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_min_atol_is_the_smallest_atol_allclose_accepts(rtol: float, dtype: type[np.floating]) -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(8, 16)).astype(dtype)
    candidate = (reference + rng.normal(scale=1e-3, size=reference.shape)).astype(dtype)

    metrics = compare(reference, candidate, rtol=rtol)

    assert metrics.min_atol > 0
    assert np.allclose(candidate, reference, rtol=rtol, atol=metrics.min_atol * 1.0000001)
    assert not np.allclose(candidate, reference, rtol=rtol, atol=metrics.min_atol * 0.99)
    assert metrics.worst is not None
    index = tuple(metrics.worst.index)
    assert metrics.worst.reference == pytest.approx(float(reference[index]))
    assert metrics.worst.candidate == pytest.approx(float(candidate[index]))


def test_min_atol_is_zero_when_rtol_alone_suffices() -> None:
    reference = np.array([[100.0, -200.0]])
    candidate = np.array([[100.05, -200.1]])  # relative errors 5e-4

    metrics = compare(reference, candidate, rtol=1e-3)

    assert metrics.min_atol == 0.0
    assert np.allclose(candidate, reference, rtol=1e-3, atol=0.0)


def test_per_sample_cosine_matches_hand_computation() -> None:
    reference = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 2.0], [3.0, 4.0, 0.0]])
    candidate = np.array([[0.0, 1.0, 0.0], [2.0, 4.0, 4.0], [4.0, 3.0, 0.0]])
    # Orthogonal -> 0; parallel -> 1; (12 + 12) / (5 * 5) = 0.96.
    expected = [0.0, 1.0, 0.96]

    metrics = compare(reference, candidate)

    assert metrics.cosine_mean == pytest.approx(sum(expected) / 3)
    assert metrics.cosine_min == pytest.approx(0.0, abs=1e-12)


def test_per_sample_cosine_flattens_each_sample() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(4, 2, 3))
    candidate = reference + rng.normal(scale=0.3, size=reference.shape)
    rows_ref = reference.reshape(4, -1)
    rows_cand = candidate.reshape(4, -1)
    expected = [
        float(r @ c / (np.linalg.norm(r) * np.linalg.norm(c))) for r, c in zip(rows_ref, rows_cand, strict=True)
    ]

    metrics = compare_in_batches(reference, candidate, [1])

    assert metrics.cosine_mean == pytest.approx(np.mean(expected))
    assert metrics.cosine_min == pytest.approx(min(expected))


def test_all_zero_samples_count_as_cosine_one() -> None:
    reference = np.array([[0.0, 0.0], [1.0, 0.0]])
    candidate = np.array([[0.0, 0.0], [0.0, 1.0]])  # sample 0 zero in both; sample 1 orthogonal

    metrics = compare(reference, candidate)

    assert metrics.cosine_mean == pytest.approx(0.5)
    assert metrics.cosine_min == pytest.approx(0.0)


def test_zero_reference_with_nonzero_candidate_is_cosine_zero() -> None:
    metrics = compare(np.zeros((1, 3)), np.ones((1, 3)))

    assert metrics.cosine_mean == 0.0
    assert metrics.snr_db == -math.inf


@pytest.mark.parametrize("shape", [(4,), (4, 3, 2), (4, 1)])
def test_top1_agreement_is_none_for_non_classifier_outputs(shape: tuple[int, ...]) -> None:
    reference = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)

    assert compare(reference, reference.copy()).top1_agreement is None


def test_shape_mismatch_raises_value_error() -> None:
    comparator = OutputComparator(RTOL)

    with pytest.raises(ValueError, match="shape mismatch"):
        comparator.update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_empty_comparator_result() -> None:
    metrics = OutputComparator(RTOL).result()

    assert metrics.samples == 0
    assert metrics.elements == 0
    assert metrics.cosine_min == 1.0
    assert metrics.worst is None


def test_accuracy_counter_across_batches() -> None:
    counter = AccuracyCounter()
    assert math.isnan(counter.accuracy)

    counter.update(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]))
    counter.update(np.array([[0.1, 0.2, 0.7]]), np.array([2]))

    assert counter.correct == 3
    assert counter.total == 4
    assert counter.accuracy == pytest.approx(0.75)


def test_equal_infinities_are_no_error_like_allclose() -> None:
    # Attention masks legitimately hold -inf: the same -inf in both models is a match, not an error.
    reference = np.array([[0.0, -np.inf, 1.0], [2.0, -np.inf, 3.0]])
    comparator = OutputComparator(rtol=1e-3)
    comparator.update(reference, reference.copy())
    metrics = comparator.result()
    assert np.allclose(reference, reference.copy())
    assert metrics.max_abs == 0.0
    assert metrics.min_atol == 0.0
    assert metrics.cosine_mean == pytest.approx(1.0)
    assert metrics.inf_count == 2


def test_one_value_per_sample_uses_the_whole_output_cosine() -> None:
    # Per-sample cosine of scalars is only their sign; the whole output's cosine is what parity means.
    reference = np.array([1.0, 2.0, -3.0, 0.001])
    candidate = np.array([1.01, 1.98, -3.02, -0.001])
    comparator = OutputComparator(rtol=1e-3)
    comparator.update(reference[:2], candidate[:2])
    comparator.update(reference[2:], candidate[2:])
    metrics = comparator.result()
    expected = float(reference @ candidate / (np.linalg.norm(reference) * np.linalg.norm(candidate)))
    assert metrics.cosine_mean == pytest.approx(expected)
    assert metrics.cosine_min == pytest.approx(expected)
    assert metrics.cosine_mean > 0.99
