"""pipeline.publish: the output folder's lock, the swap, the recovery of leftovers, and real
processes killed at each step of a publish (synthetic outputs, so each case takes a fraction of a
second; `tests/integration/test_publish.py` does the same with real conversions)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.publish as publish
from pipeline.errors import JobError, StorageError
from pipeline.publish import (
    PAUSE_ENV,
    PAUSE_FILE_ENV,
    PAUSE_STEPS,
    LockHolder,
    OutputLock,
    Publication,
    lock_path,
    recover,
    remove_leftovers,
)

HOST = socket.gethostname()
# Not from tests.conftest: the publishing processes below import this module, and conftest imports torch.
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_output(folder: Path, tag: str) -> None:
    """A complete output folder: two artifacts, then a manifest with their sha256 (written last)."""
    folder.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for name in ("model.onnx", "report.json"):
        data = f"{tag} {name}".encode() * 1000
        (folder / name).write_bytes(data)
        artifacts.append({"path": name, "sha256": hashlib.sha256(data).hexdigest()})
    (folder / "manifest.json").write_text(json.dumps({"tag": tag, "artifacts": artifacts}))


def complete(folder: Path) -> str:
    """The tag of a complete output folder, after checking every artifact's sha256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        assert hashlib.sha256((folder / artifact["path"]).read_bytes()).hexdigest() == artifact["sha256"]
    return str(manifest["tag"])


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(out: Path, host: str, pid: int, started: int | None = None) -> None:
    lock_path(out).write_text(json.dumps({"host": host, "pid": pid, "started": started, "token": "x"}))


# --- the lock


def test_a_lock_names_its_holder_refuses_a_second_claim_and_is_gone_once_released(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = OutputLock.acquire(out, "job.toml")
    holder = LockHolder.parse(lock_path(out).read_text())
    assert holder is not None and (holder.host, holder.pid) == (HOST, os.getpid())
    with pytest.raises(JobError) as refused:
        OutputLock.acquire(out, "job.toml")
    assert refused.value.key == "output_dir"
    assert f"another onnxforge run (pid {os.getpid()} on host {HOST}) is writing {out}" in refused.value.problem
    assert "wait for it or choose another output_dir" in refused.value.problem
    assert refused.value.exit_code == 2
    lock.release()
    assert hidden(out) == []
    OutputLock.acquire(out, "job.toml").release()


def test_no_descriptor_of_the_lock_stays_open_for_child_processes(tmp_path: Path) -> None:
    lock = OutputLock.acquire(tmp_path / "out", "job.toml")
    try:
        opened = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        assert str(lock.path) not in opened
    finally:
        lock.release()


def test_a_lock_of_a_dead_process_is_taken_over_and_said_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    write_lock(out, HOST, pid)
    with caplog.at_level(logging.WARNING, logger="pipeline.publish"):
        lock = OutputLock.acquire(out, "job.toml")
    assert f"took over the lock on {out} from pid {pid} on host {HOST}" in caplog.text
    assert LockHolder.parse(lock_path(out).read_text()) == lock.holder
    lock.release()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path: Path) -> None:
    out = tmp_path / "out"
    started = publish._start_time(os.getpid())
    if started is None:
        pytest.skip("no /proc here")
    write_lock(out, HOST, os.getpid(), started - 1)  # this pid, but an older process
    OutputLock.acquire(out, "job.toml").release()


def test_a_lock_of_a_live_process_is_refused_even_without_its_flock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, HOST, sleeper.pid)
        with pytest.raises(JobError, match=f"pid {sleeper.pid} on host"):
            OutputLock.acquire(out, "job.toml")
    finally:
        sleeper.kill()
        sleeper.wait()
    OutputLock.acquire(out, "job.toml").release()  # now its process is gone


def test_a_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_lock(out, "elsewhere", dead_pid())
    with pytest.raises(JobError) as refused:
        OutputLock.acquire(out, "job.toml")
    assert "on host elsewhere" in refused.value.problem
    assert "never taken over automatically" in refused.value.problem and str(lock_path(out)) in refused.value.problem
    assert json.loads(lock_path(out).read_text())["host"] == "elsewhere"  # left as it was


def test_an_unreadable_lock_file_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    lock_path(out).write_text("\x00garbage")
    with caplog.at_level(logging.WARNING, logger="pipeline.publish"):
        OutputLock.acquire(out, "job.toml").release()
    assert "unreadable" in caplog.text


def test_a_lock_naming_no_real_process_is_taken_over(tmp_path: Path) -> None:
    write_lock(tmp_path / "out", HOST, 0)  # os.kill(0, 0) would answer for our own process group
    OutputLock.acquire(tmp_path / "out", "job.toml").release()


