"""Every model source converts: factory + state dict, checkpoint, .pt2, ONNX file; unsafe ones are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch

import pipeline
from samples.digits_cnn.model import load_trained
from tests.conftest import DIGITS_DIR

WEIGHTS = DIGITS_DIR / "weights.safetensors"


def _factory_job(raw: dict[str, Any], weights: Path) -> dict[str, Any]:
    raw["model"] = {"factory": "samples.digits_cnn.model:DigitsCNN", "weights": str(weights), "task": "classification"}
    return raw


def _quantize_accuracy(result: pipeline.ConversionResult) -> tuple[float, float]:
    quantize = next(c for c in result.report.comparisons if c.stage == "quantize")
    assert quantize.accuracy is not None
    return quantize.accuracy.reference, quantize.accuracy.candidate


def test_safetensors_state_dict_plus_factory(digits_job: dict[str, Any], write_job) -> None:
    result = pipeline.convert(write_job(_factory_job(digits_job, WEIGHTS)))
    reference, int8 = _quantize_accuracy(result)
    assert reference > 0.97 and reference - int8 <= 0.01  # the trained weights were really applied
    manifest = json.loads(result.manifest_path.read_text())
    assert "model_weights" in manifest["input_hashes"]


def test_pytorch_checkpoint_loads_weights_only(digits_job: dict[str, Any], write_job, tmp_path: Path) -> None:
    checkpoint = tmp_path / "digits.pt"
    torch.save({"state_dict": load_trained().state_dict()}, checkpoint)
    result = pipeline.convert(write_job(_factory_job(digits_job, checkpoint)))
    assert result.passed


def test_state_dict_that_does_not_fit_is_a_job_error(digits_job: dict[str, Any], write_job, tmp_path: Path) -> None:
    checkpoint = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), checkpoint)
    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(write_job(_factory_job(digits_job, checkpoint)))
    assert excinfo.value.key == "model.weights"
    assert "does not fit DigitsCNN" in excinfo.value.problem


def test_exported_program_file(digits_job: dict[str, Any], write_job, digits_pt2: Path) -> None:
    digits_job["model"] = {"exported_program": str(digits_pt2), "output_names": ["logits"], "task": "classification"}
    result = pipeline.convert(write_job(digits_job))
    assert result.passed
    graph = onnx.load(str(result.path("export"))).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch stayed symbolic
    assert "model_exported_program" in json.loads(result.manifest_path.read_text())["input_hashes"]


@pytest.mark.slow
def test_onnx_file_skips_export_and_runs_the_rest(digits_job: dict[str, Any], write_job, tmp_path: Path) -> None:
    first = pipeline.convert(write_job(digits_job, name="first.toml"))
    digits_job["model"] = {"onnx": str(first.path("export")), "task": "classification"}
    digits_job["output_dir"] = str(tmp_path / "from_onnx")
    result = pipeline.convert(write_job(digits_job))
    assert result.passed
    assert result.artifacts["export"].metadata["exporter"] == "none (ONNX file given)"
    assert [c.stage for c in result.report.comparisons] == ["simplify", "quantize"]
    assert result.report.comparisons[0].reference == "model.fp32.onnx"
    assert any("ONNX file" in note for note in result.report.notes)
    assert "model_onnx" in json.loads(result.manifest_path.read_text())["input_hashes"]


def test_onnx_file_with_a_fixed_dim_the_job_calls_dynamic(
    digits_job: dict[str, Any], write_job, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(load_trained(), (torch.zeros(3, 1, 8, 8),), str(fixed), dynamo=False, input_names=["image"])
    digits_job["model"] = {"onnx": str(fixed)}
    with pytest.raises(pipeline.JobError) as excinfo:  # bad input (exit 2), found by intake before any stage
        pipeline.convert(write_job(digits_job))
    message = str(excinfo.value)
    assert "input 'image' axis 0 ('batch') should be dynamic" in message and "fixes it to 3" in message
