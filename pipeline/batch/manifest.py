"""The batch manifest (TOML): defaults merged into every job, jobs inline or as job-file paths."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.batch.base import BatchSettings
from pipeline.errors import JobError
from pipeline.job import ConversionJob, describe_validation_error, validate_job


class BatchManifest(BaseModel):
    """A batch: its settings and its jobs (what `load_manifest` reads, or built in Python).

    Attributes:
        jobs: The jobs, in order (names unique).
        settings: The ``[batch]`` settings (a relative `summary_dir` is relative to the current
            directory here; `load_manifest` has made it relative to the manifest).
        source: The manifest file, when read from one.
    """

    model_config = ConfigDict(frozen=True)

    jobs: list[ConversionJob] = Field(min_length=1)
    settings: BatchSettings = BatchSettings()
    source: Path | None = None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_manifest(path: str | Path) -> BatchManifest:
    """Read a manifest: ``[batch]`` settings, ``[defaults]`` job keys, and ``[[jobs]]``.

    Each ``[[jobs]]`` entry is either ``{ path = "job.toml" }`` (a job file, relative to the
    manifest, with `defaults` under it) or a whole job inline. Inline paths are relative to the
    manifest. Defaults merge table by table, except that a job's ``[model]`` replaces the
    default one.

    Raises:
        JobError: The manifest or one of its jobs is invalid; the key names the job entry.
    """
    manifest = Path(path).resolve()
    try:
        raw = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise JobError(manifest, "<file>", "manifest file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise JobError(manifest, "<file>", f"not valid TOML: {e}") from e
    unknown = set(raw) - {"batch", "defaults", "jobs"}
    if unknown:
        raise JobError(manifest, sorted(unknown)[0], "unknown key; expected one of: batch, defaults, jobs")
    try:
        settings = BatchSettings.model_validate(raw.get("batch", {}))
    except ValidationError as e:
        key, problem = describe_validation_error(e.errors(include_url=False)[0], raw.get("batch", {}))
        raise JobError(manifest, f"batch.{key}", problem) from e
    if not settings.summary_dir.is_absolute():
        settings = settings.model_copy(update={"summary_dir": manifest.parent / settings.summary_dir})
    entries = raw.get("jobs", [])
    if not isinstance(entries, list) or not entries:
        raise JobError(manifest, "jobs", "expected at least one [[jobs]] entry (a job table or { path = ... })")
    defaults = raw.get("defaults", {})
    jobs = [_job(manifest, index, entry, defaults) for index, entry in enumerate(entries)]
    names = [job.name for job in jobs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise JobError(manifest, "jobs", f"job names must be unique; repeated: {duplicates}")
    return BatchManifest(jobs=jobs, settings=settings, source=manifest)


def _with_defaults(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """Defaults under a job, table by table; a job's [model] replaces the default one whole
    (its source keys exclude each other, so merging them would make two sources)."""
    base = {key: value for key, value in defaults.items() if not (key == "model" and "model" in own)}
    return _deep_merge(base, own)


def _job(manifest: Path, index: int, entry: dict[str, Any], defaults: dict[str, Any]) -> ConversionJob:
    if set(entry) == {"path"}:
        job_file = (manifest.parent / entry["path"]).resolve()
        try:
            own = tomllib.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise JobError(manifest, f"jobs[{index}].path", f"cannot read job file {job_file}: {e}") from e
        return validate_job(_with_defaults(defaults, own), origin=job_file, base_dir=job_file.parent)
    try:
        origin = f"{manifest} jobs[{index}]"
        return validate_job(_with_defaults(defaults, entry), origin=origin, base_dir=manifest.parent)
    except JobError as e:
        raise JobError(manifest, f"jobs[{index}].{e.key}", e.problem) from e
