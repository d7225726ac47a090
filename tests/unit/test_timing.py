"""pipeline.timing: paired, alternating latency comparison with a distribution-free interval.

The statistics and the round structure (order, retries, stopping, inner repeat) are checked
exactly on a simulated clock (`SimulatedClock`: noisy work of known cost, with pre-emptions),
which no CPU load moves. A few tests time real ``time.sleep`` and numpy callables and assert only
wide properties: a sleeper is not immune to load either (it wakes late when the CPU is busy).
"""

from __future__ import annotations

import inspect
import itertools
import time

import numpy as np
import pydantic
import pytest

from pipeline import timing
from pipeline.timing import (
    DEFAULT_TIMING,
    MIN_INTERVAL_ROUNDS,
    RatioMeasurement,
    TimingSettings,
    compare_latency,
    measure_latency_ms,
    median_interval,
    order_statistic_rank,
    significant,
)

QUICK = TimingSettings(warmup=1, max_rounds=60, budget_s=2.0)


class SimulatedClock:
    """A clock that only the callables from `work` move: each call takes its cost times a small
    log-normal noise, plus, in `preempted` of the calls, a pre-emption of 2 to 10 times the cost
    (which the simulated scheduler counts as an involuntary context switch when `seen`).

    Attributes:
        now: The time in seconds.
        switches: Pre-emptions seen so far.
        settings: Settings for the simulated comparisons.
    """

    def __init__(self, seed: int = 0, preempted: float = 0.3, seen: bool = True) -> None:
        self.now = 0.0
        self.switches = 0
        self.seen = seen
        self.rng = np.random.default_rng(seed)
        self.preempted = preempted
        self.settings = TimingSettings(warmup=1, budget_s=60.0)

    def work(self, cost: float, noise: float = 0.03):
        """A callable taking `cost` seconds of this clock (noise and pre-emptions aside)."""

        def run() -> None:
            taken = cost * (float(np.exp(self.rng.normal(0.0, noise))) if noise else 1.0)
            if noise and self.rng.random() < self.preempted:
                taken += cost * self.rng.uniform(2.0, 10.0)
                self.switches += self.seen
            self.now += taken

        return run


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimulatedClock:
    """The module's timer and context-switch count replaced by a simulated clock's."""
    simulated = SimulatedClock()
    monkeypatch.setattr(timing, "_clock", lambda: simulated.now)
    monkeypatch.setattr(timing, "_involuntary_switches", lambda: simulated.switches)
    return simulated


def sleeper(seconds: float):
    """A callable that sleeps `seconds`."""
    return lambda: time.sleep(seconds)


def measurement(low: float, high: float, decided: bool = True) -> RatioMeasurement:
    return RatioMeasurement(
        ratio=(low + high) / 2,
        low=low,
        high=high,
        rounds=14,
        baseline_ms=1.0,
        candidate_ms=1.0,
        seconds=0.1,
        decided=decided,
    )


def test_the_defaults_are_defined_once_and_used_by_default() -> None:
    assert TimingSettings() == DEFAULT_TIMING
    assert (DEFAULT_TIMING.warmup, DEFAULT_TIMING.min_rounds, DEFAULT_TIMING.max_rounds) == (2, 5, 200)
    assert (DEFAULT_TIMING.relative_halfwidth, DEFAULT_TIMING.budget_s, DEFAULT_TIMING.confidence) == (0.05, 10.0, 0.95)
    for function in (compare_latency, measure_latency_ms):
        assert inspect.signature(function).parameters["settings"].default is DEFAULT_TIMING


@pytest.mark.parametrize(
    "bad",
    [
        {"min_rounds": 10, "max_rounds": 5},
        {"confidence": 1.0},
        {"confidence": 0.3},
        {"relative_halfwidth": 0.0},
        {"budget_s": 0.0},
        {"warmup": 0},
        {"min_rounds": 1},
        {"retries": -1},
        {"session_spread": -0.1},
    ],
)
def test_settings_are_validated(bad: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        TimingSettings(**bad)


def test_settings_are_frozen() -> None:
    with pytest.raises(pydantic.ValidationError):
        DEFAULT_TIMING.budget_s = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("n", "rank"), [(2, 0), (5, 0), (6, 1), (10, 2), (20, 6), (50, 18), (200, 86)])
