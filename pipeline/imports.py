"""Resolve "package.module:attribute" specs, searching the job's python_path first."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import JobError


@contextmanager
def search_path(folders: Sequence[Path]) -> Iterator[None]:
    """Put `folders` at the front of ``sys.path`` for the duration of the block, then restore it."""
    saved = list(sys.path)
    sys.path[:0] = [str(folder) for folder in folders]
    try:
        yield
    finally:
        sys.path[:] = saved


def resolve_import(spec: str, folders: Sequence[Path], *, origin: str, key: str) -> Any:
    """Import the object named by "package.module:attribute".

    Args:
        spec: The import spec.
        folders: Folders searched before ``sys.path`` (the job's python_path).
        origin: The job file, for error messages.
        key: The job key holding the spec, for error messages.

    Returns:
        The object the spec names.

    Raises:
        JobError: The module does not import or has no such attribute.
    """
    module_name, _, attribute_path = spec.partition(":")
    with search_path(folders):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise JobError(origin, key, f"importing {module_name!r} failed: {e}") from e
            searched = ", ".join(str(folder) for folder in folders) or "sys.path only"
            raise JobError(
                origin,
                key,
                f"no module named {e.name!r}; expected an importable 'package.module:function' "
                f"(searched first: {searched}; set python_path in the job)",
            ) from e
        except Exception as e:  # any import-time failure is the user's module's
            problem = f"module {module_name!r} raised while importing: {type(e).__name__}: {e}"
            raise JobError(origin, key, problem) from e
    target: Any = module
    for part in attribute_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise JobError(origin, key, f"module {module_name!r} has no attribute {attribute_path!r}") from e
    return target
