"""The per-target search: build each candidate the target allows, judge it on held-out calibration
data, time the ones that pass against the float model on the target, and ship the fastest.

The candidates are recipes (`candidate_specs`), tried in order within a time budget. Timing is
`pipeline.timing`'s interleaved comparison, each model in a fresh session of the target's backend,
on a held-out calibration batch of the deployed shape.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from backends.base import QuantizationConstraints
from pipeline.errors import BackendError
from pipeline.onnx_io import save_model
from pipeline.quantization.candidates import Built, CandidateBuilder
from pipeline.quantization.decision import CandidateResult, SearchDecision, TargetLatency
from pipeline.quantization.judge import PolicyJudge
from pipeline.quantization.qdq import QdqSettings
from pipeline.timing import DEFAULT_TIMING, RatioMeasurement, compare_latency

if TYPE_CHECKING:
    from pipeline.stages.base import Target

logger = logging.getLogger(__name__)

BuildStep = Callable[[], Built | None]
# The most seconds one candidate's timing may take (the stability rule of `_choose` absorbs the
# wider interval); validation's speed guard then times the shipped model with the full default.
SEARCH_TIMING_S = 5.0


@dataclass(frozen=True)
class CandidateSpec:
    """A recipe the search may try.

    Attributes:
        recipe: Its identifier in the job's ``quantize.recipes``.
        name: How the report names it.
        precision: "int8" (or a float precision).
        build: Builds the candidate (None: the recipe does not apply to this model, see `skip_note`).
        skip_note: Why it does not apply, when `build` returns None.
    """

    recipe: str
    name: str
    precision: str
    build: BuildStep
    skip_note: str = ""


def candidate_specs(
    builder: CandidateBuilder,
    settings: QdqSettings,
    constraints: QuantizationConstraints,
    precisions: tuple[str, ...] = ("int8",),
) -> list[CandidateSpec]:
    """The recipes a branch's targets allow (and the job's ``quantize.recipes`` lists), in the
    order tried: the first is the safe default, and on a tie in speed the earlier one ships.

    Args:
        builder: Builds models from the branch's calibration.
        settings: The branch's QDQ settings (its targets' constraints applied).
        constraints: The branch's constraints (which recipes its kernels run).
        precisions: The precisions every target of the branch may ship (``targets.precisions``);
            with ``fp32``, the float model is the last candidate: it ships when no int8 one is
            faster than it beyond the timing noise.
    """
    specs = _int8_specs(builder, settings, constraints) if "int8" in precisions else []
    allowed = builder.job.quantize.recipes
    specs = [spec for index, spec in enumerate(specs) if allowed is None or spec.recipe in allowed or index == 0]
    if "fp32" in precisions:
        specs.append(CandidateSpec("fp32", "fp32 (the float model)", "fp32", lambda: builder.float_model(settings)))
    return specs


def _int8_specs(
    builder: CandidateBuilder, settings: QdqSettings, constraints: QuantizationConstraints
) -> list[CandidateSpec]:
    """The int8 recipes the constraints allow, static first."""
    static = cache(lambda: builder.static_mixed(settings, constraints.int16_activations))
    signed = replace(settings, activation_type="int8")
    free_choice = builder.job.quantize.activation_type is None and not settings.power_of_two
    specs = [CandidateSpec("static", "int8 static", "int8", static)]
    if constraints.dynamic_int8:
        specs += [
            CandidateSpec(
                "float_to_dynamic",
                "int8 static, float MatMuls dynamic",
                "int8",
                lambda: builder.float_to_dynamic(static()),
                "int8 static kept no MatMul float, or none of them could be quantized dynamically",
            ),
            CandidateSpec(
                "dynamic",
                "int8 dynamic MatMul",
                "int8",
                lambda: builder.dynamic_mixed(settings),
                "no MatMul with a constant weight that ONNX Runtime's dynamic quantizer takes",
            ),
        ]
    if free_choice and settings.activation_type == "uint8" and "int8" in constraints.activation_types:
        specs.append(
            CandidateSpec(
                "static_int8_activations",
                "int8 static, int8 activations",
                "int8",
                lambda: builder.static_keeping(signed, static()),
            )
        )
    return specs


class LatencyTimer:
    """Times candidate models against the float model on each timed target of a branch.

    Args:
        targets: The branch's targets (those whose sessions time the device are timed).
        float_model: The float model quantize started from.
        feeds: The batch to time on.
        scratch: A folder for candidate files (removed by `close`).
        threshold_bytes: External-data threshold for saving candidates.
    """

    def __init__(
        self,
        targets: list[Target],
        float_model: Path,
        feeds: dict[str, np.ndarray],
        scratch: Path,
        threshold_bytes: int,
    ) -> None:
        self._targets = targets
        self._float_model = float_model
        self._feeds = feeds
        self._scratch = scratch
        self._threshold = threshold_bytes
        self._count = 0

    @property
    def timed(self) -> list[str]:
        """The targets it times."""
        return [t.name for t in self._targets if t.capabilities.measured_latency]

    def __call__(self, model: onnx.ModelProto, budget_s: float) -> list[TargetLatency]:
        """The candidate's latency ratio to the float model on every target (untimed ones noted)."""
        self._count += 1
        path = self._scratch / f"candidate{self._count}.onnx"
        self._scratch.mkdir(parents=True, exist_ok=True)
        save_model(ir.from_proto(model), path, self._threshold)
        results = []
        share = budget_s / max(1, len(self.timed))
        for target in self._targets:
            if not target.capabilities.measured_latency:
                results.append(TargetLatency(target=target.name, note="emulated: see the cost model in Placement"))
                continue
            results.append(self._time(target, path, share))
        return results

    def _time(self, target: Target, path: Path, budget_s: float) -> TargetLatency:
        settings = DEFAULT_TIMING.model_copy(update={"budget_s": max(1.0, min(SEARCH_TIMING_S, budget_s))})
        try:
            with (
                target.backend.open(self._float_model, target.options) as base,
                target.backend.open(path, target.options) as candidate,
            ):
                measured = compare_latency(lambda: base.run(self._feeds), lambda: candidate.run(self._feeds), settings)
        except BackendError as e:
            return TargetLatency(target=target.name, note=f"could not be timed: {e.reason}")
        return TargetLatency(target=target.name, measurement=measured)

    def identity(self) -> list[TargetLatency]:
        """The float model against itself: exactly 1 on every timed target (not timed)."""
        exact = RatioMeasurement(
            ratio=1.0, low=1.0, high=1.0, rounds=0, baseline_ms=0.0, candidate_ms=0.0, seconds=0.0, decided=True
        )
        return [TargetLatency(target=name, measurement=exact, note="the float model itself") for name in self.timed]

    def close(self) -> None:
        """Remove the candidate files."""
        shutil.rmtree(self._scratch, ignore_errors=True)


