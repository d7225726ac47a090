"""The hls stage on the digits CNN: the fpga target's accelerator partition as an hls4ml project in
``hls/``, its C simulation bit for bit against the emulator (on a subset of the held-out images;
benchmarks/fpga_hls.py runs all 360), the report's section, and the job-level failures (a missing
toolchain before anything is written, a partition the export cannot take), each exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import pipeline
from backends.fpga.hls import INSTALL_HINT, HlsBuild, IntegerComparison, missing_tools, toolchain
from backends.fpga.profile import PROFILES
from pipeline.artifacts import Manifest
from pipeline.cli import app
from pipeline.parity.hls import HlsSummary
from pipeline.parity.html import render_html
from pipeline.parity.report import ParityReport, render_markdown
from pipeline.parity.summary import RunFacts
from pipeline.records import HlsRecord
from tests.conftest import DIGITS_DIR

MISSING = missing_tools()
needs_toolchain = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} missing ({INSTALL_HINT})")
HLS_TARGET = {"backend": "fpga", "options": {"hls": True}}
SUBSET = 96  # held-out images the test simulates (two batches of the job's 64)


def hls_job(digits_job: dict[str, Any], tmp_path: Path, **target_options: Any) -> dict[str, Any]:
    """The digits job on the fpga target with hls = true, evaluated on the first held-out images."""
    data = np.load(DIGITS_DIR / "data" / "heldout.npz")
    subset = tmp_path / "heldout_subset.npz"
    np.savez(subset, image=data["image"][:SUBSET], label=data["label"][:SUBSET])
    digits_job["evaluation"]["npz"] = str(subset)
    digits_job["targets"] = [{"backend": "fpga", "options": {"hls": True, **target_options}}]
    return digits_job


@needs_toolchain
@pytest.mark.slow
def test_digits_c_simulation_matches_the_emulator_bit_for_bit(
    digits_job: dict[str, Any], write_job: Any, tmp_path: Path
) -> None:
    result = pipeline.convert(write_job(hls_job(digits_job, tmp_path)))
    summary = result.artifacts["hls"].record_as(HlsRecord).summary
    build = summary.build

    assert build.samples == SUBSET and build.vs_emulator.values == SUBSET * 10
    assert build.bit_exact and build.differences == [] and build.emulator_saturations == {}
    assert build.vs_cpu_qdq.max_difference == 0
    assert len(build.nodes) == 12  # every compute node of the digits CNN is in the project
    hls = result.output_dir / "hls"
    readme = (hls / "README.md").read_text()
    assert "vitis-run --mode hls --tcl build_prj.tcl" in readme and "**Bit-exact**" in readme
    qonnx = onnx.load(str(hls / "model.qonnx.onnx"))
    assert [n.op_type for n in qonnx.graph.node if n.op_type != "Quant"].count("Conv") == 3
    assert (hls / "firmware" / "myproject.cpp").is_file() and (hls / "build_prj.tcl").is_file()
    stages = [run.name for run in Manifest.model_validate_json(result.manifest_path.read_text()).stages]
    assert stages.index("hls") == stages.index("quantize") + 1
    assert result.passed
    assert "## hls4ml project for fpga (hls/)" in (result.output_dir / "report.md").read_text()
    assert [item.target for item in result.report.hls] == ["fpga"]


def test_the_report_shows_the_c_simulation_against_the_emulator_and_cpu() -> None:
    build = HlsBuild(
        backend="Vitis",
        io_type="io_stream",
        part="xcvu13p-flga2577-2-e",
        clock_period_ns=5.0,
        project_name="myproject",
        qonnx_model="model.qonnx.onnx",
        nodes=["conv", "gemm"],
        inputs=["x_q (5)"],
        outputs=["y_q (2)"],
        samples=360,
        vs_emulator=IntegerComparison(values=3600, mismatches=2, max_difference=1),
        vs_cpu_qdq=IntegerComparison(values=3600, mismatches=2, max_difference=1),
        emulator_vs_cpu_qdq=IntegerComparison(values=3600),
        differences=["2 accumulations overflowed the profile's 32-bit accumulator (conv: 2)"],
        seconds={"export": 0.1, "convert": 2.0, "compile": 15.0, "simulate": 20.0},
        synthesis_command="vitis-run --mode hls --tcl build_prj.tcl",
    )
    summary = HlsSummary(target="fpga", model="model.int8.onnx", project="hls", build=build)
    report = ParityReport.build(job="j", data="d", samples=360, notes=[], comparisons=[], facts=RunFacts(hls=[summary]))

    markdown = render_markdown(report)
    assert "## hls4ml project for fpga (hls/)" in markdown
    assert "| C simulation vs emulator | 3600 | 2 | 1 |" in markdown
    assert "2 of 3600 values differ from the emulator on 360 samples; max 1 output steps from CPU QDQ" in markdown
    assert "- 2 accumulations overflowed" in markdown and "`vitis-run --mode hls --tcl build_prj.tcl`" in markdown
    assert "hls4ml project for fpga" in render_html(report)
    assert ParityReport.model_validate_json(report.model_dump_json()).hls == [summary]


def test_missing_hls4ml_stops_the_job_before_anything_is_written(
    digits_job: dict[str, Any], write_job: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(toolchain, "PACKAGES", ("hls4ml_is_not_installed", "qonnx"))
    job = write_job(hls_job(digits_job, tmp_path))

    outcome = CliRunner().invoke(app, ["convert", str(job)])

    assert outcome.exit_code == 2, outcome.output
    assert "needs hls4ml_is_not_installed" in outcome.output and "onnxforge[fpga-hls]" in outcome.output
    assert not (tmp_path / "out").exists()


@needs_toolchain
def test_a_partition_the_export_cannot_take_is_refused_clearly(
    digits_job: dict[str, Any], write_job: Any, tmp_path: Path
) -> None:
    # Without MaxPool in the profile the pools fall back: three accelerator segments, not one.
    text = (PROFILES / "dpu-int8.toml").read_text()
    profile = tmp_path / "no-pool.toml"
    profile.write_text(text.replace("[ops.MaxPool]\nkernel_max = 8\nstride_max = 8\npad_max = 7\n", ""))
    job = write_job(hls_job(digits_job, tmp_path, profile=str(profile)))

    outcome = CliRunner().invoke(app, ["convert", str(job)])

    assert outcome.exit_code == 2, outcome.output
    assert "cannot export the accelerator partition to hls4ml" in outcome.output
    assert "3 separate segments" in outcome.output and "set hls = false" in outcome.output
