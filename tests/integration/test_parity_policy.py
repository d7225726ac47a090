"""Per-output policy overrides and the p99 error, on the digits sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline
from pipeline.parity.metrics import OutputComparator
from tests.conftest import tree

Raw = dict[str, Any]


def test_an_output_override_replaces_the_job_wide_rule(digits_job: Raw, write_job) -> None:  # type: ignore[no-untyped-def]
    digits_job["parity"]["outputs"] = {"logits": {"int8": {"min_cosine": 0.9999999}}}
    digits_job["parity"]["localize"] = "never"
    with pytest.raises(pipeline.ParityError) as excinfo:
        pipeline.convert(write_job(digits_job))
    assert "stage quantize on cpu, output 'logits': cosine_mean" in str(excinfo.value)
    assert "policy cosine_mean >= 1" in str(excinfo.value)  # 0.9999999 printed with %g


def test_an_override_for_a_missing_output_is_bad_input(digits_job: Raw, write_job, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    digits_job["parity"]["outputs"] = {"probabilities": {"int8": {"min_cosine": 0.9}}}
    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(write_job(digits_job))
    assert excinfo.value.key == "parity.outputs.probabilities"
    assert "['logits']" in str(excinfo.value)
    assert not (tmp_path / "out").exists() and ".staging" not in " ".join(tree(tmp_path))


def test_p99_is_a_tight_upper_bound() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2000, 8))
    error = rng.standard_normal((2000, 8)) * 1e-3
    comparator = OutputComparator(1e-3)
    for start in range(0, 2000, 500):  # streamed in batches
        comparator.update(reference[start : start + 500], reference[start : start + 500] + error[start : start + 500])
    metrics = comparator.result()
    exact = float(np.quantile(np.abs(error), 0.99))
    assert exact <= metrics.p99_abs <= exact * 1.13
    assert metrics.error_histogram is not None and sum(metrics.error_histogram.counts) == error.size


@pytest.mark.slow
def test_every_listed_shape_is_checked_along_the_whole_chain(digits_job: Raw, write_job) -> None:  # type: ignore[no-untyped-def]
    digits_job["export"] = {"check_shapes": [{"batch": 1}, {"batch": 7}]}
    result = pipeline.convert(write_job(digits_job))
    shaped = [(c.stage, c.shape["batch"]) for c in result.report.comparisons if c.shape is not None]
    assert shaped == [(s, b) for b in (1, 7) for s in ("export", "simplify", "quantize")]
    assert all(c.passed for c in result.report.comparisons)
