"""The backend contract: every registered backend, built-in or plugin, must pass these tests.

The suite is parametrised over `backends.list_backends()` at collection time, so an installed
plugin is checked too. Backends that cannot run on this machine are skipped with their reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

import backends
from backends.base import Capabilities, PlacementReport, QuantizationConstraints
from backends.errors import BackendError
from backends.fpga import FpgaOptions
from backends.fpga.session import FpgaSession

ENTRIES = {entry.name: entry for entry in backends.list_backends()}

W = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 1.0, 0.75], [0.1, 0.2, 0.3]], dtype=np.float32)
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def write_tiny_model(path: Path) -> Path:
    """y = Relu(x @ W + b), x: [batch, 4] float32, y: [batch, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


# The QDQ model: y = Q/DQ(Q/DQ(x) @ DQ(W_Q)), int8 with power-of-two scales (input 2^-5, weight
# 2^-7, output 2^-4), so an int8 accelerator takes the MatMul. |W_Q| <= 64 keeps every pair of
# products within int16, so x86 int8 kernels without VNNI (which saturate pairs in int16) are exact.
W_Q = np.array([[37, -64, 5], [-12, 63, 20], [64, -1, -33], [7, 18, -50]], dtype=np.int8)
QDQ_FRACS = (5, 7, 4)


def write_tiny_qdq_model(path: Path) -> Path:
    """The QDQ model above: x: [batch, 4] float32 -> y: [batch, 3] float32, int8 in between."""
    f_in, f_w, f_out = QDQ_FRACS

    def scale(name: str, frac_bits: int) -> list[onnx.TensorProto]:
        return [
            numpy_helper.from_array(np.array(2.0**-frac_bits, dtype=np.float32), f"{name}_s"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), f"{name}_z"),
        ]

    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_d"]),
            helper.make_node("DequantizeLinear", ["W_q", "W_s", "W_z"], ["W_d"]),
            helper.make_node("MatMul", ["x_d", "W_d"], ["xw"], name="matmul"),
            helper.make_node("QuantizeLinear", ["xw", "y_s", "y_z"], ["y_q"]),
            helper.make_node("DequantizeLinear", ["y_q", "y_s", "y_z"], ["y"]),
        ],
        "tiny_qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(W_Q, "W_q"),
            *scale("x", f_in),
            *scale("W", f_w),
            *scale("y", f_out),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def qdq_reference(x: np.ndarray) -> np.ndarray:
    """The QDQ model in exact integer arithmetic, rounding half to even as QuantizeLinear does."""
    f_in, f_w, f_out = QDQ_FRACS
    x_q = np.clip(np.rint(x.astype(np.float64) * 2.0**f_in), -128, 127).astype(np.int64)
    accumulator = x_q @ W_Q.astype(np.int64)  # at scale 2^-(f_in + f_w)
    y_q = np.clip(np.rint(accumulator * 2.0 ** (f_out - f_in - f_w)), -128, 127)
    return (y_q * 2.0**-f_out).astype(np.float32)


@pytest.fixture(params=sorted(ENTRIES), ids=str)
def backend(request: pytest.FixtureRequest) -> backends.Backend:
    """Each registered backend that is available here (the others are skipped with their reason)."""
    entry = ENTRIES[request.param]
    if not entry.availability.ok:
        pytest.skip(entry.availability.reason)
    assert entry.backend is not None
    return entry.backend


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny.onnx")


@pytest.fixture
def qdq_model(tmp_path: Path) -> Path:
    return write_tiny_qdq_model(tmp_path / "tiny_qdq.onnx")


