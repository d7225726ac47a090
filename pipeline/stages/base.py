"""The Stage protocol and the context a job's stages share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel

from backends.base import Backend
from pipeline.artifacts import Artifact, RecordT, StageRun
from pipeline.feeds import Batch, FeedSource
from pipeline.job import ConversionJob, InputSpec, TargetSpec
from pipeline.model_source import SourceModel
from pipeline.records import ModelRecord, StageName, StageRecord


@dataclass(frozen=True)
class Target:
    """A job target resolved to its backend and validated options."""

    spec: TargetSpec
    backend: Backend
    options: BaseModel

    @property
    def name(self) -> str:
        """The backend name."""
        return self.spec.backend


@dataclass(frozen=True)
class PreparedInputs:
    """What the runner's preflight loaded and checked, before anything is written.

    Attributes:
        source: The job's model as loaded (a module, an ExportedProgram or an ONNX file).
        calibration: Calibration batches (None when the job has none).
        evaluation: Batches parity is measured on.
        targets: The job's targets, resolved.
    """

    source: SourceModel
    calibration: FeedSource | None
    evaluation: FeedSource
    targets: list[Target]


@dataclass
class StageContext:
    """Everything a stage may read, and the artifacts earlier stages produced.

    Attributes:
        job: The conversion job.
        workdir: The folder stages write into (the staging copy of the output folder).
        source: The job's model as loaded (a module, an ExportedProgram or an ONNX file).
        calibration: Calibration batches (None when the job has none).
        evaluation: Batches parity is measured on.
        targets: The job's targets, resolved.
        progress: Where a long stage reports its steps: ``(done, total, detail)``.
        artifacts: Artifacts by stage name, filled in as stages run.
        student: The distilled student once loaded (see `pipeline.stages.distill.pytorch_model`).
        stage_runs: The stages run so far, with their times (filled in by the runner).
    """

    job: ConversionJob
    workdir: Path
    source: SourceModel
    calibration: FeedSource | None
    evaluation: FeedSource
    targets: list[Target]
    progress: Callable[[int, int, str], None] = field(default=lambda done, total, detail: None, repr=False)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    student: torch.nn.Module | None = field(default=None, repr=False)
    stage_runs: list[StageRun] = field(default_factory=list, repr=False)
    _example: Batch | None = field(default=None, init=False, repr=False)

    @classmethod
    def prepared(cls, job: ConversionJob, workdir: Path, inputs: PreparedInputs) -> StageContext:
        """The context of a run of `job` writing into `workdir`, with what preflight loaded."""
        return cls(job, workdir, inputs.source, inputs.calibration, inputs.evaluation, inputs.targets)

    def path_of(self, stage: str) -> Path:
        """The file of the artifact a stage produced."""
        return self.workdir / self.artifacts[stage].path

    def example_batch(self) -> Batch:
        """The first evaluation batch: the export's example inputs (read once per run)."""
        if self._example is None:
            self._example = next(iter(self.evaluation))
        return self._example

    def artifact_with(self, record_type: type[StageRecord]) -> Artifact | None:
        """The first artifact whose record is a `record_type` (None: no stage wrote one)."""
        return next((a for a in self.artifacts.values() if isinstance(a.record, record_type)), None)

    def record(self, record_type: type[RecordT]) -> RecordT | None:
        """The record of type `record_type`, when a stage of this run wrote one."""
        artifact = self.artifact_with(record_type)
        return artifact.record_as(record_type) if artifact is not None else None

    def model_chain(self) -> list[Artifact]:
        """The ONNX models of the run so far, in the order the stages wrote them."""
        return [artifact for artifact in self.artifacts.values() if isinstance(artifact.record, ModelRecord)]

    def current_model(self) -> Artifact:
        """The model a transforming stage takes: the last ONNX model of the chain.

        Raises:
            LookupError: No stage has written a model yet (a stage-order bug).
        """
        chain = self.model_chain()
        if not chain:
            raise LookupError(f"job {self.job.name}: no ONNX model has been written yet")
        return chain[-1]


class Stage(Protocol):
    """One step of the pipeline.

    Attributes:
        name: Stage name, used in the manifest, reports and errors.
    """

    name: StageName

    def enabled(self, job: ConversionJob) -> bool:
        """Whether the job asks for this stage."""
        ...

    def check(self, job: ConversionJob, inputs: PreparedInputs) -> None:
        """The stage's preconditions, checked by preflight before anything is written.

        Raises:
            JobError: The job cannot run this stage (bad settings, data or model).
        """
        ...

    def key(self, ctx: StageContext) -> str | None:
        """Content key of the output (inputs, settings, tool versions); None: never cached."""
        ...

    def run(self, ctx: StageContext) -> Artifact:
        """Do the work, write the artifact atomically into ``ctx.workdir`` and describe it."""
        ...


class NoPreconditions:
    """Mixin of stages that need nothing checked up front beyond the job's own validation."""

    def check(self, job: ConversionJob, inputs: PreparedInputs) -> None:
        """Nothing to check: the job model and the common preflight cover this stage."""


def resize_feeds(feeds: dict[str, np.ndarray], inputs: list[InputSpec], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Feeds cut or tiled along named dims to the given sizes (real values, new shape).

    Tiling repeats the data cyclically, so token ids stay valid ids and masks stay masks.
    """
    resized = {}
    for spec in inputs:
        array = feeds[spec.name]
        for axis, dim in spec.dynamic_axes.items():
            if dim in sizes:
                array = np.take(array, np.arange(sizes[dim]) % array.shape[axis], axis=axis)
        resized[spec.name] = np.ascontiguousarray(array)
    return resized
