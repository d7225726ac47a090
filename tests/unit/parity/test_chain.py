"""The parity engine: which checks apply to which output, and a row's result showing the accuracy gate."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from rich.console import Console

from pipeline import cli
from pipeline.job import Int8Policy, OutputPolicy, ParityPolicy
from pipeline.parity.chain import Link, ParityChain
from pipeline.parity.html import render_html
from pipeline.parity.report import ParityReport, render_markdown

RNG = np.random.default_rng(0)
LINK = Link.on_target("quantize", "cpu", "model.fp32.onnx", "model.int8.onnx", "int8")
NAMES = ["logits", "embedding"]


def runs(logits: np.ndarray, embedding: np.ndarray, noisy_embedding: np.ndarray) -> dict:
    """The reference's and the candidate's outputs: identical logits, a perturbed embedding."""
    return {LINK.reference_run: [logits, embedding], LINK.candidate_run: [logits.copy(), noisy_embedding]}


def two_head_chain(labelled: bool, wrong_labels: bool = False) -> ParityChain:
    """One batch of a classifier with an embedding head whose argmax flips everywhere in int8
    (labelled: with the labels the reference's logits predict)."""
    logits = RNG.standard_normal((64, 10))
    embedding = RNG.standard_normal((64, 16))
    # Same vector up to a tiny change that swaps its two largest entries: cosine ~1, argmax flips.
    noisy = embedding.copy()
    order = np.argsort(embedding, axis=1)
    rows = np.arange(64)
    noisy[rows, order[:, -1]], noisy[rows, order[:, -2]] = embedding[rows, order[:, -2]], embedding[rows, order[:, -1]]
    chain = ParityChain([LINK], NAMES, rtol=1e-3, is_classifier=True)
    batch = runs(logits, embedding, noisy)
    if wrong_labels:  # the candidate's logits now disagree with the labels the reference gets right
        batch[LINK.candidate_run][0] = np.roll(logits, 1, axis=1)
    chain.update(batch, 64, logits.argmax(axis=1) if labelled else None)
    return chain


def test_top1_and_the_accuracy_bound_apply_to_the_classifier_output_only() -> None:
    chain = two_head_chain(labelled=False)
    policy = ParityPolicy(int8=Int8Policy(min_cosine=0.9, min_top1_agreement=0.99, max_accuracy_drop=1.0))

    (comparison,) = chain.judge(policy, agreement_bounds_drop=True)

    logits, embedding = comparison.outputs
    assert embedding.metrics.top1_agreement is None
    assert {check.metric for check in embedding.checks} == {"nan_inf_count", "cosine_mean"}
    # Without labels the classifier's agreement stands in for the accuracy drop (1 point -> 0.99).
    bounds = [check for check in logits.checks if check.metric == "top1_agreement"]
    assert [check.limit for check in bounds] == [0.99, 0.99]
    assert comparison.passed


def test_the_accuracy_bound_stands_in_only_when_asked_and_without_labels() -> None:
    policy = ParityPolicy(int8=Int8Policy(max_accuracy_drop=1.0))
    (plain,) = two_head_chain(labelled=False).judge(policy)
    assert [c.metric for c in plain.outputs[0].checks] == ["nan_inf_count", "cosine_mean"]
    (labelled,) = two_head_chain(labelled=True).judge(policy, agreement_bounds_drop=True)
    assert [c.metric for c in labelled.outputs[0].checks] == ["nan_inf_count", "cosine_mean"]
    assert labelled.accuracy is not None and labelled.accuracy.check is not None


def test_an_output_override_judges_that_output_only() -> None:
    policy = ParityPolicy(outputs={"embedding": OutputPolicy(int8=Int8Policy(min_cosine=0.999999))})
    (comparison,) = two_head_chain(labelled=False).judge(policy)
    limits = {
        output.name: [c.limit for c in output.checks if c.metric == "cosine_mean"] for output in comparison.outputs
    }
    assert limits == {"logits": [0.99], "embedding": [0.999999]}


@pytest.fixture
def failed_accuracy_report() -> ParityReport:
    """Every output's own checks pass; the accuracy drop on the classifier output fails."""
    chain = two_head_chain(labelled=True, wrong_labels=True)
    (comparison,) = chain.judge(ParityPolicy(int8=Int8Policy(min_cosine=-1.0, max_accuracy_drop=1.0)))
    assert all(output.passed for output in comparison.outputs)
    assert comparison.accuracy is not None and comparison.accuracy.check is not None
    assert not comparison.accuracy.check.passed
    return ParityReport.build(job="j", data="d", samples=64, notes=[], comparisons=[comparison])


def test_a_failed_accuracy_gate_shows_fail_on_the_classifier_row(failed_accuracy_report: ParityReport) -> None:
    comparison = failed_accuracy_report.comparisons[0]
    assert [comparison.output_result(output) for output in comparison.outputs] == ["FAIL", "pass"]

    markdown = render_markdown(failed_accuracy_report)
    assert re.search(r"\| quantize \| cpu \| .* \| logits \| .* \| FAIL \|", markdown)
    assert re.search(r"\| quantize \| cpu \| .* \| embedding \| .* \| pass \|", markdown)

    html = render_html(failed_accuracy_report)
    logits_row = next(row for row in html.split("<tr>") if "<td>logits</td>" in row)
    assert ">FAIL<" in logits_row and ">pass<" not in logits_row


def test_the_cli_table_shows_fail_on_the_classifier_row(
    failed_accuracy_report: ParityReport, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = io.StringIO()
    monkeypatch.setattr(cli, "stdout", Console(file=captured, width=200, color_system=None))

    cli._print_report(failed_accuracy_report)

    lines = captured.getvalue().splitlines()
    logits = next(line for line in lines if " logits " in line)
    embedding = next(line for line in lines if " embedding " in line)
    assert "FAIL" in logits and "pass" not in logits
    assert "pass" in embedding
    assert "verdict: FAIL" in captured.getvalue()
