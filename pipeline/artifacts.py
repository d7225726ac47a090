"""Artifacts: atomic file writes, content hashes, and the job manifest written last."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import StorageError
from pipeline.records import AnyRecord, StageRecord, read_record

_CHUNK = 1 << 20
# mkstemp/mkdtemp create private (0600/0700) entries; published artifacts get the usual modes.
FILE_MODE = 0o644
DIR_MODE = 0o755


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


@contextmanager
def storage_errors(target: Path) -> Iterator[None]:
    """Turn an `OSError` raised in the block (disk full, no permission, read-only) into a
    `StorageError` naming `target` (or the file the error names) and its errno.

    Raises:
        StorageError: The block raised an `OSError` (a `StorageError` passes through unchanged).
    """
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError.from_os_error(e, target) from e


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success fsync it and rename it over `target`.

    Whoever writes to the yielded path can be any library that takes a file name. If the block
    raises, the temporary file is removed and `target` is untouched.

    Raises:
        StorageError: The filesystem refused the write (an `OSError` in the block included).
    """
    with storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        # Keep the suffix: some writers pick the file format from it.
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
        os.close(fd)
        temp = Path(temp_name)
        try:
            yield temp
            with temp.open("rb+") as handle:
                os.fsync(handle.fileno())
            temp.chmod(FILE_MODE)
            os.replace(temp, target)
            fsync_dir(target.parent)
        finally:
            temp.unlink(missing_ok=True)


@contextmanager
def staged_files(target: Path) -> Iterator[Path]:
    """Yield `target`'s path inside a private folder beside it; on success move every file written
    there (the target and its sidecars, e.g. external data) into place, the target last.

    For writers that name companion files after their output (ONNX external data): the names
    inside the files stay right because the files keep their final names. If the block raises,
    the folder is removed and nothing beside `target` changes.

    Raises:
        StorageError: The filesystem refused the write (an `OSError` in the block included).
    """
    with storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            yield folder / target.name
            written = sorted(folder.iterdir(), key=lambda path: path.name == target.name)
            for path in written:
                with path.open("rb+") as handle:
                    os.fsync(handle.fileno())
                path.chmod(FILE_MODE)
                os.replace(path, target.parent / path.name)
            fsync_dir(target.parent)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def write_atomic(target: Path, data: bytes | str) -> None:
    """Write bytes or UTF-8 text to `target` atomically.

    Raises:
        StorageError: The filesystem refused the write.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(target) as temp:
        temp.write_bytes(payload)


def write_with(target: Path, writer: Callable[[Path], None]) -> None:
    """Let `writer(path)` produce `target` atomically (for libraries that save to a file name).

    Raises:
        StorageError: The filesystem refused the write (an `OSError` from `writer` included).
    """
    with atomic_path(target) as temp:
        writer(temp)


RecordT = TypeVar("RecordT", bound=StageRecord)


class Artifact(BaseModel):
    """One file a stage produced, and the stage's typed record of it.

    Attributes:
        stage: The stage that wrote it.
        path: File name relative to the job's output folder.
        sha256: Hex content hash.
        parent_sha256: Hash of the artifact it was derived from (None for the first).
        external_data: External data files beside `path` (name to sha256), for big models.
        targets: The targets whose chain this model belongs to, when a stage wrote one model per
            group of targets (quantize, when the targets' constraints differ); empty: every target.
        record: What the stage recorded (`pipeline.records`); serialised as ``metadata``.
    """

    model_config = ConfigDict(frozen=True, validate_by_name=True, serialize_by_alias=True)

    stage: str
    path: str
    sha256: str
    parent_sha256: str | None = None
    external_data: dict[str, str] = Field(default_factory=dict)
    targets: list[str] = Field(default_factory=list)
    record: AnyRecord | None = Field(default=None, validation_alias="metadata", serialization_alias="metadata")

    @model_validator(mode="before")
    @classmethod
    def _typed_record(cls, data: Any) -> Any:
        """A record read back from JSON (manifest, stage cache) becomes its stage's record type."""
        if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            record = read_record(str(data.get("stage")), data["metadata"])
            if record is not None:
                data = {**data, "metadata": record}
            elif not data["metadata"]:
                data = {**data, "metadata": None}
        return data

    def serves(self, target: str | None) -> bool:
        """Whether this artifact is in `target`'s chain (None: the trunk every target shares)."""
        return not self.targets or (target is not None and target in self.targets)

    @property
    def metadata(self) -> dict[str, Any]:
        """The record as JSON data, as the manifest shows it (empty without a record)."""
        return self.record.model_dump(mode="json") if self.record is not None else {}

    def record_as(self, record_type: type[RecordT]) -> RecordT:
        """The record, checked to be of `record_type`.

        Raises:
            TypeError: The artifact holds another kind of record (a bug in the stage that wrote it).
        """
        if not isinstance(self.record, record_type):
            raise TypeError(f"the {self.stage} artifact holds {type(self.record).__name__}, not {record_type.__name__}")
        return self.record


class StageRun(BaseModel):
    """What the manifest records of one stage run.

    Attributes:
        name: The stage (with its branch, for a branching stage).
        seconds: Wall-clock seconds (0 when skipped or restored).
        artifact: What it wrote; None when skipped.
        restored: Whether the artifact came from the stage cache.
        peak_rss_bytes: The process's peak resident memory during the stage (None when the host
            cannot tell, or the stage did not run).
    """

    name: str
    seconds: float
    artifact: Artifact | None = None
    restored: bool = False
    peak_rss_bytes: int | None = None


class Manifest(BaseModel):
    """The job manifest: written last, so its presence means the output folder is complete.

    Attributes:
        job: The job name.
        job_file: The job file, if the job came from one.
        job_sha256: Hash of the job's validated settings.
        input_hashes: Hash of each input file (weights, data) by role.
        tool_versions: Versions of onnxforge and the libraries that shaped the artifacts.
        stages: Each stage run, in order, with its timing and artifact.
        exporter: Which exporter produced the fp32 model, and why (fallback cause).
        parity: Verdict per comparison ("pass" / "fail").
        verdict: Overall parity verdict.
    """

    schema_version: int = 1
    job: str
    job_file: str | None
    job_sha256: str
    input_hashes: dict[str, str]
    tool_versions: dict[str, str]
    stages: list[StageRun]
    exporter: dict[str, str]
    parity: dict[str, str]
    verdict: str
