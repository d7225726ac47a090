"""The error types backends raise, and the root of onnxforge's error hierarchy.

They live here, not in `pipeline`, so `backends` imports nothing from `pipeline`; `pipeline.errors`
re-exports them (the same classes), and every pipeline error subclasses `OnnxforgeError`.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the `onnxforge` command, one per error family."""

    OK = 0
    PARITY_FAILED = 1
    BAD_INPUT = 2
    INTERNAL_ERROR = 3


class OnnxforgeError(Exception):
    """Base class of every error onnxforge raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR


class BackendError(OnnxforgeError):
    """A backend is unknown, unavailable, failed to open a model or was given bad input.

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


class UnknownBackendError(BackendError):
    """No backend is registered under the name asked for."""


class BackendUnavailableError(BackendError):
    """The backend is registered but cannot run on this machine (its `availability()` is not ok)."""


class BackendOptionError(BackendError):
    """A backend option is not valid for the backend.

    Attributes:
        option: The offending option's name, dotted when nested (the raw text when it is not
            ``key=value``; empty when the problem is across options).
        problem: What is wrong with it and what was expected.
    """

    def __init__(self, backend: str, option: str, problem: str, hint: str = "") -> None:
        self.option = option
        self.problem = problem
        super().__init__(backend, f"option {option!r}: {problem}" if option else f"options: {problem}", hint)


class SessionClosedError(BackendError, RuntimeError):
    """A session was used after `close()`.

    Also a `RuntimeError`, which is what closed sessions raised before, so callers catching that
    keep working.
    """

    def __init__(self, backend: str) -> None:
        super().__init__(backend, "the session is closed", "open the model again")
