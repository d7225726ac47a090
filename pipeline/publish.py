"""Publishing a job's output folder: an exclusive lock, a crash-safe swap, and recovery of what killed runs left.

Beside ``<out>``, hidden and named after it:

- ``.<out>.lock``: the lock file, JSON naming its holder (host, pid, process start time), there
  while a run holds the folder. Another run is refused unless the holder is a process of this host
  that is gone: then the lock is taken over, with a warning. A lock of another host is never taken
  over. No descriptor stays open during the run (the file is ``flock``-ed only for the instant it
  is read and written), so the run's child processes inherit nothing.
- ``.<out>.staging-<host>-<pid>-<random>``: the run's staging folder; its manifest, written last,
  marks it complete.
- ``.<out>.previous-<host>-<pid>-<random>``: the earlier output, moved aside by a two-step publish.

`publish`: with no earlier output, one rename. Where Linux can (``renameat2(RENAME_EXCHANGE)``),
staging and ``<out>`` swap in one atomic step and the old output, now under the staging name, is
deleted: ``<out>`` is complete at every instant. Elsewhere, two steps: ``<out>`` to
``.previous-*``, staging to ``<out>``, the previous deleted; between the renames the old output is
complete in ``.previous-*``.

`recover` (run under the lock, before a run starts): with ``<out>`` missing, the newest complete
``.previous-*`` (one with a manifest) is renamed back; with ``<out>`` complete, ``.previous-*``
folders are deleted; staging folders are deleted. Folders of live processes of this host are left
alone. Each action is logged.

Test hook: with ``ONNXFORGE_TEST_PAUSE_AT=<step>`` (one of `PAUSE_STEPS`) the process writes its
pid to ``$ONNXFORGE_TEST_PAUSE_FILE`` (default ``.<out>.paused-<step>`` beside the output) and
sleeps at that step, so a test can kill it exactly there. For tests only.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import cast

from pipeline.artifacts import DIR_MODE, fsync_dir, storage_errors
from pipeline.errors import JobError, StorageError
from pipeline.processes import linux_libc_function, pid_alive, proc_stat

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PAUSE_ENV = "ONNXFORGE_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "ONNXFORGE_TEST_PAUSE_FILE"
# The named points of a run where the test hook can stop it, in the order a run passes them.
PAUSE_STEPS = ("locked", "publishing", "swapped", "moved-aside", "moved-in", "published")
_PAUSE_SECONDS = 600.0
# The longest another process may keep the lock file flock-ed (it reads and writes a few bytes).
_GUARD_SECONDS = 10.0
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_EXCHANGE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output folder: what its lock file says.

    Attributes:
        host: The holder's host name.
        pid: Its process id.
        started: Its start time (clock ticks since boot, from /proc), which tells a reused pid
            apart; None where unknown.
        token: Random, unique to one acquisition (a release removes only its own lock).
    """

    host: str
    pid: int
    started: int | None = None
    token: str = ""

    @classmethod
    def this_process(cls) -> LockHolder:
        """A new holder record for this process."""
        return cls(socket.gethostname(), os.getpid(), _start_time(os.getpid()), uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder a lock file names; None when the file is empty or unreadable."""
        try:
            data = json.loads(text)
            started = data.get("started")
            token = str(data.get("token", ""))
            return cls(str(data["host"]), int(data["pid"]), None if started is None else int(started), token)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def describe(self) -> str:
        """``pid N on host H``, for messages."""
        return f"pid {self.pid} on host {self.host}"

    def is_alive(self) -> bool:
        """Whether the holder's process still runs (asked of this host's processes)."""
        if not pid_alive(self.pid):
            return False
        started = _start_time(self.pid)
        return self.started is None or started is None or started == self.started


@dataclass(frozen=True)
class OutputLock:
    """An exclusive claim on one output folder for a whole run: the lock file ``.<out>.lock``.

    Attributes:
        output_dir: The folder claimed.
        holder: What the lock file says (this process).
    """

    output_dir: Path
    holder: LockHolder

    @property
    def path(self) -> Path:
        """The lock file."""
        return lock_path(self.output_dir)

    @classmethod
    def acquire(cls, output_dir: Path, origin: str) -> OutputLock:
        """Claim `output_dir` (whose parent folder must exist), taking over a dead holder's lock.

        Args:
            output_dir: The output folder.
            origin: The job file (or job name), for errors.

        Raises:
            JobError: Another live run holds the folder, or a run of another host does.
            StorageError: The lock file cannot be written (permissions, a full disk).
        """
        holder = LockHolder.this_process()
        path = lock_path(output_dir)
        with storage_errors(path), _guarded(path, origin, create=True) as fd:
            text = _read(fd)
            previous = LockHolder.parse(text)
            if previous is not None:
                _refuse_if_held(previous, output_dir, origin)
                logger.warning("took over the lock on %s from %s, which is gone", output_dir, previous.describe())
            elif text.strip():
                logger.warning("took over the lock on %s: its lock file %s was unreadable", output_dir, path.name)
            try:
                _write(fd, holder)
            except OSError:
                path.unlink(missing_ok=True)  # (a full disk) no empty lock file left behind
                raise
        fsync_dir(path.parent)
        return cls(output_dir, holder)

    def release(self) -> None:
        """Give the folder up: delete the lock file if it still names this holder. Never raises."""
        try:
            with _guarded(self.path, str(self.output_dir), create=False) as fd:
                if LockHolder.parse(_read(fd)) == self.holder:
                    self.path.unlink()
        except (OSError, JobError) as e:  # e.g. deleted by hand meanwhile
            logger.warning("could not release the lock %s: %s", self.path, e)


@dataclass
class Publication:
    """One run's way to its output folder: ``start``, the stages write into ``staging`` (the
    manifest last), ``publish``, and ``close`` in a ``finally``.

    Attributes:
        output_dir: The folder to publish.
        staging: The hidden staging folder beside it, for the stages.
        lock: The run's lock on `output_dir`.
    """

    output_dir: Path
    staging: Path
    lock: OutputLock

    @classmethod
    def start(cls, output_dir: Path, origin: str) -> Publication:
        """Check the folder may be replaced, lock it, recover leftovers, make the staging folder.

        Args:
            output_dir: The output folder.
            origin: The job file (or job name), for errors.

        Raises:
            JobError: `output_dir` is not an onnxforge output, or another run holds it.
            StorageError: Its parent folder, lock or staging folder cannot be created.
        """
        check_output_dir(output_dir, origin)
        with storage_errors(output_dir.parent):
            output_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock.acquire(output_dir, origin)
        try:
            recover(output_dir)
            _pause("locked", output_dir)
            with storage_errors(output_dir.parent):
                staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir), dir=output_dir.parent))
                staging.chmod(DIR_MODE)
        except BaseException:
            lock.release()
            raise
        return cls(output_dir, staging, lock)

    def publish(self) -> None:
        """Put the complete staging folder in place of the output folder (`publish`)."""
        publish(self.staging, self.output_dir)

    def close(self) -> None:
        """Delete the staging folder if it was not published, and release the lock. Never raises."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.release()


