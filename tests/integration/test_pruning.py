"""The prune stage end to end: the digits sample with half its channels removed, judged on the task,
then quantized and validated like any other model; sparsity; an ONNX file as the source; the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from tests.conftest import DIGITS_DIR, minilm_onnx_job, tree

Raw = dict[str, Any]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> pipeline.ConversionResult:
    out = tmp_path_factory.mktemp("pruned") / "out"
    return pipeline.convert(DIGITS_DIR / "job_pruned.toml", output_dir=out)


def test_pruned_sample_passes_on_the_task(pruned: pipeline.ConversionResult) -> None:
    prune = next(c for c in pruned.report.comparisons if c.stage == "prune")
    assert prune.precision == "pruned"
    assert prune.accuracy is not None and prune.accuracy.check is not None
    assert prune.accuracy.check.rule == "accuracy_drop_points <= 1"
    assert prune.accuracy.check.passed
    assert pruned.passed
    manifest = json.loads(pruned.manifest_path.read_text())
    assert set(manifest["parity"]) == {"export@cpu", "simplify@cpu", "prune@cpu", "quantize@cpu"}


def test_pruned_graph_is_really_smaller(pruned: pipeline.ConversionResult) -> None:
    summary = pruned.report.pruning
    assert summary is not None
    assert summary.parameters[1] < 0.3 * summary.parameters[0]
    assert summary.macs[1] < 0.3 * summary.macs[0]
    layers = {change.layer: change for change in summary.layers}
    assert layers["features.3"].inputs == (32, 16) and layers["features.3"].outputs == (64, 32)
    assert layers["classifier.1"].inputs == (256, 128)  # 32 channels x 2 x 2 after the flatten
    assert all(change.outputs[1] % 8 == 0 for change in summary.layers if change.layer != "classifier.3")
    assert set(summary.blocked) == {"classifier.3"}  # the logits stay 10
    graph = onnx.load(str(pruned.path("prune"))).graph
    weights = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    assert weights["features.3.weight"] == [32, 16, 3, 3]


def test_recovery_lowers_every_refitted_layers_error(pruned: pipeline.ConversionResult) -> None:
    summary = pruned.report.pruning
    assert summary is not None and len(summary.recovery) == 4
    for record in summary.recovery:
        assert record.skipped is None
        assert record.error_with < 0.8 * record.error_without, record


def test_int8_is_built_from_the_pruned_model(pruned: pipeline.ConversionResult) -> None:
    assert pruned.artifacts["quantize"].parent_sha256 == pruned.artifacts["prune"].sha256
    quantize = next(c for c in pruned.report.comparisons if c.stage == "quantize")
    assert quantize.reference == pruned.artifacts["prune"].path
    session = ort.InferenceSession(str(pruned.path("quantize")), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": np.zeros((3, 1, 8, 8), np.float32)})
    assert logits.shape == (3, 10)


def test_report_md_shows_what_was_removed(pruned: pipeline.ConversionResult) -> None:
    text = (pruned.output_dir / "report.md").read_text()
    assert "## Pruning" in text
    assert "| features.3 | 32 -> 16 | 64 -> 32 |" in text
    assert "classifier.3: reaches the graph output logits" in text


def test_too_much_pruning_fails_the_task_gate_and_keeps_the_evidence(
    digits_job: Raw, write_job, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    digits_job["prune"] = {"structured": {"ratio": 0.95, "criterion": "l1", "recovery": False}}
    digits_job["quantize"] = {"enabled": False}
    with pytest.raises(pipeline.ParityError) as excinfo:
        pipeline.convert(write_job(digits_job))
    message = str(excinfo.value)
    assert "stage prune on cpu" in message and "accuracy_drop_points" in message
    assert (tmp_path / "out" / "model.pruned.onnx").is_file()
    assert (tmp_path / "out" / "report.md").is_file()


def test_sparsity_reports_the_pattern_and_compressed_size(digits_job: Raw, write_job, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    digits_job["prune"] = {"sparsity": {"pattern": "n:m", "n": 2, "m": 4}}
    digits_job["quantize"] = {"enabled": False}
    digits_job["parity"]["prune"] = {"max_accuracy_drop": 5.0, "min_cosine": 0.9}
    result = pipeline.convert(write_job(digits_job))
    summary = result.report.pruning
    assert summary is not None and summary.sparsity is not None
    assert summary.sparsity.pattern == "2:4"
    assert summary.sparsity.sparsity == pytest.approx(0.5)
    assert summary.sparsity.skipped == {"features.0": "1 input channels are not a multiple of 4"}
    assert summary.sparsity.compressed_after < summary.sparsity.compressed_before
    assert summary.parameters[0] == summary.parameters[1]  # zeros are still stored
    assert "dense speed" in summary.note


def test_an_onnx_file_is_pruned_too(pruned: pipeline.ConversionResult, digits_job: Raw, write_job) -> None:  # type: ignore[no-untyped-def]
    digits_job["model"] = {"onnx": str(pruned.path("export")), "task": "classification"}
    digits_job["prune"] = {"structured": {"ratio": 0.25}}
    digits_job["quantize"] = {"enabled": False}
    result = pipeline.convert(write_job(digits_job))
    assert result.report.pruning is not None
    assert result.report.pruning.parameters[1] < result.report.pruning.parameters[0]


@pytest.mark.slow
def test_cli_prune_flag(digits_job: Raw, write_job, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    digits_job["quantize"] = {"enabled": False}
    job_file = write_job(digits_job)
    result = CliRunner().invoke(app, ["convert", str(job_file), "--prune", "0.25"])
    assert result.exit_code == 0, result.output
    assert "pruned: parameters 89,932 ->" in result.output
    bad = CliRunner().invoke(app, ["convert", str(job_file), "--sparsity", "two:four", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2
    assert "--sparsity" in bad.output and not (tmp_path / "bad").exists()
    assert ".staging" not in " ".join(tree(tmp_path))


def test_per_layer_ratios_and_skips(digits_job: Raw, write_job) -> None:  # type: ignore[no-untyped-def]
    digits_job["prune"] = {
        "structured": {"ratio": 0.5, "layers": {"features.3": 0.25}, "skip": ["features.7"], "criterion": "l2"}
    }
    digits_job["quantize"] = {"enabled": False}
    result = pipeline.convert(write_job(digits_job))
    summary = result.report.pruning
    assert summary is not None
    outputs = {change.layer: change.outputs[1] for change in summary.layers}
    assert outputs["features.0"] == 16 and outputs["features.3"] == 48 and outputs["classifier.1"] == 64
    assert "features.7" not in outputs or outputs["features.7"] == 64
    assert summary.skipped == ["features.7"]


@pytest.mark.slow
def test_minilm_ffn_neurons_are_pruned_and_the_rest_is_explained(
    minilm_models: dict[str, Path], tmp_path: Path
) -> None:
    # The session's exported MiniLM (not exported again). Scores and recovery read only the tokens the
    # attention mask marks, so the calibration sentences come padded to each batch's longest (22 to 50
    # tokens) instead of 128: the same tokens (cosine 0.944 either way) in under half the time.
    job = minilm_onnx_job(
        tmp_path,
        minilm_models["export"],
        export={"check_shapes": []},
        quantize={"enabled": False},
        prune={"structured": {"ratio": 0.3}},
        calibration={"factory": "tests.integration.minilm_feeds:calibration_feeds"},
        parity={"prune": {"min_cosine": 0.9}},  # measured 0.944 with recovery (benchmarks/pruning.py)
    )
    result = pipeline.convert(job)
    summary = result.report.pruning
    assert summary is not None
    pruned = {change.layer: change for change in summary.layers if change.outputs[0] != change.outputs[1]}
    assert sorted(pruned) == [f"encoder.encoder.layer.{i}.intermediate.dense" for i in range(6)]
    assert all(change.outputs == (1536, 1075) for change in pruned.values())
    assert len(summary.blocked) == 30  # q, k, v (head reshapes), attention output and FFN output (residual)
    assert all("Reshape" in why or "not pruned" in why for why in summary.blocked.values())
    assert all(r.error_with < r.error_without for r in summary.recovery)
    session = ort.InferenceSession(str(result.path("prune")), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.ones((2, 16), np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    assert session.run(None, feeds)[0].shape == (2, 384)  # batch and sequence stay dynamic
