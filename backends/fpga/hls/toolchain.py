"""What the hls4ml export needs on this machine: the ``fpga-hls`` extra (hls4ml, qonnx) and g++."""

from __future__ import annotations

import importlib.util
import shutil

from backends.errors import BackendError

INSTALL_HINT = "pip install 'onnxforge[fpga-hls]' (hls4ml and qonnx), and g++ (Debian: apt-get install g++)"
# hls4ml's generated build_lib.sh compiles the C simulation with g++ by name.
COMPILER = "g++"
PACKAGES = ("hls4ml", "qonnx")


def missing_tools() -> list[str]:
    """The packages and programs the export needs that this machine lacks (empty: all present)."""
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if shutil.which(COMPILER) is None:
        missing.append(COMPILER)
    return missing


def require_toolchain(backend: str = "fpga") -> None:
    """Check that hls4ml, qonnx and g++ are present.

    Raises:
        BackendError: One of them is missing; the message names what and how to install it.
    """
    missing = missing_tools()
    if missing:
        raise BackendError(
            backend,
            f"hls = true exports an hls4ml project and builds its C simulation, which needs {', '.join(missing)} "
            "(not found on this machine)",
            INSTALL_HINT,
        )