@pytest.fixture(params=["float", "qdq"])
def any_model(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The float model and the QDQ model (which runs on the FPGA backend's partitioned session)."""
    if request.param == "float":
        return write_tiny_model(tmp_path / "tiny.onnx")
    return write_tiny_qdq_model(tmp_path / "tiny_qdq.onnx")


def test_registry_lists_the_builtins() -> None:
    assert {"cpu", "cuda", "fpga"} <= set(ENTRIES)
    assert ENTRIES["cpu"].origin == "builtin"
    assert ENTRIES["cpu"].availability.ok


def test_unavailable_backends_say_why() -> None:
    for entry in ENTRIES.values():
        if not entry.availability.ok:
            assert entry.availability.reason, entry.name


def test_satisfies_the_protocol(backend: backends.Backend) -> None:
    assert isinstance(backend, backends.Backend)


def test_describes_itself(backend: backends.Backend) -> None:
    entry = ENTRIES[backend.name]
    assert backend.name == entry.name
    assert isinstance(backend.execution_providers, tuple) and backend.execution_providers
    assert all(isinstance(provider, str) and provider for provider in backend.execution_providers)
    assert isinstance(backend.capabilities, Capabilities)
    assert "float32" in backend.capabilities.dtypes
    quantization = backend.capabilities.quantization
    assert isinstance(quantization, QuantizationConstraints)
    assert quantization.activation_types
    assert set(quantization.activation_types) <= {"uint8", "int8"}


def test_availability_is_ok(backend: backends.Backend) -> None:
    availability = backend.availability()

    assert availability.ok
    assert availability.reason == ""


def test_runs_a_model(backend: backends.Backend, tiny_model: Path) -> None:
    rng = np.random.default_rng(0)

    with backend.open(tiny_model) as session:
        assert isinstance(session, backends.Session)
        assert session.input_names == ["x"]
        assert session.output_names == ["y"]
        for batch in (5, 1, 7):  # the batch axis is dynamic
            x = rng.normal(size=(batch, 4)).astype(np.float32)
            outputs = session.run({"x": x})
            assert set(outputs) == {"y"}
            assert outputs["y"].shape == (batch, 3)
            assert outputs["y"].dtype == np.float32
            np.testing.assert_allclose(outputs["y"], np.maximum(x @ W + B, 0.0), rtol=1e-5, atol=1e-6)


def test_runs_a_qdq_model(backend: backends.Backend, qdq_model: Path) -> None:
    rng = np.random.default_rng(1)

    with backend.open(qdq_model) as session:
        assert isinstance(session, backends.Session)
        assert session.input_names == ["x"]
        assert session.output_names == ["y"]
        for batch in (6, 1):
            x = rng.uniform(-4.5, 4.5, size=(batch, 4)).astype(np.float32)  # saturates some inputs
            y = session.run({"x": x})["y"]
            assert y.shape == (batch, 3)
            assert y.dtype == np.float32
            np.testing.assert_array_equal(y, qdq_reference(x))


def test_the_qdq_model_runs_on_the_fpga_session(qdq_model: Path) -> None:
    """Guard: the QDQ model really puts the FPGA backend's own session through this suite."""
    fpga = ENTRIES["fpga"].backend
    assert fpga is not None

    with fpga.open(qdq_model, FpgaOptions(execution="emulator")) as session:
        assert isinstance(session, FpgaSession)
    assert fpga.placement(qdq_model, FpgaOptions(execution="emulator")).fallback_nodes == 0


BAD_FEEDS = {
    "missing input": ({}, ("'x'", "missing")),
    "unknown name": (
        {"x": np.ones((2, 4), np.float32), "extra": np.ones((2, 4), np.float32)},
        ("'extra'", "the model's inputs are: x"),
    ),
    "wrong dtype": ({"x": np.ones((2, 4), np.float64)}, ("'x'", "float64", "expected float32")),
    "wrong rank": ({"x": np.ones((2, 1, 4), np.float32)}, ("'x'", "rank 3", "expected float32, rank 2")),
    "not an array": ({"x": [[1.0, 2.0, 3.0, 4.0]]}, ("'x'", "list", "numpy array")),
}


@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
def test_bad_feeds_raise_backend_error_naming_the_input(backend: backends.Backend, any_model: Path, case: str) -> None:
    feeds, phrases = BAD_FEEDS[case]

    with backend.open(any_model) as session:
        with pytest.raises(BackendError) as caught:
            session.run(feeds)  # type: ignore[arg-type]
        y = session.run({"x": np.ones((2, 4), np.float32)})["y"]  # the session still works

    assert caught.value.backend == backend.name
    for phrase in phrases:
        assert phrase in str(caught.value), str(caught.value)
    assert y.shape == (2, 3)


def test_use_after_close_raises_backend_error(backend: backends.Backend, any_model: Path) -> None:
    x = np.ones((2, 4), np.float32)
    with backend.open(any_model) as session:
        session.run({"x": x})

    with pytest.raises(BackendError, match="closed") as caught:
        session.run({"x": x})

    assert caught.value.backend == backend.name


def test_runs_with_explicit_default_options(backend: backends.Backend, tiny_model: Path) -> None:
    x = np.ones((2, 4), dtype=np.float32)

    with backend.open(tiny_model, backend.options_model()) as session:
        y = session.run({"x": x})["y"]

    np.testing.assert_allclose(y, np.maximum(x @ W + B, 0.0), rtol=1e-5, atol=1e-6)


def test_options_model_defaults_validate_and_unknown_options_are_rejected(backend: backends.Backend) -> None:
    defaults = backend.options_model.model_validate({})
    assert isinstance(defaults, backend.options_model)

    with pytest.raises(ValidationError):
        backend.options_model.model_validate({"no_such_option": 1})


def test_corrupt_model_raises_backend_error_naming_the_backend(backend: backends.Backend, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not an ONNX protobuf\xff\xfe")

    with pytest.raises(BackendError) as caught:
        backend.open(corrupt)

    assert caught.value.backend == backend.name
    assert repr(backend.name) in str(caught.value)
    assert caught.value.reason


def test_missing_model_raises_backend_error(backend: backends.Backend, tmp_path: Path) -> None:
    with pytest.raises(BackendError) as caught:
        backend.open(tmp_path / "missing.onnx")

    assert caught.value.backend == backend.name


def test_opening_on_unavailable_cuda_raises_with_install_hint(tiny_model: Path) -> None:
    cuda = backends.get_backend("cuda")
    if cuda.availability().ok:
        pytest.skip("CUDA is available here; the unavailable path cannot be exercised")

    with pytest.raises(BackendError) as caught:
        cuda.open(tiny_model)

    error = caught.value
    assert error.backend == "cuda"
    assert "CUDAExecutionProvider" in error.reason
    assert error.reason == cuda.availability().reason
    assert "onnxruntime-gpu" in error.hint
    assert "onnxruntime-gpu" in str(error)


def test_places_every_node(backend: backends.Backend, tiny_model: Path) -> None:
    report = backend.placement(tiny_model)

    assert isinstance(report, PlacementReport)
    assert report.backend == backend.name
    assert report.model == tiny_model.name
    assert report.nodes and all(node.device for node in report.nodes)
    assert report.compute_nodes == sum(
        node.op_type not in ("QuantizeLinear", "DequantizeLinear") for node in report.nodes
    )
    assert 0 <= report.fallback_nodes <= report.compute_nodes
    assert 0.0 <= report.fallback_share <= 1.0
    for node in report.nodes:
        if node.device != report.preferred and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            assert node.reason, node


def test_placement_of_a_corrupt_model_raises_backend_error(backend: backends.Backend, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a model")

    with pytest.raises(BackendError) as caught:
        backend.placement(corrupt)

    assert caught.value.backend == backend.name
