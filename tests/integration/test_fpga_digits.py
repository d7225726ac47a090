"""The digits CNN on the FPGA-style backend: partition, emulated int8, cost and memory plan, on-target
parity, the fallback and accelerator-share gates, and MiniLM on the transformer profile (slow)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import pipeline
from backends.fpga import FpgaBackend
from backends.fpga.profile import PROFILES
from pipeline.cli import app
from pipeline.parity.report import REPORT_SCHEMA_VERSION
from pipeline.records import QuantizeRecord
from tests.conftest import DIGITS_DIR, minilm_onnx_job

ACCELERATOR = "fpga:dpu-int8"


@pytest.fixture(scope="module")
def fpga_result(tmp_path_factory: pytest.TempPathFactory) -> pipeline.ConversionResult:
    out = tmp_path_factory.mktemp("fpga") / "out"
    job = pipeline.load_job(DIGITS_DIR / "job.toml", targets=[{"backend": "fpga", "max_fallback": 0.0}])
    return pipeline.convert(job, output_dir=out)


def test_every_convolution_runs_on_the_accelerator(fpga_result: pipeline.ConversionResult) -> None:
    (placement,) = fpga_result.report.placements
    devices = {node.node: (node.op_type, node.device) for node in placement.nodes}

    convolutions = [device for op, device in devices.values() if op == "Conv"]
    assert len(convolutions) == 3 and set(convolutions) == {ACCELERATOR}
    assert placement.fallback_nodes == 0 and placement.fallback_share == 0.0
    # Only the model's float input is quantized and its int8 output dequantized on the CPU.
    assert placement.unfused_qdq == 2


def test_report_shows_the_cycle_estimate_and_the_memory_plan(fpga_result: pipeline.ConversionResult) -> None:
    estimate = fpga_result.report.placements[0].accelerator
    assert estimate is not None
    assert estimate.macs == 1_821_952  # the digits CNN's MACs per sample (as the pruning cost model counts them)
    assert estimate.cycles > estimate.macs / 2048  # never faster than the array's peak
    assert 0 < estimate.utilization <= 1
    assert estimate.fits and estimate.peak_activation_bytes < estimate.segments[0].unshared_activation_bytes
    markdown = (fpga_result.output_dir / "report.md").read_text()
    assert "## Placement on fpga (model.int8.onnx)" in markdown
    assert "Activation memory plan: peak" in markdown
    assert "## On-target parity" in markdown
    saved = json.loads((fpga_result.output_dir / "report.json").read_text())
    assert saved["schema_version"] == REPORT_SCHEMA_VERSION
    assert saved["placements"][0]["accelerator"]["cycles"] == estimate.cycles


def test_on_target_outputs_are_within_one_int8_step_of_cpu_qdq(fpga_result: pipeline.ConversionResult) -> None:
    (parity,) = fpga_result.report.on_target
    (logits,) = parity.outputs

    assert parity.passed
    assert logits.target_vs_cpu <= logits.int8_step
    assert logits.target_error <= logits.limit
    assert fpga_result.passed


def test_emulated_accuracy_matches_cpu_qdq(fpga_result: pipeline.ConversionResult) -> None:
    data = np.load(DIGITS_DIR / "data" / "heldout.npz")
    int8 = fpga_result.path("quantize")
    with FpgaBackend().open(int8) as session:
        fpga = session.run({"image": data["image"]})["logits"]
    cpu = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"image": data["image"]})[0]

    assert (fpga.argmax(1) == data["label"]).mean() == (cpu.argmax(1) == data["label"]).mean()
    assert (fpga.argmax(1) == data["label"]).mean() > 0.97


def test_fallback_over_the_limit_fails_the_job_with_the_evidence_written(tmp_path: Path) -> None:
    profile = tmp_path / "no-fc.toml"
    text = (PROFILES / "dpu-int8.toml").read_text().replace('name = "dpu-int8"', 'name = "no-fc"')
    profile.write_text(text.replace("[ops.Gemm]", "[ops.GemmX]"))
    target = {"backend": "fpga", "max_fallback": 0.1, "options": {"profile": str(profile)}}
    job = pipeline.load_job(DIGITS_DIR / "job.toml", targets=[target])

    with pytest.raises(pipeline.ParityError) as caught:
        pipeline.convert(job, output_dir=tmp_path / "out")

    (line,) = caught.value.failures
    assert line.startswith("placement@fpga: 2 of 12 compute nodes of model.int8.onnx fall back (16.7%)")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    gemms = [n for n in report["placements"][0]["nodes"] if n["op_type"] == "Gemm"]
    assert {n["reason"] for n in gemms} == {"Gemm is not in profile no-fc's operators"}
    assert report["verdict"] == "fail"


def test_placement_command(fpga_result: pipeline.ConversionResult) -> None:
    runner = CliRunner()
    model = str(fpga_result.path("quantize"))

    placed = runner.invoke(app, ["placement", model, "--backend", "fpga", "-o", "cost_dims=batch=4"])
    bad = runner.invoke(app, ["placement", model, "--backend", "fpga", "-o", "bogus=1"])
    cpu = runner.invoke(app, ["placement", model])

    assert placed.exit_code == 0, placed.output
    assert "12 of 12 compute nodes on fpga:dpu-int8, 0% fall back" in " ".join(placed.output.split())
    assert bad.exit_code == 2 and "Extra inputs are not permitted" in bad.output
    assert cpu.exit_code == 0 and "on CPUExecutionProvider" in cpu.output


@pytest.mark.slow
def test_minilm_runs_on_the_transformer_profile(minilm_models: dict[str, Path], tmp_path: Path) -> None:
    """MiniLM on npu-int8: every MAC on the accelerator (attention included), the activations int8
    damages most in int16, cosine >= 0.99 on the emulated target, within one int8 step of CPU QDQ."""
    target = {"backend": "fpga", "options": {"profile": "npu-int8", "cost_dims": ["batch=1", "sequence=128"]}}
    # The session's exported MiniLM (not exported again); on-target parity on 2 of the 5 evaluation batches.
    job = minilm_onnx_job(
        tmp_path,
        minilm_models["export"],
        targets=[target],
        export={"check_shapes": []},
        evaluation={"max_batches": 2},
        parity={"int8": {"min_cosine": 0.99}},
    )

    result = pipeline.convert(job)

    (placement,) = result.report.placements
    assert placement.accelerator is not None and placement.accelerator.mac_share is not None
    assert placement.accelerator.mac_share >= 0.8
    devices = {node.op_type: node.device for node in placement.nodes if node.device != placement.preferred}
    assert not {"MatMul", "LayerNormalization", "Gelu"} & set(devices)  # Softmax reads the float mask
    (on_target,) = result.report.on_target
    assert all(output.passed for output in on_target.outputs)
    quantize = [c for c in result.report.comparisons if c.stage == "quantize" and c.shape is None]
    assert quantize and all(c.passed for c in quantize)
    record = result.artifact("quantize").record_as(QuantizeRecord)
    assert record.recipe == "transformer-accelerator" and record.int16_activations
    share = f"{placement.accelerator.mac_share:.1%} of the model's {placement.accelerator.model_macs} MACs run on"
    assert share in (result.output_dir / "report.md").read_text()


def test_a_target_that_runs_nothing_on_its_accelerator_says_so_and_can_fail(
    digits_job: dict[str, Any], write_job: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    """A profile with none of the CNN's operators: parity passes on the CPU fallback, and the verdict
    says "all on CPU fallback"; with require_accelerator_share the job fails (exit 1, report written)."""
    profile = tmp_path / "norm-only.toml"
    profile.write_text('name = "norm-only"\n[ops.LayerNormalization]\n')
    target: dict[str, Any] = {"backend": "fpga", "options": {"profile": str(profile)}}
    digits_job["targets"] = [target]
    runner = CliRunner()
    warned = runner.invoke(app, ["convert", str(write_job(digits_job)), "--resume"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    markdown = (tmp_path / "out" / "report.md").read_text()
    target["require_accelerator_share"] = True
    failed = runner.invoke(app, ["convert", str(write_job(digits_job)), "--resume"])

    assert warned.exit_code == 0, warned.output
    assert "verdict: PASS (fpga: all on CPU fallback)" in " ".join(warned.output.split())
    assert report["summary"][0]["share_note"] == "all on CPU fallback"
    assert "| PASS (all on CPU fallback) |" in markdown
    assert failed.exit_code == 1, failed.output
    assert "nothing of model.int8.onnx runs on fpga:norm-only" in " ".join(failed.output.split())
