"""External data of a user's ONNX model, opened strictly inside the model's own folder.

Every location is a relative path below the folder of the .onnx file: no ``..``, no absolute
path, no symbolic link on the way (each component is opened with ``O_NOFOLLOW`` relative to the
one before), a regular file, every tensor's ``offset + length`` within it. Each data file is
opened once; what is later read (`ExternalData.read`) comes from that same open file, so a
path swapped after the check is never followed.

Problems are raised as `ModelProblem` (the tensor and what is wrong); `pipeline.intake` turns
them into a `JobError` naming the user's file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from types import TracebackType

import onnx

from pipeline.model_checks import ModelProblem, all_tensors, tensor_nbytes

_MOVE_DATA = (
    "keep the data files inside the folder of the .onnx file, e.g. onnx.save_model(model, path, "
    "save_as_external_data=True, location='model.onnx.data')"
)
# os.pread returns at most this much per call on Linux.
_READ_CHUNK = 1 << 30


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor's bytes are stored.

    Attributes:
        tensor: The tensor's name.
        location: The data file, relative to the model's folder, as the model gives it.
        offset: Where the bytes start in the file.
        length: How many bytes (the expected size of the tensor).
    """

    tensor: str
    location: str
    offset: int
    length: int


@dataclass(frozen=True)
class DataFile:
    """One external data file a model uses, as checked.

    Attributes:
        location: Its name relative to the model's folder.
        size: Its size in bytes.
        sha256: The hash of its content.
        tensors: How many tensors are stored in it.
    """

    location: str
    size: int
    sha256: str
    tensors: int


def check_location(tensor: str, location: str) -> tuple[str, ...]:
    """The components of a location that must stay below the model's folder.

    Raises:
        ModelProblem: The location is empty, absolute, or steps out with ``..``.
    """
    where = f"tensor {tensor!r}"
    if not location or "\0" in location:
        raise ModelProblem(where, f"names external data location {location!r}, which is not a file name; {_MOVE_DATA}")
    if location.startswith(("/", "\\")) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        raise ModelProblem(
            where,
            f"names external data location {location!r}, an absolute path outside the model's folder; {_MOVE_DATA}",
        )
    parts = tuple(part for part in location.replace("\\", "/").split("/") if part not in ("", "."))
    if ".." in parts:
        raise ModelProblem(
            where,
            f"names external data location {location!r}, which steps out of the model's folder with '..'; {_MOVE_DATA}",
        )
    if not parts:
        raise ModelProblem(where, f"names external data location {location!r}, which is not a file name; {_MOVE_DATA}")
    return parts


def external_ref(tensor: onnx.TensorProto) -> ExternalRef:
    """Parse a tensor's external data entries (its size comes from its dims and element type).

    Raises:
        ModelProblem: An entry is missing or not a non-negative integer.
    """
    where = f"tensor {tensor.name!r}"
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if "location" not in entries:
        raise ModelProblem(where, "is stored as external data but names no 'location'")
    values: dict[str, int] = {}
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is None:
            continue
        if not text.isdigit():
            raise ModelProblem(where, f"has external data {key} {text!r}, not a non-negative integer")
        values[key] = int(text)
    if tensor.data_type == onnx.TensorProto.STRING:
        raise ModelProblem(where, "is a string tensor stored as external data, which ONNX does not allow")
    expected = tensor_nbytes(tensor)
    length = values.get("length", expected)
    if length is None:
        raise ModelProblem(where, "is stored as external data with no 'length', and its element type has no fixed size")
    if expected is not None and length != expected:
        raise ModelProblem(
            where,
            f"has external data length {length} bytes, but its dims {list(tensor.dims)} and element type "
            f"{onnx.TensorProto.DataType.Name(tensor.data_type)} need {expected}",
        )
    return ExternalRef(tensor.name, entries["location"], values.get("offset", 0), length)


