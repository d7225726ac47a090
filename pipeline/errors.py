"""The onnxforge error hierarchy: every error the API raises is an `OnnxforgeError`.

`ExitCode`, `OnnxforgeError` and the `BackendError` family are defined in `backends.errors` and
re-exported here.
"""

from __future__ import annotations

import errno as errno_codes
import os
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
    "StorageError",
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


class StorageError(OnnxforgeError, OSError):
    """The filesystem refused a write (disk full, no permission, read-only): not a bug, not the job.

    Also an `OSError` (what the write raised before), so callers catching that keep working.

    Attributes:
        path: The file or folder that could not be written.
        errno: The OS error number (e.g. ``errno.ENOSPC``), or None when the OS gave none.
        reason: The OS's words for it, with the errno (``No space left on device (errno 28, ENOSPC)``).
        hint: What to do about it.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, path: str | Path, errno: int | None, reason: str, hint: str) -> None:
        super().__init__(f"cannot write {path}: {reason}; to fix: {hint}")
        self.path = str(path)
        self.errno = errno
        self.reason = reason
        self.hint = hint

    @classmethod
    def from_os_error(cls, error: OSError, path: str | Path | None) -> StorageError:
        """The typed form of an `OSError` raised while writing `path`.

        Args:
            error: What the write raised (a `StorageError` is returned as it is).
            path: What was being written (None: the file the error names).
        """
        if isinstance(error, StorageError):
            return error
        named = error.filename if isinstance(error.filename, str | bytes | os.PathLike) else None
        where = os.fsdecode(path if path is not None else named if named is not None else "<unknown path>")
        code = error.errno
        words = error.strerror or str(error) or type(error).__name__
        reason = f"{words} (errno {code}, {errno_codes.errorcode.get(code, '?')})" if code is not None else words
        return cls(where, code, reason, _storage_hint(code))

    @staticmethod
    def found_in(error: BaseException) -> OSError | None:
        """The refused write behind `error` (a stage may have wrapped it), or None.

        Follows the chain of causes to a `StorageError`, or to an `OSError` whose errno is the
        filesystem's (disk full, quota, read-only, permission, I/O).
        """
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            if isinstance(current, StorageError) or (
                isinstance(current, OSError) and current.errno in _FILESYSTEM_ERRNOS
            ):
                return current
            current = current.__cause__ or current.__context__
        return None

    @classmethod
    def while_staging(cls, error: OSError, staging: Path, output_dir: Path) -> StorageError:
        """A failed write in a job's staging folder, named by where the file was going (`output_dir`).

        Args:
            error: What the write raised (an `OSError`, or a `StorageError` already).
            staging: The hidden folder the run writes into, beside `output_dir`.
            output_dir: The job's output folder.
        """
        typed = cls.from_os_error(error, staging if error.filename is None else None)
        path = Path(typed.path)
        if not path.is_relative_to(staging):
            return cls(typed.path, typed.errno, typed.reason, typed.hint)
        reason = f"{typed.reason}, in the staging folder {staging.name} beside {output_dir.name}"
        return cls(output_dir / path.relative_to(staging), typed.errno, reason, typed.hint)


# The errnos of a filesystem refusing a write: the user's disk, not onnxforge.
_FILESYSTEM_ERRNOS = frozenset(
    {
        errno_codes.ENOSPC,
        errno_codes.EDQUOT,
        errno_codes.EFBIG,
        errno_codes.EROFS,
        errno_codes.EACCES,
        errno_codes.EPERM,
        errno_codes.EIO,
    }
)


def _storage_hint(code: int | None) -> str:
    """What a user can do about a failed write, by errno."""
    if code in (errno_codes.ENOSPC, errno_codes.EDQUOT, errno_codes.EFBIG):
        return "free space (or quota) on that disk, or set output_dir to a folder on another disk"
    if code in (errno_codes.EACCES, errno_codes.EPERM):
        return "make the folder writable for this user, or set output_dir to a folder you can write"
    if code == errno_codes.EROFS:
        return "that filesystem is read-only: set output_dir to a folder on a writable one"
    return "check the disk and the folder (free space, permissions, mount), then run again"


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
