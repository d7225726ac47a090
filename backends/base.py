"""The Backend protocol: what a target must say about itself and how it runs a model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import numpy as np
from pydantic import BaseModel, Field

from backends.errors import SessionClosedError
from backends.estimate import AcceleratorPlan
from backends.feeds import SessionInput, check_feeds

# Ops that only convert between int8 and float; not counted as compute when placing nodes.
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, why and what to do.

    Attributes:
        ok: The backend can open models on this machine.
        reason: Why not (empty when ok).
        hint: How to make it available (empty when ok or nothing can be done).
        detail: How it runs when it is available in a reduced form (e.g. emulated), else empty.
    """

    ok: bool
    reason: str = ""
    hint: str = ""
    detail: str = ""


@dataclass(frozen=True)
class QuantizationConstraints:
    """What int8 models must look like to run well on a backend.

    Attributes:
        activation_types: Activation element types the backend executes in int8.
        symmetric_activations: Activations must have zero point 0.
        per_channel_weights: Per-channel weight scales are supported.
        power_of_two_scales: Scales must be powers of two (shift-based requantization).
        dynamic_int8: Runs ONNX Runtime's dynamic int8 kernels (DynamicQuantizeLinear with
            MatMulInteger, fused as DynamicQuantizeMatMul), so a MatMul may be quantized with
            activation ranges measured at run time instead of calibrated ones.
        accelerator_op_types: The op types an integer accelerator runs (its profile's operators;
            empty for backends without one). A transformer's int8 model for such a target
            quantizes these op types, outputs included, so int8 flows from node to node on the
            accelerator instead of falling back at every float output.
        int16_activations: Also runs int16 activations (int16 x int8 products), so the tensors
            int8 damages most may be quantized to 16 bits instead of kept float.
    """

    activation_types: tuple[str, ...] = ("uint8", "int8")
    symmetric_activations: bool = False
    per_channel_weights: bool = True
    power_of_two_scales: bool = False
    dynamic_int8: bool = False
    accelerator_op_types: tuple[str, ...] = ()
    int16_activations: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What a backend can execute.

    Attributes:
        dtypes: Tensor element types it runs natively.
        quantization: Constraints on int8 models.
        measured_latency: Wall-clock time of its sessions is the device's latency (False for an
            emulator, whose latency comes from a cost model instead).
        contrib_ops: It runs ONNX Runtime's ``com.microsoft`` fused operators (such as
            BiasGelu), so an int8 model for it may contain them.
    """

    dtypes: tuple[str, ...]
    quantization: QuantizationConstraints
    measured_latency: bool = True
    contrib_ops: bool = False

    def int8_summary(self) -> str:
        """Activation types and the constraints on int8 models, in a few words (``onnxforge backends``)."""
        constraints = self.quantization
        parts = ["/".join(constraints.activation_types)]
        if constraints.symmetric_activations:
            parts.append("symmetric")
        if constraints.power_of_two_scales:
            parts.append("pow2 scales")
        if not constraints.per_channel_weights:
            parts.append("per-tensor weights")
        if constraints.dynamic_int8:
            parts.append("dynamic int8")
        if constraints.int16_activations:
            parts.append("int16 activations")
        if self.contrib_ops:
            parts.append("ORT contrib ops")
        return ", ".join(parts)


class NodePlacement(BaseModel):
    """Where one node of a model runs.

    Attributes:
        node: The node name.
        op_type: Its operator.
        device: The execution provider (or accelerator) that runs it.
        reason: Why it is not on the backend's preferred device (empty when it is).
    """

    node: str
    op_type: str
    device: str
    reason: str = ""


class PlacementReport(BaseModel):
    """Which node runs where on one backend, and how much falls back.

    Attributes:
        backend: The backend name.
        model: The model file name.
        preferred: The device the backend wants nodes on (its first execution provider).
        nodes: Every node the backend runs, with its device.
        compute_nodes: Nodes counted for the fallback share (all but QuantizeLinear /
            DequantizeLinear, which only convert between int8 and float).
        fallback_nodes: Compute nodes that run somewhere other than `preferred`.
        fallback_share: fallback_nodes / compute_nodes (0 for an empty graph).
        unfused_qdq: QuantizeLinear / DequantizeLinear left as separate conversions on the
            target (None when the backend cannot say).
        notes: Anything else a reader needs (how the assignment was obtained, what is estimated).
        accelerator: An accelerator's cost and memory estimate (None for backends without one).
    """

    backend: str
    model: str
    preferred: str
    nodes: list[NodePlacement]
    compute_nodes: int
    fallback_nodes: int
    fallback_share: float
    unfused_qdq: int | None = None
    notes: list[str] = Field(default_factory=list)
    accelerator: AcceleratorPlan | None = None

    def accelerator_share(self) -> tuple[float, str] | None:
        """The share of the model on the preferred device and what it counts: ``MACs`` when the
        backend estimates them, else ``compute nodes``; None for a CPU target or an empty graph."""
        if self.preferred == "CPUExecutionProvider" or self.compute_nodes == 0:
            return None
        plan = self.accelerator
        if plan is not None and plan.mac_share is not None:
            return plan.mac_share, "MACs"
        return 1.0 - self.fallback_share, "compute nodes"

    @classmethod
    def from_nodes(
        cls,
        backend: str,
        model: str,
        preferred: str,
        nodes: list[NodePlacement],
        unfused_qdq: int | None = None,
        notes: list[str] | None = None,
        accelerator: AcceleratorPlan | None = None,
    ) -> PlacementReport:
        """Build a report, counting compute nodes and the share that falls back."""
        compute = [node for node in nodes if node.op_type not in QDQ_OPS]
        fallback = sum(node.device != preferred for node in compute)
        return cls(
            backend=backend,
            model=model,
            preferred=preferred,
            nodes=nodes,
            compute_nodes=len(compute),
            fallback_nodes=fallback,
            fallback_share=fallback / len(compute) if compute else 0.0,
            unfused_qdq=unfused_qdq,
            notes=notes or [],
            accelerator=accelerator,
        )


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
        """Run one batch and return every output by name.

        Raises:
            BackendError: A feed is missing, unexpected or of the wrong element type or rank, or the
                session is closed.
        """
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


class SessionBase:
    """What our `Session` implementations share: names, the feed check, closing and the context manager.

    `run` checks the feeds against the model's inputs (names, element types, ranks) and raises
    `BackendError` naming the backend and the input before the subclass sees them. Subclasses set
    `_backend` (the backend name), `_input_specs` (each model input, in order) and `_outputs`, and
    implement `_run` and `_close`.
    """

    _backend: str
    _input_specs: list[SessionInput]
    _outputs: list[str]
    _closed: bool = False

    @property
    def input_names(self) -> list[str]:
        """The model's input names, in order."""
        return [spec.name for spec in self._input_specs]

    @property
    def inputs(self) -> list[SessionInput]:
        """The model's inputs (name, element type, rank), in order."""
        return list(self._input_specs)

    @property
    def output_names(self) -> list[str]:
        """The model's output names, in order."""
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check `feeds` against the model's inputs, run one batch and return every output by name.

        Raises:
            BackendError: The session is closed, or a feed is missing, unexpected, or of the wrong
                element type or rank (nothing has run).
        """
        self._check_open()
        check_feeds(self._backend, self._input_specs, feeds)
        return self._run(feeds)

    def close(self) -> None:
        """Release what the session holds; later calls to `run` raise `BackendError`."""
        if not self._closed:
            self._closed = True
            self._close()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run checked feeds (every input, with its element type and rank)."""
        raise NotImplementedError

    def _close(self) -> None:
        """Release the subclass's resources (called once, by `close`)."""

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(self._backend)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def capabilities_for(backend: Backend, options: BaseModel | None) -> Capabilities:
    """A backend's capabilities under a target's options.

    A backend whose constraints depend on its options (the FPGA-style backend's profile says
    which operators its accelerator runs) has a ``capabilities_for(options)`` method; the rest
    have fixed `capabilities`.
    """
    method = getattr(backend, "capabilities_for", None)
    if callable(method):
        found = method(options)
        if isinstance(found, Capabilities):
            return found
    return backend.capabilities


@runtime_checkable
class Backend(Protocol):
    """A target that converted models run on.

    Attributes:
        name: Registry name (``cpu``, ``cuda``, ...).
        execution_providers: ONNX Runtime providers used, in priority order.
        capabilities: What it runs and the constraints on int8 models.
        options_model: Pydantic model validating the job's ``targets.options`` for it.

    The four are read-only (properties here), so class attributes and properties both provide them.
    """

    @property
    def name(self) -> str: ...

    @property
    def execution_providers(self) -> tuple[str, ...]: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def options_model(self) -> type[BaseModel]: ...

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

    def placement(self, model: Path, options: BaseModel | None = None) -> PlacementReport:
        """Say which node of `model` runs on which device, and what falls back.

        Raises:
            BackendError: The backend is unavailable or could not load the model.
        """
        ...
