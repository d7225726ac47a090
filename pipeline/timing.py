"""Latency timing you can trust under load: how much slower or faster one callable is than another.

Both callables are zero-argument (``lambda: session.run(feeds)``), so the module knows no backend.

`compare_latency` warms both up, then times rounds of *adjacent pairs*, alternating the order
(baseline then candidate, then candidate then baseline, ...), so slow drift (frequency scaling, a
neighbour's load ramping up) and the second-of-a-pair effect (a few per cent on ONNX Runtime)
cancel. Each round gives one log-ratio ``log(t_candidate / t_baseline)``.

The ratio is the exponential of the *median* of those log-ratios, and its interval the
distribution-free order-statistic interval of the median (the sign test's): with ``n`` rounds,
the k-th smallest and k-th largest log-ratio, k the largest with
``2 P(Binomial(n, 1/2) < k) <= 1 - confidence``. It assumes no distribution of the log-ratios,
only independent rounds. Why not a Student-t interval: measured under load (two identical ONNX
Runtime sessions on a busy 2-core machine), a sample that the operating system pre-empted is
several times the typical one and two thirds of the rounds had one; a 20 % trimmed mean of 400
rounds came out 0.78 [0.53, 1.14] (quiet: 1.03 [0.85, 1.25]) and never reached +-5 %, while the
median of the same rounds gave 0.97 and 1.00; the median moves only when over half the rounds are hit.

Two fresh sessions of byte-identical models are not equally fast: on a busy 2-core machine, one
pair of ONNX Runtime CPU sessions (1 thread, a 1.5 ms MLP) was reproducibly 6 % apart, another 7 %
the other way, most within 2 % (the log-ratio's standard deviation between pairs was 0.016 to
0.034, 0.024 pooled over 27 pairs), while a session timed against itself stays within 1 %, and the
rounds' own interval covered each pair's long-run ratio (10 of 10). More rounds cannot shrink
that spread, and a claim about two *models* must allow for it, so the reported interval adds
`TimingSettings.session_spread` (as a normal term at the interval's confidence, in quadrature) to
the rounds' own interval; the stopping rule looks at the rounds' own interval only. Its default,
0.03, lies between the pooled 0.024 and the busiest 0.034.

Where the operating system counts involuntary context switches per thread (Linux), a round in
which the timing thread was descheduled is timed again, up to `TimingSettings.retries` times (a
retry soon after the thread gets the CPU back is often undisturbed). A round still
descheduled after its retries is left out of the estimate as long as the undisturbed rounds are
enough for an interval: measured on two identical models, the undisturbed rounds' ratios stayed
within a factor 1.5 of 1, while nine in ten disturbed ones were off by 2.7 times or more (up to
30), and with four busy neighbours on two cores over half the rounds can be disturbed, past what
the median withstands. The selection is made by the scheduler, not on the measured values, so
the interval stays distribution-free.
Where the OS does not count (or for threads other than the caller's), every round is used and
the median alone carries the robustness.

Rounds stop once the rounds' own interval is within ``ratio * (1 +- relative_halfwidth)`` (after
``min_rounds``), at ``max_rounds``, or when the wall-clock budget is spent. Callables faster than
`TimingSettings.min_sample_s` are repeated inside one timed sample (the count is calibrated during
warm-up), so timer resolution and call overhead do not dominate.

`DEFAULT_TIMING` is the one default; every caller that takes settings defaults to it.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

from pydantic import BaseModel, Field, model_validator

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

Runnable = Callable[[], object]

MIN_INTERVAL_ROUNDS = 3
"""Rounds always timed, even past the budget."""

MAX_INNER_REPEAT = 100_000
"""The most calls of a very fast callable inside one timed sample."""

LONG_ROUND_S = 0.1
"""A round at least this long is kept though its thread was descheduled: a scheduler slice (a few
ms) is then a small part of it, and a multi-threaded run (ONNX Runtime on 2 threads) of hundreds of
ms is nearly always descheduled once, so retrying it would only spend the budget (MiniLM: 3 rounds
in 10 s)."""

_SIGNIFICANT = 4
"""Significant digits a measurement keeps (it goes into report.json)."""

_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)

_clock = time.perf_counter
"""The timer (seconds); tests put a simulated clock here."""


class TimingSettings(BaseModel, frozen=True):
    """How `compare_latency` and `measure_latency_ms` time.

    Attributes:
        warmup: Untimed runs of each callable before timing (they also calibrate the inner repeat).
        min_rounds: Rounds (pairs) timed before the interval may stop the loop. The interval needs
            at least 6 rounds at 95 % confidence (the sign test's smallest sample), so fewer are
            never decided.
        max_rounds: The most rounds timed.
        relative_halfwidth: Stop once the rounds' own interval is within ``ratio * (1 +- relative_halfwidth)``.
        budget_s: Wall-clock budget in seconds for the timed rounds: the loop stops when it is
            spent, decided or not (after at least `MIN_INTERVAL_ROUNDS` rounds).
        confidence: Coverage of the interval.
        session_spread: Standard deviation of the log latency ratio between two fresh sessions of
            the same model, added to the interval (see the module's docstring); 0 reports the
            rounds' own interval.
        retries: Times a round in which the timing thread was descheduled is timed again (where
            the operating system reports it); 0 keeps every round as first timed.
        min_sample_s: A callable faster than this is repeated inside one timed sample until a
            sample takes about this long.
    """

    warmup: int = Field(default=2, ge=1)
    min_rounds: int = Field(default=5, ge=2)
    max_rounds: int = Field(default=200, ge=2)
    relative_halfwidth: float = Field(default=0.05, gt=0.0, lt=1.0)
    budget_s: float = Field(default=10.0, gt=0.0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    session_spread: float = Field(default=0.03, ge=0.0, lt=1.0)
    retries: int = Field(default=2, ge=0)
    min_sample_s: float = Field(default=0.001, gt=0.0)

    @model_validator(mode="after")
    def _rounds_in_order(self) -> TimingSettings:
        if self.max_rounds < self.min_rounds:
            raise ValueError(f"max_rounds ({self.max_rounds}) is below min_rounds ({self.min_rounds})")
        return self


DEFAULT_TIMING = TimingSettings()
"""The settings every caller uses unless told otherwise."""


class RatioMeasurement(BaseModel):
    """Candidate latency over baseline latency, with its confidence interval.

    Attributes:
        ratio: Candidate / baseline latency (point estimate: exp of the median log-ratio).
        low: Lower bound of the confidence interval of the ratio (session spread included).
        high: Upper bound of the confidence interval of the ratio (session spread included).
        rounds: Rounds (adjacent pairs) timed.
        baseline_ms: Median latency of one baseline call over the rounds used, in milliseconds.
        candidate_ms: Median latency of one candidate call over the rounds used, in milliseconds.
        seconds: Wall-clock time spent, warm-up included.
        decided: Whether the rounds' own interval reached the requested half-width.
        confidence: Coverage of the interval.
        inner_repeat: Calls inside one timed sample (1 unless the callables are very fast).
        retimed: Extra attempts at rounds in which the timing thread was descheduled (at most
            `TimingSettings.retries` a round).
        disturbed: Rounds still descheduled after every retry: left out of the estimate while the
            others are enough for an interval.
    """

    ratio: float
    low: float
    high: float
    rounds: int
    baseline_ms: float
    candidate_ms: float
    seconds: float
    decided: bool
    confidence: float = DEFAULT_TIMING.confidence
    inner_repeat: int = 1
    retimed: int = 0
    disturbed: int = 0

    def faster(self) -> bool | None:
        """True if the candidate is faster (the whole interval is below 1), False if slower (above 1),
        None if the interval contains 1 (equal, or too noisy to tell)."""
        if self.high < 1.0:
            return True
        if self.low > 1.0:
            return False
        return None

    def describe(self) -> str:
        """One line for people, e.g. ``0.62x [0.60, 0.64], 14 rounds`` (``, wide`` when the interval did
        not narrow to the requested half-width before a stop: its bounds still hold)."""
        text = f"{self.ratio:.2f}x [{self.low:.2f}, {self.high:.2f}], {self.rounds} rounds"
        return text if self.decided else f"{text}, wide"


def significant(value: float, digits: int = _SIGNIFICANT) -> float:
    """`value` rounded to `digits` significant digits (for JSON fields)."""
    if value == 0.0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


@lru_cache(maxsize=1024)
def order_statistic_rank(n: int, confidence: float) -> int:
    """The rank k (1-based) whose k-th smallest and k-th largest of `n` values bound the median
    with at least `confidence` (sign-test interval: ``2 P(Binomial(n, 1/2) <= k - 1) <= 1 - confidence``);
    0 if `n` is too small for any such interval (then the range has less coverage).

    Args:
        n: Number of values.
        confidence: Two-sided coverage, in (0, 1).
    """
    tail, rank = 0, 0
    allowed = (1.0 - confidence) * 2**n / 2  # the one-sided tail mass allowed, in units of 2**-n
    while rank < n // 2 and tail + math.comb(n, rank) <= allowed:
        tail += math.comb(n, rank)
        rank += 1
    return rank


def median_interval(values: Sequence[float], confidence: float) -> tuple[float, float, float, bool]:
    """The median of `values` and its distribution-free order-statistic interval.

    Args:
        values: At least one number.
        confidence: Two-sided coverage of the interval.

    Returns:
        (median, low, high, covered): covered is False when there are too few values for the
        requested coverage, and (low, high) is then their whole range.
    """
    ordered = sorted(values)
    rank = order_statistic_rank(len(ordered), confidence)
    low, high = (ordered[rank - 1], ordered[-rank]) if rank else (ordered[0], ordered[-1])
    return statistics.median(ordered), low, high, rank > 0


def _involuntary_switches() -> int:
    """The calling thread's involuntary context switches so far (0 where the OS does not say)."""
    if _RUSAGE_THREAD is None:
        return 0
    return int(resource.getrusage(_RUSAGE_THREAD).ru_nivcsw)


def _time_sample(run: Runnable, repeat: int) -> float:
    """Seconds per call of `run`, timed over `repeat` back-to-back calls."""
    start = _clock()
    for _ in range(repeat):
        run()
    return max(_clock() - start, 1e-9) / repeat


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector off inside the block (as `timeit` does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _time_round(runs: Sequence[Runnable], repeat: int, retries: int) -> tuple[list[float], int]:
    """One round: seconds per call of each of `runs`, timed back to back in order; timed again
    (up to `retries` times) while the timing thread was descheduled during it, unless the round
    is long (`LONG_ROUND_S`). The first attempt not descheduled is kept; if every one was, the
    quickest in all (the least disturbed).

    Returns:
        (seconds per call of each, attempts that were descheduled).
    """
    disturbed = 0
    kept: list[float] = []
    with _gc_paused():
        for _ in range(retries + 1):
            before = _involuntary_switches()
            seconds = [_time_sample(run, repeat) for run in runs]
            if _involuntary_switches() == before or sum(seconds) * repeat >= LONG_ROUND_S:
                return seconds, disturbed
            disturbed += 1
            kept = seconds if not kept or sum(seconds) < sum(kept) else kept
    return kept, disturbed


def _warm_up(runs: Sequence[Runnable], settings: TimingSettings) -> int:
    """Run each callable `settings.warmup` times, and return the inner repeat count: the calls
    that make one sample of the fastest callable last about `settings.min_sample_s`."""
    fastest = math.inf
    for _ in range(settings.warmup):
        for run in runs:
            fastest = min(fastest, _time_sample(run, 1))
    repeat = min(MAX_INNER_REPEAT, max(1, math.ceil(settings.min_sample_s / fastest)))
    if repeat > 1:
        for run in runs:  # one pass at the sample's length
            _time_sample(run, repeat)
    return repeat


@dataclass
class _Rounds:
    """The rounds timed so far: seconds per call of each callable, and which were undisturbed."""

    baseline: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)
    clean: list[bool] = field(default_factory=list)
    retimed: int = 0

    def add(self, baseline: float, candidate: float, descheduled: int, retries: int) -> None:
        """Record one round whose attempts were descheduled `descheduled` times."""
        self.baseline.append(baseline)
        self.candidate.append(candidate)
        self.clean.append(descheduled <= retries)
        self.retimed += min(descheduled, retries)

    def used(self, confidence: float) -> list[int]:
        """The rounds the estimate uses: the undisturbed ones when they are enough for an
        interval at `confidence`, else every round."""
        clean = [index for index, ok in enumerate(self.clean) if ok]
        return clean if order_statistic_rank(len(clean), confidence) else list(range(len(self.clean)))

    def bounds(self, settings: TimingSettings) -> tuple[float, float, float, bool]:
        """(ratio, low, high, narrow enough): narrow when the rounds' own interval is within the
        requested half-width; low and high include the session spread."""
        logs = [math.log(self.candidate[i] / self.baseline[i]) for i in self.used(settings.confidence)]
        center, low, high, covered = median_interval(logs, settings.confidence)
        narrow = covered and math.expm1(high - center) <= settings.relative_halfwidth
        narrow = narrow and -math.expm1(low - center) <= settings.relative_halfwidth
        spread = statistics.NormalDist().inv_cdf(0.5 + settings.confidence / 2) * settings.session_spread
        low, high = center - math.hypot(center - low, spread), center + math.hypot(high - center, spread)
        return math.exp(center), math.exp(low), math.exp(high), narrow

    def medians_ms(self, confidence: float) -> tuple[float, float]:
        """Median milliseconds per call of (baseline, candidate) over the rounds used."""
        used = self.used(confidence)
        return (
            significant(1000.0 * statistics.median(self.baseline[i] for i in used)),
            significant(1000.0 * statistics.median(self.candidate[i] for i in used)),
        )


def compare_latency(
    baseline: Runnable, candidate: Runnable, settings: TimingSettings = DEFAULT_TIMING
) -> RatioMeasurement:
    """How long `candidate` takes relative to `baseline`, with a confidence interval.

    Warms both up, then times rounds of adjacent pairs in alternating order until the interval of
    the ratio is narrow enough (after `settings.min_rounds`), `settings.max_rounds` are timed, or
    `settings.budget_s` is spent (the method is in the module's docstring).

    Args:
        baseline: The reference callable (e.g. ``lambda: fp32.run(feeds)``).
        candidate: The callable compared with it.
        settings: How to time; `DEFAULT_TIMING` unless told.

    Returns:
        The ratio candidate / baseline, its interval, and each one's median latency.
    """
    started = _clock()
    repeat = _warm_up((baseline, candidate), settings)
    timed_from = _clock()
    rounds = _Rounds()
    ratio, low, high, narrow = 1.0, 1.0, 1.0, False
    while len(rounds.clean) < settings.max_rounds:
        baseline_first = len(rounds.clean) % 2 == 0
        order = (baseline, candidate) if baseline_first else (candidate, baseline)
        seconds, descheduled = _time_round(order, repeat, settings.retries)
        base, cand = seconds if baseline_first else seconds[::-1]
        rounds.add(base, cand, descheduled, settings.retries)
        ratio, low, high, narrow = rounds.bounds(settings)
        narrow = narrow and len(rounds.clean) >= settings.min_rounds
        if narrow:
            break
        if _clock() - timed_from >= settings.budget_s and len(rounds.clean) >= MIN_INTERVAL_ROUNDS:
            logger.debug("timing budget of %.1f s spent after %d rounds", settings.budget_s, len(rounds.clean))
            break
    baseline_ms, candidate_ms = rounds.medians_ms(settings.confidence)
    measurement = RatioMeasurement(
        ratio=significant(ratio),
        low=significant(low),
        high=significant(high),
        rounds=len(rounds.clean),
        baseline_ms=baseline_ms,
        candidate_ms=candidate_ms,
        seconds=round(_clock() - started, 3),
        decided=narrow,
        confidence=settings.confidence,
        inner_repeat=repeat,
        retimed=rounds.retimed,
        disturbed=rounds.clean.count(False),
    )
    logger.debug(
        "latency ratio %s (%d rounds retimed, %d left out)",
        measurement.describe(),
        rounds.retimed,
        measurement.disturbed,
    )
    return measurement


def measure_latency_ms(run: Runnable, settings: TimingSettings = DEFAULT_TIMING) -> float:
    """A typical latency of one call of `run` in milliseconds: the median of `settings.min_rounds`
    timed samples after warm-up (descheduled samples timed again and very fast callables repeated
    inside a sample, as in `compare_latency`).

    Args:
        run: The callable to time.
        settings: How to time; `DEFAULT_TIMING` unless told.
    """
    repeat = _warm_up((run,), settings)
    samples = [_time_round((run,), repeat, settings.retries)[0][0] for _ in range(settings.min_rounds)]
    return significant(1000.0 * statistics.median(samples))
