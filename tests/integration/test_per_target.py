"""Per-target artifacts: a job with a cpu and an fpga target ships each its own int8 model, searched,
judged and reported per target, and a resumed run restores each branch from the stage cache.

The two tests on the sample's full cpu search (every recipe built, judged and timed: about a
minute on 2 cores) run with --run-slow; the CLI test (static recipe only) runs by default.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from tests.conftest import DIGITS_DIR


@pytest.fixture(scope="module")
def two_targets(tmp_path_factory: pytest.TempPathFactory) -> pipeline.ConversionResult:
    """The digits sample (its full search on the cpu) with targets cpu and fpga."""
    out = tmp_path_factory.mktemp("per_target") / "out"
    job = pipeline.load_job(DIGITS_DIR / "job.toml", targets=[{"backend": "cpu"}, {"backend": "fpga"}], output_dir=out)
    return pipeline.convert(job)


def weight_scales(path: Path) -> list[np.ndarray]:
    """The scale of every int8 weight's DequantizeLinear."""
    model = onnx.load(str(path))
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return [
        values[node.input[1]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and values.get(node.input[0], np.zeros(0)).ndim > 1
    ]


@pytest.mark.slow
def test_each_target_ships_its_own_int8_model(two_targets: pipeline.ConversionResult) -> None:
    cpu, fpga = two_targets.artifact("quantize", "cpu"), two_targets.artifact("quantize", "fpga")

    assert (cpu.path, cpu.targets) == ("model.int8.cpu.onnx", ["cpu"])
    assert (fpga.path, fpga.targets) == ("model.int8.fpga.onnx", ["fpga"])
    # The cpu model: per-channel weights, no power-of-two constraint; the fpga model: both.
    cpu_scales = weight_scales(two_targets.output_dir / cpu.path)
    assert any(scale.size > 1 for scale in cpu_scales)
    assert not all(np.all(np.log2(s) == np.round(np.log2(s))) for s in cpu_scales)
    fpga_scales = weight_scales(two_targets.output_dir / fpga.path)
    assert fpga_scales and all(s.size == 1 and np.log2(s) == np.round(np.log2(s)) for s in fpga_scales)
    with pytest.raises(KeyError, match="name a target"):
        two_targets.path("quantize")


@pytest.mark.slow
def test_each_target_has_its_own_chain_verdict_and_search(two_targets: pipeline.ConversionResult) -> None:
    report = two_targets.report

    links = {(c.target, c.candidate) for c in report.comparisons if c.stage == "quantize" and c.shape is None}
    assert links == {("cpu", "model.int8.cpu.onnx"), ("fpga", "model.int8.fpga.onnx")}
    assert {s.target: s.shipped_model for s in report.summary} == {
        "cpu": "model.int8.cpu.onnx",
        "fpga": "model.int8.fpga.onnx",
    }
    assert all(s.verdict == "pass" for s in report.summary)
    searches = {tuple(q.targets): q.decision for q in report.quantization}
    assert set(searches) == {("cpu",), ("fpga",)}
    cpu_search, fpga_search = searches[("cpu",)], searches[("fpga",)]
    assert cpu_search is not None and fpga_search is not None
    assert len(cpu_search.candidates) >= 3  # static, dynamic, int8 activations: the cpu runs them all
    assert [c.name for c in fpga_search.candidates] == ["int8 static"]  # the fpga's constraints allow one
    assert [c.shipped for c in cpu_search.candidates].count(True) == 1
    manifest = json.loads(two_targets.manifest_path.read_text())
    assert [stage["name"] for stage in manifest["stages"]] == [
        "distill", "export", "simplify", "prune", "quantize.cpu", "quantize.fpga", "validate"
    ]  # fmt: skip
    markdown = (two_targets.output_dir / "report.md").read_text()
    assert "## Quantization (model.int8.cpu.onnx, for cpu" in markdown and "**shipped**" in markdown


def test_the_cli_prints_one_search_line_per_target_and_resume_restores_each_branch(
    digits_job: dict[str, Any], write_job: Callable[[dict[str, Any]], Path], tmp_path: Path
) -> None:
    digits_job["targets"] = [{"backend": "cpu"}, {"backend": "fpga"}]
    job = write_job(digits_job)
    runner = CliRunner()
    first = runner.invoke(app, ["convert", str(job), "--resume"])
    second = runner.invoke(app, ["convert", str(job), "--resume"])

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    for output in (first.output, second.output):
        assert "search for cpu: shipped" in output and "search for fpga: shipped" in output
    stages = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert {stage["name"]: stage["restored"] for stage in stages}["quantize.fpga"] is True
    assert {stage["name"]: stage["restored"] for stage in stages}["quantize.cpu"] is True
