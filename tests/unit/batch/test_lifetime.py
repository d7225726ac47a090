"""The batch's hold on its workers (parent-death signal, lifeline, scratch folders by pid, a stopped
loop kills its jobs) and the wording of a job process's death (OOM only on the kernel's word)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.batch import lifetime
from pipeline.batch.base import JobOutcome, run_jobs
from pipeline.batch.death import OomCounter, counter_files, death_cause, oom_counters, oom_evidence
from pipeline.batch.lifetime import (
    ORPHANED_EXIT,
    OWNER_ENV,
    SCRATCH_PREFIX,
    pid_alive,
    remove_abandoned_scratch,
    scratch_folder,
)
from pipeline.job import ConversionJob
from tests.unit.batch.conftest import FakeLauncher, Script

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")

# --- the wording of a death -------------------------------------------------------------------


def test_sigkill_without_evidence_is_not_called_out_of_memory() -> None:
    message = death_cause(-signal.SIGKILL)
    assert "out of memory" not in message
    assert message == (
        "the job's process was killed by SIGKILL (not by onnxforge; e.g. the kernel's OOM killer or an operator)"
    )


def test_sigkill_with_the_kernels_word_is_out_of_memory() -> None:
    evidence = "oom_kill in /sys/fs/cgroup/memory.events rose from 0 to 1 during the job"
    message = death_cause(-signal.SIGKILL, evidence)
    assert message.startswith("the job's process was killed by SIGKILL: out of memory, the kernel's OOM killer")
    assert evidence in message


def test_other_deaths_name_the_signal_or_the_exit_code_and_never_memory() -> None:
    assert death_cause(-signal.SIGSEGV) == "the job's process died of SIGSEGV"
    assert death_cause(-signal.SIGSEGV, "evidence") == "the job's process died of SIGSEGV"  # OOM kills are SIGKILL
    assert death_cause(-200) == "the job's process died of signal 200"
    assert death_cause(1) == "the job's process exited with code 1 without a result"


def test_a_counter_that_rose_during_the_job_is_the_evidence(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n")
    control = tmp_path / "memory.oom_control"
    control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    before = oom_counters([events, control, tmp_path / "missing"])
    assert before == [OomCounter(events, 1), OomCounter(control, 7)]  # unreadable files are skipped
    assert oom_evidence(before) is None
    control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 8\n")
    assert oom_evidence(before) == f"oom_kill in {control} rose from 7 to 8 during the job"
    events.write_text("oom_kill 2\n")
    assert oom_evidence(before) == f"oom_kill in {events} rose from 1 to 2 during the job"  # the first that rose
    events.unlink()
    control.write_text("no counter here\n")
    assert oom_evidence(before) is None


def _fake_proc(tmp_path: Path, mountinfo: list[str], cgroup: list[str]) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("\n".join(mountinfo) + "\n")
    (proc / "self" / "cgroup").write_text("\n".join(cgroup) + "\n")
    return proc


def test_the_counters_are_this_process_memory_cgroups(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path,
        [
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
            "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
            "36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices",
            "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
        ],
        ["5:devices:/ci/job", "4:memory:/ci/job", "0::/ci/job"],
    )
    assert counter_files(proc) == [
        Path("/sys/fs/cgroup/unified/ci/job/memory.events"),
        Path("/sys/fs/cgroup/memory/ci/job/memory.oom_control"),
    ]


def test_a_namespaced_cgroup_mount_is_read_from_its_root(tmp_path: Path) -> None:
    # A container's cgroup v2: mounted at its own cgroup (root /docker/abc), or in a cgroup namespace ("0::/").
    mounted = ["40 30 0:40 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw"]
    proc = _fake_proc(tmp_path, mounted, ["0::/docker/abc"])
    assert counter_files(proc) == [Path("/sys/fs/cgroup/memory.events")]
    proc = _fake_proc(tmp_path / "ns", ["40 30 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw"], ["0::/"])
    assert counter_files(proc) == [Path("/sys/fs/cgroup/memory.events")]
    proc = _fake_proc(tmp_path / "elsewhere", mounted, ["0::/other"])  # not visible in this mount
    assert counter_files(proc) == []
    assert counter_files(tmp_path / "no-proc") == []  # macOS, or no /proc


# --- processes: alive, dead, zombie -------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_pid_alive_tells_running_from_gone_and_a_zombie_is_gone() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{zombie.pid}/stat").is_file() and pid_alive(zombie.pid):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not pid_alive(zombie.pid)  # exited, not yet reaped (no wait() so far)
    finally:
        zombie.wait()


# --- scratch folders ------------------------------------------------------------------------------


def test_scratch_folders_of_dead_batches_on_this_host_are_removed(tmp_path: Path) -> None:
    host = lifetime.socket.gethostname()
    dead, alive = _dead_pid(), os.getpid()
    names = [
        f"{SCRATCH_PREFIX}{host}-{dead}-abc",  # a killed batch: removed
        f"{SCRATCH_PREFIX}{host}-{alive}-def",  # a running batch
        f"{SCRATCH_PREFIX}other-host-{dead}-ghi",  # another host's (shared storage): its pid means nothing here
        f"{SCRATCH_PREFIX}k3j_x9zq",  # the old unnamed kind: no pid to check
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text("{}")
    assert remove_abandoned_scratch(tmp_path) == [tmp_path / names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_batch_scratch_folder_names_its_pid_and_goes_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lifetime.tempfile, "tempdir", str(tmp_path))
    leftover = tmp_path / f"{SCRATCH_PREFIX}{lifetime.socket.gethostname()}-{_dead_pid()}-xyz"
    leftover.mkdir()
    with scratch_folder() as folder:
        assert not leftover.exists()
        assert folder.parent == tmp_path
        assert folder.name.startswith(f"{SCRATCH_PREFIX}{lifetime.socket.gethostname()}-{os.getpid()}-")
    assert not folder.exists()


# --- the ties: parent-death signal, the fork server's guard, the lifeline -------------------------

_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import sys, time
from pipeline.batch.lifetime import die_with_parent
print(die_with_parent(), flush=True)
time.sleep(60)
'''])
print(child.pid, flush=True)
time.sleep(60)
"""


