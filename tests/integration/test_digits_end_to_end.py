"""The digits sample converted end to end through the Python API: artifacts, manifest, parity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import pipeline
from tests.conftest import DIGITS_DIR


@pytest.fixture(scope="module")
def digits_result(tmp_path_factory: pytest.TempPathFactory) -> pipeline.ConversionResult:
    events: list[pipeline.StageEvent] = []
    out = tmp_path_factory.mktemp("digits") / "out"
    result = pipeline.convert(DIGITS_DIR / "job.toml", output_dir=out, on_event=events.append)
    ran = [("distill", "skipped")]  # nor does it distil
    ran += [(s, status) for s in ("export", "simplify") for status in ("started", "finished")]
    ran += [("prune", "skipped")]  # the sample job does not prune
    ran += [("quantize", status) for status in ("started", "finished")]
    ran += [("hls", "skipped")]  # no fpga target with hls = true
    ran += [("validate", status) for status in ("started", "finished")]
    assert [(e.stage, e.status) for e in events] == ran
    return result


def test_writes_every_artifact_and_nothing_else(digits_result: pipeline.ConversionResult) -> None:
    out = digits_result.output_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.fp32.onnx",
        "model.int8.onnx",
        "model.simplified.onnx",
        "report.html",
        "report.json",
        "report.md",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_int8_accuracy_within_one_point_of_pytorch(digits_result: pipeline.ConversionResult) -> None:
    quantize = next(c for c in digits_result.report.comparisons if c.stage == "quantize")
    assert quantize.accuracy is not None
    assert quantize.accuracy.reference > 0.97  # the trained model really classifies digits
    assert 100 * (quantize.accuracy.reference - quantize.accuracy.candidate) <= 1.0
    assert digits_result.passed


def test_int8_model_is_qdq_and_runs_at_any_batch(digits_result: pipeline.ConversionResult) -> None:
    int8 = digits_result.path("quantize")
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        (logits,) = session.run(None, {"image": np.zeros((batch, 1, 8, 8), np.float32)})
        assert logits.shape == (batch, 10)


def test_batch_axis_stays_dynamic(digits_result: pipeline.ConversionResult) -> None:
    for stage in ("export", "simplify", "quantize"):
        graph = onnx.load(str(digits_result.path(stage))).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch", stage


def test_manifest_records_hashes_versions_exporter_and_verdicts(digits_result: pipeline.ConversionResult) -> None:
    manifest: dict[str, Any] = json.loads(digits_result.manifest_path.read_text())
    assert manifest["exporter"]["used"] == "dynamo"
    assert manifest["verdict"] == "pass"
    assert set(manifest["parity"]) == {"export@cpu", "simplify@cpu", "quantize@cpu"}
    assert {"torch", "onnx", "onnxruntime", "onnxforge"} <= set(manifest["tool_versions"])
    assert {"model_state_dict", "calibration_npz", "evaluation_npz"} <= set(manifest["input_hashes"])
    for record in manifest["stages"]:
        artifact = record["artifact"]
        if record["name"] in ("distill", "prune", "hls"):  # not asked for by the sample job: recorded, no artifact
            assert artifact is None
            continue
        assert artifact is not None
        data = (digits_result.output_dir / artifact["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"], artifact["path"]


def test_export_parity_is_tight(digits_result: pipeline.ConversionResult) -> None:
    export = next(c for c in digits_result.report.comparisons if c.stage == "export")
    (logits,) = export.outputs
    assert logits.metrics.max_abs < 1e-4
    assert logits.metrics.samples == 360


@pytest.mark.slow
def test_rerun_replaces_output_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The static recipe only: which recipe ships may follow timing; each recipe's model is deterministic.
    job = pipeline.load_job(DIGITS_DIR / "job.toml", output_dir=out, quantize={"recipes": ["static"]})
    first = pipeline.convert(job)
    second = pipeline.convert(job)
    assert first.artifacts["quantize"].sha256 == second.artifacts["quantize"].sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_job_built_in_python(tmp_path: Path) -> None:
    job = pipeline.ConversionJob(
        name="digits_py",
        model=pipeline.ModelSource(factory="samples.digits_cnn.model:load_trained", task="classification"),
        inputs=[pipeline.InputSpec(name="image", shape=["batch", 1, 8, 8])],
        calibration=pipeline.DataSource(npz=DIGITS_DIR / "data" / "calibration.npz", max_batches=2),
        evaluation=pipeline.DataSource(npz=DIGITS_DIR / "data" / "heldout.npz", labels="label"),
        python_path=[DIGITS_DIR.parent.parent],
        output_dir=tmp_path / "py_out",
    )
    result = pipeline.convert(job)
    assert result.passed
    assert result.path("quantize").is_file()
    quantize = result.artifacts["quantize"]
    assert quantize.metadata["calibration"]["batches"] == 2
