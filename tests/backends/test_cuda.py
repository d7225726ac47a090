"""Tests of the CUDA backend: options, provider lists, each availability branch, and (on a GPU) real runs.

The availability branches are exercised on any machine by replacing what the check asks (ONNX Runtime's
provider list, the installed wheels, the driver, the probe session). Tests that need a GPU skip with the
backend's own availability reason.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

import backends
from backends import cuda
from backends.base import Availability
from backends.cuda import CUDA, INSTALL_HINT, TENSORRT, CudaBackend, CudaOptions
from backends.errors import BackendError
from backends.ort import OrtBackend, OrtSession, SessionOptionsSpec

CPU = "CPUExecutionProvider"
W = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 1.0, 0.75], [0.1, 0.2, 0.3]], dtype=np.float32)
REAL = cuda.cuda_availability()  # before any test replaces what it asks


@pytest.fixture(autouse=True)
def fresh_availability() -> Iterator[None]:
    """Each test computes availability anew, and leaves no faked result cached for the rest of the suite."""
    cuda.cuda_availability.cache_clear()
    yield
    cuda.cuda_availability.cache_clear()


@pytest.fixture
def backend() -> CudaBackend:
    return CudaBackend()


@pytest.fixture
def matmul_model(tmp_path: Path) -> Path:
    """y = x @ W, x: [batch, 4] float32: one MatMul that no optimisation folds away."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "matmul.onnx"
    onnx.save(model, path)
    return path


