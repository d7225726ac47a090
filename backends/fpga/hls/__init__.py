"""hls4ml export of the FPGA-style target's accelerator partition (the optional ``fpga-hls`` extra).

`export_hls_project` writes the partition of an int8 model as a QONNX model with power-of-two
scales (`qonnx_export`), converts it with hls4ml into a Vitis HLS project whose fixed-point types
follow from those scales and the profile (`project`), compiles the project's C simulation with
g++ and compares it with the emulator and with ONNX Runtime's CPU QDQ (`compare`). hls4ml and
qonnx are imported only when a project is built; `missing_tools` says what this machine lacks.
"""

from backends.fpga.hls.export import QONNX_FILE, README, export_hls_project
from backends.fpga.hls.project import HlsSettings
from backends.fpga.hls.qonnx_export import EXPORTABLE_OPS, QonnxPartition, export_qonnx
from backends.fpga.hls.results import HlsBuild, HlsLayer, IntegerComparison
from backends.fpga.hls.toolchain import INSTALL_HINT, missing_tools, require_toolchain

__all__ = [
    "EXPORTABLE_OPS",
    "INSTALL_HINT",
    "QONNX_FILE",
    "README",
    "HlsBuild",
    "HlsLayer",
    "HlsSettings",
    "IntegerComparison",
    "QonnxPartition",
    "export_hls_project",
    "export_qonnx",
    "missing_tools",
    "require_toolchain",
]