def test_the_order_statistic_rank_is_the_sign_tests(n: int, rank: int) -> None:
    # values from scipy.stats.binom: the largest k with 2 P(Bin(n, 1/2) <= k - 1) <= 0.05
    assert order_statistic_rank(n, 0.95) == rank


def test_the_median_interval_brackets_the_median() -> None:
    values = [float(v) for v in range(1, 21)]  # 1 .. 20
    center, low, high, covered = median_interval(values[::-1], 0.95)
    assert (center, low, high, covered) == (10.5, 6.0, 15.0, True)
    assert median_interval([3.0, 1.0, 2.0], 0.95) == (2.0, 1.0, 3.0, False)


def test_significant_digits() -> None:
    assert significant(0.0123456) == 0.01235
    assert significant(1234.5678) == 1235.0
    assert significant(0.0) == 0.0


def test_faster_reads_the_interval() -> None:
    assert measurement(0.60, 0.64).faster() is True
    assert measurement(1.10, 1.30).faster() is False
    assert measurement(0.95, 1.05).faster() is None


def test_describe() -> None:
    m = measurement(0.60, 0.64).model_copy(update={"ratio": 0.62})
    assert m.describe() == "0.62x [0.60, 0.64], 14 rounds"
    assert m.model_copy(update={"decided": False}).describe() == "0.62x [0.60, 0.64], 14 rounds, wide"


def test_a_measurement_round_trips_through_json() -> None:
    m = compare_latency(sleeper(0.001), sleeper(0.001), QUICK.model_copy(update={"max_rounds": 6}))
    assert RatioMeasurement.model_validate_json(m.model_dump_json()) == m
    assert m.ratio == significant(m.ratio)


def test_double_the_work_measures_near_two(clock: SimulatedClock) -> None:
    m = compare_latency(clock.work(0.002), clock.work(0.004), clock.settings)
    assert 1.9 < m.ratio < 2.1 and m.low <= 2.0 <= m.high
    assert m.decided and m.faster() is False
    assert 1.9 < m.baseline_ms < 2.4 and 3.8 < m.candidate_ms < 4.8


def test_half_the_work_is_faster(clock: SimulatedClock) -> None:
    m = compare_latency(clock.work(0.004), clock.work(0.002), clock.settings)
    assert 0.45 < m.ratio < 0.55 and m.faster() is True


def test_identical_work_gives_an_interval_containing_one(clock: SimulatedClock) -> None:
    m = compare_latency(clock.work(0.002), clock.work(0.002), clock.settings)
    assert m.low <= 1.0 <= m.high and m.faster() is None
    assert m.decided and m.rounds >= clock.settings.min_rounds


def test_the_interval_covers_at_its_confidence_despite_preemptions(clock: SimulatedClock) -> None:
    settings = clock.settings.model_copy(update={"session_spread": 0.0})  # the rounds' own interval
    covered = [
        (m := compare_latency(clock.work(0.002), clock.work(0.002), settings)).low <= 1.0 <= m.high for _ in range(100)
    ]
    assert sum(covered) >= 88  # nominal 95 (optional stopping costs a little)


@pytest.mark.parametrize("seen", [True, False])
def test_disturbed_rounds_are_left_out_when_the_scheduler_says(clock: SimulatedClock, seen: bool) -> None:
    clock.preempted, clock.seen = 0.6, seen  # most rounds disturbed
    settings = clock.settings.model_copy(update={"retries": 0})
    m = compare_latency(clock.work(0.002), clock.work(0.004), settings)
    assert 1.9 < m.ratio < 2.1 and m.low <= 2.0 <= m.high
    assert m.disturbed > m.rounds / 2 if seen else m.disturbed == 0
    assert 1.9 < m.baseline_ms < 2.2 if seen else m.baseline_ms > 2.2  # the medians of the rounds used


def test_the_session_spread_widens_the_interval(clock: SimulatedClock) -> None:
    bare = compare_latency(
        clock.work(0.002), clock.work(0.002), clock.settings.model_copy(update={"session_spread": 0.0})
    )
    widened = compare_latency(clock.work(0.002), clock.work(0.002), clock.settings)
    assert widened.high / widened.ratio > 1.058 and widened.ratio / widened.low > 1.058  # 1.96 * 0.03
    assert bare.high / bare.ratio < widened.high / widened.ratio


