"""Loading and validating job files, and turning pydantic errors into the job file's terms."""

from __future__ import annotations

import codecs
import difflib
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from pipeline.errors import JobError
from pipeline.job.conversion import ConversionJob


def load_job(path: str | Path, **overrides: Any) -> ConversionJob:
    """Load and validate a job file (TOML).

    Args:
        path: The job file.
        **overrides: Top-level keys replacing the file's values (e.g. ``output_dir``, paths
            relative to the current directory); a table (dict) updates the file's table key by key.

    Returns:
        The validated job, with every relative path resolved against the file's folder.

    Raises:
        JobError: The file is missing, not TOML, or does not validate; the message names the
            file, the key and what was expected.
    """
    job_file = Path(path).resolve()
    text = _job_text(job_file)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        kind = _model_file_kind(job_file, None)
        raise JobError(job_file, "<file>", kind or f"not valid TOML: {e}") from e
    _merge(raw, {key: value for key, value in overrides.items() if value is not None})
    return validate_job(raw, origin=job_file, base_dir=job_file.parent)


def _job_text(job_file: Path) -> str:
    """The job file's text; a model, data or other binary file given instead is named as such.

    Raises:
        JobError: The file is missing, unreadable, binary or too big to be a job file.
    """
    try:
        with job_file.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
            size = job_file.stat().st_size
            data = head + handle.read() if size <= _MAX_JOB_FILE_BYTES else head
    except FileNotFoundError as e:
        raise JobError(job_file, "<file>", "job file not found") from e
    except OSError as e:
        raise JobError(job_file, "<file>", f"cannot read the job file: {e}") from e
    if not _is_text(head):
        raise JobError(job_file, "<file>", _model_file_kind(job_file, data) or _NOT_TEXT)
    if size > _MAX_JOB_FILE_BYTES:
        raise JobError(job_file, "<file>", f"{size} bytes is too big for a job file (a TOML file of settings)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError(job_file, "<file>", _model_file_kind(job_file, data) or f"{_NOT_TEXT} ({e})") from e


# Read to tell a job file from a model or data file; job files are small TOML text.
_SNIFF_BYTES = 64 * 1024
_MAX_JOB_FILE_BYTES = 16 * 2**20
_NOT_TEXT = "this is a binary file, not a job file: a job file is TOML text (UTF-8)"
_WRITE_JOB = "write a job file (TOML) with"


def _is_text(head: bytes) -> bool:
    """UTF-8 text without NUL bytes (a multi-byte character cut at the end of `head` is fine)."""
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _model_file_kind(job_file: Path, head: bytes | None) -> str | None:
    """What to say when a model or data file is given where the job file belongs (None: not one).

    Args:
        job_file: The file given as the job file.
        head: Its first bytes (the whole file when small enough; None: read them here).
    """
    if head is None:
        with job_file.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    name = job_file.name
    if job_file.suffix == ".onnx" or _parses_as_onnx(job_file, head):
        return f'this is an ONNX model, not a job file: {_WRITE_JOB} [model] onnx = "{name}"'
    if head.startswith(b"PK\x03\x04") and job_file.suffix == ".npz":
        return f'this is an .npz of arrays, not a job file: {_WRITE_JOB} [calibration] npz = "{name}"'
    if head.startswith(b"PK\x03\x04"):
        return (
            f"this is a zip archive (a PyTorch .pt / .pt2 file?), not a job file: {_WRITE_JOB} [model] "
            f'exported_program = "{name}" (a torch.export .pt2), or factory = "..." and weights = "{name}"'
        )
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if job_file.suffix == ".safetensors" or (head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < len(head)):
        return (
            f'this is a safetensors file, not a job file: {_WRITE_JOB} [model] factory = "..." and weights = "{name}"'
        )
    return None


def _parses_as_onnx(job_file: Path, head: bytes) -> bool:
    """A binary file that parses as an ONNX model with a graph (when `head` is not the whole file, by name only)."""
    if _is_text(head) or len(head) < job_file.stat().st_size:
        return False
    import onnx  # only on this error path: the job package does not need it otherwise

    model = onnx.ModelProto()
    try:
        model.ParseFromString(head)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, or anything a garbage file triggers
        return False
    return model.ir_version > 0 and model.HasField("graph")


def _merge(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Apply overrides in place; a table given for a table updates it key by key."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            _merge(raw[key], value)
        else:
            raw[key] = value


def validate_job(raw: dict[str, Any], origin: str | Path, base_dir: Path | None = None) -> ConversionJob:
    """Validate a job given as plain data (a parsed TOML table).

    Args:
        raw: The job's keys and values.
        origin: What to name in error messages (the job file).
        base_dir: Folder that relative paths are resolved against (None: the current directory).

    Returns:
        The validated job.

    Raises:
        JobError: The first problem found, naming the key and what was expected.
    """
    try:
        job = ConversionJob.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as e:
        # A misspelt key first: the unknown [calibraton] explains the missing [calibration] it causes.
        errors = sorted(e.errors(include_url=False), key=lambda error: _misspelling(error) is None)
        key, problem = describe_validation_error(errors[0], raw)
        # A value failing a union (int or dim name) yields one error per branch: count keys, not errors.
        others = {describe_validation_error(error, raw)[0] for error in errors[1:]} - {key}
        more = f" (and problems at {', '.join(sorted(others))})" if others else ""
        raise JobError(origin, key, problem + more) from e
    if isinstance(origin, Path):
        job = job.model_copy(update={"source_file": origin})
    return job


def describe_validation_error(error: ErrorDetails, raw: Any) -> tuple[str, str]:
    """Turn one pydantic error into (dotted key, what was expected) in the job file's terms.

    Args:
        error: One error from a `ValidationError`.
        raw: The data that was validated, to tell real keys from pydantic's internal labels.
    """
    kind = error["type"]
    loc = error["loc"]
    key = _dotted_key(loc, raw) or "<job>"
    if kind == "extra_forbidden":
        return key, _unknown_key(error)
    if kind == "missing":
        return key, "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return key, message
    return key, f"{message} (got {error['input']!r})"


def _misspelling(error: ErrorDetails) -> str | None:
    """The allowed key an unknown key most likely misspells (difflib), or None."""
    loc = error["loc"]
    if error["type"] != "extra_forbidden" or not loc:
        return None
    close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(loc[:-1]), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(error: ErrorDetails) -> str:
    """An unknown key or table, with the allowed key it most likely misspells."""
    allowed = ", ".join(sorted(_allowed_keys(error["loc"][:-1])))
    table = isinstance(error["input"], dict)
    meant = _misspelling(error)
    if meant is None:
        guess = ""
    else:
        guess = f"did you mean [{meant}]? " if table else f"did you mean {meant!r}? "
    return f"unknown key{' (a table)' if table else ''}; {guess}expected one of: {allowed}"


def _dotted_key(loc: tuple[int | str, ...], raw: Any) -> str:
    """Follow `loc` through the raw data: a name inside a table is a key (given or defaulted), while
    pydantic's union labels ("str", "int", ...) appear where the data is a value, not a table."""
    parts: list[str] = []
    current = raw
    for item in loc:
        if isinstance(current, dict) and isinstance(item, str):
            parts.append(item)
            current = current.get(item)
        elif isinstance(current, list) and isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            current = current[item] if 0 <= item < len(current) else None
        else:
            break
    return ".".join(parts)


def _allowed_keys(parent_loc: tuple[int | str, ...]) -> list[str]:
    """The keys a section accepts, found by walking the models along `parent_loc`."""
    model: type[BaseModel] = ConversionJob
    for item in parent_loc:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item)
        annotation = field.annotation if field else None
        nested = _model_in(annotation)
        if nested is None:
            return []
        model = nested
    return [name for name, field in model.model_fields.items() if not field.exclude]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def prune_overrides(job_file: Path, ratio: float | None, sparsity: str | None) -> dict[str, object]:
    """The CLI's --prune / --sparsity flags as a [prune] table to merge into the job's (`load_job`).

    Args:
        job_file: The job file, for errors.
        ratio: --prune: the share of channels removed from every prunable layer.
        sparsity: --sparsity: ``N:M`` (e.g. ``2:4``) or ``unstructured:RATIO``.

    Raises:
        JobError: --sparsity is neither form.
    """
    table: dict[str, object] = {}
    if ratio is not None:
        table["structured"] = {"ratio": ratio}
    if sparsity is not None:
        kind, _, value = sparsity.partition(":")
        try:
            if kind == "unstructured":
                table["sparsity"] = {"pattern": "unstructured", "ratio": float(value or 0.5)}
            else:
                table["sparsity"] = {"pattern": "n:m", "n": int(kind), "m": int(value)}
        except ValueError as e:
            raise JobError(
                job_file, "--sparsity", f"expected N:M (e.g. 2:4) or unstructured:RATIO, got {sparsity!r}"
            ) from e
    return {"prune": table} if table else {}
