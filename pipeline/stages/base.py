"""The Stage protocol and the context a job's stages share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel

from backends.base import Backend
from pipeline.artifacts import Artifact
from pipeline.feeds import Batch, FeedSource
from pipeline.job import ConversionJob, TargetSpec


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
        model: The trained PyTorch model, in eval mode.
        calibration: Calibration batches (None when the job has none).
        evaluation: Batches parity is measured on.
        targets: The job's targets, resolved.
        artifacts: Artifacts by stage name, filled in as stages run.
    """

    job: ConversionJob
    workdir: Path
    model: torch.nn.Module
    calibration: FeedSource | None
    evaluation: FeedSource
    targets: list[Target]
    artifacts: dict[str, Artifact] = field(default_factory=dict)

    def path_of(self, stage: str) -> Path:
        """The file of the artifact a stage produced."""
        return self.workdir / self.artifacts[stage].path

    def example_batch(self) -> Batch:
        """The first evaluation batch: the export's example inputs."""
        return next(iter(self.evaluation))

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

    def run(self, ctx: StageContext) -> Artifact:
        """Do the work, write the artifact atomically into ``ctx.workdir`` and describe it."""
        ...


def torch_inputs(feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Feeds as the positional tensors ``forward`` takes (feeds are in input order)."""
    return tuple(torch.from_numpy(array) for array in feeds.values())


def flatten_outputs(value: object) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in flatten_outputs(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_outputs(item)]
    raise TypeError(f"model output of type {type(value).__name__} is not a tensor, tuple, list or dict")


def iter_torch_outputs(model: torch.nn.Module, batches: FeedSource) -> Iterator[tuple[Batch, list[np.ndarray]]]:
    """Run the PyTorch model over batches; yield each batch with its outputs as arrays."""
    with torch.inference_mode():
        for batch in batches:
            outputs = flatten_outputs(model(*torch_inputs(batch.feeds)))
            yield batch, [tensor.detach().cpu().numpy() for tensor in outputs]
