"""Bad [distill] settings: each a `JobError` naming the job file and key, raised before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import DIGITS_DIR
from tests.unit.test_job_errors import _no_bytecode, assert_names, convert_fails, user_module, with_user_path

__all__ = ["_no_bytecode", "user_module"]  # fixtures shared with test_job_errors

Raw = dict[str, Any]
WriteJob = Callable[..., Path]


@pytest.fixture
def distill_job(digits_job: Raw) -> Raw:
    """The digits job with a [distill] section (absolute data paths, 2 epochs)."""
    digits_job["distill"] = {
        "student": "samples.digits_cnn.student:build_student",
        "epochs": 2,
        "data": {"npz": str(DIGITS_DIR / "data" / "train.npz"), "labels": "label"},
    }
    return digits_job


def test_distilling_an_onnx_file_is_refused(distill_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    distill_job["model"] = {"onnx": str(model)}
    job_file = write_job(distill_job)
    assert_names(convert_fails(job_file, tmp_path), job_file, "distill", "PyTorch teacher", "model.onnx")


def test_checkpoints_inside_the_output_folder_are_refused(
    distill_job: Raw, write_job: WriteJob, tmp_path: Path
) -> None:
    distill_job["distill"]["checkpoint_dir"] = "out/checkpoints"
    job_file = write_job(distill_job)
    error = convert_fails(job_file, tmp_path)
    assert "checkpoint_dir" in str(error) and "inside output_dir" in str(error)


STUDENT_CASES = [
    ("not-a-module", "def build():\n    return 42\n", "distill.student", ("returned int", "torch.nn.Module")),
    ("factory-raises", "def build():\n    raise RuntimeError('no GPU')\n", "distill.student", ("raised RuntimeError",)),
    (
        "wrong-output-shape",
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))\n",
        "distill.student",
        ("shapes [(32, 5)]", "teacher [(32, 10)]"),
    ),
    (
        "fails-on-the-data",
        "import torch\n\ndef build():\n    return torch.nn.Linear(3, 10)\n",
        "distill.student",
        ("the student failed on a training batch",),
    ),
    (
        "takes-two-inputs",
        "import torch\n\nclass Two(torch.nn.Module):\n    def forward(self, a, b):\n        return a\n\n"
        "def build():\n    return Two()\n",
        "distill.student",
        ("forward takes ['a', 'b']",),
    ),
]


@pytest.mark.parametrize(
    ("source", "key", "expected"), [c[1:] for c in STUDENT_CASES], ids=[c[0] for c in STUDENT_CASES]
)
def test_student_error(
    source: str,
    key: str,
    expected: tuple[str, ...],
    distill_job: Raw,
    write_job: WriteJob,
    user_module: Callable[[str], str],
    tmp_path: Path,
) -> None:
    distill_job["distill"]["student"] = f"{user_module(source)}:build"
    job_file = write_job(with_user_path(distill_job, tmp_path))
    assert_names(convert_fails(job_file, tmp_path), job_file, key, *expected)


def test_kd_needs_a_classifier(distill_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    distill_job["model"]["task"] = "other"
    distill_job.pop("evaluation")  # parity on the (unlabelled) calibration data: not a classifier job
    distill_job["distill"]["loss"] = "kd"
    job_file = write_job(distill_job)
    assert_names(convert_fails(job_file, tmp_path), job_file, "distill.loss", "kd needs a classifier", '"mse"')


def test_training_data_missing(distill_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    distill_job["distill"]["data"]["npz"] = str(tmp_path / "nowhere.npz")
    job_file = write_job(distill_job)
    assert_names(convert_fails(job_file, tmp_path), job_file, "distill.data.npz", "file not found")


def test_training_labels_missing(distill_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    data = tmp_path / "unlabelled.npz"
    np.savez(data, image=np.zeros((8, 1, 8, 8), np.float32))
    distill_job["distill"]["data"]["npz"] = str(data)
    job_file = write_job(distill_job)
    assert_names(convert_fails(job_file, tmp_path), job_file, "distill.data.npz", "labels 'label' are nothing")


def test_bad_temperature(distill_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    distill_job["distill"]["temperature"] = 0
    job_file = write_job(distill_job)
    assert_names(convert_fails(job_file, tmp_path), job_file, "distill.temperature", "greater than 0")