class ExternalData:
    """The checked external data files of one model, open until `close` (a context manager).

    Args:
        folder: The model's own folder: every location is resolved below it.
        hash_files: Hash each file's content as it is opened (`DataFile.sha256`; else empty).
    """

    def __init__(self, folder: Path, hash_files: bool = False) -> None:
        self._folder = folder
        self._hash_files = hash_files
        self._fds: dict[str, int] = {}
        self._files: dict[str, DataFile] = {}

    def __enter__(self) -> ExternalData:
        """Open nothing yet: `add` opens each file as its first tensor names it."""
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Close every file."""
        self.close()

    @property
    def files(self) -> tuple[DataFile, ...]:
        """The data files, in location order."""
        return tuple(self._files[name] for name in sorted(self._files))

    def add(self, tensor: onnx.TensorProto) -> ExternalRef:
        """Check one external tensor: its location, its file (opened once), its bytes' bounds.

        Raises:
            ModelProblem: The location leaves the folder, the file is missing, is a link or not a
                regular file, or the bytes lie past its end.
        """
        given = external_ref(tensor)
        ref = _normalised(given)
        if ref.location not in self._fds:
            self._open(ref)
        file = self._files[ref.location]
        if ref.offset + ref.length > file.size:
            raise ModelProblem(
                f"tensor {ref.tensor!r}",
                f"has external data at offset {ref.offset}, length {ref.length}, past the end of "
                f"{given.location!r} ({file.size} bytes); the data file is truncated or does not belong to this "
                "model",
            )
        self._files[ref.location] = DataFile(file.location, file.size, file.sha256, file.tensors + 1)
        return ref

    def read(self, tensor: onnx.TensorProto) -> bytes:
        """The bytes of an external tensor `add` checked, read from the file it opened.

        Raises:
            ModelProblem: The file ended before the tensor's bytes (it changed since it was checked).
        """
        ref = _normalised(external_ref(tensor))
        fd = self._fds[ref.location]  # KeyError: a tensor `add` never saw, a bug of the caller
        chunks: list[bytes] = []
        done = 0
        while done < ref.length:
            chunk = os.pread(fd, min(ref.length - done, _READ_CHUNK), ref.offset + done)
            if not chunk:
                raise ModelProblem(
                    f"tensor {ref.tensor!r}", f"could not be read: {ref.location!r} ended early (changed meanwhile?)"
                )
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Close every open data file."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _open(self, ref: ExternalRef) -> None:
        fd = _open_below(self._folder, tuple(ref.location.split("/")), ref)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ModelProblem(
                    f"tensor {ref.tensor!r}",
                    f"has external data {ref.location!r} that is not a regular file; {_MOVE_DATA}",
                )
            digest = _sha256_fd(fd, info.st_size) if self._hash_files else ""
        except BaseException:
            os.close(fd)
            raise
        self._fds[ref.location] = fd
        self._files[ref.location] = DataFile(ref.location, info.st_size, digest, 0)


def _normalised(ref: ExternalRef) -> ExternalRef:
    """`ref` with its location checked and written as the folder-relative path it opens."""
    return ExternalRef(ref.tensor, "/".join(check_location(ref.tensor, ref.location)), ref.offset, ref.length)


def _open_below(folder: Path, parts: tuple[str, ...], ref: ExternalRef) -> int:
    """Open `folder/parts...` one component at a time, relative to the one before, never following a
    symbolic link (``O_NOFOLLOW``); a FIFO does not block (``O_NONBLOCK``) and is refused by the caller."""
    directory = _open_component(None, str(folder), os.O_DIRECTORY, ref)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            opened = _open_component(directory, part, os.O_NONBLOCK if last else os.O_DIRECTORY, ref)
            os.close(directory)
            directory = opened
        return directory
    except BaseException:
        os.close(directory)
        raise


def _open_component(directory: int | None, name: str, flags: int, ref: ExternalRef) -> int:
    where = f"tensor {ref.tensor!r}"
    try:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=directory)
    except FileNotFoundError as e:
        raise ModelProblem(
            where,
            f"has its external data in {ref.location!r}, which is missing from the model's folder; copy the file there",
        ) from e
    except OSError as e:  # ELOOP: a link; ENOTDIR: a file where a folder should be; EACCES
        if directory is not None and _is_link(directory, name):
            raise ModelProblem(
                where,
                f"has external data {ref.location!r} behind a symbolic link ({name!r}); onnxforge reads external "
                "data only from real files inside the model's folder: copy the file there (cp -L)",
            ) from e
        raise ModelProblem(
            where, f"has external data {ref.location!r} that cannot be opened ({e.strerror}, errno {e.errno})"
        ) from e


def _is_link(directory: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _sha256_fd(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    done = 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 1 << 24), done)
        if not chunk:
            break
        digest.update(chunk)
        done += len(chunk)
    return digest.hexdigest()


def open_external_data(model: onnx.ModelProto, folder: Path, hash_files: bool = False) -> ExternalData:
    """Check every external tensor of a model (graph-only load) and open its files.

    Args:
        model: The model, loaded without its external data.
        folder: The model's own folder.
        hash_files: Hash each data file's content (`DataFile.sha256`).

    Returns:
        The open files; use as a context manager (or call `close`).

    Raises:
        ModelProblem: See `ExternalData.add`.
    """
    data = ExternalData(folder, hash_files)
    try:
        for tensor in external_tensors(model):
            data.add(tensor)
    except BaseException:
        data.close()
        raise
    return data


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a model (initializers and attributes, subgraphs included) stored externally."""
    return (tensor for tensor in all_tensors(model) if tensor.data_location == onnx.TensorProto.EXTERNAL)


def inline_external_data(model: onnx.ModelProto, data: ExternalData) -> None:
    """Move every external tensor's bytes (read from the checked files) into the model itself."""
    for tensor in external_tensors(model):
        tensor.raw_data = data.read(tensor)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
