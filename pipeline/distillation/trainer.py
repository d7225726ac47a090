"""The distillation training loop: seeded, checkpointed every epoch, resumable, with early stopping."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.distillation.checkpoint import (
    Checkpoint,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.distillation.losses import DistillLoss
from pipeline.distillation.summary import EpochRecord, best_epochs
from pipeline.feeds import Batch
from pipeline.job import DistillOptions
from pipeline.outputs import flatten_outputs, torch_inputs

logger = logging.getLogger(__name__)

Metric = Literal["accuracy", "cosine"]
EpochCallback = Callable[[EpochRecord, int], None]

_OPTIMIZERS: dict[str, Callable[[Iterable[torch.nn.Parameter], DistillOptions], torch.optim.Optimizer]] = {
    "adamw": lambda params, o: torch.optim.AdamW(params, lr=o.learning_rate, weight_decay=o.weight_decay),
    "adam": lambda params, o: torch.optim.Adam(params, lr=o.learning_rate, weight_decay=o.weight_decay),
    "sgd": lambda params, o: torch.optim.SGD(
        params, lr=o.learning_rate, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.momentum > 0
    ),
}


@dataclass(frozen=True)
class TrainingPlan:
    """What to train on and how to judge it.

    Attributes:
        options: The job's distillation settings.
        loss: The loss of a batch.
        train_batches: The training batches of an epoch (1-based), in that epoch's order.
        validation: Held-out batches (re-iterable).
        metric: ``accuracy`` of the classifier output against labels, or ``cosine`` to the teacher.
        classifier: Index of the ``[batch, classes]`` output (needed for accuracy).
    """

    options: DistillOptions
    loss: DistillLoss
    train_batches: Callable[[int], Iterable[Batch]]
    validation: Iterable[Batch]
    metric: Metric
    classifier: int | None


@dataclass(frozen=True)
class TrainingOutcome:
    """How training ended; the student holds the best epoch's weights.

    Attributes:
        history: Every epoch, including those of the run resumed from.
        best_epoch: The epoch whose weights the student now has.
        stopped_early: The held-out score stopped improving before the last epoch.
        resumed_from: The checkpoint epoch this run continued from (None: from the start).
    """

    history: list[EpochRecord]
    best_epoch: int
    stopped_early: bool
    resumed_from: int | None


def learning_rate(options: DistillOptions, epoch: int) -> float:
    """The learning rate of a 1-based epoch: constant, or cosine-decayed from the peak."""
    if options.schedule == "constant":
        return options.learning_rate
    return options.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / options.epochs))


def train_student(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    plan: TrainingPlan,
    checkpoints: Path,
    on_epoch: EpochCallback | None = None,
) -> TrainingOutcome:
    """Train `student` to imitate `teacher`, checkpointing every epoch into `checkpoints`.

    The teacher runs in eval mode without gradients. Epoch ``e`` seeds its data order and dropout
    from ``(seed, e)``, so a run resumed from a checkpoint continues exactly as an uninterrupted
    run would. Training stops early when the held-out score has not improved for `patience`
    epochs; the student ends with the weights of its best epoch.

    Args:
        teacher: The trained model.
        student: The model to train (initialised by the caller, seeded).
        plan: Data, loss, metric and settings.
        checkpoints: The folder of this training's checkpoints (resumed from when it has one).
        on_epoch: Called after each epoch with its record and the best epoch so far.

    Returns:
        The history and the best epoch; `student` holds that epoch's weights, in eval mode.
    """
    options = plan.options
    teacher.eval()
    optimizer = _OPTIMIZERS[options.optimizer](student.parameters(), options)
    history: list[EpochRecord] = []
    resumed_from = None
    resumed = latest_checkpoint(checkpoints) if options.resume else None
    if resumed is not None:
        student.load_state_dict(resumed.student, strict=True)
        optimizer.load_state_dict({"state": resumed.optimizer, "param_groups": optimizer.state_dict()["param_groups"]})
        history, resumed_from = list(resumed.history), resumed.epoch
        logger.info("resuming distillation after epoch %d from %s", resumed.epoch, checkpoints)
    with _deterministic():
        while len(history) < options.epochs and not _stops_early(options, history):
            history.append(_train_epoch(teacher, student, optimizer, plan, len(history) + 1))
            state = {index: dict(values) for index, values in optimizer.state_dict()["state"].items()}
            save_checkpoint(checkpoints, Checkpoint(student.state_dict(), state, history))
            if on_epoch is not None:
                on_epoch(history[-1], best_epochs(history)[0])
    best_epoch, stopped_early = best_epochs(history)[0], _stops_early(options, history)
    if stopped_early:
        logger.info("held-out %s stopped improving after epoch %d: stopped early", plan.metric, best_epoch)
    student.load_state_dict(load_checkpoint(checkpoint_path(checkpoints, best_epoch)).student, strict=True)
    student.eval()
    return TrainingOutcome(history, best_epoch, stopped_early, resumed_from)


def _stops_early(options: DistillOptions, history: list[EpochRecord]) -> bool:
    """Whether training ends after the history's last epoch, before `epochs`, for want of progress."""
    if options.patience == 0 or not history or len(history) >= options.epochs:
        return False
    return len(history) - best_epochs(history)[1] >= options.patience


def _train_epoch(
    teacher: torch.nn.Module, student: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: TrainingPlan, epoch: int
) -> EpochRecord:
    start = time.perf_counter()
    rate = learning_rate(plan.options, epoch)
    for group in optimizer.param_groups:
        group["lr"] = rate
    torch.manual_seed(plan.options.seed * 100_003 + epoch)  # this epoch's dropout, whatever ran before
    student.train()
    total, samples = 0.0, 0
    for batch in plan.train_batches(epoch):
        inputs = torch_inputs(batch.feeds)
        labels = None if batch.labels is None else torch.from_numpy(batch.labels).long()
        with torch.no_grad():
            teacher_outputs = flatten_outputs(teacher(*inputs))
        loss = plan.loss(flatten_outputs(student(*inputs)), teacher_outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * batch.size
        samples += batch.size
    if samples == 0:
        raise ValueError(f"epoch {epoch} had no training batches")
    score = held_out_score(student, teacher, plan.validation, plan.metric, plan.classifier)
    return EpochRecord(
        epoch=epoch,
        learning_rate=rate,
        train_loss=total / samples,
        score=score,
        seconds=round(time.perf_counter() - start, 4),
    )


def held_out_score(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    batches: Iterable[Batch],
    metric: Metric,
    classifier: int | None,
) -> float:
    """The held-out metric of `model`: top-1 accuracy against the labels, or the mean cosine of its
    outputs to the teacher's (each sample's output flattened; averaged over samples and outputs)."""
    model.eval()
    hits = total = 0
    cosine_sum = 0.0
    with torch.no_grad():
        for batch in batches:
            inputs = torch_inputs(batch.feeds)
            outputs = flatten_outputs(model(*inputs))
            if metric == "accuracy":
                assert classifier is not None and batch.labels is not None
                hits += int((outputs[classifier].argmax(dim=-1).numpy() == batch.labels).sum())
                total += batch.size
                continue
            for produced, expected in zip(outputs, flatten_outputs(teacher(*inputs)), strict=True):
                cosine_sum += float(F.cosine_similarity(produced.flatten(1), expected.flatten(1), dim=1).sum())
                total += batch.size
    return (hits if metric == "accuracy" else cosine_sum) / max(total, 1)


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels and a private RNG for the block; the caller's settings come back after."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
