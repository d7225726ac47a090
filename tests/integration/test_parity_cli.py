"""`onnxforge parity A B` and `onnxforge report OUT_DIR` on the digits sample's converted models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from tests.conftest import DIGITS_DIR


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[pipeline.ConversionResult, Path]:
    folder = tmp_path_factory.mktemp("parity")
    # The static recipe only: these tests are about `onnxforge parity`, not the quantize search.
    job = pipeline.load_job(DIGITS_DIR / "job.toml", output_dir=folder / "out", quantize={"recipes": ["static"]})
    result = pipeline.convert(job)
    heldout = np.load(DIGITS_DIR / "data" / "heldout.npz")
    data = folder / "heldout.npz"
    np.savez(data, image=heldout["image"], label=heldout["label"])
    return result, data


def test_parity_passes_and_writes_the_report(converted: tuple[pipeline.ConversionResult, Path], tmp_path: Path) -> None:
    result, data = converted
    fp32, int8 = result.path("simplify"), result.path("quantize")
    run = CliRunner().invoke(
        app, ["parity", str(fp32), str(int8), "--data", str(data), "--labels", "label", "-o", str(tmp_path)]
    )
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "report.json").read_text())
    (comparison,) = report["comparisons"]
    assert comparison["precision"] == "task" and comparison["accuracy"]["candidate"] > 0.97
    assert report["localisations"] == []  # passed, not asked for


def test_failing_gate_exits_1_and_localises(converted: tuple[pipeline.ConversionResult, Path], tmp_path: Path) -> None:
    result, data = converted
    fp32, int8 = result.path("simplify"), result.path("quantize")
    run = CliRunner().invoke(
        app, ["parity", str(fp32), str(int8), "--data", str(data), "--atol", "1e-6", "-o", str(tmp_path)]
    )
    assert run.exit_code == 1, run.output
    assert "error enters first at" in run.output and "dB local SQNR" in run.output
    markdown = (tmp_path / "report.md").read_text()
    assert "## Where the error enters: model.int8.onnx vs model.simplified.onnx" in markdown


def test_bad_inputs_exit_2(converted: tuple[pipeline.ConversionResult, Path], tmp_path: Path) -> None:
    result, data = converted
    fp32 = result.path("simplify")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, pixels=np.zeros((2, 1, 8, 8), np.float32))
    doubles = tmp_path / "doubles.npz"
    np.savez(doubles, image=np.zeros((2, 1, 8, 8), np.float64))
    for args, says in (
        ([str(fp32), str(tmp_path / "missing.onnx"), "--data", str(data)], "model file not found"),
        ([str(fp32), str(fp32), "--data", str(wrong)], "no array named image"),
        ([str(fp32), str(fp32), "--data", str(doubles)], "'image' is float64 with 4 dims"),
        ([str(fp32), str(fp32), "--data", str(data), "--backend-b", "nosuch"], "nosuch"),
    ):
        run = CliRunner().invoke(app, ["parity", *args])
        assert run.exit_code == 2, (args, run.output)
        assert says in " ".join(run.output.split()), (says, run.output)


def test_report_rerenders_markdown(converted: tuple[pipeline.ConversionResult, Path], tmp_path: Path) -> None:
    result, _ = converted
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "report.json").write_text((result.output_dir / "report.json").read_text())
    run = CliRunner().invoke(app, ["report", str(folder)])
    assert run.exit_code == 0, run.output
    assert (folder / "report.md").read_text() == (result.output_dir / "report.md").read_text()
    assert CliRunner().invoke(app, ["report", str(tmp_path / "nothing")]).exit_code == 2
    (folder / "report.json").write_text("{not json")
    assert CliRunner().invoke(app, ["report", str(folder)]).exit_code == 2
