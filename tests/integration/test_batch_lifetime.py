"""A batch process owns its workers: SIGKILL the `onnxforge batch` process alone (not its process
group) and no process of the batch is left within 5 s, nothing is published after it is gone, its
scratch folder is cleared by the next run, and a `--resume` rerun gives the bytes of a run that
was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import pipeline
from pipeline.artifacts import sha256_file
from pipeline.batch.death import oom_counters, oom_evidence
from tests.integration.paced_feeds import PACE_ENV

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes through /proc")

_GONE_WITHIN_S = 5.0
_JOBS = ("first", "second")


def _manifest(tmp_path: Path, job: dict[str, Any], out: str, *, workers: int) -> Path:
    jobs = [
        {"name": "first", "output_dir": f"{out}/first"},
        # Another opset: its own export (identical jobs would share cached stages).
        {"name": "second", "output_dir": f"{out}/second", "export": {"opset": 17}},
    ]
    path = tmp_path / f"{out}.toml"
    path.write_text(tomli_w.dumps({"batch": {"workers": workers, "timeout_s": 300.0}, "defaults": job, "jobs": jobs}))
    return path


def _paced_job(digits_job: dict[str, Any]) -> dict[str, Any]:
    job = {key: value for key, value in digits_job.items() if key not in ("name", "output_dir")}
    job["calibration"] = {"factory": "tests.integration.paced_feeds:calibration_feeds"}
    return job


def _batch(manifest: Path, events: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "batch", str(manifest)]
    return subprocess.Popen(
        [*command, "--quiet", "--events", str(events), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: only for the test's own clean-up below
    )


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for(process: subprocess.Popen[bytes], events: Path, wanted: list[dict[str, str]]) -> None:
    deadline = time.monotonic() + 240
    while not all(any(w.items() <= e.items() for e in _events(events)) for w in wanted):
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, f"the batch never got to {wanted}"
        time.sleep(0.05)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process; None when it is gone (a zombie is gone: it runs no code)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return None if state in ("Z", "X") else (int(ppid), state)


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[0]
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _survivors(pids: set[int], within_s: float) -> set[int]:
    deadline = time.monotonic() + within_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = {pid for pid in alive if _stat(pid) is not None}
    return alive


def _kill_survivors(pids: set[int], group: int) -> None:
    """The test's own clean-up: whatever outlived the batch must not outlive the test."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _scratch(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("onnxforge-batch-*"))


@contextmanager
def _kill_parent_when(manifest: Path, events: Path, env: dict[str, str], stage: str) -> Iterator[set[int]]:
    """Run the batch until both jobs have started `stage`, SIGKILL its process alone; yield its descendants then."""
    process = _batch(manifest, events, env, "--resume")
    pids: set[int] = set()
    try:
        _wait_for(process, events, [{"job": job, "stage": stage, "status": "started"} for job in _JOBS])
        pids = _descendants(process.pid)
        process.kill()
        process.wait()
        yield pids
    finally:
        _kill_survivors(pids, process.pid)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The batch's environment: its own stage cache and temporary folder (where its scratch goes)."""
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "ONNXFORGE_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")}


