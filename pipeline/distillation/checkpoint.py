"""Per-epoch distillation checkpoints as safetensors: the student, the optimizer state, the history.

A checkpoint holds everything a run needs to continue exactly where it stopped: the learning rate,
data order and dropout of every epoch are derived from the seed and the epoch number, and the best
epoch and the early stop from the history, so the student's weights, the optimizer's state and the
epoch history are all there is to save. Nothing is
pickled: tensors go in the safetensors body, the rest as JSON in its metadata.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from pipeline.artifacts import write_atomic
from pipeline.distillation.summary import EpochRecord, best_epochs

logger = logging.getLogger(__name__)

_FORMAT = "onnxforge-distill-1"
_NAME = re.compile(r"^epoch-(\d{4,})\.safetensors$")
_STUDENT = "student/"
_OPTIMIZER = "optimizer/"


@dataclass
class Checkpoint:
    """The state of training after one epoch.

    Attributes:
        student: The student's state dict.
        optimizer: The optimizer's per-parameter state (``optimizer.state_dict()["state"]``).
        history: Every epoch so far (the last one is the epoch just finished).
    """

    student: dict[str, torch.Tensor]
    optimizer: dict[int, dict[str, Any]]
    history: list[EpochRecord]

    @property
    def epoch(self) -> int:
        """The epoch just finished (1-based)."""
        return self.history[-1].epoch

    @property
    def best_epoch(self) -> int:
        """The epoch with the best held-out score so far (the last of equals)."""
        return best_epochs(self.history)[0]


def checkpoint_path(folder: Path, epoch: int) -> Path:
    """The file of one epoch's checkpoint."""
    return folder / f"epoch-{epoch:04d}.safetensors"


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write a checkpoint atomically, then delete older ones except the best epoch's.

    Returns:
        The checkpoint file.
    """
    tensors = {f"{_STUDENT}{name}": tensor.detach().cpu().contiguous() for name, tensor in checkpoint.student.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in checkpoint.optimizer.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "format": _FORMAT,
        "history": json.dumps([record.model_dump(mode="json") for record in checkpoint.history]),
        "optimizer_scalars": json.dumps(scalars),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, checkpoint.epoch)
    write_atomic(path, safetensors.torch.save(tensors, metadata=metadata))
    keep = {path, checkpoint_path(folder, checkpoint.best_epoch)}
    for older in checkpoint_files(folder):
        if older not in keep:
            older.unlink(missing_ok=True)
    return path


def checkpoint_files(folder: Path) -> list[Path]:
    """The folder's checkpoint files, oldest epoch first."""
    if not folder.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        ValueError: The file is not a readable checkpoint of this format.
    """
    try:
        with safetensors.safe_open(str(path), framework="pt") as archive:
            metadata = archive.metadata() or {}
            tensors = {name: archive.get_tensor(name) for name in archive.keys()}  # not a dict
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path.name} is not a readable safetensors file: {e}") from e
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path.name} is not an onnxforge distillation checkpoint")
    optimizer: dict[int, dict[str, Any]] = {
        int(index): dict(values) for index, values in json.loads(metadata["optimizer_scalars"]).items()
    }
    student = {}
    for name, tensor in tensors.items():
        if name.startswith(_STUDENT):
            student[name.removeprefix(_STUDENT)] = tensor
        else:
            index, key = name.removeprefix(_OPTIMIZER).split("/", 1)
            optimizer.setdefault(int(index), {})[key] = tensor
    history = [EpochRecord.model_validate(record) for record in json.loads(metadata["history"])]
    return Checkpoint(student=student, optimizer=optimizer, history=history)


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest readable checkpoint in `folder` (a damaged newest file is skipped with a warning)."""
    for path in reversed(checkpoint_files(folder)):
        try:
            return load_checkpoint(path)
        except (ValueError, KeyError) as e:
            logger.warning("ignoring checkpoint %s: %s", path, e)
    return None
