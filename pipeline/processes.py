"""Facts about processes on this host: is a pid still running, what /proc says of it."""

from __future__ import annotations

import ctypes
import gc
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


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (``VmHWM``) to its current one, so the next
    `peak_rss_bytes` is the peak since now; False where the kernel does not offer it (Linux < 4.0,
    no /proc, or writes refused)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes (``VmHWM``: anonymous and file-backed pages,
    memory-mapped weights included, since the start or the last `reset_peak_rss`); None without
    /proc."""
    return _status_bytes("VmHWM")


def resident_bytes() -> int | None:
    """This process's resident set size now in bytes (``VmRSS``); None without /proc."""
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None without /proc or the field."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def release_freed_memory(collect: bool = True) -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``, microseconds),
    after collecting unreachable Python objects when `collect` (a quarter of a second with torch
    loaded: worth it only when large objects may be waiting in reference cycles)."""
    if collect:
        gc.collect()
    trim = linux_libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    if trim is not None:
        trim(0)
