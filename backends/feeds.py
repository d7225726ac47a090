"""What a session's inputs are, and the check every feed passes before a backend runs it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from backends.errors import BackendError


@dataclass(frozen=True)
class SessionInput:
    """One model input as a session sees it.

    Attributes:
        name: The input name.
        dtype: The numpy element type a feed must have (None when unknown or not checked).
        rank: The number of axes a feed must have (None when unknown).
    """

    name: str
    dtype: np.dtype | None = None
    rank: int | None = None

    @classmethod
    def from_value_info(cls, value: onnx.ValueInfoProto) -> SessionInput:
        """From a graph input: its tensor element type and, when it has a shape, its rank."""
        tensor = value.type.tensor_type
        rank = len(tensor.shape.dim) if value.type.HasField("tensor_type") and tensor.HasField("shape") else None
        return cls(value.name, numpy_dtype(tensor.elem_type), rank)

    def describe(self) -> str:
        """What a feed for this input must be, e.g. ``float32, rank 4``."""
        parts = [str(self.dtype) if self.dtype is not None else "any element type"]
        if self.rank is not None:
            parts.append(f"rank {self.rank}")
        return ", ".join(parts)


def numpy_dtype(elem_type: int) -> np.dtype | None:
    """The numpy type of an ONNX element type; None when it is undefined or has no plain numpy type.

    Strings are None as well: ONNX Runtime takes them as object or str arrays alike.
    """
    if elem_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None
    return None if dtype == np.dtype(object) else dtype


def check_feeds(backend: str, inputs: Sequence[SessionInput], feeds: Mapping[str, object]) -> None:
    """Check that `feeds` holds every input, nothing else, each with its element type and rank.

    Args:
        backend: The backend name, for the error.
        inputs: The session's inputs.
        feeds: The arrays about to be run, by input name.

    Raises:
        BackendError: The first problem: an unknown name, a missing input, a value that is not a numpy
            array, or one with the wrong element type or rank; the message names the input and
            what was expected.
    """
    expected = {spec.name: spec for spec in inputs}
    names = ", ".join(expected) or "none"
    unknown = [name for name in feeds if name not in expected]
    if unknown:
        raise BackendError(backend, f"unexpected input {unknown[0]!r}; the model's inputs are: {names}")
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise BackendError(backend, f"input {missing[0]!r} is missing; the model's inputs are: {names}")
    for spec in inputs:
        _check_value(backend, spec, feeds[spec.name])


def _check_value(backend: str, spec: SessionInput, value: object) -> None:
    if not isinstance(value, np.ndarray):
        raise BackendError(
            backend, f"input {spec.name!r} is a {type(value).__name__}; expected a numpy array ({spec.describe()})"
        )
    if spec.dtype is not None and value.dtype != spec.dtype:
        raise BackendError(backend, f"input {spec.name!r} has element type {value.dtype}; expected {spec.describe()}")
    if spec.rank is not None and value.ndim != spec.rank:
        raise BackendError(
            backend, f"input {spec.name!r} has rank {value.ndim} (shape {value.shape}); expected {spec.describe()}"
        )
