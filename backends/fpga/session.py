"""Running a partitioned model: accelerator segments on the emulator, the rest on ONNX Runtime's CPU provider."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from backends.base import SessionBase
from backends.feeds import SessionInput
from backends.fpga.emulator import Emulator
from backends.fpga.partition import PartitionPlan, Segment
from backends.fpga.profile import FpgaProfile
from backends.threads import session_options

logger = logging.getLogger(__name__)


def _element_type(array: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(array.dtype)


class FpgaSession(SessionBase):
    """An open model on the FPGA-style backend; a context manager like every backend session.

    CPU segments become ONNX submodels (built on the first run, when the types of the tensors that
    cross into them are known) run by ONNX Runtime; accelerator segments run node by node on the
    integer emulator; int8 tensors flow between them in one environment.
    """

    def __init__(self, model: onnx.ModelProto, plan: PartitionPlan, profile: FpgaProfile, threads: int) -> None:
        self._model = model
        self._plan = plan
        self._threads = threads
        self._emulator = Emulator(profile, plan.constants, threads)
        self._backend = "fpga"
        self._input_specs = [
            SessionInput.from_value_info(value) for value in model.graph.input if value.name not in plan.constants
        ]
        self._outputs = [value.name for value in model.graph.output]
        self._boundaries = _boundaries(model, plan.segments, set(plan.constants))
        self._cpu_sessions: dict[int, ort.InferenceSession] = {}
        self._types = _known_types(model)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch through every segment in order and return every output by name."""
        env: dict[str, np.ndarray] = dict(feeds)
        for index, segment in enumerate(self._plan.segments):
            if segment.device == "accelerator":
                for item in segment.accelerator_nodes:
                    self._emulator.run(item, env)
                continue
            inputs, outputs = self._boundaries[index]
            session = self._cpu_session(index, segment, env)
            values = session.run(outputs, {name: env[name] for name in inputs})
            env.update(zip(outputs, values, strict=True))
        # The emulator's channels-first results can be views of channels-last memory: copied once here.
        return {
            name: np.ascontiguousarray(env[name] if name in env else self._plan.constants[name])
            for name in self._outputs
        }

    def _close(self) -> None:
        """Release the CPU sessions; warn about accumulator overflows the emulator saw."""
        if self._emulator.saturated:
            logger.warning("accelerator accumulators saturated (node: count): %s", self._emulator.saturated)
        self._cpu_sessions.clear()

    def _cpu_session(self, index: int, segment: Segment, env: Mapping[str, np.ndarray]) -> ort.InferenceSession:
        if index not in self._cpu_sessions:
            inputs, outputs = self._boundaries[index]
            submodel = _submodel(self._model, segment, inputs, outputs, self._plan.constants, env, self._types)
            options = session_options(self._threads)
            # ONNX Runtime's pool threads spin for a while after each run, and the emulator's BLAS
            # threads run right after: spinning there took cores from them (the first convolution
            # after the input's QuantizeLinear ran up to 5x slower on 2 cores).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._cpu_sessions[index] = ort.InferenceSession(
                submodel.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        return self._cpu_sessions[index]


def _boundaries(
    model: onnx.ModelProto, segments: list[Segment], constants: set[str]
) -> list[tuple[list[str], list[str]]]:
    """Per CPU segment: the tensors it reads from outside (not constants: those go into the submodel),
    and those it writes that are read later."""
    graph_outputs = {value.name for value in model.graph.output}
    reads: list[set[str]] = []
    for segment in segments:
        if segment.device == "cpu":
            reads.append({name for node in segment.cpu_nodes for name in node.input if name})
        else:
            reads.append(
                {fixed.tensor for item in segment.accelerator_nodes for fixed in item.inputs if fixed is not None}
            )
    boundaries = []
    for index, segment in enumerate(segments):
        produced = {name for node in segment.cpu_nodes for name in node.output if name}
        inputs = sorted(reads[index] - produced - constants) if segment.device == "cpu" else []
        later = set().union(*reads[index + 1 :]) | graph_outputs
        outputs = sorted(produced & later)
        boundaries.append((inputs, outputs))
    return boundaries


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types ONNX shape inference can tell (types of the rest come from the first run)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a convenience here; unknown types are handled
        inferred = model
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {value.name: value.type.tensor_type.elem_type for value in values if value.type.tensor_type.elem_type}


def _submodel(
    model: onnx.ModelProto,
    segment: Segment,
    inputs: list[str],
    outputs: list[str],
    constants: Mapping[str, np.ndarray],
    env: Mapping[str, np.ndarray],
    types: Mapping[str, int],
) -> onnx.ModelProto:
    """The CPU segment as a model of its own: its boundary tensors become graph inputs and outputs."""
    used = {name for node in segment.cpu_nodes for name in node.input}
    graph = helper.make_graph(
        segment.cpu_nodes,
        f"{model.graph.name}_cpu",
        [helper.make_tensor_value_info(name, _element_type(env[name]), None) for name in inputs],
        [_output_info(name, types) for name in outputs],
        initializer=[numpy_helper.from_array(constants[name], name) for name in sorted(used & set(constants))],
    )
    submodel = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    submodel.functions.extend(model.functions)
    return submodel


def _output_info(name: str, types: Mapping[str, int]) -> onnx.ValueInfoProto:
    if name in types:
        return helper.make_tensor_value_info(name, types[name], None)
    return onnx.ValueInfoProto(name=name)  # ONNX Runtime infers what inference could not
