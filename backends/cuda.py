"""The CUDA backend: ONNX Runtime's CUDAExecutionProvider, with the CPU provider for leftovers."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from backends.base import Capabilities, QuantizationConstraints
from backends.ort import OrtBackend, SessionOptionsSpec


class CudaOptions(SessionOptionsSpec):
    """CUDA session options.

    Attributes:
        device_id: The GPU to run on.
    """

    device_id: int = Field(default=0, ge=0)


class CudaBackend(OrtBackend):
    """Runs models with ONNX Runtime on an NVIDIA GPU."""

    name = "cuda"
    execution_providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    capabilities = Capabilities(
        dtypes=("float32", "float16", "int8", "int32", "int64", "bool"),
        # GPU int8 kernels take symmetric signed activations.
        quantization=QuantizationConstraints(activation_types=("int8",), symmetric_activations=True),
    )
    options_model = CudaOptions
    install_hint = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (it replaces onnxruntime)"

    def provider_options(self, options: SessionOptionsSpec) -> list[dict[str, Any]]:
        """Pass the device id to the CUDA provider."""
        device_id = options.device_id if isinstance(options, CudaOptions) else 0
        return [{"device_id": str(device_id)}, {}]
