"""Unit tests of `ParityPolicy.section` and `ParityPolicy.for_link`: which rule judges which output.

Each precision maps to one job-file section; a per-output override replaces that section's rule
for its own output only; "task" comparisons (``onnxforge parity``) take the int8 section.
"""

from __future__ import annotations

import math
from typing import get_args

import pytest

from pipeline.job import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_MIN_COSINE,
    DEFAULT_RTOL,
    POLICY_SECTIONS,
    DataSource,
    DistillPolicy,
    Fp32Policy,
    Int8Policy,
    OutputPolicy,
    ParityPolicy,
    Precision,
    PrunePolicy,
    TaskPolicy,
)
from pipeline.parity.policy import Precision as PolicyModulePrecision


def job_policy() -> ParityPolicy:
    """A policy whose every section differs from the defaults, so each can be told apart."""
    return ParityPolicy(
        fp32=Fp32Policy(atol=1e-2, rtol=1e-2),
        distill=DistillPolicy(min_cosine=0.5),
        prune=PrunePolicy(min_cosine=0.6),
        int8=Int8Policy(min_cosine=0.7),
    )


@pytest.mark.parametrize(
    ("precision", "section"),
    [("fp32", "fp32"), ("distilled", "distill"), ("pruned", "prune"), ("int8", "int8"), ("task", "int8")],
)
def test_each_precision_is_judged_by_its_section(precision: Precision, section: str) -> None:
    policy = job_policy()
    expected = getattr(policy, section)
    assert POLICY_SECTIONS[precision] == section
    assert policy.section(precision) is expected
    assert policy.for_link(precision, "logits") is expected


def test_every_precision_has_a_section() -> None:
    assert set(POLICY_SECTIONS) == set(get_args(Precision))


def test_task_uses_the_int8_section() -> None:
    policy = job_policy()
    assert policy.for_link("task", "embedding") is policy.int8
    override = Int8Policy(min_cosine=0.95)
    with_override = policy.model_copy(update={"outputs": {"embedding": OutputPolicy(int8=override)}})
    assert with_override.for_link("task", "embedding") is override


def test_an_override_applies_to_its_output_only() -> None:
    override = Int8Policy(min_cosine=0.9, min_top1_agreement=0.99)
    policy = job_policy().model_copy(update={"outputs": {"logits": OutputPolicy(int8=override)}})
    assert policy.for_link("int8", "logits") is override
    assert policy.for_link("int8", "embedding") is policy.int8


def test_an_override_applies_to_its_precision_only() -> None:
    override = PrunePolicy(min_cosine=0.99)
    policy = job_policy().model_copy(update={"outputs": {"logits": OutputPolicy(prune=override)}})
    assert policy.for_link("pruned", "logits") is override
    for precision in ("fp32", "distilled", "int8", "task"):
        assert policy.for_link(precision, "logits") is policy.section(precision)


def test_an_fp32_override_is_element_wise() -> None:
    override = Fp32Policy(atol=1e-3)
    policy = ParityPolicy(outputs={"logits": OutputPolicy(fp32=override)})
    rule = policy.for_link("fp32", "logits")
    assert rule is override
    assert isinstance(policy.for_link("int8", "logits"), TaskPolicy)


def test_defaults_are_the_shared_constants() -> None:
    policy = ParityPolicy()
    assert (policy.fp32.rtol, policy.fp32.atol) == (DEFAULT_RTOL, DEFAULT_ATOL) == (1e-3, 1e-4)
    assert policy.int8.min_cosine == TaskPolicy().min_cosine == DEFAULT_MIN_COSINE == 0.99
    assert DataSource(factory="data:batches").batch_size == DEFAULT_BATCH_SIZE == 32


def test_precision_is_still_importable_from_the_policy_module() -> None:
    assert PolicyModulePrecision is Precision


def test_the_search_margin_moves_every_int8_limit_toward_perfect() -> None:
    policy = ParityPolicy.model_validate(
        {
            "int8": {"min_cosine": 0.99, "min_snr_db": 20.0, "min_top1_agreement": 0.9, "max_accuracy_drop": 1.0},
            "outputs": {"emb": {"int8": {"min_cosine": 0.999}}},
        }
    )

    tight = policy.with_int8_margin(0.1)

    assert tight.int8.min_cosine == pytest.approx(0.991)
    assert tight.int8.min_snr_db == pytest.approx(20.0 + 10 * math.log10(1 / 0.9))
    assert tight.int8.min_top1_agreement == pytest.approx(0.91)
    assert tight.int8.max_accuracy_drop == pytest.approx(0.9)
    emb = tight.outputs["emb"].int8
    assert emb is not None and emb.min_cosine == pytest.approx(0.9991)
    assert tight.fp32 == policy.fp32 and policy.int8.min_cosine == 0.99  # nothing else, and no mutation
