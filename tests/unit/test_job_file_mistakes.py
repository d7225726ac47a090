"""Common mistakes with the job file, each told plainly (exit 2):

* a model or data file given where the job file belongs (``onnxforge convert model.onnx``) is
  named for what it is, with the job-file line that would use it, instead of a UTF-8 decode error;
* a misspelt table or key (``[calibraton]``) is an unknown key with the name it most likely
  misspells, reported before the errors it causes elsewhere (a missing ``[calibration]``).
"""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import ExitCode, JobError
from pipeline.job import load_job

Raw = dict[str, Any]
WriteJob = Callable[..., Path]


def write_onnx(path: Path, weights: int = 64) -> Path:
    """A small ONNX model with some float weights (bytes that are not UTF-8)."""
    values = np.random.default_rng(0).normal(size=(weights,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [weights])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [weights])],
        initializer=[numpy_helper.from_array(values, "w")],
    )
    onnx.save(helper.make_model(graph), path)
    return path


def refused(path: Path) -> JobError:
    with pytest.raises(JobError) as caught:
        load_job(path)
    assert caught.value.key == "<file>"
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    return caught.value


# ---------------------------------------------------------------- not a job file


def test_an_onnx_model_given_as_the_job_file_is_named_as_such(tmp_path: Path) -> None:
    error = refused(write_onnx(tmp_path / "model.onnx"))

    assert error.problem == (
        'this is an ONNX model, not a job file: write a job file (TOML) with [model] onnx = "model.onnx"'
    )
    assert "utf-8" not in str(error)


def test_an_onnx_model_is_recognised_without_its_suffix(tmp_path: Path) -> None:
    model = write_onnx(tmp_path / "model.onnx", weights=40_000)  # past the first bytes read
    renamed = model.rename(tmp_path / "model.bin")

    assert "this is an ONNX model" in refused(renamed).problem


def test_data_and_pytorch_files_are_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", x=np.ones((2, 2), np.float32))
    assert 'this is an .npz of arrays, not a job file: write a job file (TOML) with [calibration] npz = "data.npz"' == (
        refused(tmp_path / "data.npz").problem
    )

    with zipfile.ZipFile(tmp_path / "model.pt2", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    assert 'exported_program = "model.pt2"' in refused(tmp_path / "model.pt2").problem

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "weights.bin").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\x80\x3f")
    assert 'this is a safetensors file, not a job file: write a job file (TOML) with [model] factory = "..." and ' in (
        refused(tmp_path / "weights.bin").problem
    )


def test_other_binary_files_are_not_text(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_bytes(b"name = \xff\xfe\x00 broken")
    assert refused(tmp_path / "job.toml").problem.startswith(
        "this is a binary file, not a job file: a job file is TOML"
    )


def test_the_cli_says_so_and_exits_2(tmp_path: Path) -> None:
    model = write_onnx(tmp_path / "model.onnx")
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(app, ["convert", str(model)])
    finally:  # `convert` configures logging for the process: put the test's back
        root.handlers[:], _ = saved
        root.setLevel(saved[1])

    assert result.exit_code == 2, result.output
    expected = f'this is an ONNX model, not a job file: write a job file (TOML) with [model] onnx = "{model.name}"'
    assert "".join(expected.split()) in "".join(result.stderr.split())
    assert "codec" not in result.stderr


# ---------------------------------------------------------------- misspelt keys


def test_a_misspelt_table_is_an_unknown_key_with_the_likely_name(digits_job: Raw, write_job: WriteJob) -> None:
    digits_job["calibraton"] = digits_job.pop("calibration")  # [quantize] now has no [calibration] data

    with pytest.raises(JobError) as caught:
        load_job(write_job(digits_job))

    error = caught.value
    assert error.key == "calibraton"
    assert error.problem.startswith("unknown key (a table); did you mean [calibration]? expected one of: calibration,")
    assert error.problem.endswith("(and problems at quantize)")


def test_a_misspelt_key_names_the_likely_key(digits_job: Raw, write_job: WriteJob) -> None:
    digits_job["calibration"]["batch_sise"] = digits_job["calibration"].pop("batch_size")

    with pytest.raises(JobError) as caught:
        load_job(write_job(digits_job))

    assert caught.value.key == "calibration.batch_sise"
    assert caught.value.problem.startswith("unknown key; did you mean 'batch_size'? expected one of: batch_size,")


def test_an_unknown_key_like_no_other_gets_no_guess(digits_job: Raw, write_job: WriteJob) -> None:
    # A regression guard (it passed before): without a likely name the message is as it was.
    digits_job["quantize"]["colour"] = "red"

    with pytest.raises(JobError) as caught:
        load_job(write_job(digits_job))

    assert caught.value.problem.startswith("unknown key; expected one of: ")
    assert "did you mean" not in caught.value.problem


@pytest.mark.parametrize(
    ("output_dir", "expected"),
    [
        ("a" * 300, "longer than the filesystem allows (255 bytes)"),
        ("b" * 200, "the folder name is 200 bytes; onnxforge writes hidden folders named after it"),
    ],
)
def test_an_output_folder_name_too_long_for_its_hidden_siblings_is_a_job_error(
    digits_job: Raw, write_job: WriteJob, output_dir: str, expected: str
) -> None:
    # Before: the name reached the filesystem and an untyped OSError (File name too long) escaped.
    digits_job["output_dir"] = output_dir
    with pytest.raises(JobError) as caught:
        load_job(write_job(digits_job))
    assert caught.value.key == "output_dir"
    assert expected in caught.value.problem