def check_output_dir(output_dir: Path, origin: str) -> None:
    """Refuse to replace a folder that is not an earlier onnxforge output.

    Raises:
        JobError: `output_dir` is a file, or a non-empty folder without a manifest.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise JobError(origin, "output_dir", f"{output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (output_dir / MANIFEST).is_file():
        problem = f"{output_dir} is not empty and holds no {MANIFEST}: it is not an onnxforge output folder, "
        raise JobError(origin, "output_dir", f"{problem}so it is not replaced; choose a new or empty folder")


def lock_path(output_dir: Path) -> Path:
    """The lock file of an output folder: ``.<out>.lock`` beside it."""
    return output_dir.with_name(f".{output_dir.name}.lock")


def staging_prefix(output_dir: Path) -> str:
    """Hidden, beside the output, naming this host and process: ``.out.staging-host-1234-``."""
    return _prefix(output_dir, "staging") + f"{os.getpid()}-"


def publish(staging: Path, output_dir: Path) -> None:
    """Put the complete `staging` folder in place of `output_dir` (hold the lock).

    At every instant either the old or the new complete output is findable: in `output_dir`,
    or (two-step publish, between the renames) in a ``.previous-*`` folder `recover` restores.

    Raises:
        OSError: A rename failed (the earlier output is put back when it had been moved aside).
    """
    _pause("publishing", output_dir)
    if not os.path.lexists(output_dir):
        os.rename(staging, output_dir)
    elif _exchange(staging, output_dir):
        fsync_dir(output_dir.parent)
        _pause("swapped", output_dir)
        shutil.rmtree(staging, ignore_errors=True)  # the old output, now under the staging name
    else:
        _publish_in_two_steps(staging, output_dir)
    fsync_dir(output_dir.parent)
    _pause("published", output_dir)


def _publish_in_two_steps(staging: Path, output_dir: Path) -> None:
    """The old output aside to ``.previous-*``, the new one into place, the old one deleted."""
    previous = output_dir.with_name(f"{_prefix(output_dir, 'previous')}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(output_dir, previous)
    fsync_dir(output_dir.parent)
    _pause("moved-aside", output_dir)
    try:
        os.rename(staging, output_dir)
    except BaseException:
        os.rename(previous, output_dir)
        raise
    fsync_dir(output_dir.parent)
    _pause("moved-in", output_dir)
    shutil.rmtree(previous, ignore_errors=True)


def recover(output_dir: Path) -> list[str]:
    """Restore or delete what killed runs left beside `output_dir` (hold its lock).

    With `output_dir` missing, the newest complete ``.previous-*`` is renamed back; with
    `output_dir` complete, ``.previous-*`` folders are deleted (otherwise left, with a warning);
    staging folders are deleted. Folders of live processes of this host are left alone.

    Returns:
        One line per action, each logged too.
    """
    actions: list[str] = []
    previous = _abandoned(output_dir, "previous")
    complete = [folder for folder in previous if (folder / MANIFEST).is_file()]
    if complete and not os.path.lexists(output_dir):
        newest = max(complete, key=lambda folder: (folder / MANIFEST).stat().st_mtime_ns)
        os.rename(newest, output_dir)
        fsync_dir(output_dir.parent)
        previous.remove(newest)
        actions.append(f"restored {output_dir} from {newest.name}, where a run killed while publishing had left it")
        logger.warning("%s", actions[-1])
    if previous and not (output_dir / MANIFEST).is_file():
        names = ", ".join(folder.name for folder in previous)
        actions.append(f"left {names} alone: {output_dir} is not a complete onnxforge output")
        logger.warning("%s", actions[-1])
        previous = []
    for folder in previous + _abandoned(output_dir, "staging"):
        shutil.rmtree(folder, ignore_errors=True)
        actions.append(f"removed {folder.name}, left by a run that was killed")
        logger.info("%s", actions[-1])
    return actions


def remove_leftovers(output_dir: Path, origin: str) -> list[str]:
    """After a run was killed: take its lock over, `recover` what it left, release the lock.

    Nothing is touched while another live run (or a run of another host) holds the folder.
    """
    try:
        lock = OutputLock.acquire(output_dir, origin)
    except (JobError, StorageError) as e:
        logger.info("left the leftovers beside %s alone: %s", output_dir, e)
        return []
    try:
        return recover(output_dir)
    finally:
        lock.release()


def _refuse_if_held(previous: LockHolder, output_dir: Path, origin: str) -> None:
    """Raise if the lock file's holder may still be writing `output_dir`."""
    held = f"another onnxforge run ({previous.describe()}) is writing {output_dir}"
    if previous.host != socket.gethostname():  # its process cannot be checked from here
        problem = f"{held}; a lock from another host is never taken over automatically: wait for that run, or, "
        raise JobError(origin, "output_dir", f"{problem}if it is gone, delete {lock_path(output_dir)}")
    if previous.is_alive():
        raise JobError(origin, "output_dir", f"{held}; wait for it or choose another output_dir")


