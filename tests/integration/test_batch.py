"""Batch conversion: crash isolation (segfault, hang, corrupt model) among healthy jobs; summary files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import tomli_w
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from tests.conftest import DIGITS_DIR

_BAD_FACTORIES = """
import ctypes
import time


def segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV in the job's process


def hang():
    time.sleep(600)
"""


@pytest.fixture
def batch_manifest(tmp_path: Path, digits_job: dict[str, Any]) -> Path:
    (tmp_path / "bad_factories.py").write_text(_BAD_FACTORIES)
    (tmp_path / "corrupt.onnx").write_bytes(b"this is not a protobuf")
    healthy = {key: value for key, value in digits_job.items() if key not in ("name", "output_dir")}
    healthy["quantize"] = {**digits_job["quantize"], "mixed_precision": False}
    jobs = [
        {"name": "healthy_a", "output_dir": "out/healthy_a"},
        {"name": "segfaults", "output_dir": "out/segfaults", "model": {"factory": "bad_factories:segfault"}},
        {"name": "hangs", "output_dir": "out/hangs", "model": {"factory": "bad_factories:hang"}},
        {"name": "corrupt", "output_dir": "out/corrupt", "model": {"onnx": "corrupt.onnx"}},
        {"name": "healthy_b", "output_dir": "out/healthy_b"},
    ]
    healthy["python_path"] = [*healthy["python_path"], str(tmp_path)]
    # The hanging job waits for this timeout: long enough for a healthy digits job (about 5 s here).
    manifest = {"batch": {"workers": 2, "timeout_s": 25.0}, "defaults": healthy, "jobs": jobs}
    path = tmp_path / "batch.toml"
    path.write_text(tomli_w.dumps(manifest))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "executor",
    [
        pytest.param("local", id="local"),
        # The same manifest on a local Ray instance (the `ray` extra, installed with `dev`).
        pytest.param("ray", id="ray", marks=pytest.mark.slow),
    ],
)
def test_bad_jobs_are_isolated_and_reported(batch_manifest: Path, tmp_path: Path, executor: str) -> None:
    if executor == "ray":
        pytest.importorskip("ray", reason="the ray extra is not installed")
    events = tmp_path / "events.jsonl"
    result = CliRunner().invoke(
        app, ["batch", str(batch_manifest), "--quiet", "--events", str(events), "--executor", executor]
    )
    assert result.exit_code == 3, result.output  # a job failed / crashed / timed out
    summary = json.loads((tmp_path / "batch-summary" / "summary.json").read_text())
    status = {outcome["job"]: outcome for outcome in summary["outcomes"]}
    assert status["healthy_a"]["status"] == "passed" and status["healthy_b"]["status"] == "passed"
    assert status["healthy_a"]["verdicts"] == {"export@cpu": "pass", "simplify@cpu": "pass", "quantize@cpu": "pass"}
    crash_cause = "SIGSEGV" if executor == "local" else "WorkerCrashedError"
    assert status["segfaults"]["status"] == "crashed" and crash_cause in status["segfaults"]["message"]
    assert status["hangs"]["status"] == "timeout"
    assert status["corrupt"]["status"] == "failed" and "JobError" in status["corrupt"]["message"]
    assert summary["counts"] == {"crashed": 1, "failed": 1, "passed": 2, "timeout": 1}
    # Healthy outputs are complete; the others left nothing visible and no staging folder.
    for name in ("healthy_a", "healthy_b"):
        assert (tmp_path / "out" / name / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["healthy_a", "healthy_b"]
    # JUnit: one case per job x target, errors for the three broken jobs.
    suite = ElementTree.parse(tmp_path / "batch-summary" / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("5", "3", "0")
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert {line.get("outcome") for line in lines if "outcome" in line} == {"passed", "crashed", "timeout", "failed"}
    assert any(line.get("stage") == "quantize" and line.get("job") == "healthy_a" for line in lines)
    assert "summary.json" in result.stdout


@pytest.mark.slow
def test_convert_many_never_raises_for_a_bad_job(tmp_path: Path) -> None:
    good = pipeline.load_job(DIGITS_DIR / "job.toml", output_dir=str(tmp_path / "good"))
    bad = good.model_copy(
        update={
            "name": "bad",
            "output_dir": tmp_path / "bad",
            "model": good.model.model_copy(update={"factory": None, "onnx": tmp_path / "missing.onnx"}),
        }
    )
    outcomes = pipeline.convert_many([good, bad], workers=2, timeout_s=120)
    assert [o.status for o in outcomes] == ["passed", "failed"]
    assert outcomes[0].verdicts["quantize@cpu"] == "pass"


def test_bad_manifest_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "batch.toml"
    path.write_text('[batch]\nworkers = 0\n[[jobs]]\npath = "nowhere.toml"\n')
    result = CliRunner().invoke(app, ["batch", str(path)])
    assert result.exit_code == 2
    assert "batch.workers" in result.stderr


def test_convert_batch_runs_a_manifest_and_writes_the_three_summary_files(
    tmp_path: Path, digits_job: dict[str, Any]
) -> None:
    (tmp_path / "corrupt.onnx").write_bytes(b"this is not a protobuf")
    healthy = {key: value for key, value in digits_job.items() if key not in ("name", "output_dir")}
    healthy["quantize"] = {**digits_job["quantize"], "mixed_precision": False}
    jobs = [
        {"name": "healthy", "output_dir": "out/healthy"},
        {"name": "corrupt", "output_dir": "out/corrupt", "model": {"onnx": "corrupt.onnx"}},
    ]
    manifest = tmp_path / "batch.toml"
    manifest.write_text(tomli_w.dumps({"batch": {"summary_dir": "summary"}, "defaults": healthy, "jobs": jobs}))
    finished: list[str] = []
    result = pipeline.convert_batch(manifest, workers=2, timeout_s=120, on_outcome=lambda o: finished.append(o.job))
    assert [(o.job, o.status) for o in result.outcomes] == [("healthy", "passed"), ("corrupt", "failed")]
    assert sorted(finished) == ["corrupt", "healthy"]
    assert result.summary_path == tmp_path / "summary" / "summary.json"
    summary = json.loads(result.summary_path.read_text())
    assert summary["counts"] == {"failed": 1, "passed": 1}
    assert "| healthy | passed |" in (tmp_path / "summary" / "summary.md").read_text()
    suite = ElementTree.parse(tmp_path / "summary" / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("2", "1", "0")
    assert int(result.exit_code) == 3


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--executor", "dask"], "unknown executor; available: local, ray"),
        (["--workers", "0"], "batch.workers"),
    ],
)
def test_a_bad_executor_or_setting_on_the_command_line_is_exit_2(
    tmp_path: Path, digits_job: dict[str, Any], options: list[str], expected: str
) -> None:
    manifest = tmp_path / "batch.toml"
    manifest.write_text(tomli_w.dumps({"defaults": digits_job, "jobs": [{"name": "a", "output_dir": "out/a"}]}))
    result = CliRunner().invoke(app, ["batch", str(manifest), "--quiet", *options])
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
