"""The backend contract: every registered backend, built-in or plugin, must pass these tests.

The suite is parametrised over `backends.list_backends()` at collection time, so an installed
plugin is checked too. Backends that cannot run on this machine are skipped with their reason.
"""

from __future__ import annotations

from pathlib import Path

# Import pipeline before backends: `import backends` first fails on a circular import
# (backends.registry -> pipeline -> pipeline.runner -> backends.registry); see test_registry.
# isort: off
import pipeline
import backends

# isort: on

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from backends.base import Capabilities, PlacementReport, QuantizationConstraints

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

    with pytest.raises(pipeline.BackendError) as caught:
        backend.open(corrupt)

    assert caught.value.backend == backend.name
    assert repr(backend.name) in str(caught.value)
    assert caught.value.reason


def test_missing_model_raises_backend_error(backend: backends.Backend, tmp_path: Path) -> None:
    with pytest.raises(pipeline.BackendError) as caught:
        backend.open(tmp_path / "missing.onnx")

    assert caught.value.backend == backend.name


def test_opening_on_unavailable_cuda_raises_with_install_hint(tiny_model: Path) -> None:
    cuda = backends.get_backend("cuda")
    if cuda.availability().ok:
        pytest.skip("CUDA is available here; the unavailable path cannot be exercised")

    with pytest.raises(pipeline.BackendError) as caught:
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

    with pytest.raises(pipeline.BackendError) as caught:
        backend.placement(corrupt)

    assert caught.value.backend == backend.name
