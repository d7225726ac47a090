"""The `onnxforge` command line: exit codes, what it prints, and what it leaves on disk.

Runs `pipeline.cli.app` in-process with typer's `CliRunner`, which captures stdout and stderr
separately. Rich wraps long lines at the console width, so messages are compared with all
whitespace removed (see `flat`).

Two tests convert the real digits sample (a few seconds each): one whose int8 parity gate
cannot pass (exit 1, evidence still written) and one that passes (exit 0, a clean folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime
import pytest
from typer.testing import CliRunner, Result

from pipeline.cli import _QUIET_LOGGERS, app
from tests.conftest import DIGITS_DIR, sample_job, tree

Raw = dict[str, Any]
WriteJob = Callable[..., Path]

ARTIFACTS = {
    "model.fp32.onnx",
    "model.simplified.onnx",
    "model.int8.onnx",
    "report.json",
    "report.md",
    "report.html",
    "manifest.json",
}
CUDA_PRESENT = "CUDAExecutionProvider" in onnxruntime.get_available_providers()


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """`text` without ANSI escapes (rich styles its output when FORCE_COLOR is set)."""
    return ANSI_ESCAPE.sub("", text)


def flat(text: str) -> str:
    """`text` without ANSI escapes or any whitespace, so rich's styling and line wrapping do not matter."""
    return "".join(plain(text).split())


def invoke(*args: str) -> Result:
    """Run ``onnxforge ARGS`` in-process; restore the logging setup `convert` replaces."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_quiet = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, level in saved_quiet.items():
            logging.getLogger(name).setLevel(level)


def test_help_lists_the_commands() -> None:
    result = invoke("--help")

    assert result.exit_code == 0, result.output
    assert "convert" in result.stdout
    assert "backends" in result.stdout


def test_bad_job_exits_2_naming_file_key_and_problem(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["colour"] = "red"
    job_file = write_job(digits_job)

    result = invoke("convert", str(job_file))

    assert result.exit_code == 2, result.output
    err = flat(result.stderr)
    assert flat(f"{job_file}: colour: unknown key; expected one of:") in err
    assert "output_dir" in err
    assert not (tmp_path / "out").exists()


def test_bad_data_exits_2(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    digits_job["inputs"][0]["shape"] = ["batch", 1, 8, 9]
    job_file = write_job(digits_job)

    result = invoke("convert", str(job_file))

    assert result.exit_code == 2, result.output
    assert flat(f"{job_file}: calibration.npz:") in flat(result.stderr)
    assert flat("expected ['batch', 1, 8, 9]") in flat(result.stderr)
    assert tree(tmp_path) == ["job.toml"]


def test_missing_job_file_exits_2(tmp_path: Path) -> None:
    job_file = tmp_path / "missing.toml"

    result = invoke("convert", str(job_file))

    assert result.exit_code == 2, result.output
    assert flat(f"{job_file}: <file>: job file not found") in flat(result.stderr)
    assert tree(tmp_path) == []


def test_backends_lists_cpu_and_cuda() -> None:
    result = invoke("backends")

    assert result.exit_code == 0, result.output
    lines = plain(result.stdout).splitlines()
    rows = {line.split("│")[1].strip(): line for line in lines if line.startswith("│")}
    assert {"cpu", "cuda"} <= set(rows)
    assert "yes" in rows["cpu"]
    assert "CPUExecutionProvider" in rows["cpu"]
    assert "CUDAExecutionProvider" in rows["cuda"]
    assert "ORT contrib ops" in rows["cpu"] and "ORT contrib ops" in rows["cuda"]  # may get BiasGelu
    if CUDA_PRESENT:
        assert "yes" in rows["cuda"]
    else:
        assert "no" in rows["cuda"].split("│")[4]
        out = flat(result.stdout)
        assert flat("cuda unavailable: this onnxruntime build") in out
        assert "noCUDAExecutionProvider" in out  # the reason
        assert flat("to install: pip uninstall -y onnxruntime && pip install onnxruntime-gpu") in out


def test_failing_parity_gate_exits_1_and_keeps_the_evidence(
    digits_job: Raw, write_job: WriteJob, tmp_path: Path
) -> None:
    digits_job["parity"]["int8"].update(min_cosine=1.0, min_snr_db=200.0)
    job_file = write_job(digits_job)
    out = tmp_path / "out"

    result = invoke("convert", str(job_file))

    assert result.exit_code == 1, result.output
    err = flat(result.stderr)
    assert flat("parity gate failed") in err
    assert flat("stage quantize on cpu, output 'logits': snr_db =") in err
    assert flat("policy snr_db >= 200") in err
    assert "FAIL" in result.stdout  # the parity table is printed for the failed run too
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["verdict"] == manifest["verdict"] == "fail"
    assert set(os.listdir(out)) == ARTIFACTS
    assert tree(tmp_path) == sorted(["job.toml", "out/", *(f"out/{name}" for name in ARTIFACTS)])


def test_successful_conversion_exits_0_and_leaves_a_clean_folder(
    digits_job: Raw, write_job: WriteJob, tmp_path: Path
) -> None:
    job_file = write_job(digits_job)
    converted = tmp_path / "converted"

    result = invoke("convert", str(job_file), "-o", str(converted))

    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout
    assert flat(f"wrote {converted}") in flat(result.stdout)
    assert set(os.listdir(converted)) == ARTIFACTS
    # -o replaces the job's output_dir ("out"), and no staging or temp files are left beside it.
    assert tree(tmp_path) == sorted(["job.toml", "converted/", *(f"converted/{name}" for name in ARTIFACTS)])
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["verdict"] == "pass"


@pytest.mark.slow
def test_convert_distils_and_prints_teacher_vs_student(write_job: WriteJob, tmp_path: Path) -> None:
    raw = sample_job(DIGITS_DIR, "job_distilled.toml")
    raw["targets"] = [{"backend": "cpu"}]
    raw["distill"].update(epochs=6, checkpoint_dir=str(tmp_path / "checkpoints"))
    job_file = write_job(raw)

    result = invoke("convert", str(job_file))

    assert result.exit_code == 0, result.output
    assert flat("distilled: parameters 90,250 -> 20,890 (0.23x), held-out accuracy") in flat(result.stdout)
    assert "student.safetensors" in os.listdir(tmp_path / "out_distilled")
