"""Export stage: the TorchScript fallback is recorded, and a double failure names both causes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.stages import export


def _fail(message: str):
    def exporter(*args: Any) -> None:
        raise RuntimeError(message)

    return exporter


def _fast_job(raw: dict[str, Any]) -> dict[str, Any]:
    raw["quantize"] = {"enabled": False}
    raw["evaluation"]["max_batches"] = 1
    return raw


def test_dynamo_failure_falls_back_to_torchscript_and_is_recorded(
    digits_job: dict[str, Any], write_job, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(export._EXPORTERS, "dynamo", _fail("unsupported op aten::frobnicate"))
    result = pipeline.convert(write_job(_fast_job(digits_job)))
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["exporter"]["used"] == "torchscript"
    assert "aten::frobnicate" in manifest["exporter"]["fallback_reason"]
    assert result.passed  # the TorchScript export is as exact as the dynamo one


def test_both_exporters_failing_names_both_causes_and_writes_nothing(
    digits_job: dict[str, Any], write_job, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(export._EXPORTERS, "dynamo", _fail("dynamo says no"))
    monkeypatch.setitem(export._EXPORTERS, "torchscript", _fail("torchscript says no"))
    job_file = write_job(_fast_job(digits_job))
    with pytest.raises(pipeline.StageError) as excinfo:
        pipeline.convert(job_file)
    error = excinfo.value
    assert error.stage == "export" and error.exit_code == pipeline.ExitCode.INTERNAL_ERROR
    assert "dynamo: RuntimeError: dynamo says no" in str(error)
    assert "torchscript: RuntimeError: torchscript says no" in str(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"]  # no output, no staging left


def test_torchscript_exporter_on_request_keeps_the_batch_dynamic(digits_job: dict[str, Any], write_job) -> None:
    digits_job["export"] = {"exporter": "torchscript"}
    result = pipeline.convert(write_job(_fast_job(digits_job)))
    assert result.artifacts["export"].metadata["exporter"] == "torchscript"
    assert result.passed
