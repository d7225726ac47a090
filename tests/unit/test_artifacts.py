"""Unit tests of `pipeline.artifacts`: atomic writes, content hashes and published file modes."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from pipeline.artifacts import FILE_MODE, atomic_path, sha256_file, write_atomic, write_with


class WriterFailed(RuntimeError):
    """Raised by the test writers on purpose."""


def entries(folder: Path) -> list[str]:
    """Every name in `folder`, hidden ones (the temporary files) included."""
    return sorted(os.listdir(folder))


def test_write_atomic_text(tmp_path: Path) -> None:
    target = tmp_path / "report.md"

    write_atomic(target, "héllo\nwörld\n")

    assert target.read_bytes() == "héllo\nwörld\n".encode()
    assert entries(tmp_path) == ["report.md"]


def test_write_atomic_bytes_replaces_old_content(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    write_atomic(target, b"\x00\x01new")

    assert target.read_bytes() == b"\x00\x01new"
    assert entries(tmp_path) == ["model.onnx"]


def test_write_atomic_creates_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "report.json"

    write_atomic(target, "{}")

    assert target.read_text() == "{}"
    assert entries(target.parent) == ["report.json"]


def test_published_file_mode_is_0644(tmp_path: Path) -> None:
    def write_b(path: Path) -> None:
        path.write_bytes(b"b")

    old_umask = os.umask(0o077)  # the mode must not depend on a restrictive umask either
    try:
        write_atomic(tmp_path / "a.txt", "a")
        write_with(tmp_path / "b.bin", write_b)
    finally:
        os.umask(old_umask)

    for name in ("a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == FILE_MODE == 0o644


def test_write_with_passes_a_temp_path_with_the_target_suffix(tmp_path: Path) -> None:
    target = tmp_path / "model.int8.onnx"
    seen: list[Path] = []

    def writer(path: Path) -> None:
        seen.append(path)
        path.write_bytes(b"model")

    write_with(target, writer)

    assert target.read_bytes() == b"model"
    assert seen[0].parent == tmp_path
    assert seen[0] != target
    assert seen[0].suffix == ".onnx"  # writers that pick the format from the suffix still work
    assert not seen[0].exists()
    assert entries(tmp_path) == ["model.int8.onnx"]


def test_write_with_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old content")

    def writer(path: Path) -> None:
        path.write_bytes(b"half-written")
        raise WriterFailed("disk full")

    with pytest.raises(WriterFailed):
        write_with(target, writer)

    assert target.read_bytes() == b"old content"
    assert entries(tmp_path) == ["model.onnx"]


def test_atomic_path_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    with pytest.raises(WriterFailed), atomic_path(target) as temp:
        temp.write_text("new")
        raise WriterFailed("interrupted")

    assert target.read_text() == "old"
    assert entries(tmp_path) == ["report.json"]


def test_atomic_path_failure_without_old_file_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "report.json"

    with pytest.raises(WriterFailed), atomic_path(target) as temp:
        temp.write_text("new")
        raise WriterFailed("interrupted")

    assert entries(tmp_path) == []


def test_atomic_path_success_renames_over_target(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    with atomic_path(target) as temp:
        assert temp.exists()  # created empty, so libraries may open it for update
        temp.write_text("new")
        assert target.read_text() == "old"  # not visible until the block ends

    assert target.read_text() == "new"
    assert entries(tmp_path) == ["report.json"]


@pytest.mark.parametrize("size", [0, 17, (1 << 20) + 3])
def test_sha256_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    payload = os.urandom(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)

    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()