@linux_only
def test_a_process_that_asked_dies_with_its_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "True"  # armed
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while pid_alive(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.02)
    finally:
        parent.kill()
        if child and pid_alive(child):
            os.kill(child, signal.SIGKILL)


_GUARDED = "import os, pipeline.batch.forkserver_guard; print(os.environ.get('ONNXFORGE_BATCH_OWNER_PID'))"


@linux_only
def test_the_fork_server_guard_binds_only_a_child_of_its_owner() -> None:
    def run(owner: str | None) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if key != OWNER_ENV}
        if owner is not None:
            env[OWNER_ENV] = owner
        return subprocess.run([sys.executable, "-c", _GUARDED], env=env, capture_output=True, text=True, timeout=60)

    owned = run(str(os.getpid()))  # this process is its parent: armed, and the name is not passed on
    assert (owned.returncode, owned.stdout.strip()) == (0, "None")
    orphaned = run(str(_dead_pid()))  # its owner is not its parent (died before the guard ran): exits
    assert orphaned.returncode == ORPHANED_EXIT
    unowned = run(None)  # any other process: the import does nothing
    assert (unowned.returncode, unowned.stdout.strip()) == (0, "None")


_BOUND = """
import sys, time
from multiprocessing.connection import Connection
from pipeline.batch.lifetime import bind_to_batch
bind_to_batch(Connection(int(sys.argv[1]), writable=False))
print("bound", flush=True)
time.sleep(60)
"""


def _job_process(reader: int) -> subprocess.Popen[str]:
    """A process that binds to a lifeline (the read end `reader` of a pipe), then works (sleeps)."""
    command = [sys.executable, "-c", _BOUND, str(reader)]
    return subprocess.Popen(command, pass_fds=(reader,), stdout=subprocess.PIPE, text=True)


def test_a_job_whose_batch_is_already_gone_exits_at_once() -> None:
    reader, writer = os.pipe()
    os.close(writer)  # the batch is gone before the job binds
    process = _job_process(reader)
    os.close(reader)
    assert process.wait(timeout=30) == ORPHANED_EXIT
    assert process.stdout is not None and process.stdout.read() == ""


def test_a_running_job_exits_when_its_batch_goes() -> None:
    reader, writer = os.pipe()
    process = _job_process(reader)
    os.close(reader)
    try:
        assert process.stdout is not None and process.stdout.readline() == "bound\n"
        os.close(writer)  # as the batch process's death does
        assert process.wait(timeout=5) == ORPHANED_EXIT
    finally:
        process.kill()
        process.wait()


def test_the_lifeline_reaches_its_end_when_closed() -> None:
    line = lifetime.Lifeline(mp.get_context("spawn"))
    assert not line.reader.poll(0)  # the batch never writes: nothing to read while it lives
    line.close()
    assert line.reader.closed


# --- the scheduling loop ------------------------------------------------------------------------


def test_a_stopped_loop_kills_its_running_jobs(make_job: Callable[[str], ConversionJob]) -> None:
    launcher = FakeLauncher({"quick": Script(polls=1), "long": Script(polls=None), "later": Script(polls=None)})
    jobs = [make_job("long"), make_job("quick"), make_job("later")]

    def stop(outcome: JobOutcome) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs(launcher, jobs, workers=2, timeout_s=60, poll_seconds=0.001, on_outcome=stop)
    assert launcher.killed == ["long"]  # "later" never started
    assert launcher.running == set()