def test_the_budget_stops_the_loop(clock: SimulatedClock) -> None:
    settings = TimingSettings(warmup=1, relative_halfwidth=1e-9, budget_s=0.05, max_rounds=200)
    m = compare_latency(clock.work(0.02), clock.work(0.02), settings)
    assert (m.rounds, m.decided) == (MIN_INTERVAL_ROUNDS, False)  # 40 ms a round: the budget is spent after 2


def test_max_rounds_stops_the_loop(clock: SimulatedClock) -> None:
    settings = TimingSettings(warmup=1, min_rounds=2, max_rounds=8, relative_halfwidth=1e-9)
    m = compare_latency(clock.work(0.002), clock.work(0.002), settings)
    assert (m.rounds, m.decided) == (8, False)


def test_rounds_alternate_the_order(clock: SimulatedClock) -> None:
    calls: list[str] = []
    baseline, candidate = clock.work(0.002, noise=0.0), clock.work(0.002, noise=0.0)
    settings = TimingSettings(warmup=1, min_rounds=2, max_rounds=6, relative_halfwidth=1e-9)
    m = compare_latency(lambda: (calls.append("b"), baseline()), lambda: (calls.append("c"), candidate()), settings)
    assert m.inner_repeat == 1
    assert "".join(calls) == "bc" + "bccb" * 3  # warm-up, then b c / c b / ...


def test_descheduled_rounds_are_timed_again(clock: SimulatedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = itertools.count()
    monkeypatch.setattr(timing, "_involuntary_switches", lambda: next(counter))  # every round looks descheduled
    settings = TimingSettings(warmup=1, min_rounds=2, max_rounds=4, relative_halfwidth=1e-9, retries=2)
    m = compare_latency(clock.work(0.002), clock.work(0.002), settings)
    assert (m.rounds, m.retimed, m.disturbed) == (4, 8, 4)


def test_long_rounds_are_kept_though_descheduled(clock: SimulatedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 300 ms two-thread inference is nearly always descheduled once; retrying it would only spend the budget.
    counter = itertools.count()
    monkeypatch.setattr(timing, "_involuntary_switches", lambda: next(counter))
    settings = TimingSettings(warmup=1, min_rounds=2, max_rounds=4, relative_halfwidth=1e-9, retries=2)
    m = compare_latency(clock.work(0.3), clock.work(0.3), settings)
    assert (m.rounds, m.retimed, m.disturbed) == (4, 0, 0)


def test_very_fast_callables_are_repeated_inside_a_sample(clock: SimulatedClock) -> None:
    m = compare_latency(clock.work(1e-5, noise=0.0), clock.work(2e-5, noise=0.0), clock.settings)
    assert m.inner_repeat == 100  # 1 ms samples
    assert (m.baseline_ms, m.candidate_ms, m.ratio) == (0.01, 0.02, 2.0)


def test_identical_sleeps_give_an_interval_containing_one() -> None:
    m = compare_latency(sleeper(0.002), sleeper(0.002), QUICK)
    assert m.low <= 1.0 <= m.high and m.faster() is None


def test_a_longer_sleep_is_slower() -> None:
    # wide: under CPU load a sleeper wakes late by a few ms, which pulls the ratio toward 1
    m = compare_latency(sleeper(0.01), sleeper(0.02), QUICK.model_copy(update={"max_rounds": 20}))
    assert 1.3 < m.ratio < 2.3 and m.faster() is False


def test_real_fast_callables_are_repeated_inside_a_sample() -> None:
    matrix = np.random.default_rng(0).standard_normal((48, 48))

    def once() -> object:
        return matrix @ matrix

    def twice() -> object:
        return matrix @ matrix, matrix @ matrix

    m = compare_latency(once, twice, QUICK)
    assert m.inner_repeat > 1
    assert m.baseline_ms < 1.0
    assert 1.2 < m.ratio < 3.0  # wide: numpy work under whatever load the machine has


def test_measure_latency_ms() -> None:
    latency = measure_latency_ms(sleeper(0.004), TimingSettings(warmup=1))
    assert 4.0 <= latency < 40.0
    assert measure_latency_ms(lambda: None) < 0.01
