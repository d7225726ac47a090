"""The Stage protocol and the context a job's stages share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel

from backends.base import Backend, Capabilities, capabilities_for
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

    @property
    def capabilities(self) -> Capabilities:
        """The backend's capabilities under this target's options (an FPGA profile's operators)."""
        return capabilities_for(self.backend, self.options)


@dataclass(frozen=True)
class Branch:
    """The targets one run of a stage serves: all of them (the trunk), or a group of targets
    whose constraints give them a model of their own.

    Attributes:
        name: The group's name in file names and the manifest ("" for the trunk).
        targets: The group's target names (empty for the trunk: every target).
    """

    name: str = ""
    targets: tuple[str, ...] = ()

    def artifact_key(self, stage: str) -> str:
        """The key of this branch's artifact among the run's artifacts: ``quantize`` or ``quantize.fpga``."""
        return f"{stage}.{self.name}" if self.name else stage

    def file_name(self, stem: str, suffix: str = ".onnx") -> str:
        """The branch's file: ``model.int8.onnx`` for the trunk, ``model.int8.fpga.onnx`` for a branch."""
        return f"{stem}.{self.name}{suffix}" if self.name else f"{stem}{suffix}"


TRUNK = Branch()


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
        branch: The branch the running stage serves (set by the runner; the trunk unless the
            stage is a `BranchingStage`).
        source_released: Whether the source's PyTorch model was dropped to save memory
            (`pipeline.stages.source_weights`: rebuilt when validation needs it).
        input_hashes: Hashes of the conversion's inputs once computed (`job_input_hashes`).
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
    branch: Branch = TRUNK
    source_released: bool = False
    input_hashes: dict[str, str] | None = field(default=None, repr=False)
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

    def artifact_with(self, record_type: type[StageRecord], target: str | None = None) -> Artifact | None:
        """The first artifact whose record is a `record_type`, in `target`'s chain when a target
        is named (None: a stage wrote none)."""
        return next(
            (
                a
                for a in self.artifacts.values()
                if isinstance(a.record, record_type) and (target is None or a.serves(target))
            ),
            None,
        )

    def record(self, record_type: type[RecordT], target: str | None = None) -> RecordT | None:
        """The record of type `record_type` (in `target`'s chain when named), when a stage of this run wrote one."""
        artifact = self.artifact_with(record_type, target)
        return artifact.record_as(record_type) if artifact is not None else None

    def model_chain(self, target: str | None = None) -> list[Artifact]:
        """The ONNX models of `target`'s chain so far, in the order the stages wrote them (None:
        the trunk, the models every target shares)."""
        return [
            artifact
            for artifact in self.artifacts.values()
            if isinstance(artifact.record, ModelRecord) and artifact.serves(target)
        ]

    def all_models(self) -> list[Artifact]:
        """Every ONNX model of the run so far, each branch's included, in the order they were written."""
        return [artifact for artifact in self.artifacts.values() if isinstance(artifact.record, ModelRecord)]

    def current_model(self) -> Artifact:
        """The model a transforming stage takes: the last ONNX model of its branch's chain.

        Raises:
            LookupError: No stage has written a model yet (a stage-order bug).
        """
        chain = self.model_chain(self.branch.targets[0] if self.branch.targets else None)
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


@runtime_checkable
class BranchingStage(Stage, Protocol):
    """A stage that runs once per group of targets, each run writing that group's own model."""

    def branches(self, ctx: StageContext) -> list[Branch]:
        """The groups this job's targets fall into (``[TRUNK]`` when they all agree)."""
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
