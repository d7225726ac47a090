"""Facts about processes on this host: is a pid still running, what /proc says of it."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs.

    A zombie (dead, not yet reaped: where PID 1 does not reap orphans, `kill(pid, 0)` still
    succeeds on one) does not; another user's process does.
    """
    if pid <= 0:  # kill(0) would ask about our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):  # a pid out of range
        return False
    fields = proc_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); None without /proc
    or once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def linux_libc_function(name: str, argtypes: list[Any], restype: Any) -> Any | None:
    """The C library's `name` with its argument and result types set, on Linux; None elsewhere or
    where this C library lacks it (errno is kept for `ctypes.get_errno`)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function
