"""Kill a real `onnxforge batch --resume` process mid-run, run it again: only unfinished stages are
redone (counted from the event logs), the results are byte-identical to a fresh run, and nothing
half-written is left, not even hidden staging folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import pipeline
from tests.integration.paced_feeds import PACE_ENV


def _batch(manifest: Path, events: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "batch", str(manifest)]
    return subprocess.Popen(
        [*command, "--resume", "--quiet", "--events", str(events)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes the job processes too
    )


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_killed_batch_resumes_only_unfinished_stages(tmp_path: Path, digits_job: dict[str, Any]) -> None:
    job = {key: value for key, value in digits_job.items() if key not in ("name", "output_dir")}
    job["calibration"] = {"factory": "tests.integration.paced_feeds:calibration_feeds"}
    manifest = tmp_path / "batch.toml"
    manifest.write_text(
        tomli_w.dumps(
            {
                "batch": {"workers": 1, "timeout_s": 300.0},
                "defaults": job,
                "jobs": [
                    {"name": "first", "output_dir": "out/first"},
                    # Another opset: its own export (identical jobs would share cached stages).
                    {"name": "second", "output_dir": "out/second", "export": {"opset": 17}},
                ],
            }
        )
    )
    env = {**os.environ, "ONNXFORGE_CACHE_DIR": str(tmp_path / "cache")}

    # Run until the first job has finished simplify and started quantizing, then kill everything.
    # Calibration is paced (8 batches x 0.25 s), so quantize is still running when the kill lands.
    first_events = tmp_path / "events1.jsonl"
    process = _batch(manifest, first_events, {**env, PACE_ENV: "0.25"})
    deadline = time.monotonic() + 240
    started_quantize = {"job": "first", "stage": "quantize", "status": "started"}
    while not any(started_quantize.items() <= event.items() for event in _events(first_events)):
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "the batch never reached the quantize stage"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out" / "first").exists()  # nothing published, nothing half-written
    abandoned = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".first.staging-")]
    assert abandoned, "the killed job's hidden staging folder (the rerun must clear it)"

    second_events = tmp_path / "events2.jsonl"
    rerun = _batch(manifest, second_events, env)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode() if rerun.stderr else ""

    runs = Counter((e["job"], e["stage"], e["status"]) for e in _events(second_events) if "stage" in e)
    for stage in ("export", "simplify"):  # finished before the kill: restored, not run again
        assert runs[("first", stage, "restored")] == 1 and runs[("first", stage, "started")] == 0, stage
    assert runs[("first", "quantize", "started")] == 1  # interrupted: redone
    assert runs[("second", "export", "started")] == 1  # never reached before the kill
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "staging left behind"

    # A run without the cache produces the very same bytes.
    fresh = pipeline.convert(
        pipeline.validate_job({**job, "name": "first", "output_dir": str(tmp_path / "fresh")}, origin="fresh")
    )
    for stage in ("export", "simplify", "quantize"):
        resumed = tmp_path / "out" / "first" / fresh.artifacts[stage].path
        assert resumed.read_bytes() == fresh.path(stage).read_bytes(), stage
