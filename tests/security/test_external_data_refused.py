"""Hostile external data is refused up front (exit 2) and nothing outside the model's folder is read.

Each case puts the model in `<tmp>/model/` and a file with the right bytes outside it: a location
with `../`, an absolute location, a symbolic link (to a file, to a folder), an offset past the end
of the data file, a missing data file. The refusal must be a `JobError` naming the user's model
file and the tensor, raised before any stage (no output, no staging folder), and the outside
file's access time must be unchanged (relatime updates an access time older than the
modification time on any read).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pipeline
from tests.security.models import matmul_model, save_external, set_external_entry, weights, write_job

_OLD_ATIME = 1_000_000.0  # 1970: older than the mtime, so any read moves it


def _outside_file(tmp_path: Path) -> Path:
    """A file outside the model's folder holding exactly W's bytes, with an old access time."""
    outside = tmp_path / "secret" / "outside.bin"
    outside.parent.mkdir()
    outside.write_bytes(weights().tobytes())
    os.utime(outside, (_OLD_ATIME, time.time()))
    return outside


def _atime_is_tracked(tmp_path: Path) -> bool:
    """Whether this filesystem moves an old access time on a read (not mounted noatime)."""
    probe = tmp_path / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (_OLD_ATIME, time.time()))
    probe.read_bytes()
    return os.stat(probe).st_atime != _OLD_ATIME


def _model(tmp_path: Path) -> Path:
    return save_external(matmul_model(), tmp_path / "model" / "model.onnx")


def _parent_relative(tmp_path: Path, outside: Path) -> Path:
    model = _model(tmp_path)
    set_external_entry(model, "W", location="../secret/outside.bin")
    return model


def _absolute(tmp_path: Path, outside: Path) -> Path:
    model = _model(tmp_path)
    set_external_entry(model, "W", location=str(outside))
    return model


def _symlink_to_file(tmp_path: Path, outside: Path) -> Path:
    model = _model(tmp_path)
    (model.parent / "link.bin").symlink_to(outside)
    set_external_entry(model, "W", location="link.bin")
    return model


def _symlink_to_folder(tmp_path: Path, outside: Path) -> Path:
    model = _model(tmp_path)
    (model.parent / "sub").symlink_to(outside.parent, target_is_directory=True)
    set_external_entry(model, "W", location="sub/outside.bin")
    return model


def _offset_past_the_end(tmp_path: Path, outside: Path) -> Path:
    model = _model(tmp_path)
    set_external_entry(model, "W", offset="4096")
    return model


def _length_past_the_end(tmp_path: Path, outside: Path) -> Path:
    model = _model(tmp_path)
    set_external_entry(model, "W", offset="0", length=str(2 * 8192))
    return model


def _missing_data_file(tmp_path: Path, outside: Path) -> Path:
    model = _model(tmp_path)
    (model.parent / "model.onnx.data").unlink()
    return model


CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "parent-relative": (_parent_relative, "'..'"),
    "absolute": (_absolute, "absolute path"),
    "symlink-to-file": (_symlink_to_file, "symbolic link"),
    "symlink-to-folder": (_symlink_to_folder, "symbolic link"),
    "offset-past-end": (_offset_past_the_end, "past the end"),
    "length-past-end": (_length_past_the_end, "length"),
    "missing-file": (_missing_data_file, "missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_external_data_is_refused_before_any_read(case: str, tmp_path: Path) -> None:
    make, expected = CASES[case]
    outside = _outside_file(tmp_path)
    model = make(tmp_path, outside)
    job_file = write_job(tmp_path, model)

    with pytest.raises(pipeline.JobError) as excinfo:
        pipeline.convert(job_file)

    error = excinfo.value
    message = str(error)
    assert error.exit_code == pipeline.ExitCode.BAD_INPUT
    assert error.key == "model.onnx"
    assert str(model) in message, message  # the user's file, never a staging copy
    assert "tensor 'W'" in message, message
    assert expected in message, message
    assert "staging" not in message and ".tmp" not in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "job.toml", "model", "secret"]  # no output
    if _atime_is_tracked(tmp_path):
        assert os.stat(outside).st_atime == _OLD_ATIME, "the file outside the model's folder was read"


def test_hostile_location_exits_2_on_the_command_line(tmp_path: Path) -> None:
    from tests.unit.test_cli import flat, invoke

    model = _parent_relative(tmp_path, _outside_file(tmp_path))
    result = invoke("convert", str(write_job(tmp_path, model)))

    assert result.exit_code == 2, result.output
    assert flat(str(model)) in flat(result.stderr)


def test_data_is_read_from_the_checked_file_not_re_resolved(tmp_path: Path) -> None:
    """A data file swapped for a link to an outside file after the check is never followed."""
    import onnx

    from pipeline.external_data import inline_external_data, open_external_data

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\xff" * 8192)
    model_path = _model(tmp_path)
    proto = onnx.load(str(model_path), load_external_data=False)
    data_file = model_path.parent / "model.onnx.data"
    with open_external_data(proto, model_path.parent) as data:
        data_file.unlink()
        data_file.symlink_to(outside)
        inline_external_data(proto, data)

    assert proto.graph.initializer[0].raw_data == weights().tobytes()


def test_a_fifo_as_data_file_is_refused_without_blocking(tmp_path: Path) -> None:
    model = _model(tmp_path)
    data_file = model.parent / "model.onnx.data"
    data_file.unlink()
    os.mkfifo(data_file)

    with pytest.raises(pipeline.JobError, match="not a regular file"):
        pipeline.convert(write_job(tmp_path, model))