def _prefix(output_dir: Path, kind: str) -> str:
    """``.<out>.<kind>-<host>-``: the start of this host's hidden folders of that kind."""
    return f".{output_dir.name}.{kind}-{socket.gethostname()}-"


def _abandoned(output_dir: Path, kind: str) -> list[Path]:
    """The ``.<out>.<kind>-*`` folders beside `output_dir`, less those of live processes of this host."""
    here = _prefix(output_dir, kind)
    found: list[Path] = []
    for folder in output_dir.parent.glob(f".{glob.escape(output_dir.name)}.{kind}-*"):
        pid = folder.name[len(here) :].split("-", 1)[0] if folder.name.startswith(here) else ""
        if folder.is_dir() and not (pid.isdigit() and pid_alive(int(pid))):
            found.append(folder)
    return sorted(found)


@contextmanager
def _guarded(path: Path, origin: str, *, create: bool) -> Iterator[int]:
    """The lock file, open and ``flock``-ed for the instant it is read and written.

    Raises:
        OSError: The lock file cannot be opened (FileNotFoundError: `create` is False and there is none).
        JobError: The lock file stays flock-ed past `_GUARD_SECONDS`.
    """
    deadline = time.monotonic() + _GUARD_SECONDS
    while True:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_CLOEXEC, 0o644)
        try:
            locked = _flock(fd, deadline)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            raise JobError(origin, "output_dir", f"the lock file {path} stayed flock-ed for {_GUARD_SECONDS:g} s")
        if _same_file(fd, path):
            break
        os.close(fd)  # locked, then unlinked by its holder meanwhile: open the new one
    try:
        yield fd
    finally:
        os.close(fd)


def _flock(fd: int, deadline: float) -> bool:
    """``flock`` the open lock file; False if it was not free before `deadline`."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        except OSError as e:  # a filesystem without flock: the lock file's content still decides
            logger.debug("flock unavailable on the lock file: %s", e)
            return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (its holder may have unlinked it meanwhile)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")  # a lock file is a line of JSON


def _write(fd: int, holder: LockHolder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
    os.fsync(fd)


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux); None where unknown."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


@cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """The C library's ``renameat2`` (Linux, glibc 2.28+); None elsewhere."""
    argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function = linux_libc_function("renameat2", argtypes, ctypes.c_int)
    return None if function is None else cast(Callable[[int, bytes, int, bytes, int], int], function)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False (nothing changed) where the system cannot.

    Raises:
        OSError: The swap failed for another reason (e.g. permissions).
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _pause(step: str, output_dir: Path) -> None:
    """Test hook (see the module docstring): stop here while ``$ONNXFORGE_TEST_PAUSE_AT`` names `step`."""
    if os.environ.get(PAUSE_ENV) != step:
        return
    marker = Path(os.environ.get(PAUSE_FILE_ENV) or output_dir.with_name(f".{output_dir.name}.paused-{step}"))
    marker.write_text(str(os.getpid()))
    logger.warning("test hook: paused at %s (pid %d)", step, os.getpid())
    time.sleep(_PAUSE_SECONDS)
