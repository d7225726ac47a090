"""The CUDA backend: ONNX Runtime's CUDA provider (TensorRT's first, on request), the CPU provider for leftovers."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, Self

import onnx.parser
import onnxruntime as ort
from pydantic import BaseModel, Field, model_validator

from backends.base import Availability, Capabilities, PlacementReport, QuantizationConstraints
from backends.errors import BackendError
from backends.ort import OrtBackend, OrtSession, SessionOptionsSpec

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
INSTALL_HINT = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (it replaces onnxruntime)"
GPU_HINT = (
    "onnxruntime-gpu needs a visible NVIDIA GPU and driver: check that nvidia-smi lists one, that "
    "CUDA_VISIBLE_DEVICES is unset or names it, and that containers get it (docker run --gpus all)"
)
_PROBE = '<ir_version: 9, opset_import: ["" : 17]> probe (float[1] x) => (float[1] y) { y = Relu(x) }'


class CudaOptions(SessionOptionsSpec):
    """CUDA session options; those left unset (None) keep ONNX Runtime's own default.

    Field names are ONNX Runtime's provider option names (onnxruntime/core/providers/cuda/
    cuda_execution_provider_info.cc and .../tensorrt/tensorrt_execution_provider_info.cc).

    Attributes:
        device_id: The GPU to run on, in CUDA's numbering (after CUDA_VISIBLE_DEVICES).
        gpu_mem_limit: Cap on the CUDA memory arena in bytes (ORT: no cap).
        arena_extend_strategy: How the arena grows (ORT: kNextPowerOfTwo).
        cudnn_conv_algo_search: How cuDNN picks convolution algorithms (ORT: EXHAUSTIVE).
        do_copy_in_default_stream: Copy on the compute stream (ORT: true).
        use_tf32: TF32 float32 MatMul/Conv on Ampere and newer (ORT: true); false keeps fp32 parity tight.
        tensorrt: Put TensorRT's provider first; CUDA, then the CPU, take what it leaves.
        trt_fp16_enable: Let TensorRT run layers in float16 (ORT: false).
        trt_int8_enable: Let TensorRT run layers in int8 (ORT: false).
        trt_engine_cache_enable: Keep built engines on disk; needs trt_engine_cache_path (ORT: false).
        trt_engine_cache_path: Folder for the engine cache.
        trt_max_workspace_size: TensorRT's workspace limit in bytes.
    """

    device_id: int = Field(default=0, ge=0)
    gpu_mem_limit: int | None = Field(default=None, gt=0)
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] | None = None
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] | None = None
    do_copy_in_default_stream: bool | None = None
    use_tf32: bool | None = None
    tensorrt: bool = False
    trt_fp16_enable: bool | None = None
    trt_int8_enable: bool | None = None
    trt_engine_cache_enable: bool | None = None
    trt_engine_cache_path: str | None = None
    trt_max_workspace_size: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _tensorrt_options_need_tensorrt(self) -> Self:
        given = [name for name in _TRT_OPTIONS if getattr(self, name) is not None]
        if given and not self.tensorrt:
            raise ValueError(f"{', '.join(given)} only apply with tensorrt = true")
        # Without a path TensorRT's provider writes its engines into the current directory.
        if self.trt_engine_cache_enable and not self.trt_engine_cache_path:
            raise ValueError("trt_engine_cache_enable needs trt_engine_cache_path")
        return self


_OWN = [name for name in CudaOptions.model_fields if name not in SessionOptionsSpec.model_fields]
_TRT_OPTIONS = tuple(name for name in _OWN if name.startswith("trt_"))
_CUDA_OPTIONS = tuple(name for name in _OWN if name not in {"device_id", "tensorrt", *_TRT_OPTIONS})


def _as_cuda(options: BaseModel | None) -> CudaOptions:
    return options if isinstance(options, CudaOptions) else CudaOptions()


def _ort_options(spec: CudaOptions, names: tuple[str, ...]) -> dict[str, Any]:
    """The options ORT gets for one provider: the device, and only what the job set (as ORT's strings)."""
    chosen = {name: getattr(spec, name) for name in names}
    # ORT parses every value from a string and reads booleans as "1"/"0".
    given = {name: str(int(v)) if isinstance(v, bool) else str(v) for name, v in chosen.items() if v is not None}
    return {"device_id": str(spec.device_id)} | given


def _distributions() -> dict[str, str]:
    """The onnxruntime wheels installed, name to version (both write the same `onnxruntime` folder)."""
    found = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _no_provider() -> Availability:
    """This onnxruntime build lacks the CUDA provider: say which wheel it came from and how to swap it."""
    installed = _distributions()
    wheels = " and ".join(f"{name} {release}" for name, release in installed.items()) or "not from a PyPI wheel"
    reason = f"this onnxruntime build ({wheels}) has no {CUDA}; it offers {', '.join(ort.get_available_providers())}"
    if len(installed) == 2:  # the CPU wheel was installed last and its files won
        return Availability(
            False, reason, "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    if "onnxruntime-gpu" in installed:
        return Availability(False, reason, "pip install --force-reinstall onnxruntime-gpu")
    return Availability(False, reason, INSTALL_HINT)


def _load(library: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(library)
    except OSError:
        return None


def _gpu_problem() -> str:
    """Why the NVIDIA driver shows this process no GPU, or "" when it shows one.

    Asks the driver API itself: it honours CUDA_VISIBLE_DEVICES and works where /dev/nvidia* is absent
    (WSL) or nvidia-smi is not installed. cuInit runs in this process; batch workers are spawned, not forked.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    library = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    if (driver := _load(library)) is None:
        return f"the NVIDIA driver library {library} cannot be loaded"
    count = ctypes.c_int(0)
    status = driver.cuInit(0) or driver.cuDeviceGetCount(ctypes.byref(count))
    return f"the NVIDIA driver finds no usable GPU (CUDA driver error {status})" if status or not count.value else ""


def _cuda_major() -> str:
    return (getattr(ort, "cuda_version", "") or "12").split(".")[0]


def _missing_libraries() -> list[str]:
    """The CUDA / cuDNN libraries (cuDNN 9 since ORT 1.19) that the dynamic loader cannot find."""
    major = _cuda_major()
    names = [f"libcudart.so.{major}", f"libcublasLt.so.{major}", "libcudnn.so.9"]
    if sys.platform == "win32":
        names = [f"cudart64_{major}.dll", f"cublasLt64_{major}.dll", "cudnn64_9.dll"]
    return [name for name in names if _load(name) is None]


def _probe_problem() -> str:
    """Why a real session does not get the CUDA provider, or "" when it does.

    When CUDA or cuDNN libraries fail to load, ORT logs it and quietly runs on the CPU, so only the
    providers of a live session tell.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = onnx.parser.parse_model(_PROBE).SerializeToString()
    try:
        # enable_fallback=0: raise the provider's error instead of printing it and retrying on the CPU.
        session = ort.InferenceSession(model, options, providers=[CUDA], enable_fallback=0)
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated exception types
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    if CUDA in session.get_providers():
        return ""
    return f"cannot load {', '.join(_missing_libraries()) or 'a CUDA or cuDNN library (see ONNX Runtime log)'}"


def _libraries_hint() -> str:
    return (
        f"onnxruntime-gpu {ort.__version__} needs the CUDA {_cuda_major()}.x runtime and cuDNN 9: "
        "pip install 'onnxruntime-gpu[cuda,cudnn]' and call onnxruntime.preload_dlls() (or import torch first), "
        "or put the system CUDA and cuDNN libraries on LD_LIBRARY_PATH"
    )


@functools.cache
def cuda_availability() -> Availability:
    """Whether ONNX Runtime can run on an NVIDIA GPU here and, if not, exactly why; checked once per process."""
    try:
        # A CUDA plugin EP (ORT's newer packaging) is listed among the EP devices rather than the providers.
        if CUDA not in ort.get_available_providers() and all(d.ep_name != CUDA for d in ort.get_ep_devices()):
            return _no_provider()
        if gpu := _gpu_problem():
            return Availability(False, f"{CUDA} is present but no GPU is visible: {gpu}", GPU_HINT)
        if failure := _probe_problem():
            reason = f"{CUDA} failed to load, so ONNX Runtime fell back to the CPU: {failure}"
            return Availability(False, reason, _libraries_hint())
    except Exception as e:  # noqa: BLE001 - availability reports, it never raises
        return Availability(False, f"could not check whether {CUDA} works here: {type(e).__name__}: {e}")
    return Availability(ok=True)


class CudaBackend(OrtBackend):
    """Runs models with ONNX Runtime on an NVIDIA GPU."""

    name = "cuda"
    execution_providers = (CUDA, "CPUExecutionProvider")
    capabilities = Capabilities(
        dtypes=("float32", "float16", "int8", "int32", "int64", "bool"),
        # TensorRT quantizes symmetrically with signed int8 and takes per-channel weight scales
        # (docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html); the CUDA
        # provider's Q/DQ kernels take per-axis scales too (onnxruntime/core/providers/cuda/tensor/quantize_linear.cc).
        quantization=QuantizationConstraints(activation_types=("int8",), symmetric_activations=True),
        contrib_ops=True,
    )
    options_model = CudaOptions
    install_hint = INSTALL_HINT

    def availability(self) -> Availability:
        """Which of: no CUDA provider in this build, no visible GPU, or the provider failing to load."""
        return cuda_availability()

    def providers(self, options: SessionOptionsSpec) -> list[str]:
        """TensorRT's provider first when asked for, then CUDA's, then the CPU's."""
        return [TENSORRT, *self.execution_providers] if _as_cuda(options).tensorrt else list(self.execution_providers)

    def provider_options(self, options: SessionOptionsSpec) -> list[dict[str, Any]]:
        """Per provider, in `providers(options)` order: the device id and the options the job set."""
        spec = _as_cuda(options)
        cuda = [_ort_options(spec, _CUDA_OPTIONS), {}]
        return [_ort_options(spec, _TRT_OPTIONS), *cuda] if spec.tensorrt else cuda

    def open(self, model: Path, options: BaseModel | None = None) -> OrtSession:
        """Open `model`, refusing a session that lost a GPU provider (ORT would quietly use the CPU).

        Raises:
            BackendError: Unavailable here, TensorRT asked for but missing, or a GPU provider dropped.
        """
        spec = self._spec(options)
        self._require_tensorrt(spec)
        session = super().open(model, spec)
        dropped = [provider for provider in self.providers(spec)[:-1] if provider not in session.providers]
        if dropped:
            reason = f"ONNX Runtime dropped {', '.join(dropped)} for {model.name}; it would run on {session.providers}"
            session.close()
            trt_hint = "install the TensorRT libraries this onnxruntime-gpu build needs, or set tensorrt = false"
            raise BackendError(self.name, reason, trt_hint if TENSORRT in dropped else _libraries_hint())
        return session

    def placement(self, model: Path, options: BaseModel | None = None) -> PlacementReport:
        """Which provider ONNX Runtime assigns each node to (see `OrtBackend.placement`)."""
        self._require_tensorrt(options)
        return super().placement(model, options)

    def _require_tensorrt(self, options: BaseModel | None) -> None:
        """Refuse tensorrt = true on a build without TensorRT's provider, which ORT would skip with a warning."""
        if not _as_cuda(options).tensorrt or TENSORRT in ort.get_available_providers():
            return
        availability = self.availability()
        if not availability.ok:  # the more basic problem first
            raise BackendError(self.name, availability.reason, availability.hint)
        hint = "use the PyPI onnxruntime-gpu wheel, which ships TensorRT's provider, or set tensorrt = false"
        raise BackendError(self.name, f"tensorrt = true, but this onnxruntime build has no {TENSORRT}", hint)
