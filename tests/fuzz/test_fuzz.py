"""Seeded fuzzing of ONNX models and job files: only exit codes 0 / 1 / 2, nothing untyped, nothing left.

Exit 3 means a bug in onnxforge, so a damaged or hostile file must never cause it: it is bad
input (2), or the model converts (0) or fails a parity gate (1). The default run converts a few
hundred mutants; `--run-slow` adds 2,000 ONNX mutants (the figure the hardening issue names).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.mutants import Outcome, run_job_mutants, run_model_mutants

ALLOWED = {0, 1, 2}


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """The stages log a warning for many mutants; the outcome is what the test reads."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _findings(outcomes: list[Outcome]) -> list[str]:
    """Every outcome that breaks the contract: an untyped escape, exit 3, or files left behind."""
    return [
        f"{o.case}: exit {o.exit_code}, {o.error}{f', left {o.leftovers}' if o.leftovers else ''}"
        for o in outcomes
        if o.exit_code not in ALLOWED or o.leftovers
    ]


# 100 of each in the default run (the slow tier runs thousands): the default tier is near its 5 minutes.
def test_model_mutants_are_bad_input_never_internal_errors(tmp_path: Path) -> None:
    outcomes = run_model_mutants(tmp_path, range(100))
    assert not _findings(outcomes), "\n".join(_findings(outcomes))
    # The mutator is no no-op: most mutants are refused, and refused as bad input.
    assert Counter(o.exit_code for o in outcomes)[2] >= 50


def test_job_mutants_are_bad_input_never_internal_errors(tmp_path: Path) -> None:
    outcomes = run_job_mutants(tmp_path, range(100))
    assert not _findings(outcomes), "\n".join(_findings(outcomes))
    assert Counter(o.exit_code for o in outcomes)[2] >= 50


@pytest.mark.slow
def test_two_thousand_model_mutants(tmp_path: Path) -> None:
    outcomes = run_model_mutants(tmp_path, range(1000, 3000))
    counts = Counter(o.exit_code for o in outcomes)
    assert counts[None] == 0, "\n".join(_findings(outcomes))
    assert counts[3] <= 20, "\n".join(_findings(outcomes))  # the bound: at most 1% exit 3
    assert not [o for o in outcomes if o.leftovers], "\n".join(_findings(outcomes))


@pytest.mark.slow
def test_a_thousand_job_mutants(tmp_path: Path) -> None:
    outcomes = run_job_mutants(tmp_path, range(1000, 2000))
    assert not _findings(outcomes), "\n".join(_findings(outcomes))
