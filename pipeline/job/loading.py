"""Loading and validating job files, and turning pydantic errors into the job file's terms."""

from __future__ import annotations

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
    try:
        raw = tomllib.loads(job_file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise JobError(job_file, "<file>", "job file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(job_file, "<file>", f"cannot read the job file: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise JobError(job_file, "<file>", f"not valid TOML: {e}") from e
    _merge(raw, {key: value for key, value in overrides.items() if value is not None})
    return validate_job(raw, origin=job_file, base_dir=job_file.parent)


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
        errors = e.errors(include_url=False)
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
        allowed = _allowed_keys(loc[:-1])
        return key, f"unknown key; expected one of: {', '.join(sorted(allowed))}"
    if kind == "missing":
        return key, "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return key, message
    return key, f"{message} (got {error['input']!r})"


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
