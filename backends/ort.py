"""Shared ONNX Runtime plumbing for backends that are an execution-provider list plus options."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from backends.base import QDQ_OPS, Availability, Capabilities, NodePlacement, PlacementReport, SessionBase
from backends.errors import BackendError
from backends.feeds import SessionInput, numpy_dtype
from backends.threads import job_threads, session_options

logger = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# ONNX Runtime's element type names ("float", "int64", ...) to ONNX's TensorProto types.
_ELEMENT_TYPES = {name.lower(): value for name, value in onnx.TensorProto.DataType.items()}


class SessionOptionsSpec(BaseModel):
    """Session options every ONNX Runtime backend accepts.

    Attributes:
        intra_op_threads: Threads inside one op (0: ONNX Runtime decides).
        inter_op_threads: Threads across ops (0: ONNX Runtime decides).
        graph_optimization_level: The level parity is measured at; use the one you deploy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    intra_op_threads: int = Field(default=0, ge=0)
    inter_op_threads: int = Field(default=0, ge=0)
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"


class OrtSession(SessionBase):
    """An ONNX Runtime InferenceSession behind the `Session` protocol.

    Args:
        session: The open InferenceSession.
        backend: The backend name errors are reported under.
    """

    def __init__(self, session: ort.InferenceSession, backend: str = "onnxruntime") -> None:
        self._session: ort.InferenceSession | None = session
        self._backend = backend
        self._input_specs = [_session_input(node) for node in session.get_inputs()]
        self._outputs = [node.name for node in session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses.

        Raises:
            BackendError: The session is closed.
        """
        return self._live().get_providers()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._live().run(self._outputs, dict(feeds))
        return dict(zip(self._outputs, values, strict=True))

    def _close(self) -> None:
        self._session = None

    def _live(self) -> ort.InferenceSession:
        self._check_open()
        assert self._session is not None
        return self._session


def _session_input(node: ort.NodeArg) -> SessionInput:
    """An input as ONNX Runtime describes it: ``tensor(float)`` and a list of dims.

    ONNX Runtime reports a scalar and an input without a shape alike (no dims), so no dims means an
    unknown rank; non-tensor inputs (sequences, maps) are not checked beyond their name.
    """
    kind = str(node.type)
    element = kind.removeprefix("tensor(").removesuffix(")")
    if element == kind:
        return SessionInput(node.name)
    return SessionInput(node.name, numpy_dtype(_ELEMENT_TYPES.get(element, 0)), len(node.shape) or None)


class OrtBackend:
    """Base of backends that run a model on ONNX Runtime with a fixed provider list.

    Subclasses set the class attributes and may override `provider_options` and
    `availability`.
    """

    name: ClassVar[str]
    execution_providers: ClassVar[tuple[str, ...]]
    capabilities: ClassVar[Capabilities]
    options_model: ClassVar[type[SessionOptionsSpec]] = SessionOptionsSpec
    install_hint: ClassVar[str] = ""

    def availability(self) -> Availability:
        """Available when ONNX Runtime offers the backend's first execution provider."""
        provider = self.execution_providers[0]
        present = ort.get_available_providers()
        if provider in present:
            return Availability(ok=True)
        return Availability(
            ok=False,
            reason=f"this onnxruntime build ({ort.__version__}) has no {provider}; it offers {', '.join(present)}",
            hint=self.install_hint,
        )

    def providers(self, options: SessionOptionsSpec) -> list[str]:
        """The execution providers a session with `options` asks for, in priority order."""
        return list(self.execution_providers)

    def provider_options(self, options: SessionOptionsSpec) -> list[dict[str, Any]]:
        """Options per execution provider, in `providers(options)` order."""
        return [{} for _ in self.providers(options)]

    def open(self, model: Path, options: BaseModel | None = None) -> OrtSession:
        """Open `model` on this backend's providers.

        Args:
            model: The ONNX file.
            options: An instance of `options_model` (defaults when None).

        Returns:
            The open session.

        Raises:
            BackendError: Unavailable here, or ONNX Runtime could not load the model.
        """
        return OrtSession(self._session(model, self._spec(options)), self.name)

    def placement(self, model: Path, options: BaseModel | None = None) -> PlacementReport:
        """Which provider ONNX Runtime assigns each node to, from its graph assignment record.

        Raises:
            BackendError: Unavailable here, or ONNX Runtime could not load the model.
        """
        spec = self._spec(options)
        session = self._session(model, spec, record_assignment=True)
        providers = self.providers(spec)
        nodes = [
            NodePlacement(
                node=node.name,
                op_type=node.op_type,
                device=subgraph.ep_name,
                reason="" if subgraph.ep_name == providers[0] else f"{providers[0]} did not take it",
            )
            for subgraph in session.get_provider_graph_assignment_info()
            for node in subgraph.get_nodes()
        ]
        notes = [
            "Assignment as ONNX Runtime recorded it when partitioning the graph "
            f"(optimization level {spec.graph_optimization_level}); "
            "nodes folded away before partitioning are not listed."
        ]
        return PlacementReport.from_nodes(
            self.name,
            model.name,
            providers[0],
            nodes,
            unfused_qdq=unfused_qdq_count(model, providers, self.provider_options(spec)),
            notes=notes,
        )

    def _spec(self, options: BaseModel | None) -> SessionOptionsSpec:
        return options if isinstance(options, SessionOptionsSpec) else self.options_model()

    def _session(self, model: Path, spec: SessionOptionsSpec, record_assignment: bool = False) -> ort.InferenceSession:
        availability = self.availability()
        if not availability.ok:
            raise BackendError(self.name, availability.reason, availability.hint)
        session_options = ort.SessionOptions()
        # 0 means the job's share of the cores in a batch, else all of them.
        session_options.intra_op_num_threads = spec.intra_op_threads or job_threads()
        session_options.inter_op_num_threads = spec.inter_op_threads
        session_options.graph_optimization_level = _OPT_LEVELS[spec.graph_optimization_level]
        session_options.log_severity_level = 3  # errors only; warnings go through our logging
        if record_assignment:
            session_options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        try:
            session = ort.InferenceSession(
                str(model),
                sess_options=session_options,
                providers=self.providers(spec),
                provider_options=self.provider_options(spec),
            )
        except Exception as e:  # ORT raises several unrelated exception types
            raise BackendError(self.name, f"ONNX Runtime could not load {model.name}: {e}") from e
        logger.debug("opened %s on %s", model.name, session.get_providers())
        return session


def unfused_qdq_count(
    model: Path, providers: list[str] | None = None, provider_options: list[dict[str, Any]] | None = None
) -> int | None:
    """Q/DQ nodes that survive ONNX Runtime's graph optimisations on `providers` (None if ORT cannot say).

    Each one is a float <-> int8 conversion done as a separate op instead of inside a fused int8 kernel.
    """
    providers = providers or ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        options = session_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(optimized)
        try:
            ort.InferenceSession(str(model), options, providers=providers, provider_options=provider_options)
            graph = onnx.load(str(optimized), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - diagnostics only: say "unknown" rather than fail the job
            return None
    return sum(node.op_type in QDQ_OPS for node in graph.node)
