"""The onnxforge error hierarchy: every error the API raises is an `OnnxforgeError`.

`ExitCode`, `OnnxforgeError` and the `BackendError` family are defined in `backends.errors` and
re-exported here.
"""

from __future__ import annotations

from pathlib import Path

# Defined in backends (which must not import pipeline); the same classes, re-exported.
from backends.errors import (
    BackendError,
    BackendOptionError,
    BackendUnavailableError,
    ExitCode,
    OnnxforgeError,
    SessionClosedError,
    UnknownBackendError,
)

__all__ = [
    "BackendError",
    "BackendOptionError",
    "BackendUnavailableError",
    "ExitCode",
    "JobError",
    "OnnxforgeError",
    "ParityError",
    "SessionClosedError",
    "StageError",
    "UnknownBackendError",
    "first_line",
]


class JobError(OnnxforgeError):
    """The job (its file, its model factory or its data) is not what onnxforge needs.

    Attributes:
        source: The job file (or the job name when built in Python) the problem is in.
        key: The dotted key of the offending setting, e.g. ``inputs[0].dtype``.
        problem: What is wrong and what was expected.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, source: str | Path, key: str, problem: str) -> None:
        self.source = str(source)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.source}: {key}: {problem}")


class StageError(OnnxforgeError):
    """A pipeline stage failed on a job; the cause is chained (`raise ... from e`).

    Attributes:
        stage: The stage name (export, simplify, quantize, validate).
        job: The job name.
        detail: What went wrong, in one line.
    """

    def __init__(self, stage: str, job: str, detail: str) -> None:
        self.stage = stage
        self.job = job
        self.detail = detail
        super().__init__(f"job {job!r}, stage {stage}: {detail}")


class ParityError(OnnxforgeError):
    """A parity gate failed: the converted model does not match its reference under the policy.

    Raised after every artifact and report has been written, so the evidence is on disk.

    Attributes:
        job: The job name.
        failures: One line per failed check, naming the stage, target, output and metric.
        report_path: The report.json that holds every figure.
        result: The `ConversionResult` of the run whose gate failed (from `pipeline.convert`).
    """

    exit_code = ExitCode.PARITY_FAILED

    def __init__(self, job: str, failures: list[str], report_path: Path, result: object | None = None) -> None:
        self.job = job
        self.failures = failures
        self.report_path = report_path
        self.result = result
        lines = "\n  ".join(failures)
        super().__init__(f"job {job!r}: parity gate failed ({report_path}):\n  {lines}")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line error reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
