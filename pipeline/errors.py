"""The onnxforge error hierarchy: every error the API raises is an `OnnxforgeError`."""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Process exit codes of the `onnxforge` command, one per error family."""

    OK = 0
    PARITY_FAILED = 1
    BAD_INPUT = 2
    INTERNAL_ERROR = 3


class OnnxforgeError(Exception):
    """Base class of every error onnxforge raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR


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


class BackendError(OnnxforgeError):
    """A backend is unknown, unavailable or failed to open a model.

    Attributes:
        backend: The backend name.
        reason: Why it cannot be used.
        hint: What to do about it (may be empty).
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, backend: str, reason: str, hint: str = "") -> None:
        self.backend = backend
        self.reason = reason
        self.hint = hint
        message = f"backend {backend!r}: {reason}"
        super().__init__(f"{message}; to fix: {hint}" if hint else message)


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
