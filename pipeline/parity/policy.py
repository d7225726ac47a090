"""Parity policies applied to metrics: which checks run for each precision, and their verdicts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipeline.job import Fp32Policy, TaskPolicy
from pipeline.job import Precision as Precision  # defined with the policies, re-exported here
from pipeline.parity.metrics import OutputMetrics


class Check(BaseModel):
    """One policy rule applied to one measured value.

    Attributes:
        metric: The metric checked (e.g. ``cosine_mean``).
        value: The measured value.
        limit: The policy's limit.
        passed: Whether the value is within the limit.
        rule: The rule in words, e.g. ``cosine_mean >= 0.99``.
    """

    model_config = ConfigDict(ser_json_inf_nan="strings")

    metric: str
    value: float
    limit: float
    passed: bool
    rule: str


def _at_least(metric: str, value: float, limit: float) -> Check:
    return Check(metric=metric, value=value, limit=limit, passed=value >= limit, rule=f"{metric} >= {limit:g}")


def _at_most(metric: str, value: float, limit: float) -> Check:
    return Check(metric=metric, value=value, limit=limit, passed=value <= limit, rule=f"{metric} <= {limit:g}")


def fp32_checks(metrics: OutputMetrics, policy: Fp32Policy) -> list[Check]:
    """Element-wise closeness for float stages: every element within atol + rtol * |reference|."""
    return [
        _at_most("min_atol", metrics.min_atol, policy.atol),
        _at_most("nan_inf_count", metrics.nan_count + metrics.inf_count, 0),
    ]


def task_checks(metrics: OutputMetrics, policy: TaskPolicy) -> list[Check]:
    """Task-level closeness (pruned, int8): cosine, SNR and top-1 agreement, where the policy sets them."""
    checks = [_at_most("nan_inf_count", metrics.nan_count + metrics.inf_count, 0)]
    if policy.min_cosine is not None:
        checks.append(_at_least("cosine_mean", metrics.cosine_mean, policy.min_cosine))
    if policy.min_snr_db is not None:
        checks.append(_at_least("snr_db", metrics.snr_db, policy.min_snr_db))
    if policy.min_top1_agreement is not None and metrics.top1_agreement is not None:
        checks.append(_at_least("top1_agreement", metrics.top1_agreement, policy.min_top1_agreement))
    return checks


def accuracy_drop_check(reference: float, candidate: float, policy: TaskPolicy) -> Check | None:
    """Top-1 accuracy drop in points (reference minus candidate), when the policy limits it."""
    if policy.max_accuracy_drop is None:
        return None
    # Accuracies are ratios of counts: round away float noise so a drop of exactly the limit passes.
    drop = round(100.0 * (reference - candidate), 9)
    return _at_most("accuracy_drop_points", drop, policy.max_accuracy_drop)


def agreement_bound_check(metrics: OutputMetrics, policy: TaskPolicy) -> Check | None:
    """Without labels, top-1 disagreement bounds the accuracy drop from above: check it against the limit.

    Returns None when the policy sets no accuracy drop or the output has no top-1 agreement.
    """
    if policy.max_accuracy_drop is None or metrics.top1_agreement is None:
        return None
    limit = 1.0 - policy.max_accuracy_drop / 100.0
    return _at_least("top1_agreement", metrics.top1_agreement, limit)
