"""What the per-target search tried and why it shipped what it did (typed records for the manifest and
the report)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipeline.timing import RatioMeasurement


class TargetLatency(BaseModel):
    """A candidate's latency against the float model on one target.

    Attributes:
        target: The backend.
        measurement: Candidate / float latency with its interval (None: not timed, see `note`).
        note: Why it was not timed (an emulated target, the budget spent), else empty.
    """

    model_config = ConfigDict(frozen=True)

    target: str
    measurement: RatioMeasurement | None = None
    note: str = ""


class CandidateResult(BaseModel):
    """One candidate model the search built, judged and timed.

    Attributes:
        name: The recipe, e.g. "int8 static" or "int8 dynamic MatMul".
        precision: "int8" or "fp32".
        float_nodes: Compute nodes left float.
        dynamic_nodes: Nodes quantized dynamically (activation ranges computed at run time).
        passed: Whether it met the int8 policy on the held-out batches (None: not judged).
        metric: The policy's figures on the held-out batches.
        latency: Its latency against the float model on each target of the branch.
        shipped: Whether this is the model the branch ships.
        note: Anything else (why it was skipped or not timed).
    """

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")

    name: str
    precision: str
    float_nodes: int = 0
    dynamic_nodes: int = 0
    passed: bool | None = None
    metric: str = ""
    latency: list[TargetLatency] = []
    shipped: bool = False
    note: str = ""

    def worst_ratio(self) -> float | None:
        """The highest latency ratio over the timed targets (None: timed on none)."""
        ratios = [t.measurement.ratio for t in self.latency if t.measurement is not None]
        return max(ratios) if ratios else None

    def faster(self) -> bool | None:
        """True when faster than float on every timed target, False when slower on one, None when
        untimed or an interval contains 1."""
        verdicts = [t.measurement.faster() for t in self.latency if t.measurement is not None]
        if not verdicts or None in verdicts and False not in verdicts:
            return None
        return all(verdicts)


class SearchDecision(BaseModel):
    """The search of one branch (a group of targets sharing a model).

    Attributes:
        targets: The targets the branch serves (empty: every target).
        judged_on: The data candidates were judged on.
        candidates: Every candidate, in the order tried.
        shipped: The name of the shipped candidate.
        reason: Why it shipped.
        speedup: Whether the shipped model beats float on every timed target (None: not timed, or
            the interval could not tell).
        slow_reasons: When it does not: what explains it (float nodes, unfused Q/DQ, the CPU).
        seconds: Time the search took.
        budget_s: The time budget it had.
    """

    model_config = ConfigDict(frozen=True)

    targets: list[str] = []
    judged_on: str
    candidates: list[CandidateResult]
    shipped: str
    reason: str
    speedup: bool | None = None
    slow_reasons: list[str] = []
    seconds: float
    budget_s: float
