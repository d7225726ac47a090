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
from pipeline.artifacts import Artifact
from pipeline.distillation.student import load_student
from pipeline.feeds import Batch, FeedSource
from pipeline.job import ConversionJob, InputSpec, TargetSpec
from pipeline.model_source import SourceModel


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
        distill_data: Distillation training batches (None when the job does not distil).
        distill_validation: Distillation held-out batches (None: the evaluation data).
        progress: Where a long stage reports its steps: ``(done, total, detail)``.
        artifacts: Artifacts by stage name, filled in as stages run.
    """

    job: ConversionJob
    workdir: Path
    source: SourceModel
    calibration: FeedSource | None
    evaluation: FeedSource
    targets: list[Target]
    distill_data: FeedSource | None = None
    distill_validation: FeedSource | None = None
    progress: Callable[[int, int, str], None] = field(default=lambda done, total, detail: None, repr=False)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    _example: Batch | None = field(default=None, init=False, repr=False)
    _student: torch.nn.Module | None = field(default=None, init=False, repr=False)

    def path_of(self, stage: str) -> Path:
        """The file of the artifact a stage produced."""
        return self.workdir / self.artifacts[stage].path

    def example_batch(self) -> Batch:
        """The first evaluation batch: the export's example inputs (read once per run)."""
        if self._example is None:
            self._example = next(iter(self.evaluation))
        return self._example

    @property
    def pytorch_model(self) -> torch.nn.Module | None:
        """The PyTorch model the ONNX chain starts from: the distilled student when the job
        distils, else the job's model (None for an ONNX-file source)."""
        if "distill" not in self.artifacts:
            return self.source.module
        if self._student is None:
            self._student = load_student(self.job, self.path_of("distill"))
        return self._student

    @property
    def pytorch_program(self) -> torch.export.ExportedProgram | None:
        """The ExportedProgram to export as it is (None when a student replaced the job's model)."""
        return None if "distill" in self.artifacts else self.source.program

    def latest_model(self) -> Artifact:
        """The newest ONNX model artifact (what the next stage transforms)."""
        models = [a for a in self.artifacts.values() if a.path.endswith(".onnx")]
        return models[-1]


class Stage(Protocol):
    """One step of the pipeline.

    Attributes:
        name: Stage name, used in the manifest, reports and errors.
    """

    name: str

    def enabled(self, job: ConversionJob) -> bool:
        """Whether the job asks for this stage."""
        ...

    def key(self, ctx: StageContext) -> str | None:
        """Content key of the output (inputs, settings, tool versions); None: never cached."""
        ...

    def run(self, ctx: StageContext) -> Artifact:
        """Do the work, write the artifact atomically into ``ctx.workdir`` and describe it."""
        ...


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