def run_search(
    specs: list[CandidateSpec], judge: PolicyJudge, timer: LatencyTimer, budget_s: float, judged_on: str
) -> tuple[SearchDecision, Built]:
    """Build and judge every spec within the budget, time the ones that pass, pick the one to ship.

    The first spec is always built (the search ships something), however long it takes; the budget
    is for the alternatives after it (their building, judging and timing): later ones are skipped
    once it is spent, and the table says so. Timing runs only when more than one candidate passes
    (validation's speed guard times the shipped model in any case).

    Returns:
        The decision (every candidate, the choice and why) and the shipped model.
    """
    clock = time.perf_counter()
    results, models, start = _build_and_judge(specs, judge, budget_s)
    passing = [index for index, result in enumerate(results) if result.passed]
    if len(passing) > 1 and timer.timed:
        for count, index in enumerate(passing):
            remaining = max(0.0, budget_s - (time.perf_counter() - start)) / (len(passing) - count)
            built = models[index]
            assert built is not None
            latency = timer.identity() if built.precision == "fp32" else timer(built.model, remaining)
            results[index] = results[index].model_copy(update={"latency": latency})
    pick, reason = _choose(results)
    shipped = models[pick]
    assert shipped is not None, "the first candidate is always built"
    results[pick] = results[pick].model_copy(update={"shipped": True})
    decision = SearchDecision(
        judged_on=judged_on,
        candidates=results,
        shipped=results[pick].name,
        reason=reason,
        speedup=results[pick].faster(),
        seconds=round(time.perf_counter() - clock, 2),
        budget_s=budget_s,
    )
    return decision, shipped