def test_a_lock_that_cannot_be_written_is_a_storage_error_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, holder: LockHolder) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "_write", full)
    with pytest.raises(StorageError, match=r"No space left on device \(errno 28, ENOSPC\)") as refused:
        OutputLock.acquire(tmp_path / "out", "job.toml")
    assert refused.value.exit_code == 2 and refused.value.path == str(lock_path(tmp_path / "out"))
    assert hidden(tmp_path / "out") == []
    assert remove_leftovers(tmp_path / "missing" / "out", "batch") == []  # nothing there, nothing done


def test_a_release_leaves_a_lock_it_does_not_hold(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lock = OutputLock.acquire(out, "job.toml")
    write_lock(out, "elsewhere", 1)  # someone deleted and re-took it
    lock.release()
    assert json.loads(lock_path(out).read_text())["host"] == "elsewhere"


_RACER = r"""
import json, sys, time
from pathlib import Path
from pipeline.errors import JobError
from pipeline.publish import OutputLock
out, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    lock = OutputLock.acquire(out, "race")
except JobError as e:
    print(json.dumps({"refused": e.problem}))
    sys.exit(0)
began = time.time()
time.sleep(0.2)
ended = time.time()
lock.release()
print(json.dumps({"held": [began, ended]}))
"""


@pytest.mark.parametrize("stale", [False, True])
def test_racing_processes_never_hold_one_lock_at_once(tmp_path: Path, stale: bool) -> None:
    out = tmp_path / "out"
    if stale:
        write_lock(out, HOST, dead_pid())  # all of them try to take over the same dead holder
    start = time.time() + 1.0
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(out), str(start)], cwd=REPO_ROOT, stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    results = [json.loads(racer.communicate(timeout=60)[0]) for racer in racers]
    held = sorted(result["held"] for result in results if "held" in result)
    assert held, results
    for (_, first_end), (second_start, _) in zip(held, held[1:], strict=False):
        assert first_end <= second_start, results  # one holder at a time
    assert all("another onnxforge run (pid" in r["refused"] for r in results if "refused" in r)
    assert hidden(out) == []


# --- recovery


def test_a_missing_output_is_restored_from_its_moved_aside_copy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pid = dead_pid()
    write_output(tmp_path / f".out.previous-{HOST}-{pid}-0a1b2c3d", "old")
    write_output(tmp_path / f".out.staging-{HOST}-{pid}-xyz", "new")
    actions = recover(out)
    assert complete(out) == "old"
    assert hidden(out) == []
    assert (
        actions[0]
        == f"restored {out} from .out.previous-{HOST}-{pid}-0a1b2c3d, where a run killed while publishing had left it"
    )


def test_an_earlier_versions_moved_aside_copy_is_restored_too(tmp_path: Path) -> None:
    write_output(tmp_path / ".out.previous-54aa49e6", "old")  # the naming before the lock
    recover(tmp_path / "out")
    assert complete(tmp_path / "out") == "old"


def test_with_the_output_complete_copies_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(out, "new")
    write_output(tmp_path / ".out.previous-elsewhere-12-abc", "old")
    (tmp_path / ".out.previous-elsewhere-13-def").mkdir()  # half deleted
    recover(out)
    assert complete(out) == "new"
    assert hidden(out) == []


def test_folders_of_live_processes_and_incomplete_copies_are_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    live = tmp_path / f".out.staging-{HOST}-{os.getpid()}-abc"
    live.mkdir()
    (tmp_path / ".out.previous-elsewhere-12-abc").mkdir()  # no manifest, and no output to replace it
    with caplog.at_level(logging.WARNING, logger="pipeline.publish"):
        recover(out)
    assert hidden(out) == [".out.previous-elsewhere-12-abc", live.name]
    assert "left .out.previous-elsewhere-12-abc alone" in caplog.text
    assert not out.exists()


def test_remove_leftovers_leaves_everything_while_a_live_run_holds_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = tmp_path / ".out.staging-elsewhere-1-abc"
    staging.mkdir()
    with _held(out):
        assert remove_leftovers(out, "batch") == []
        assert staging.is_dir()
    assert remove_leftovers(out, "batch") == ["removed .out.staging-elsewhere-1-abc, left by a run that was killed"]
    assert hidden(out) == []


class _held:
    def __init__(self, out: Path) -> None:
        self.lock = OutputLock.acquire(out, "holder")

    def __enter__(self) -> OutputLock:
        return self.lock

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()


# --- publishing in one process


