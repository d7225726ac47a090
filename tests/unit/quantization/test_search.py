"""The per-target search's bookkeeping: which candidate ships, the budget, the held-out split.

The recipes themselves are built and judged on a real model in tests/unit/stages/test_quantize.py;
here the judge and the timer are stand-ins, so the choice rules are tested exactly.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import onnx
import pytest

from pipeline.quantization.candidates import Built
from pipeline.quantization.decision import CandidateResult, TargetLatency
from pipeline.quantization.judge import HOLDOUT_EVERY, is_held_out
from pipeline.quantization.qdq import QdqSettings
from pipeline.quantization.search import CandidateSpec, run_search
from pipeline.timing import RatioMeasurement

SETTINGS = QdqSettings(per_channel=True, activation_type="uint8", weight_type="int8", activation_symmetric=False,
                       reduce_range=False)  # fmt: skip


def ratio(value: float, low: float, high: float) -> RatioMeasurement:
    return RatioMeasurement(
        ratio=value, low=low, high=high, rounds=10, baseline_ms=1.0, candidate_ms=value, seconds=0.1, decided=True
    )


def built(name: str) -> Built:
    model = onnx.ModelProto()
    model.graph.name = name
    return Built(model=model, settings=SETTINGS, kept_float={})


class Judge:
    """Passes the candidates named in `passing`."""

    def __init__(self, passing: set[str]) -> None:
        self.passing = passing
        self.judged: list[str] = []

    def __call__(self, model: onnx.ModelProto) -> tuple[bool, str]:
        self.judged.append(model.graph.name)
        return model.graph.name in self.passing, f"cosine_mean for {model.graph.name}"


class Timer:
    """Reports the latency given for each candidate (the float model itself: exactly 1)."""

    timed = ["cpu"]

    def identity(self) -> list[TargetLatency]:
        return [TargetLatency(target="cpu", measurement=ratio(1.0, 1.0, 1.0), note="the float model itself")]

    def __init__(self, latencies: dict[str, RatioMeasurement]) -> None:
        self.latencies = latencies
        self.calls: list[str] = []

    def __call__(self, model: onnx.ModelProto, budget_s: float) -> list[TargetLatency]:
        self.calls.append(model.graph.name)
        return [TargetLatency(target="cpu", measurement=self.latencies[model.graph.name])]


def specs(*names: str, slow: str = "") -> list[CandidateSpec]:
    def build(name: str) -> Any:
        def step() -> Built:
            if name == slow:
                time.sleep(0.3)
            return replace(built(name), precision="fp32" if name == "fp32" else "int8")

        return step

    return [CandidateSpec(name, name, "fp32" if name == "fp32" else "int8", build(name)) for name in names]


def search(names: tuple[str, ...], passing: set[str], latencies: dict[str, RatioMeasurement], budget: float = 60.0,
           slow: str = "") -> tuple[Any, Judge, Timer]:  # fmt: skip
    judge, timer = Judge(passing), Timer(latencies)
    decision, _ = run_search(specs(*names, slow=slow), judge, timer, budget, "2 held-out batches")  # type: ignore[arg-type]
    return decision, judge, timer


def test_a_clearly_faster_later_candidate_ships() -> None:
    decision, _, timer = search(("a", "b"), {"a", "b"}, {"a": ratio(0.8, 0.78, 0.82), "b": ratio(0.5, 0.48, 0.52)})

    assert decision.shipped == "b"
    assert [c.shipped for c in decision.candidates] == [False, True]
    assert timer.calls == ["a", "b"]
    assert "fastest" in decision.reason and "0.50x" in decision.reason
    assert decision.speedup is True


def test_within_the_noise_the_earlier_candidate_ships() -> None:
    # b's point estimate is lower, but its interval reaches past a's estimate: a tie, a wins.
    decision, _, _ = search(("a", "b"), {"a", "b"}, {"a": ratio(0.80, 0.76, 0.84), "b": ratio(0.78, 0.70, 0.86)})

    assert decision.shipped == "a"


def test_a_failing_candidate_is_never_timed_or_shipped() -> None:
    decision, judge, timer = search(("a", "b", "c"), {"a", "c"}, {"a": ratio(0.9, 0.88, 0.92),
                                                                 "c": ratio(0.6, 0.58, 0.62)})  # fmt: skip

    assert judge.judged == ["a", "b", "c"]
    assert timer.calls == ["a", "c"]
    assert decision.shipped == "c"
    assert decision.candidates[1].passed is False and decision.candidates[1].latency == []


def test_one_passing_candidate_ships_untimed() -> None:
    decision, _, timer = search(("a", "b"), {"b"}, {})

    assert timer.calls == []
    assert decision.shipped == "b" and "only candidate" in decision.reason
    assert decision.speedup is None


def test_when_nothing_passes_the_first_ships_and_says_so() -> None:
    decision, _, _ = search(("a", "b"), set(), {})

    assert decision.shipped == "a"
    assert "no candidate met" in decision.reason


def test_the_budget_is_for_the_alternatives_after_the_first() -> None:
    _, judge, _ = search(("a", "b", "c"), {"a"}, {}, budget=0.1, slow="a")
    slow_second, judge_two, _ = search(("a", "b", "c"), {"a"}, {}, budget=0.1, slow="b")

    assert judge.judged == ["a", "b", "c"]  # a slow first candidate does not starve the others
    assert judge_two.judged == ["a", "b"]
    assert slow_second.candidates[2].note == "not tried: budget spent"
    assert slow_second.shipped == "a"


def test_the_float_model_ships_only_when_every_int8_candidate_is_slower() -> None:
    slower, _, timer = search(("a", "fp32"), {"a", "fp32"}, {"a": ratio(1.3, 1.2, 1.4)})
    noisy, _, _ = search(("a", "fp32"), {"a", "fp32"}, {"a": ratio(0.98, 0.9, 1.06)})
    faster, _, _ = search(("a", "fp32"), {"a", "fp32"}, {"a": ratio(0.7, 0.65, 0.75)})

    assert timer.calls == ["a"]  # the float model is not timed against itself
    assert slower.shipped == "fp32" and "no int8 candidate is faster than float" in slower.reason
    assert noisy.shipped == "a"  # within the noise, int8 (earlier) stays
    assert faster.shipped == "a"


def test_the_fastest_sets_the_bar_and_the_earliest_within_it_ships() -> None:
    # b is the fastest; a is within b's interval, so the earlier a ships; fp32 never beats both.
    tie, _, _ = search(("a", "b", "fp32"), {"a", "b", "fp32"},
                       {"a": ratio(1.05, 0.95, 1.15), "b": ratio(0.98, 0.80, 1.07)})  # fmt: skip
    clear, _, _ = search(("a", "b", "fp32"), {"a", "b", "fp32"},
                         {"a": ratio(1.3, 1.2, 1.4), "b": ratio(0.7, 0.65, 0.75)})  # fmt: skip

    assert tie.shipped == "a"
    assert clear.shipped == "b"


def test_a_slower_shipped_model_is_flagged() -> None:
    result = CandidateResult(name="a", precision="int8", passed=True,
                             latency=[TargetLatency(target="cpu", measurement=ratio(1.3, 1.2, 1.4))])  # fmt: skip
    undecided = result.model_copy(update={"latency": [TargetLatency(target="cpu", measurement=ratio(1.0, 0.9, 1.1))]})

    assert result.faster() is False
    assert undecided.faster() is None
    assert CandidateResult(name="b", precision="int8").faster() is None


@pytest.mark.parametrize("batches", [1, 2, 3, 4, 9, 10])
def test_held_out_batches_are_never_calibrated_on_and_never_all_of_them(batches: int) -> None:
    held = [index for index in range(batches) if is_held_out(index)]

    if batches < HOLDOUT_EVERY:
        assert held == []  # too little data to split: it both calibrates and judges (the report says so)
    else:
        assert 1 <= len(held) < batches
        assert len(held) <= max(1, batches // HOLDOUT_EVERY)