def fake_checks(
    monkeypatch: pytest.MonkeyPatch,
    providers: list[str],
    wheels: dict[str, str] | None = None,
    gpu: str = "",
    probe: str = "",
) -> None:
    """Answer the availability check's questions: providers in this build, wheels, driver, probe session."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(ort, "get_ep_devices", lambda: [])
    monkeypatch.setattr(cuda, "_distributions", lambda: dict(wheels or {}))
    monkeypatch.setattr(cuda, "_gpu_problem", lambda: gpu)
    monkeypatch.setattr(cuda, "_probe_problem", lambda: probe)


def fake_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "cuda_availability", lambda: Availability(ok=True))


# Options and providers (pure: no GPU needed)


def test_default_options_ask_for_cuda_then_cpu_on_device_0(backend: CudaBackend) -> None:
    options = CudaOptions()

    assert backend.providers(options) == [CUDA, CPU]
    assert backend.provider_options(options) == [{"device_id": "0"}, {}]


def test_cuda_options_reach_ort_as_its_strings(backend: CudaBackend) -> None:
    options = CudaOptions(
        device_id=1,
        gpu_mem_limit=2 * 1024**3,
        arena_extend_strategy="kSameAsRequested",
        cudnn_conv_algo_search="HEURISTIC",
        do_copy_in_default_stream=False,
        use_tf32=False,
    )

    assert backend.providers(options) == [CUDA, CPU]
    assert backend.provider_options(options) == [
        {
            "device_id": "1",
            "gpu_mem_limit": "2147483648",
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": "0",
            "use_tf32": "0",
        },
        {},
    ]


def test_tensorrt_goes_first_with_its_own_options(backend: CudaBackend) -> None:
    options = CudaOptions(
        device_id=2,
        use_tf32=True,
        tensorrt=True,
        trt_fp16_enable=True,
        trt_int8_enable=False,
        trt_engine_cache_enable=True,
        trt_engine_cache_path="/tmp/engines",
        trt_max_workspace_size=1 << 30,
    )

    providers = backend.providers(options)
    provider_options = backend.provider_options(options)

    assert providers == [TENSORRT, CUDA, CPU]
    assert len(provider_options) == len(providers)
    assert provider_options[0] == {
        "device_id": "2",
        "trt_fp16_enable": "1",
        "trt_int8_enable": "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": "/tmp/engines",
        "trt_max_workspace_size": "1073741824",
    }
    assert provider_options[1] == {"device_id": "2", "use_tf32": "1"}
    assert provider_options[2] == {}


def test_plain_session_options_get_the_cuda_defaults(backend: CudaBackend) -> None:
    options = SessionOptionsSpec(intra_op_threads=2)

    assert backend.providers(options) == [CUDA, CPU]
    assert backend.provider_options(options) == [{"device_id": "0"}, {}]


def test_options_load_from_toml_scalars() -> None:
    raw = tomllib.loads(
        """
        device_id = 1
        gpu_mem_limit = 4294967296
        cudnn_conv_algo_search = "DEFAULT"
        use_tf32 = false
        tensorrt = true
        trt_fp16_enable = true
        """
    )

    options = CudaOptions.model_validate(raw)

    assert options.device_id == 1
    assert options.gpu_mem_limit == 4294967296
    assert options.cudnn_conv_algo_search == "DEFAULT"
    assert options.use_tf32 is False
    assert options.tensorrt and options.trt_fp16_enable
    assert options.arena_extend_strategy is None  # unset: ONNX Runtime's default, not passed


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"no_such_option": 1}, "extra"),
        ({"cudnn_conv_algo_search": "FASTEST"}, "cudnn_conv_algo_search"),
        ({"arena_extend_strategy": "next_power_of_two"}, "arena_extend_strategy"),
        ({"device_id": -1}, "device_id"),
        ({"gpu_mem_limit": 0}, "gpu_mem_limit"),
        ({"trt_fp16_enable": True}, "only apply with tensorrt = true"),
        ({"tensorrt": True, "trt_engine_cache_enable": True}, "needs trt_engine_cache_path"),
    ],
    ids=[
        "unknown",
        "bad-algo-search",
        "bad-arena",
        "negative-device",
        "zero-mem-limit",
        "trt-without",
        "cache-no-path",
    ],
)
def test_bad_options_are_rejected(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        CudaOptions.model_validate(raw)

    assert problem in str(caught.value)


def test_quantization_constraints_are_symmetric_signed_int8_with_per_channel_weights(backend: CudaBackend) -> None:
    constraints = backend.capabilities.quantization

    assert constraints.activation_types == ("int8",)
    assert constraints.symmetric_activations
    assert constraints.per_channel_weights
    assert not constraints.power_of_two_scales


# Availability, one branch at a time


def test_cpu_wheel_says_which_build_and_how_to_swap_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CPU], wheels={"onnxruntime": "1.32.0"}, gpu="must not be asked")

    availability = CudaBackend().availability()

    assert not availability.ok
    assert availability.reason == (
        "this onnxruntime build (onnxruntime 1.32.0) has no CUDAExecutionProvider; it offers CPUExecutionProvider"
    )
    assert availability.hint == INSTALL_HINT
    assert availability.hint.startswith("pip uninstall -y onnxruntime && pip install onnxruntime-gpu")


def test_both_wheels_installed_says_uninstall_both(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CPU], wheels={"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"})

    availability = CudaBackend().availability()

    assert availability.reason.startswith(
        "this onnxruntime build (onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0) has no CUDAExecutionProvider"
    )
    assert availability.hint == "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"


def test_gpu_wheel_without_the_provider_says_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CPU], wheels={"onnxruntime-gpu": "1.32.0"})

    availability = CudaBackend().availability()

    assert availability.reason.startswith(
        "this onnxruntime build (onnxruntime-gpu 1.32.0) has no CUDAExecutionProvider"
    )
    assert availability.hint == "pip install --force-reinstall onnxruntime-gpu"


def test_build_from_no_wheel_still_names_the_missing_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, ["AzureExecutionProvider", CPU], wheels={})

    availability = CudaBackend().availability()

    assert availability.reason == (
        "this onnxruntime build (not from a PyPI wheel) has no CUDAExecutionProvider; "
        "it offers AzureExecutionProvider, CPUExecutionProvider"
    )
    assert availability.hint == INSTALL_HINT


def test_provider_present_but_no_gpu_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CUDA, CPU], gpu="CUDA_VISIBLE_DEVICES='' hides every GPU", probe="must not be asked")

    availability = CudaBackend().availability()

    assert not availability.ok
    assert availability.reason == (
        "CUDAExecutionProvider is present but no GPU is visible: CUDA_VISIBLE_DEVICES='' hides every GPU"
    )
    assert "nvidia-smi" in availability.hint
    assert "CUDA_VISIBLE_DEVICES" in availability.hint


def test_provider_that_fails_to_load_names_the_libraries_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CUDA, CPU], probe="cannot load libcudnn.so.9")
    monkeypatch.setattr(ort, "cuda_version", "12.8", raising=False)

    availability = CudaBackend().availability()

    assert not availability.ok
    assert availability.reason == (
        "CUDAExecutionProvider failed to load, so ONNX Runtime fell back to the CPU: cannot load libcudnn.so.9"
    )
    assert "the CUDA 12.x runtime and cuDNN 9" in availability.hint
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]'" in availability.hint
    assert "onnxruntime.preload_dlls()" in availability.hint


def test_plugin_ep_listed_among_ep_devices_counts_as_present(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CPU], gpu="the NVIDIA driver library libcuda.so.1 cannot be loaded")
    monkeypatch.setattr(ort, "get_ep_devices", lambda: [type("Device", (), {"ep_name": CUDA})()])

    availability = CudaBackend().availability()

    assert availability.reason.startswith("CUDAExecutionProvider is present but no GPU is visible")


def test_available_when_every_check_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CUDA, CPU])

    assert CudaBackend().availability() == Availability(ok=True)


def test_availability_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CUDA, CPU])

    def broken() -> str:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(cuda, "_gpu_problem", broken)

    availability = CudaBackend().availability()

    assert not availability.ok
    assert availability.reason == (
        "could not check whether CUDAExecutionProvider works here: RuntimeError: driver exploded"
    )


def test_availability_is_computed_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_checks(monkeypatch, [CUDA, CPU])
    probes: list[int] = []

    def probe() -> str:
        probes.append(1)
        return ""

    monkeypatch.setattr(cuda, "_probe_problem", probe)

    assert CudaBackend().availability().ok
    assert CudaBackend().availability().ok
    assert len(probes) == 1


def test_real_check_on_a_cpu_build_keeps_the_cli_wording() -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider")

    assert REAL.reason.startswith("this onnxruntime build (")
    assert "has no CUDAExecutionProvider" in REAL.reason
    assert "onnxruntime-gpu" in REAL.hint


# The visible-GPU check and the probe session


class FakeDriver:
    """The two CUDA driver calls the visibility check makes."""

    def __init__(self, init_status: int = 0, devices: int = 1) -> None:
        self.init_status = init_status
        self.devices = devices

    def cuInit(self, flags: int) -> int:  # the driver's name
        return self.init_status

    def cuDeviceGetCount(self, count: Any) -> int:  # the driver's name
        count._obj.value = self.devices  # ctypes.byref(c_int) keeps the c_int as _obj
        return 0


@pytest.mark.parametrize("visible", ["", "-1"])
def test_cuda_visible_devices_can_hide_every_gpu(monkeypatch: pytest.MonkeyPatch, visible: str) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    assert cuda._gpu_problem() == f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"


def test_no_driver_library_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cuda, "_load", lambda library: None)

    assert cuda._gpu_problem() in (
        "the NVIDIA driver library libcuda.so.1 cannot be loaded",
        "the NVIDIA driver library nvcuda.dll cannot be loaded",
    )


@pytest.mark.parametrize(
    ("driver", "problem"),
    [
        (FakeDriver(init_status=100), "the NVIDIA driver finds no usable GPU (CUDA driver error 100)"),
        (FakeDriver(devices=0), "the NVIDIA driver finds no usable GPU (CUDA driver error 0)"),
        (FakeDriver(devices=2), ""),
    ],
    ids=["no-device", "zero-devices", "two-devices"],
)
def test_driver_device_count_decides(monkeypatch: pytest.MonkeyPatch, driver: FakeDriver, problem: str) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(cuda, "_load", lambda library: driver)

    assert cuda._gpu_problem() == problem


def test_probe_that_quietly_lands_on_the_cpu_names_the_missing_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a CPU build ORT drops the CUDA provider with a warning, as it does when CUDA libraries fail to load.
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has the CUDA provider; the probe would really use it")
    monkeypatch.setattr(cuda, "_missing_libraries", lambda: ["libcudart.so.12", "libcudnn.so.9"])

    with pytest.warns(UserWarning):
        problem = cuda._probe_problem()

    assert problem == "cannot load libcudart.so.12, libcudnn.so.9"


def test_probe_that_raises_reports_the_first_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_session(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA failure 35: CUDA driver version is insufficient\n  at cuda_call.cc:123")

    monkeypatch.setattr(ort, "InferenceSession", failing_session)

    assert cuda._probe_problem() == "CUDA failure 35: CUDA driver version is insufficient"


def test_missing_libraries_are_named_by_their_cuda_major(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "cuda_version", "13.0", raising=False)
    monkeypatch.setattr(cuda, "_load", lambda library: None)
    monkeypatch.setattr(cuda.sys, "platform", "linux")

    assert cuda._missing_libraries() == ["libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9"]


# Opening: TensorRT asked for but missing, providers dropped


def test_tensorrt_without_its_provider_raises_backend_error(
    monkeypatch: pytest.MonkeyPatch, backend: CudaBackend, matmul_model: Path
) -> None:
    fake_available(monkeypatch)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    options = CudaOptions(tensorrt=True)

    for attempt in (backend.open, backend.placement):
        with pytest.raises(BackendError) as caught:
            attempt(matmul_model, options)

        assert caught.value.backend == "cuda"
        assert caught.value.reason == "tensorrt = true, but this onnxruntime build has no TensorrtExecutionProvider"
        assert "tensorrt = false" in caught.value.hint


def test_tensorrt_on_an_unavailable_backend_reports_the_basic_problem_first(
    monkeypatch: pytest.MonkeyPatch, backend: CudaBackend, matmul_model: Path
) -> None:
    fake_checks(monkeypatch, [CPU], wheels={"onnxruntime": "1.32.0"})

    with pytest.raises(BackendError) as caught:
        backend.open(matmul_model, CudaOptions(tensorrt=True))

    assert caught.value.reason == backend.availability().reason
    assert caught.value.hint == INSTALL_HINT


def test_a_session_that_lost_the_cuda_provider_is_refused(
    monkeypatch: pytest.MonkeyPatch, backend: CudaBackend, matmul_model: Path
) -> None:
    fake_available(monkeypatch)
    cpu_only = OrtSession(ort.InferenceSession(str(matmul_model), providers=[CPU]))
    monkeypatch.setattr(OrtBackend, "open", lambda self, model, options=None: cpu_only)

    with pytest.raises(BackendError) as caught:
        backend.open(matmul_model)

    assert caught.value.reason == (
        "ONNX Runtime dropped CUDAExecutionProvider for matmul.onnx; it would run on ['CPUExecutionProvider']"
    )
    assert "cuDNN" in caught.value.hint
    with pytest.raises(RuntimeError, match="closed"):
        cpu_only.run({"x": np.ones((1, 4), dtype=np.float32)})


# On a GPU


@pytest.fixture
def gpu(backend: CudaBackend) -> CudaBackend:
    availability = backends.get_backend("cuda").availability()
    if not availability.ok:
        pytest.skip(availability.reason)
    return backend


def test_runs_a_matmul_on_the_gpu(gpu: CudaBackend, matmul_model: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)

    # TF32 off: compare float32 with float32.
    with gpu.open(matmul_model, CudaOptions(use_tf32=False)) as session:
        assert isinstance(session, OrtSession)
        assert session.providers[0] == CUDA
        y = session.run({"x": x})["y"]

    np.testing.assert_allclose(y, x @ W, rtol=1e-5, atol=1e-6)


def test_placement_puts_the_matmul_on_cuda(gpu: CudaBackend, matmul_model: Path) -> None:
    report = gpu.placement(matmul_model)

    assert report.preferred == CUDA
    # ORT may add Memcpy nodes of its own; the MatMul is what must land on the GPU.
    assert [node.device for node in report.nodes if node.op_type == "MatMul"] == [CUDA]
    assert report.fallback_nodes == 0


def test_options_reach_a_real_cuda_session(gpu: CudaBackend, matmul_model: Path) -> None:
    options = CudaOptions(gpu_mem_limit=1 << 30, arena_extend_strategy="kSameAsRequested", use_tf32=False)

    with gpu.open(matmul_model, options) as session:
        assert session.providers[0] == CUDA


def test_a_device_id_beyond_the_gpus_raises_backend_error(gpu: CudaBackend, matmul_model: Path) -> None:
    with pytest.raises(BackendError) as caught:
        gpu.open(matmul_model, CudaOptions(device_id=4096))

    assert caught.value.backend == "cuda"
