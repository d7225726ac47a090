"""Unit tests of the parity policies (`pipeline.parity.policy`) and the report (`pipeline.parity.report`).

Checks are exercised exactly at their limits (a limit is inclusive) and just past them; the
report is built from hand-made metrics, rendered, written and read back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from pipeline.job import Fp32Policy, Int8Policy
from pipeline.parity.metrics import OutputMetrics, WorstElement
from pipeline.parity.policy import Check, accuracy_drop_check, fp32_checks, task_checks
from pipeline.parity.report import (
    AccuracyParity,
    Comparison,
    OutputParity,
    ParityReport,
    format_value,
    render_markdown,
)
from pipeline.parity.writers import write_reports


def make_metrics(**overrides: Any) -> OutputMetrics:
    """Metrics of a perfect match, with `overrides` applied."""
    values: dict[str, Any] = {
        "samples": 8,
        "elements": 80,
        "max_abs": 0.0,
        "max_rel": 0.0,
        "mean_abs": 0.0,
        "cosine_mean": 1.0,
        "cosine_min": 1.0,
        "snr_db": math.inf,
        "top1_agreement": 1.0,
        "nan_count": 0,
        "inf_count": 0,
        "min_atol": 0.0,
        "rtol": 1e-3,
        "worst": WorstElement(index=[0, 0], reference=1.0, candidate=1.0),
    }
    values.update(overrides)
    return OutputMetrics(**values)


def by_metric(checks: list[Check]) -> dict[str, Check]:
    """Checks keyed by metric name (each metric appears once)."""
    result = {check.metric: check for check in checks}
    assert len(result) == len(checks)
    return result


# --- fp32 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_atol", "passed"),
    [(0.0, True), (1e-4, True), (1.5e-4, False)],
)
def test_fp32_min_atol_boundary(min_atol: float, passed: bool) -> None:
    checks = by_metric(fp32_checks(make_metrics(min_atol=min_atol), Fp32Policy(atol=1e-4)))

    assert set(checks) == {"min_atol", "nan_inf_count"}
    assert checks["min_atol"].passed is passed
    assert checks["min_atol"].value == min_atol
    assert checks["min_atol"].limit == 1e-4
    assert checks["min_atol"].rule == "min_atol <= 0.0001"
    assert checks["nan_inf_count"].passed


@pytest.mark.parametrize(("nan", "inf"), [(1, 0), (0, 1)])
def test_fp32_any_nan_or_inf_fails(nan: int, inf: int) -> None:
    checks = by_metric(fp32_checks(make_metrics(nan_count=nan, inf_count=inf), Fp32Policy()))

    assert not checks["nan_inf_count"].passed
    assert checks["nan_inf_count"].value == 1


# --- int8 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cosine", "passed"), [(0.99, True), (0.995, True), (0.9899, False)])
def test_int8_cosine_boundary(cosine: float, passed: bool) -> None:
    checks = by_metric(task_checks(make_metrics(cosine_mean=cosine), Int8Policy(min_cosine=0.99)))

    assert checks["cosine_mean"].passed is passed
    assert checks["cosine_mean"].rule == "cosine_mean >= 0.99"


@pytest.mark.parametrize(("snr", "passed"), [(20.0, True), (math.inf, True), (19.99, False), (-math.inf, False)])
def test_int8_snr_boundary(snr: float, passed: bool) -> None:
    checks = by_metric(task_checks(make_metrics(snr_db=snr), Int8Policy(min_snr_db=20.0)))

    assert checks["snr_db"].passed is passed


@pytest.mark.parametrize(("agreement", "passed"), [(0.97, True), (0.96875, False)])
def test_int8_top1_boundary(agreement: float, passed: bool) -> None:
    checks = by_metric(task_checks(make_metrics(top1_agreement=agreement), Int8Policy(min_top1_agreement=0.97)))

    assert checks["top1_agreement"].passed is passed


def test_int8_only_applies_checks_the_policy_sets() -> None:
    policy = Int8Policy(min_cosine=None, min_snr_db=None, min_top1_agreement=None)

    checks = task_checks(make_metrics(cosine_mean=-1.0, snr_db=-10.0, top1_agreement=0.0), policy)

    assert [check.metric for check in checks] == ["nan_inf_count"]
    assert checks[0].passed


def test_int8_top1_check_skipped_for_non_classifier_outputs() -> None:
    checks = task_checks(make_metrics(top1_agreement=None), Int8Policy(min_top1_agreement=0.97))

    assert "top1_agreement" not in by_metric(checks)


def test_int8_nan_cosine_fails() -> None:
    checks = by_metric(task_checks(make_metrics(cosine_mean=math.nan), Int8Policy(min_cosine=0.5)))

    assert not checks["cosine_mean"].passed


def test_int8_nan_count_fails() -> None:
    checks = by_metric(task_checks(make_metrics(nan_count=3), Int8Policy()))

    assert not checks["nan_inf_count"].passed


# --- accuracy drop --------------------------------------------------------------------------


def test_accuracy_drop_none_without_limit() -> None:
    assert accuracy_drop_check(0.9, 0.1, Int8Policy(max_accuracy_drop=None)) is None


@pytest.mark.parametrize(
    ("candidate", "passed"),
    # 0.5 - 0.4921875 = 1/128: exactly 0.78125 points in binary floating point.
    [(0.5, True), (0.4921875, True), (0.484375, False), (0.75, True)],
)
def test_accuracy_drop_boundary(candidate: float, passed: bool) -> None:
    check = accuracy_drop_check(0.5, candidate, Int8Policy(max_accuracy_drop=0.78125))

    assert check is not None
    assert check.metric == "accuracy_drop_points"
    assert check.value == pytest.approx(100 * (0.5 - candidate))
    assert check.passed is passed


def test_accuracy_drop_of_exactly_the_limit_passes_for_decimal_accuracies() -> None:
    # 95/100 correct in PyTorch, 94/100 in int8: a drop of exactly one point.
    check = accuracy_drop_check(95 / 100, 94 / 100, Int8Policy(max_accuracy_drop=1.0))

    assert check is not None
    assert check.passed


# --- report ---------------------------------------------------------------------------------


def passing_comparison() -> Comparison:
    metrics = make_metrics(min_atol=1e-6, max_abs=2e-6)
    return Comparison(
        stage="export",
        target="cpu",
        reference="pytorch",
        candidate="model.onnx",
        precision="fp32",
        outputs=[OutputParity(name="logits", metrics=metrics, checks=fp32_checks(metrics, Fp32Policy()))],
    )


def failing_comparison() -> Comparison:
    metrics = make_metrics(cosine_mean=0.5, cosine_min=0.25, snr_db=3.0, top1_agreement=0.5)
    policy = Int8Policy(min_cosine=0.99, max_accuracy_drop=1.0)
    return Comparison(
        stage="quantize",
        target="cpu",
        reference="model.simplified.onnx",
        candidate="model.int8.onnx",
        precision="int8",
        outputs=[OutputParity(name="logits", metrics=metrics, checks=task_checks(metrics, policy))],
        accuracy=AccuracyParity(
            output="logits",
            reference=0.9,
            candidate=0.5,
            check=accuracy_drop_check(0.9, 0.5, policy),
        ),
    )


def fp32_failing_comparison() -> Comparison:
    metrics = make_metrics(
        min_atol=0.25,
        max_abs=0.25,
        worst=WorstElement(index=[3, 1], reference=2.0, candidate=2.25),
    )
    return Comparison(
        stage="simplify",
        target="cpu",
        reference="model.onnx",
        candidate="model.simplified.onnx",
        precision="fp32",
        outputs=[OutputParity(name="embedding", metrics=metrics, checks=fp32_checks(metrics, Fp32Policy()))],
    )


def test_report_passes_when_every_check_passes() -> None:
    report = ParityReport.build(
        job="tiny", data="evaluation data (x.npz)", samples=8, notes=[], comparisons=[passing_comparison()]
    )

    assert report.verdict == "pass"
    assert report.failures == []
    assert report.comparisons[0].passed


def test_report_fails_and_names_stage_target_output_and_metric() -> None:
    report = ParityReport.build(
        job="tiny",
        data="evaluation data (x.npz)",
        samples=8,
        notes=[],
        comparisons=[passing_comparison(), failing_comparison(), fp32_failing_comparison()],
    )

    assert report.verdict == "fail"
    assert len(report.failures) == 3
    cosine_line, accuracy_line, atol_line = report.failures
    assert cosine_line == "stage quantize on cpu, output 'logits': cosine_mean = 0.5, policy cosine_mean >= 0.99"
    assert "policy cosine_mean >= 0.99" in cosine_line
    assert accuracy_line.startswith("stage quantize on cpu, output 'logits': accuracy_drop_points = 40, policy")
    assert "policy accuracy_drop_points <= 1" in accuracy_line
    assert atol_line.startswith("stage simplify on cpu, output 'embedding': min_atol = 0.25, policy")
    # A failed min_atol check points at the element that needs it.
    assert "worst element [3, 1]: reference 2, candidate 2.25, rtol 0.001" in atol_line


def test_render_markdown_has_table_rows_and_failed_checks() -> None:
    report = ParityReport.build(
        job="tiny",
        data="evaluation data (x.npz)",
        samples=8,
        notes=["a caveat"],
        comparisons=[passing_comparison(), failing_comparison()],
    )

    text = render_markdown(report)

    assert text.startswith("# Parity report: tiny\n")
    assert "**Verdict: FAIL** on evaluation data (x.npz) (8 samples)." in text
    assert "> a caveat" in text
    assert "| stage | target | candidate vs reference | output |" in text
    # max abs, p99 abs (0: these hand-made metrics carry no histogram), cosine, SNR, top-1, result
    assert (
        "| export | cpu | model.onnx vs pytorch | logits | 2e-06 | 0 | 1.0000 / 1.0000 | inf | 1.0000 | pass |" in text
    )
    assert (
        "| quantize | cpu | model.int8.onnx vs model.simplified.onnx | logits | 0 | 0 | 0.5000 / 0.2500 "
        "| 3.0000 | 0.5000 | FAIL |"
    ) in text
    assert "| quantize | cpu | logits | 90.00% | 50.00% | 40.00 |" in text
    assert "## Failed checks" in text
    for line in report.failures:
        assert f"- {line}" in text


def test_render_markdown_of_passing_report_has_no_failures_section() -> None:
    report = ParityReport.build(job="tiny", data="d", samples=8, notes=[], comparisons=[passing_comparison()])

    text = render_markdown(report)

    assert "**Verdict: PASS**" in text
    assert "Failed checks" not in text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "-"),
        (0.0, "0"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (0.5, "0.5000"),
        (1e-5, "1e-05"),
        (12345.0, "1.234e+04"),
    ],
)
def test_format_value(value: float | None, text: str) -> None:
    assert format_value(value) == text


def test_write_reports_round_trips(tmp_path: Path) -> None:
    report = ParityReport.build(
        job="tiny",
        data="evaluation data (x.npz)",
        samples=8,
        notes=["n"],
        comparisons=[passing_comparison(), failing_comparison()],
    )
    assert report.comparisons[0].outputs[0].metrics.snr_db == math.inf

    json_path = write_reports(report, tmp_path)

    assert json_path == tmp_path / "report.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]
    raw = json_path.read_text()
    assert json.loads(raw)["comparisons"][0]["outputs"][0]["metrics"]["snr_db"] == "Infinity"
    loaded = ParityReport.model_validate_json(raw)
    assert loaded == report
    assert loaded.comparisons[0].outputs[0].metrics.snr_db == math.inf
    assert loaded.verdict == "fail"
    assert (tmp_path / "report.md").read_text() == render_markdown(report)
