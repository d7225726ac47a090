"""A batch process owns its workers: they die with it, and what it leaves when killed is cleared.

Three ties, each closing a gap the others leave:

- **Parent-death signal** (Linux): each job process, and the fork server it is forked from, asks
  the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to be killed when its parent dies. A job's
  parent is the fork server, whose parent is the batch process: killing the batch kills the fork
  server, which kills the jobs, at once, whatever they are doing.
- **A lifeline pipe**: the batch process holds the only write end and never writes; every job
  holds a read end, which reaches end-of-file when the batch process is gone. A job checks it
  right after asking for the signal (so a batch that died just before is noticed: the race of the
  signal), and a thread in the job watches it (platforms without prctl, e.g. macOS, and a fork
  server started without the guard).
- **Scratch folders named by pid**: ``onnxforge-batch-<host>-<pid>-*`` in the temp dir; a later
  batch on this host removes those whose process is dead.

The fork server imports `pipeline.batch.forkserver_guard` first among its preloads: it calls
`bind_fork_server`, which acts only in the process the batch named in ``$ONNXFORGE_BATCH_OWNER_PID``
(set by `start_owned` while the batch starts its fork server).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from pipeline.processes import linux_libc_function, pid_alive

logger = logging.getLogger(__name__)

OWNER_ENV = "ONNXFORGE_BATCH_OWNER_PID"
SCRATCH_PREFIX = "onnxforge-batch-"
# The exit status of a job process that finds its batch gone (nobody is left to read it).
ORPHANED_EXIT = 70
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# A thread that lasts as long as this process (an idle pool thread never exits): processes that
# die with their parent are started from it, since the kernel ties the signal to the parent thread.
_LASTING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxforge-owner")
T = TypeVar("T")


def die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux's parent-death signal).

    The signal is tied to the parent *thread* that started this process, and is not inherited by
    this process's own children.

    Returns:
        True when the kernel will do it; False where there is no prctl (then watch a lifeline).
    """
    argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl = linux_libc_function("prctl", argtypes, ctypes.c_int)
    return prctl is not None and int(prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)) == 0


def start_owned(start: Callable[[], T]) -> T:
    """Call `start` (which starts a process that will `bind_fork_server`) as this process's owned child.

    It runs on a thread that lasts as long as this process (a parent-death signal fires when the
    parent *thread* ends: a batch run from a short-lived thread must not take down a fork server
    that a later batch reuses), with this process named as the owner in the environment.
    """
    return _LASTING.submit(_with_owner_env, start).result()


def _with_owner_env(start: Callable[[], T]) -> T:
    previous = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())
    try:
        return start()
    finally:
        if previous is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = previous


def bind_fork_server() -> None:
    """In a fork server a batch started: die with the batch process (its parent), or exit now if it is gone.

    Does nothing in any other process (one whose parent is not the owner named in the environment,
    or with no owner named). The owner's name is removed from the environment, so the jobs forked
    from here do not carry it.
    """
    owner = os.environ.pop(OWNER_ENV, "")
    if not owner.isdigit():
        return
    if die_with_parent() and os.getppid() != int(owner):
        os._exit(ORPHANED_EXIT)  # the batch died before the signal was armed: nobody to serve


class Lifeline:
    """A pipe that only the batch process writes to (never): its read end reaches EOF when the batch is gone.

    Args:
        context: The multiprocessing context the jobs are started from.
    """

    def __init__(self, context: Any) -> None:
        self.reader, self._writer = context.Pipe(duplex=False)

    def close(self) -> None:
        """Cut the line: every job still holding it exits (the batch is over)."""
        self._writer.close()
        self.reader.close()


def bind_to_batch(lifeline: Connection) -> None:
    """In a job process, first thing: die with the batch that started it.

    Arms the parent-death signal, then checks the lifeline: if the batch (and so the fork server)
    died before the signal was armed, the lifeline is already at EOF and the job exits now. A
    daemon thread then watches the lifeline and ends the process if the batch goes (where the
    signal is not available, or the fork server was not started by the batch).
    """
    die_with_parent()
    if _batch_gone(lifeline, timeout=0):
        os._exit(ORPHANED_EXIT)
    threading.Thread(target=_watch, args=(lifeline,), name="onnxforge-lifeline", daemon=True).start()


def _batch_gone(lifeline: Connection, timeout: float | None) -> bool:
    """True when the lifeline is readable (EOF: the batch never writes) or broken."""
    try:
        return lifeline.poll(timeout)
    except (OSError, EOFError):
        return True


def _watch(lifeline: Connection) -> None:
    if _batch_gone(lifeline, timeout=None):
        os._exit(ORPHANED_EXIT)


def _scratch_host_prefix() -> str:
    return f"{SCRATCH_PREFIX}{socket.gethostname()}-"


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """The batch's scratch folder, ``<tmp>/onnxforge-batch-<host>-<pid>-*``, removed at the end.

    Scratch folders of batches on this host that were killed (their process is gone) are removed
    first.
    """
    remove_abandoned_scratch()
    folder = Path(tempfile.mkdtemp(prefix=f"{_scratch_host_prefix()}{os.getpid()}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned_scratch(tmp: Path | None = None) -> list[Path]:
    """Delete the scratch folders in `tmp` (default: the temp dir) of dead batch processes on this host.

    Returns:
        The folders removed.
    """
    prefix = _scratch_host_prefix()
    removed = []
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{prefix}*"):
        pid, dash, _ = folder.name[len(prefix) :].partition("-")
        if dash and pid.isdigit() and not pid_alive(int(pid)):
            logger.info("removing %s, left by a batch that was killed", folder)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