@pytest.mark.slow
def test_a_killed_batch_leaves_no_process_and_its_scratch_goes_on_the_next_run(
    tmp_path: Path, digits_job: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = _manifest(tmp_path, _paced_job(digits_job), "out", workers=2)
    # Calibration paced at 2 s a batch: the jobs would run on for ~20 s if they outlived the batch.
    paced = {**env, PACE_ENV: "2.0"}
    with _kill_parent_when(manifest, tmp_path / "events.jsonl", paced, "export") as pids:
        assert len(pids) >= 3, pids  # the fork server and both jobs (and multiprocessing's resource tracker)
        survivors = _survivors(pids, _GONE_WITHIN_S)
        assert not survivors, f"still running {_GONE_WITHIN_S} s after the batch died: {sorted(survivors)}"
        assert _scratch(tmp_path / "tmp"), "the killed batch's scratch folder (the next run must clear it)"
    time.sleep(1.0)
    published = [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    assert published == [], "published after the batch was killed"  # (staging folders: cleared by a rerun)

    # The next batch on this host (here in this process, a job that fails fast) removes the dead one's scratch.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "corrupt.onnx").write_bytes(b"this is not a protobuf")
    corrupt = {**_paced_job(digits_job), "model": {"onnx": str(tmp_path / "corrupt.onnx")}}
    job = pipeline.validate_job({**corrupt, "name": "corrupt", "output_dir": str(tmp_path / "quick")}, origin="test")
    [outcome] = pipeline.convert_many([job])
    assert outcome.status == "failed", outcome
    assert _scratch(tmp_path / "tmp") == []


def _artifacts(folder: Path) -> dict[str, Any]:
    """Every artifact the job's manifest lists, by path: its sha256 (checked against the file).

    The validate stage's report is a measurement: its latencies (``performance``, the summary's
    times and ratio) and stage timings differ between any two runs, so it is compared as JSON
    without them.
    """
    manifest = json.loads((folder / "manifest.json").read_text())
    found: dict[str, Any] = {}
    for stage in manifest["stages"]:
        artifact = stage["artifact"]
        if artifact is None:
            continue
        assert sha256_file(folder / artifact["path"]) == artifact["sha256"], artifact["path"]
        for path in (artifact["path"], *artifact["external_data"]):
            found[path] = sha256_file(folder / path)
        if stage["name"] == "validate":
            report = json.loads((folder / artifact["path"]).read_text())
            found[artifact["path"]] = _without_timings(report)
    return found


_TIMINGS = ("latency_ratio", "fp32_ms", "shipped_ms")


def _without_timings(report: dict[str, Any]) -> dict[str, Any]:
    kept = {key: value for key, value in report.items() if key not in ("performance", "stage_timings")}
    kept["summary"] = [{k: v for k, v in row.items() if k not in _TIMINGS} for row in report.get("summary", [])]
    # The quantize search's own clock (its seconds; candidates' latencies, none with one recipe).
    kept["quantization"] = [
        {**entry, "decision": {k: v for k, v in (entry.get("decision") or {}).items() if k != "seconds"}}
        for entry in report.get("quantization", [])
    ]
    return kept


@pytest.mark.slow
def test_resume_after_a_killed_batch_redoes_only_unfinished_work_byte_identically(
    tmp_path: Path, digits_job: dict[str, Any], env: dict[str, str]
) -> None:
    job = _paced_job(digits_job)
    manifest = _manifest(tmp_path, job, "out", workers=2)
    paced = {**env, PACE_ENV: "0.5"}
    with _kill_parent_when(manifest, tmp_path / "events1.jsonl", paced, "quantize") as pids:
        assert not _survivors(pids, _GONE_WITHIN_S)

    resumed = _batch(manifest, tmp_path / "events2.jsonl", env, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode() if resumed.stderr else ""
    runs = [(e["job"], e["stage"], e["status"]) for e in _events(tmp_path / "events2.jsonl") if "stage" in e]
    for name in _JOBS:
        for stage in ("export", "simplify"):  # finished before the kill: restored, not run again
            assert (name, stage, "restored") in runs and (name, stage, "started") not in runs, (name, stage)
        assert (name, "quantize", "started") in runs  # interrupted: redone
    assert _scratch(tmp_path / "tmp") == []
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "hidden leftovers"

    # An uninterrupted run, with a stage cache of its own: the very same artifacts, byte for byte.
    fresh_env = {**env, "ONNXFORGE_CACHE_DIR": str(tmp_path / "fresh-cache")}
    fresh = _batch(_manifest(tmp_path, job, "fresh", workers=2), tmp_path / "events3.jsonl", fresh_env)
    assert fresh.wait(timeout=300) == 0, fresh.stderr.read().decode() if fresh.stderr else ""
    for name in _JOBS:
        resumed_files = sorted(p.name for p in (tmp_path / "out" / name).iterdir())
        assert resumed_files == sorted(p.name for p in (tmp_path / "fresh" / name).iterdir()), name
        assert _artifacts(tmp_path / "out" / name) == _artifacts(tmp_path / "fresh" / name), name


def test_a_job_killed_by_sigkill_is_not_called_out_of_memory_without_the_kernels_word(
    tmp_path: Path, digits_job: dict[str, Any]
) -> None:
    (tmp_path / "killed_factory.py").write_text(
        "import os, signal\n\n\ndef killed():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    raw = {
        **digits_job,
        "name": "killed",
        "output_dir": str(tmp_path / "out"),
        "model": {"factory": "killed_factory:killed"},
    }
    raw["python_path"] = [*raw["python_path"], str(tmp_path)]
    before = oom_counters()
    [outcome] = pipeline.convert_many([pipeline.validate_job(raw, origin="test")])
    assert outcome.status == "crashed"
    if oom_evidence(before) is None:  # (the kernel OOM-killed nothing in this cgroup meanwhile)
        assert outcome.message == (
            "the job's process was killed by SIGKILL (not by onnxforge; e.g. the kernel's OOM killer or an operator)"
        )
