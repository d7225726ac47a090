"""The feed check `SessionBase.run` applies, and what sessions say about their inputs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from backends.base import SessionBase
from backends.errors import BackendError, SessionClosedError
from backends.feeds import SessionInput, check_feeds, numpy_dtype
from backends.ort import OrtSession

INPUTS = [SessionInput("image", np.dtype(np.float32), 4), SessionInput("mask", np.dtype(np.int64), None)]


class _Echo(SessionBase):
    """A session that returns its feeds, counting runs and closes."""

    def __init__(self) -> None:
        self._backend = "echo"
        self._input_specs = list(INPUTS)
        self._outputs = ["image"]
        self.runs = 0
        self.closes = 0

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        return {"image": feeds["image"]}

    def _close(self) -> None:
        self.closes += 1


def good_feeds() -> dict[str, np.ndarray]:
    return {"image": np.zeros((1, 1, 2, 2), np.float32), "mask": np.zeros((3,), np.int64)}


def test_good_feeds_pass_and_unknown_ranks_are_not_checked() -> None:
    check_feeds("echo", INPUTS, good_feeds())
    check_feeds("echo", INPUTS, {**good_feeds(), "mask": np.zeros((2, 2, 2), np.int64)})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": np.zeros(1)}, "backend 'echo': unexpected input 'extra'; the model's inputs are: image, mask"),
        ({"image": None}, "backend 'echo': input 'image' is a NoneType; expected a numpy array (float32, rank 4)"),
        ({"mask": np.zeros(3, np.int32)}, "backend 'echo': input 'mask' has element type int32; expected int64"),
        (
            {"image": np.zeros((2, 2), np.float32)},
            "backend 'echo': input 'image' has rank 2 (shape (2, 2)); expected float32, rank 4",
        ),
    ],
)
def test_bad_feeds_are_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(BackendError) as caught:
        check_feeds("echo", INPUTS, {**good_feeds(), **change})

    assert str(caught.value) == message


def test_a_missing_input_is_named() -> None:
    with pytest.raises(BackendError, match="input 'mask' is missing; the model's inputs are: image, mask"):
        check_feeds("echo", INPUTS, {"image": good_feeds()["image"]})


def test_run_checks_before_the_subclass_runs_and_close_is_idempotent() -> None:
    session = _Echo()

    with pytest.raises(BackendError):
        session.run({"image": good_feeds()["image"]})
    assert session.runs == 0
    assert session.run(good_feeds())["image"].shape == (1, 1, 2, 2)
    assert session.inputs == INPUTS and session.input_names == ["image", "mask"]
    session.close()
    session.close()
    with pytest.raises(SessionClosedError) as caught:
        session.run(good_feeds())

    assert session.closes == 1
    assert session.runs == 1
    assert isinstance(caught.value, BackendError) and isinstance(caught.value, RuntimeError)
    assert str(caught.value) == "backend 'echo': the session is closed; to fix: open the model again"


def test_inputs_from_value_info() -> None:
    shaped = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 3])
    scalar = helper.make_tensor_value_info("s", TensorProto.INT64, [])
    unshaped = helper.make_tensor_value_info("u", TensorProto.FLOAT, None)
    text = helper.make_tensor_value_info("t", TensorProto.STRING, [1])

    assert SessionInput.from_value_info(shaped) == SessionInput("x", np.dtype(np.float16), 2)
    assert SessionInput.from_value_info(scalar) == SessionInput("s", np.dtype(np.int64), 0)
    assert SessionInput.from_value_info(unshaped) == SessionInput("u", np.dtype(np.float32), None)
    assert SessionInput.from_value_info(text) == SessionInput("t", None, 1)  # str or object arrays alike
    assert numpy_dtype(TensorProto.UNDEFINED) is None


def test_onnx_runtime_inputs() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["s"], ["t"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.BOOL, ["n", 2, 3]),
            helper.make_tensor_value_info("s", TensorProto.DOUBLE, None),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.BOOL, None),
            helper.make_tensor_value_info("t", TensorProto.DOUBLE, None),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = OrtSession(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), "cpu")

    # ONNX Runtime reports no dims alike for a scalar and an input without a shape: rank unknown.
    assert session.inputs == [SessionInput("x", np.dtype(bool), 3), SessionInput("s", np.dtype(np.float64), None)]
    with pytest.raises(BackendError, match="backend 'cpu': input 'x' has element type int64; expected bool, rank 3"):
        session.run({"x": np.zeros((1, 2, 3), np.int64), "s": np.zeros((), np.float64)})
