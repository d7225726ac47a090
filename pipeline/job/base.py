"""What every job section shares: the strict section base, the value types, and path resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo

# "package.module:attribute", the form Python entry points use.
ImportSpec = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][\w.\-]*$", max_length=128)]
DimName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_]\w*$", max_length=64)]
# TOML gives paths as strings: accept those even though every other value is strict.
FilePath = Annotated[Path, Field(strict=False)]
DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]


class Section(BaseModel):
    """Base of every job section: unknown keys are errors, no type coercion ("yes" is no bool),
    values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def resolve_path(path: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the job file's folder (or leave it relative to the cwd).

    Args:
        path: The path as given.
        info: The validation info; its context's ``base_dir`` is the job file's folder.

    Returns:
        The resolved path, or `path` itself when it is absolute or there is no job file.
    """
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None or path.is_absolute():
        return path
    return (Path(base_dir) / path).resolve()


def existing_file(value: Path | None, info: ValidationInfo, expected: str) -> Path | None:
    """Resolve a file path against the job file's folder and check the file is there.

    Args:
        value: The path as given (None: the key is unset).
        info: The validation info (see `resolve_path`).
        expected: What the file should be, for the error message.

    Returns:
        The resolved path, or None when unset.

    Raises:
        ValueError: The file does not exist.
    """
    if value is None:
        return None
    path = resolve_path(value, info)
    if not is_kind(path, "file"):
        raise ValueError(f"file not found: {path} (expected {expected})")
    return path


def is_kind(path: Path, kind: Literal["file", "folder"]) -> bool:
    """Whether `path` is an existing file (or folder).

    Raises:
        ValueError: The path cannot even be looked up (too long, a loop of links, no permission),
            which pathlib would raise as an untyped OSError.
    """
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError as e:
        raise ValueError(f"cannot look up {str(path)[:200]!r}: {e.strerror or e}") from e
