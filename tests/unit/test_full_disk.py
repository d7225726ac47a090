"""A full disk, a read-only or unwritable folder: a typed `StorageError` (exit 2) naming the path and
the errno, never an untyped `OSError` or an internal error, and no staging folder left behind.

Real small filesystems (a tmpfs, mounted when the test runs as root; skipped otherwise) fill up
at each stage that writes; monkeypatched writes fail at the manifest, the reports and the int8
model. Shape inference for quantization writes nothing beside the model.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pipeline
from pipeline.artifacts import atomic_path, staged_files, write_atomic
from pipeline.errors import ExitCode, StageError, StorageError
from pipeline.quantization import shapes
from pipeline.quantization.shapes import load_with_shapes

FEATURES, HIDDEN, OUTPUTS = 64, 256, 8


def write_model(path: Path) -> Path:
    """y = Relu(x @ W1) @ W2: about 74 KB of weights, so a few hundred KB fill the disk at each stage."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "disk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUTPUTS])],
        initializer=[
            numpy_helper.from_array((rng.normal(size=(FEATURES, HIDDEN)) * 0.1).astype(np.float32), "w1"),
            numpy_helper.from_array((rng.normal(size=(HIDDEN, OUTPUTS)) * 0.1).astype(np.float32), "w2"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    return path


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """The model and its calibration data, in a folder of their own (never on the small disk)."""
    folder = tmp_path / "sources"
    folder.mkdir()
    write_model(folder / "model.onnx")
    np.savez(folder / "calibration.npz", x=np.random.default_rng(1).normal(size=(64, FEATURES)).astype(np.float32))
    return folder


def make_job(sources: Path, output_dir: Path) -> pipeline.ConversionJob:
    return pipeline.validate_job(
        {
            "name": "full_disk",
            "model": {"onnx": str(sources / "model.onnx")},
            "inputs": [{"name": "x", "shape": ["batch", FEATURES]}],
            "calibration": {"npz": str(sources / "calibration.npz"), "batch_size": 16},
            "quantize": {"calibration_cache": False},
            "output_dir": str(output_dir),
        },
        origin="job.toml",
    )


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """A 4 MiB tmpfs; calling the fixture fills it (with a ``filler`` file) to leave about `free` bytes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")

    def leave(free: int) -> Path:
        with (mount / "filler").open("ab") as handle:  # grows the filler: what the disk holds stays
            handle.write(b"\0" * max(free_bytes(mount) - free, 0))
        return mount

    try:
        yield leave
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name != "filler")


# ---------------------------------------------------------------- a real full disk


@pytest.mark.parametrize(
    ("share", "where"),
    [(0.5, "model.fp32.onnx"), (1.5, "model.simplified.onnx"), (2.6, "augmented.onnx")],
    ids=["export", "simplify", "quantize"],
)
def test_a_full_disk_is_a_storage_error_at_every_stage(
    sources: Path, small_disk: Callable[[int], Path], share: float, where: str
) -> None:
    # share: free space as a multiple of the model's size; each fills the disk at a later write.
    # At 2.6, ONNX Runtime's shape inference used to truncate <model>-inferred.onnx silently.
    disk = small_disk(int(share * (sources / "model.onnx").stat().st_size))

    with pytest.raises(StorageError) as caught:
        pipeline.convert(make_job(sources, disk / "out"))

    error = caught.value
    assert error.exit_code == ExitCode.BAD_INPUT
    assert error.errno == errno.ENOSPC
    assert error.path.startswith(str(disk / "out")) and error.path.endswith(where), error.path
    assert "No space left on device (errno 28, ENOSPC)" in str(error)
    assert "free space" in error.hint
    assert leftovers(disk) == [], "the staging folder (or a part of the output) was left behind"


def test_a_full_disk_leaves_the_earlier_output_as_it_was(sources: Path, small_disk: Callable[[int], Path]) -> None:
    disk = small_disk(2**21)
    first = pipeline.convert(make_job(sources, disk / "out"))
    manifest = first.manifest_path.read_bytes()
    small_disk(40_000)  # room for neither a model nor the reports

    with pytest.raises(StorageError):
        pipeline.convert(make_job(sources, disk / "out"))

    assert leftovers(disk) == ["out"]
    assert (disk / "out" / "manifest.json").read_bytes() == manifest


# ---------------------------------------------------------------- monkeypatched failures


def failing_write_bytes(monkeypatch: pytest.MonkeyPatch, name_part: str, code: int) -> None:
    """Path.write_bytes raises OSError(`code`) for files whose name contains `name_part`."""
    original = Path.write_bytes

    def write_bytes(self: Path, data: Any) -> int:
        if name_part in self.name:
            raise OSError(code, os.strerror(code), str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize(
    ("name_part", "code", "final", "hint"),
    [
        (".manifest.", errno.ENOSPC, "manifest.json", "free space"),
        (".report.", errno.EROFS, "report.json", "read-only"),
    ],
)
def test_failed_report_and_manifest_writes_are_storage_errors(
    sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name_part: str, code: int, final: str, hint: str
) -> None:
    failing_write_bytes(monkeypatch, name_part, code)

    with pytest.raises(StorageError) as caught:
        pipeline.convert(make_job(sources, tmp_path / "out"))

    error = caught.value
    assert error.path == str(tmp_path / "out" / final)  # where it was going, not the hidden staging name
    assert error.errno == code and f"errno {code}, {errno.errorcode[code]}" in str(error)
    assert hint in error.hint
    assert [p.name for p in tmp_path.iterdir()] == ["sources"], "staging left behind"


def test_an_unwritable_int8_model_is_a_storage_error(
    sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx_ir

    original = onnx_ir.save

    def save(model: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "model.int8.onnx":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        original(model, path, *args, **kwargs)

    monkeypatch.setattr(onnx_ir, "save", save)

    with pytest.raises(StorageError) as caught:
        pipeline.convert(make_job(sources, tmp_path / "out"))

    assert caught.value.path == str(tmp_path / "out" / "model.int8.onnx")
    assert caught.value.errno == errno.EACCES and "writable" in caught.value.hint


def test_a_stage_that_wraps_a_refused_write_still_reports_the_disk(
    sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.stages import simplify

    def save_model(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(args[1]))

    monkeypatch.setattr(simplify, "save_model", save_model)  # simplify wraps what it raises in a StageError

    with pytest.raises(StorageError) as caught:
        pipeline.convert(make_job(sources, tmp_path / "out"))

    assert isinstance(caught.value.__cause__, StageError)
    assert caught.value.errno == errno.EDQUOT
    assert caught.value.path == str(tmp_path / "out" / "model.simplified.onnx")


# ---------------------------------------------------------------- the write helpers and the error


def test_write_helpers_turn_os_errors_into_storage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    failing_write_bytes(monkeypatch, ".a.", errno.ENOSPC)
    with pytest.raises(StorageError) as caught:
        write_atomic(target, "new")
    assert caught.value.path == str(target) and caught.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]

    for helper_cm in (atomic_path, staged_files):
        with pytest.raises(StorageError) as caught, helper_cm(tmp_path / "b.onnx"):
            raise OSError(errno.EROFS, "Read-only file system")
        assert caught.value.path == str(tmp_path / "b.onnx") and "read-only" in caught.value.hint
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_storage_error_is_typed_and_still_an_os_error() -> None:
    error = StorageError.from_os_error(OSError(errno.ENOSPC, "No space left on device"), Path("/data/out/m.onnx"))
    assert isinstance(error, OSError) and isinstance(error, pipeline.OnnxforgeError)
    assert error.exit_code == ExitCode.BAD_INPUT
    assert str(error) == (
        "cannot write /data/out/m.onnx: No space left on device (errno 28, ENOSPC); to fix: free space "
        "(or quota) on that disk, or set output_dir to a folder on another disk"
    )
    staged = StorageError.while_staging(
        OSError(errno.EACCES, "Permission denied", "/data/.out.staging-x/report.md"),
        Path("/data/.out.staging-x"),
        Path("/data/out"),
    )
    assert staged.path == "/data/out/report.md" and "in the staging folder .out.staging-x beside out" in staged.reason
    assert StorageError.found_in(StageError("simplify", "j", "x")) is None


# ---------------------------------------------------------------- shape inference


def test_shape_inference_writes_nothing_beside_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path / "model.onnx")

    def no_path(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a small model is inferred in memory")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", no_path)
    inferred = load_with_shapes(model)

    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert {vi.name for vi in inferred.graph.value_info} == {"h", "r"}
    assert {p.key: p.value for p in inferred.metadata_props}["onnx.infer"] == "onnxruntime.quant"


def test_a_big_model_is_inferred_in_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path / "model.onnx")
    in_memory = load_with_shapes(model)
    monkeypatch.setattr(shapes, "IN_MEMORY_LIMIT_BYTES", 0)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", None)

    by_path = load_with_shapes(model)

    assert by_path.graph == in_memory.graph
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "tmp"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_truncated_shape_inference_copy_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path / "model.onnx")
    monkeypatch.setattr(shapes, "IN_MEMORY_LIMIT_BYTES", 0)

    def truncating(source: str, target: str, *args: Any, **kwargs: Any) -> None:
        # What ONNX does on a full disk: part of the file, and no error.
        Path(target).write_bytes(Path(source).read_bytes()[:1000])

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", truncating)

    with pytest.raises(StorageError, match="shape inference's copy of the model is incomplete"):
        load_with_shapes(model)