def test_start_refuses_a_foreign_folder_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="holds no manifest.json"):
        Publication.start(out, "job.toml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_refused_start_leaves_the_holders_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with _held(out) as lock:
        with pytest.raises(JobError, match="another onnxforge run"):
            Publication.start(out, "job.toml")
        assert LockHolder.parse(lock.path.read_text()) == lock.holder


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_replaces_the_old_output_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    out = tmp_path / "deep" / "out"
    write_output(out, "old")
    if not exchange:
        monkeypatch.setattr(publish, "_exchange", lambda first, second: False)
    for tag in ("new", "newer"):
        publication = Publication.start(out, "job.toml")
        try:
            write_output(publication.staging, tag)
            publication.publish()
        finally:
            publication.close()
        assert complete(out) == tag
        assert hidden(out) == []


def test_first_publish_and_a_failed_run_leave_nothing_hidden(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publication = Publication.start(out, "job.toml")
    publication.close()  # a run that failed before publishing
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    publication = Publication.start(out, "job.toml")
    write_output(publication.staging, "first")
    publication.publish()
    publication.close()
    assert complete(out) == "first" and hidden(out) == []


def _exchange_works(folder: Path) -> bool:
    (folder / "probe-a").mkdir()
    (folder / "probe-b").mkdir()
    try:
        return publish._exchange(folder / "probe-a", folder / "probe-b")
    finally:
        (folder / "probe-a").rmdir()
        (folder / "probe-b").rmdir()


def test_the_exchange_swaps_two_folders_atomically(tmp_path: Path) -> None:
    write_output(tmp_path / "a", "a")
    write_output(tmp_path / "b", "b")
    if not publish._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (complete(tmp_path / "a"), complete(tmp_path / "b")) == ("b", "a")


def test_a_failed_second_rename_puts_the_old_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    write_output(out, "old")
    monkeypatch.setattr(publish, "_exchange", lambda first, second: False)
    publication = Publication.start(out, "job.toml")
    write_output(publication.staging, "new")
    real_rename = os.rename

    def failing(src: Path, dst: Path) -> None:
        if Path(src) == publication.staging:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(publish.os, "rename", failing)
    with pytest.raises(OSError, match="No space"):
        publication.publish()
    publication.close()
    assert complete(out) == "old" and hidden(out) == []


def test_the_pause_hook_writes_its_marker_and_sleeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(publish.time, "sleep", slept.append)
    monkeypatch.setenv(PAUSE_ENV, "moved-in")
    monkeypatch.setenv(PAUSE_FILE_ENV, str(tmp_path / "marker"))
    publish._pause("moved-aside", tmp_path / "out")
    assert not (tmp_path / "marker").exists() and slept == []
    publish._pause("moved-in", tmp_path / "out")
    assert (tmp_path / "marker").read_text() == str(os.getpid()) and slept


# --- real processes killed at each step

_PUBLISHER = r"""
import sys
from pathlib import Path
import pipeline.publish
from pipeline.publish import Publication
from tests.unit.test_publish import write_output
out, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "two-step":
    pipeline.publish._exchange = lambda first, second: False
publication = Publication.start(out, "killed")
try:
    write_output(publication.staging, "new")
    publication.publish()
finally:
    publication.close()
"""
# Which output is complete after a kill at each step; "swapped" only happens with the exchange,
# "moved-aside" and "moved-in" only in two steps.
_AFTER = {"locked": "old", "publishing": "old", "swapped": "new", "moved-aside": "old", "moved-in": "new"}
_AFTER["published"] = "new"
_CASES = [("exchange", s) for s in PAUSE_STEPS if s not in ("moved-aside", "moved-in")]
_CASES += [("two-step", s) for s in PAUSE_STEPS if s != "swapped"]


@pytest.mark.parametrize(("mode", "step"), _CASES)
def test_a_process_killed_at_each_step_leaves_the_old_or_the_new_output(tmp_path: Path, mode: str, step: str) -> None:
    if mode == "exchange" and not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    out = tmp_path / "out"
    write_output(out, "old")
    marker = tmp_path / "marker"
    env = {**os.environ, PAUSE_ENV: step, PAUSE_FILE_ENV: str(marker)}
    process = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(out), mode], cwd=REPO_ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (marker.is_file() and marker.read_text()):
            assert process.poll() is None, f"exited {process.returncode} before reaching {step}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    if (out / "manifest.json").is_file():
        assert complete(out) == _AFTER[step]
    else:  # between the two renames: the old output is complete, moved aside
        assert step == "moved-aside"
        (previous,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.previous-")]
        assert complete(previous) == "old"
    remove_leftovers(out, "next run")
    assert complete(out) == _AFTER[step]
    assert hidden(out) == []
