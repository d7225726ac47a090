"""The speed guard as a gate, and the float model shipping where int8 does not pay.

A tiny two-MatMul network at batch 8 spends its time converting to and from int8: its int8 model
is not faster than float on the cpu (the interval says so, or cannot tell). With
``quantize.require_speedup = true`` that fails the job (exit 1, the report written); with
``precisions = ["int8", "fp32"]`` on the target the search may ship the float model instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from tests.unit.test_bad_data import job_dict, samples, write_model


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Any]:
    write_model(tmp_path / "model.onnx")
    np.savez(tmp_path / "calibration.npz", x=samples(32))
    return job_dict(tmp_path)


def test_require_speedup_fails_a_job_whose_int8_model_is_not_faster(tiny: dict[str, Any], tmp_path: Path) -> None:
    tiny["quantize"].update(require_speedup=True, recipes=["static"])
    job = pipeline.validate_job(tiny, origin=tmp_path / "job.toml")

    with pytest.raises(pipeline.ParityError) as caught:
        pipeline.convert(job)

    (speed,) = [line for line in caught.value.failures if line.startswith("speed on cpu")]
    assert "quantize.require_speedup = true" in speed
    assert "float" in speed and "[" in speed  # the measured ratio with its interval
    result = caught.value.result
    assert isinstance(result, pipeline.ConversionResult)
    (check,) = result.report.performance
    assert check.required and check.faster is not True and check.interval is not None
    assert (tmp_path / "out" / "report.json").is_file()  # the evidence is published


def test_the_cli_exits_1_on_the_speed_gate(tiny: dict[str, Any], tmp_path: Path, write_job: Any) -> None:
    tiny["quantize"].update(require_speedup=True, recipes=["static"])
    result = CliRunner().invoke(app, ["convert", str(write_job(tiny))])

    assert result.exit_code == 1, result.output
    assert "speed on cpu" in result.output


def test_with_fp32_allowed_the_target_ships_the_faster_of_int8_and_float(tiny: dict[str, Any], tmp_path: Path) -> None:
    tiny["targets"] = [{"backend": "cpu", "precisions": ["int8", "fp32"]}]
    tiny["quantize"]["recipes"] = ["static"]
    result = pipeline.convert(pipeline.validate_job(tiny, origin=tmp_path / "job.toml"))

    decision = result.report.quantization[0].decision
    assert decision is not None
    assert [c.name for c in decision.candidates] == ["int8 static", "fp32 (the float model)"]
    (summary,) = result.report.summary
    shipped = result.artifact("quantize", "cpu")
    if decision.shipped.startswith("fp32"):  # int8 slower than float beyond the noise: float ships
        assert summary.precision == "fp32" and summary.shipped_model == shipped.path == "model.simplified.onnx"
        assert "quantize" not in {c.stage for c in result.report.comparisons}
        assert result.report.performance == []
    else:  # int8 not slower beyond the noise: the earlier, int8 candidate keeps its place
        assert summary.precision == "int8" and shipped.path == "model.int8.onnx"
    assert result.passed