def _build_and_judge(
    specs: list[CandidateSpec], judge: PolicyJudge, budget_s: float
) -> tuple[list[CandidateResult], list[Built | None], float]:
    """Every spec built and judged on the held-out data, in order, until the budget (counted from
    when the first was built) is spent; and when that count started."""
    start = time.perf_counter()
    results: list[CandidateResult] = []
    models: list[Built | None] = []
    for index, spec in enumerate(specs):
        if index and time.perf_counter() - start >= budget_s:
            results.append(CandidateResult(name=spec.name, precision=spec.precision, note="not tried: budget spent"))
            models.append(None)
            continue
        built = spec.build()
        if index == 0:  # the budget is for the alternatives: the first is always built, however long it takes
            start = time.perf_counter()
        models.append(built)
        if built is None:
            note = f"not applicable: {spec.skip_note}"
            results.append(CandidateResult(name=spec.name, precision=spec.precision, note=note))
            continue
        passed, metric = judge(built.model)
        results.append(
            CandidateResult(
                name=spec.name,
                precision=spec.precision,
                float_nodes=built.float_compute_nodes(),
                dynamic_nodes=len(built.dynamic),
                passed=passed,
                metric=metric,
                note="" if passed else "misses the int8 policy on the held-out data",
            )
        )
        logger.info("search: %s -> %s (%s)", spec.name, "pass" if passed else "fail", metric)
    return results, models, start


def _choose(results: list[CandidateResult]) -> tuple[int, str]:
    """The candidate to ship and why: the fastest that passes (its slowest timed target decides).

    The fastest by point estimate sets the bar: the earliest candidate whose estimate is within
    that fastest one's interval ships, so within the timing noise the earlier (simpler) recipe
    wins and reruns choose alike. The fp32 candidate (the float model, exactly 1) comes last: it
    ships only when every int8 candidate is slower than float beyond the noise.
    """
    passing = [i for i, r in enumerate(results) if r.passed]
    timed = [i for i in passing if results[i].worst_ratio() is not None]
    if len(timed) > 1:
        fastest = min(timed, key=lambda i: (results[i].worst_ratio() or 0.0, i))
        bar = _upper(results[fastest])
        best = next(i for i in timed if (results[i].worst_ratio() or 0.0) <= bar)
        if results[best].precision == "fp32":
            return best, "no int8 candidate is faster than float on the target beyond the timing noise"
        shown = _ratios(results[best])
        return best, f"the fastest, within the timing noise, of {len(timed)} candidates meeting the policy ({shown})"
    if passing:
        only = "the only candidate" if len(passing) == 1 else "the first candidate"
        return passing[0], f"{only} meeting the int8 policy on the held-out data"
    return 0, "no candidate met the int8 policy on the held-out data: shipping the first, the closest the search got"


def _ratios(result: CandidateResult) -> str:
    """A candidate's latency on each timed target, e.g. ``int8 static: cpu 0.62x [0.60, 0.64], 14 rounds``."""
    ratios = "; ".join(f"{t.target} {t.measurement.describe()}" for t in result.latency if t.measurement is not None)
    return f"{result.name}: {ratios}"


def _upper(result: CandidateResult) -> float:
    """The highest upper bound of the latency interval over the timed targets."""
    return max(t.measurement.high for t in result.latency if t.measurement is not None)
