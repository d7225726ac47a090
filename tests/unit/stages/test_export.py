"""Export stage: the TorchScript fallback is recorded, and a double failure names both causes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
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


_TOY_MODELS = '''
import torch


class TwoInputs(torch.nn.Module):
    """Two inputs, nested dict/tuple outputs."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 256)  # 8 KiB fp32, 2 KiB int8: above the inline-tensor size

    def forward(self, x, y):
        h = self.proj(x * y)
        return {"logits": h, "aux": (h.sum(dim=-1), torch.relu(h))}


class FixesBatch(torch.nn.Module):
    """Adds a constant of batch size 4: the exporter has to fix the batch dim."""

    def forward(self, x, y):
        return x + torch.ones(4, 8) + y


def two_inputs():
    torch.manual_seed(0)
    return TwoInputs()


def fixes_batch():
    return FixesBatch()


def feeds():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(3):
        yield {"x": rng.normal(size=(4, 8)).astype("float32"), "y": rng.normal(size=(4, 8)).astype("float32")}
'''


@pytest.fixture
def toy_job(tmp_path: Path) -> dict[str, Any]:
    package = tmp_path / "toys_export"
    package.mkdir()
    (package / "__init__.py").write_text(_TOY_MODELS)
    return {
        "name": "toy",
        "python_path": [str(tmp_path)],
        "model": {"factory": "toys_export:two_inputs"},
        "inputs": [{"name": "x", "shape": ["batch", 8]}, {"name": "y", "shape": ["batch", 8]}],
        "calibration": {"factory": "toys_export:feeds"},
        "quantize": {"enabled": False},
    }


def test_several_inputs_and_nested_outputs_get_structural_names(toy_job: dict[str, Any], write_job) -> None:
    result = pipeline.convert(write_job(toy_job))
    graph = onnx.load(str(result.path("export"))).graph
    assert [value.name for value in graph.input] == ["x", "y"]
    assert [value.name for value in graph.output] == ["logits", "aux.0", "aux.1"]
    export = next(c for c in result.report.comparisons if c.stage == "export")
    assert [output.name for output in export.outputs] == ["logits", "aux.0", "aux.1"]
    assert result.passed


def test_parity_is_checked_at_every_listed_shape(toy_job: dict[str, Any], write_job) -> None:
    toy_job["export"] = {"check_shapes": [{"batch": 1}, {"batch": 3}, {"batch": 64}]}
    result = pipeline.convert(write_job(toy_job))
    labels = [c.label for c in result.report.comparisons if c.stage == "export"]
    assert labels == ["export", "export[batch=1]", "export[batch=3]", "export[batch=64]"]
    shaped = [c for c in result.report.comparisons if c.shape == {"batch": 64}]
    assert shaped[0].outputs[0].metrics.samples == 64
    assert result.passed


def test_a_dim_the_exporter_fixed_names_the_input_and_axis(toy_job: dict[str, Any], write_job) -> None:
    toy_job["model"] = {"factory": "toys_export:fixes_batch"}
    # The model's own code fixes the size: bad input (exit 2) naming the job's key, not an export bug.
    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(write_job(toy_job))
    message = str(excinfo.value)
    assert excinfo.value.key == "inputs[0].shape"
    assert "input 'x' axis 0 ('batch') should be dynamic but the graph fixes it to 4" in message


def test_external_data_above_the_threshold_with_hashes_in_the_manifest(toy_job: dict[str, Any], write_job) -> None:
    toy_job["export"] = {"external_data_threshold_mb": 0.001}  # 1 KiB: the 8x256 Linear is above it
    toy_job["quantize"] = {"enabled": True}
    result = pipeline.convert(write_job(toy_job))
    for stage in ("export", "simplify", "quantize"):
        artifact = result.artifacts[stage]
        assert list(artifact.external_data) == [f"{artifact.path}.data"], stage
        assert (result.output_dir / f"{artifact.path}.data").is_file()
    manifest = json.loads(result.manifest_path.read_text())
    export_record = next(r for r in manifest["stages"] if r["name"] == "export")
    data_file = result.output_dir / "model.fp32.onnx.data"
    expected = {data_file.name: hashlib.sha256(data_file.read_bytes()).hexdigest()}
    assert export_record["artifact"]["external_data"] == expected
    assert not [p for p in result.output_dir.iterdir() if p.name.startswith(".")]
    assert result.passed


def test_opset_and_ir_version_from_the_job(toy_job: dict[str, Any], write_job) -> None:
    toy_job["export"] = {"opset": 17, "ir_version": 8}
    result = pipeline.convert(write_job(toy_job))
    model = onnx.load(str(result.path("export")))
    assert model.ir_version == 8
    assert next(o.version for o in model.opset_import if o.domain == "") == 17
    assert result.artifacts["export"].metadata["ir_version"] == 8


def test_failure_description_names_the_failing_op() -> None:
    try:
        try:
            raise NotImplementedError("no ONNX function registered for aten::upsample_bicubic2d.vec")
        except NotImplementedError as inner:
            raise RuntimeError("Failed to convert the exported program") from inner
    except RuntimeError as outer:
        described = export._describe_failure(outer)
    assert described == (
        "RuntimeError: Failed to convert the exported program (failing op: aten::upsample_bicubic2d.vec)"
    )
