"""Files that would run code when unpickled are refused, and nothing in them runs.

A PyTorch checkpoint that needs code to unpickle, and .pt2 archives with a malicious pickle or
with opaque objects inside, are bad input (exit 2) naming the key; a marker file proves that no
code ran.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import pipeline


class _RunsCode:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(
    digits_job: dict[str, Any], write_job, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"weight": _RunsCode(marker)}, checkpoint)
    factory = "samples.digits_cnn.model:DigitsCNN"
    digits_job["model"] = {"factory": factory, "weights": str(checkpoint), "task": "classification"}
    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(write_job(digits_job))
    assert not marker.exists(), "unpickling ran code"
    error = excinfo.value
    assert error.key == "model.weights"
    assert "needs code to unpickle" in error.problem and "weights_only=True" in error.problem
    assert "safetensors" in error.problem  # says how to convert
    assert not (tmp_path / "out").exists()


def _rewrite_archive(source: Path, target: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            suffix = next((key for key in replace if item.filename.endswith(key)), None)
            new.writestr(item, replace.pop(suffix) if suffix else old.read(item.filename))
        for name, data in replace.items():
            new.writestr(f"digits/{name}", data)


def test_pt2_with_a_malicious_pickle_inside_runs_nothing(
    digits_job: dict[str, Any], write_job, digits_pt2: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt2"
    _rewrite_archive(digits_pt2, evil, {"data/sample_inputs/model.pt": pickle.dumps(_RunsCode(marker))})
    digits_job["model"] = {"exported_program": str(evil)}
    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(write_job(digits_job))
    assert not marker.exists(), "loading the .pt2 ran code"
    assert excinfo.value.key == "model.exported_program"


def test_pt2_with_opaque_objects_is_refused_before_loading(
    digits_job: dict[str, Any], write_job, digits_pt2: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "opaque.pt2"
    _rewrite_archive(digits_pt2, evil, {"data/constants/opaque_obj_0": pickle.dumps(_RunsCode(marker))})
    digits_job["model"] = {"exported_program": str(evil)}
    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(write_job(digits_job))
    assert not marker.exists()
    assert "opaque_obj_0" in excinfo.value.problem and "plain pickle" in excinfo.value.problem
