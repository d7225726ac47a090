"""The CPU backend: ONNX Runtime's CPUExecutionProvider."""

from __future__ import annotations

from backends.base import Capabilities, QuantizationConstraints
from backends.ort import OrtBackend


class CpuBackend(OrtBackend):
    """Runs models with ONNX Runtime on the CPU; always available."""

    name = "cpu"
    execution_providers = ("CPUExecutionProvider",)
    capabilities = Capabilities(
        dtypes=("float32", "float16", "int8", "uint8", "int32", "int64", "bool"),
        quantization=QuantizationConstraints(dynamic_int8=True),
        contrib_ops=True,
    )
    install_hint = "pip install onnxruntime"
