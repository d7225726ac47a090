"""Versions of onnxforge and the libraries that shape its artifacts, for manifests and cache keys."""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version

_DISTRIBUTIONS = ("onnxforge", "torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy")


@cache
def tool_versions() -> dict[str, str]:
    """Installed versions of the tools in the conversion path (``"not installed"`` if absent)."""
    found = {"python": platform.python_version()}
    for name in _DISTRIBUTIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
