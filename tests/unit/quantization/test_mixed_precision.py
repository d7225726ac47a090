"""Unit tests of mixed precision: the SQNR estimate, the candidate rankings and the prefix search."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.histogram import TensorHistogram
from pipeline.calibration.ranges import compute_range
from pipeline.quantization.mixed_precision import (
    Candidate,
    expected_sqnr_db,
    rank_by_damage,
    rank_candidates,
    search,
)


def histogram_of(values: np.ndarray) -> TensorHistogram:
    histogram = TensorHistogram()
    histogram.update(np.asarray(values, dtype=np.float32))
    return histogram


def candidates(count: int) -> list[Candidate]:
    return [Candidate(f"n{index}", "MatMul", 30.0 - index, f"t{index}") for index in range(count)]


class FakePolicy:
    """Passes iff every node of `needed` is kept float; records what it was asked."""

    def __init__(self, needed: set[str]) -> None:
        self.needed = needed
        self.calls: list[list[str]] = []

    def __call__(self, kept_float: list[str]) -> tuple[bool, str]:
        self.calls.append(list(kept_float))
        return self.needed <= set(kept_float), f"{len(kept_float)} float"


# --- expected_sqnr_db ----------------------------------------------------------------------------


def test_sqnr_of_a_narrow_distribution_beats_the_same_with_outliers_under_minmax() -> None:
    normal = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    narrow = histogram_of(normal)
    spiky = histogram_of(np.concatenate([normal, np.float32([60.0, -60.0, 55.0])]))

    clean = expected_sqnr_db(narrow, *compute_range(narrow, "minmax"))
    polluted = expected_sqnr_db(spiky, *compute_range(spiky, "minmax"))

    assert clean > polluted + 10.0  # a step ~13x larger costs ~22 dB
    assert 30.0 < clean < 50.0  # ~8 bits over +-4.5 sigma
    # Clipping the outliers away (MSE range) wins much of it back.
    assert expected_sqnr_db(spiky, *compute_range(spiky, "mse")) > polluted


def test_sqnr_grows_about_6_db_per_bit() -> None:
    histogram = histogram_of(np.random.default_rng(1).uniform(-1, 1, size=50_000))

    eight = expected_sqnr_db(histogram, -1.0, 1.0, levels=256)
    seven = expected_sqnr_db(histogram, -1.0, 1.0, levels=128)

    assert eight - seven == pytest.approx(20 * math.log10(255 / 127), abs=0.01)
    assert eight == pytest.approx(10 * math.log10((1 / 3) / ((2 / 255) ** 2 / 12)), abs=0.1)


def test_sqnr_of_an_empty_histogram_is_infinite() -> None:
    assert expected_sqnr_db(TensorHistogram(), -1.0, 1.0) == math.inf


# --- search --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 16, 33, 64])
def test_search_returns_exactly_the_minimal_prefix_in_logarithmic_probes(size: int) -> None:
    ranked = candidates(size)
    for needed_prefix in range(1, size + 1):
        # The deepest node the policy needs decides the minimal prefix; the others are a subset of it.
        needed = {ranked[needed_prefix - 1].node, ranked[(needed_prefix - 1) // 2].node}
        policy = FakePolicy(needed)

        result = search(lambda ranked=ranked: ranked, policy)

        assert result.met
        assert list(result.kept_float) == [c.node for c in ranked[:needed_prefix]]
        assert len(result.probes) == len(policy.calls) <= 2 * math.log2(size) + 3
        assert [p.kept_float for p in result.probes] == [len(call) for call in policy.calls]
        assert result.probes[0].kept_float == 0 and not result.probes[0].passed
        assert any(p.passed and p.kept_float == needed_prefix for p in result.probes)
        assert all(call == [c.node for c in ranked[: len(call)]] for call in policy.calls)  # always prefixes


def test_search_does_not_rank_when_full_int8_passes() -> None:
    def rank() -> list[Candidate]:
        raise AssertionError("rank must not be called")

    policy = FakePolicy(set())

    result = search(rank, policy)

    assert result.met
    assert result.kept_float == {}
    assert [(p.kept_float, p.passed) for p in result.probes] == [(0, True)]


def test_search_reasons_name_rank_damage_and_tensor() -> None:
    ranked = [Candidate("a", "Conv", 12.5, "act_a", damage=0.02), Candidate("b", "MatMul", 20.0, "act_b", damage=0.01)]

    result = search(lambda: ranked, FakePolicy({"a"}))

    assert list(result.kept_float) == ["a"]
    reason = result.kept_float["a"]
    assert "rank 1" in reason and "act_a" in reason and "12.5 dB" in reason and "2.00e-02" in reason


def test_search_records_the_measured_damage_of_every_node_it_keeps_float() -> None:
    ranked = [
        Candidate("a", "Conv", 12.5, "act_a", damage=0.02),
        Candidate("b", "MatMul", 20.0, "act_b", damage=0.01),
        Candidate("c", "MatMul", 25.0, "act_c", damage=0.001),
    ]

    result = search(lambda: ranked, FakePolicy({"a", "b"}))

    # Typed, for the report's damage chart: no parsing of the reason text.
    assert result.damage == {"a": 0.02, "b": 0.01}


def test_max_share_caps_the_prefix_and_reports_the_policy_missed() -> None:
    ranked = candidates(10)
    policy = FakePolicy({"n7"})  # needs 8 of 10 float, but only half may be

    result = search(lambda: ranked, policy, max_share=0.5)

    assert not result.met
    assert list(result.kept_float) == ["n0", "n1", "n2", "n3", "n4"]  # the closest allowed
    assert "closest" in result.kept_float["n0"]
    assert max(p.kept_float for p in result.probes) == 5
    assert not any(p.passed for p in result.probes)


def test_max_share_that_still_allows_the_prefix_meets_the_policy() -> None:
    ranked = candidates(10)

    result = search(lambda: ranked, FakePolicy({"n3"}), max_share=0.5)

    assert result.met
    assert list(result.kept_float) == ["n0", "n1", "n2", "n3"]


def test_zero_max_share_keeps_nothing_float() -> None:
    result = search(lambda: candidates(4), FakePolicy({"n0"}), max_share=0.0)

    assert not result.met
    assert result.kept_float == {}
    assert len(result.probes) == 1


def test_policy_that_no_prefix_meets_keeps_every_candidate_float() -> None:
    ranked = candidates(6)

    result = search(lambda: ranked, FakePolicy({"not a candidate"}))

    assert not result.met
    assert list(result.kept_float) == [c.node for c in ranked]
    assert len(result.probes) <= 2 * math.log2(6) + 3


def test_no_candidates_leaves_the_policy_missed() -> None:
    result = search(list, FakePolicy({"anything"}))

    assert not result.met and result.kept_float == {} and len(result.probes) == 1


# --- rankings ------------------------------------------------------------------------------------


def test_rank_by_damage_orders_by_measured_damage_then_sqnr() -> None:
    given = [
        Candidate("a", "MatMul", 30.0, "ta"),
        Candidate("b", "MatMul", 25.0, "tb"),
        Candidate("c", "Conv", 10.0, "tc"),
        Candidate("d", "Gemm", 5.0, "td"),
        Candidate("e", "MatMul", 40.0, "te"),
    ]
    damage = {"a": 0.1, "b": 0.3, "c": 0.1, "d": 0.0, "e": 0.1}
    measured: list[str] = []

    def measure(node: str) -> float:
        measured.append(node)
        return damage[node]

    ranked = rank_by_damage(given, measure)

    assert [c.node for c in ranked] == ["b", "c", "a", "e", "d"]  # ties (0.1) by SQNR, lowest first
    assert sorted(measured) == ["a", "b", "c", "d", "e"]  # each measured once
    assert {c.node: c.damage for c in ranked} == damage
    assert all(c.damage is None for c in given)  # the inputs are left as they were


def _two_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="second"),
        ],
        "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[
            numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(size=(4, 2)).astype(np.float32), "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rank_candidates_puts_the_worst_input_first_and_skips_excluded_nodes() -> None:
    model = _two_matmul_model()
    rng = np.random.default_rng(3)
    normal = rng.normal(size=20_000).astype(np.float32)
    histograms = {
        "x": histogram_of(normal),
        "r": histogram_of(np.concatenate([np.abs(normal), np.float32([80.0])])),  # an outlier: low SQNR
    }
    ranges = {name: compute_range(h, "minmax") for name, h in histograms.items()}

    ranked = rank_candidates(model, histograms, ranges, None, set())

    assert [(c.node, c.tensor) for c in ranked] == [("second", "r"), ("first", "x")]
    assert ranked[0].sqnr_db < ranked[1].sqnr_db
    assert [c.node for c in rank_candidates(model, histograms, ranges, None, {"second"})] == ["first"]
    assert rank_candidates(model, histograms, ranges, ("Conv",), set()) == []
    assert rank_candidates(model, {}, {}, None, set()) == []  # no calibrated input: not a candidate
