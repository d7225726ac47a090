"""The Backend protocol: what a target must say about itself and how it runs a model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import numpy as np
from pydantic import BaseModel


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, why and what to do.

    Attributes:
        ok: The backend can open models on this machine.
        reason: Why not (empty when ok).
        hint: How to make it available (empty when ok or nothing can be done).
    """

    ok: bool
    reason: str = ""
    hint: str = ""


@dataclass(frozen=True)
class QuantizationConstraints:
    """What int8 models must look like to run well on a backend.

    Attributes:
        activation_types: Activation element types the backend executes in int8.
        symmetric_activations: Activations must have zero point 0.
        per_channel_weights: Per-channel weight scales are supported.
        power_of_two_scales: Scales must be powers of two (shift-based requantization).
    """

    activation_types: tuple[str, ...] = ("uint8", "int8")
    symmetric_activations: bool = False
    per_channel_weights: bool = True
    power_of_two_scales: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What a backend can execute.

    Attributes:
        dtypes: Tensor element types it runs natively.
        quantization: Constraints on int8 models.
    """

    dtypes: tuple[str, ...]
    quantization: QuantizationConstraints


@runtime_checkable
class Session(Protocol):
    """An open model on a backend; a context manager that frees its resources on exit."""

    @property
    def input_names(self) -> list[str]:
        """The model's input names, in order."""
        ...

    @property
    def output_names(self) -> list[str]:
        """The model's output names, in order."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch and return every output by name."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A target that converted models run on.

    Attributes:
        name: Registry name (``cpu``, ``cuda``, ...).
        execution_providers: ONNX Runtime providers used, in priority order.
        capabilities: What it runs and the constraints on int8 models.
        options_model: Pydantic model validating the job's ``targets.options`` for it.
    """

    name: str
    execution_providers: tuple[str, ...]
    capabilities: Capabilities
    options_model: type[BaseModel]

    def availability(self) -> Availability:
        """Say whether this backend can run here, without raising."""
        ...

    def open(self, model: Path, options: BaseModel | None = None) -> Session:
        """Open a model file for inference.

        Args:
            model: The ONNX file.
            options: An instance of `options_model` (defaults when None).

        Raises:
            BackendError: The backend is unavailable or could not load the model.
        """
        ...
