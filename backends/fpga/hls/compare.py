"""The partition's int8 outputs three ways: the hls4ml C simulation, the emulator and ONNX Runtime's CPU QDQ.

One ONNX Runtime run of the int8 model (its partition boundary exposed as extra outputs) gives the
int8 tensors the CPU hands to the accelerator and the int8 tensors CPU QDQ computes at the
partition's outputs; the emulator and the C simulation take the same int8 inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from backends.fpga.emulator import Emulator
from backends.fpga.hls.qonnx_export import QonnxPartition
from backends.fpga.hls.results import IntegerComparison
from backends.fpga.partition import PartitionPlan, Segment
from backends.fpga.profile import FpgaProfile
from backends.threads import session_options

CPU = "CPUExecutionProvider"


class Tally:
    """Accumulates an `IntegerComparison` batch by batch, in constant memory."""

    def __init__(self) -> None:
        self.values = 0
        self.mismatches = 0
        self.max_difference = 0

    def update(self, candidates: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> None:
        """Add one batch: each candidate output against the reference output of the same index."""
        for candidate, reference in zip(candidates, references, strict=True):
            difference = np.abs(candidate.astype(np.int64) - reference.astype(np.int64))
            self.values += difference.size
            self.mismatches += int(np.count_nonzero(difference))
            self.max_difference = max(self.max_difference, int(difference.max(initial=0)))

    def result(self) -> IntegerComparison:
        """What was compared so far."""
        return IntegerComparison(values=self.values, mismatches=self.mismatches, max_difference=self.max_difference)


class PartitionRuns:
    """Runs a partition's boundary on CPU QDQ, and the partition on the emulator.

    Attributes:
        emulator: The emulator (its ``saturated`` counts accumulate over every batch).
    """

    def __init__(self, model: onnx.ModelProto, plan: PartitionPlan, segment: Segment, profile: FpgaProfile) -> None:
        self._segment = segment
        self.emulator = Emulator(profile, plan.constants)
        self._session: ort.InferenceSession | None = None
        self._model = model

    def boundary(self, feeds: Mapping[str, np.ndarray], tensors: Sequence[str]) -> list[np.ndarray]:
        """The int8 model run on CPU QDQ: the values of `tensors` (its intermediate int8 tensors)."""
        if self._session is None:
            self._session = ort.InferenceSession(
                _exposing(self._model, tensors).SerializeToString(), session_options(), providers=[CPU]
            )
        return list(self._session.run(list(tensors), dict(feeds)))

    def emulate(self, partition: QonnxPartition, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The accelerator nodes on the emulator, from the partition's int8 inputs to its int8 outputs."""
        env = {fixed.tensor: array for fixed, array in zip(partition.inputs, inputs, strict=True)}
        for item in self._segment.accelerator_nodes:
            self.emulator.run(item, env)
        return [env[fixed.tensor] for fixed in partition.outputs]


def boundary_tensors(partition: QonnxPartition) -> list[str]:
    """The int8 tensors a boundary run reads: the partition's inputs, then its outputs."""
    return [fixed.tensor for fixed in (*partition.inputs, *partition.outputs)]


def _exposing(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` with `tensors` (int8 tensors inside it) as extra graph outputs."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {value.name for value in exposed.graph.output}
    for name in tensors:
        if name not in present:
            exposed.graph.output.append(onnx.ValueInfoProto(name=name))  # int8 or int16: ONNX Runtime infers it
    return exposed
