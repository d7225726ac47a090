"""The training loop: seeded and exact, resumable to the bit, early stopping, the teacher left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.distillation.losses import make_loss
from pipeline.distillation.summary import EpochRecord, best_epochs
from pipeline.distillation.trainer import TrainingPlan, train_student
from pipeline.feeds import Batch
from pipeline.job import DataSource, DistillOptions


class Interrupted(Exception):
    """Stands in for Ctrl-C or a killed process in the middle of training."""


def _teacher() -> torch.nn.Module:
    torch.manual_seed(123)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # Dropout: resuming must also replay the dropout masks of the epochs after the checkpoint.
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))


def _batches(teacher: torch.nn.Module, count: int, seed: int) -> list[Batch]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = rng.standard_normal((16, 4)).astype(np.float32)
        with torch.no_grad():
            labels = teacher.eval()(torch.from_numpy(x)).argmax(dim=1).numpy()
        batches.append(Batch(feeds={"x": x}, labels=labels))
    return batches


def _plan(teacher: torch.nn.Module, epochs: int = 5, patience: int = 0, **settings: object) -> TrainingPlan:
    options = DistillOptions(
        student="m:f",
        data=DataSource(factory="m:f"),
        epochs=epochs,
        patience=patience,
        **settings,  # type: ignore[arg-type]
    )
    train = _batches(teacher, 6, seed=1)
    return TrainingPlan(
        options=options,
        loss=make_loss("kd", options.temperature, options.alpha, classifier=0),
        train_batches=lambda epoch: train[epoch % 2 :] + train[: epoch % 2],  # a different order each epoch
        validation=_batches(teacher, 2, seed=2),
        metric="accuracy",
        classifier=0,
    )


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [tensor.clone() for tensor in model.state_dict().values()]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    teacher = _teacher()
    runs = []
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        student = _student(seed)
        train_student(teacher, student, _plan(teacher, seed=seed), tmp_path / folder)
        runs.append(_weights(student))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(runs[0], runs[2], strict=True))


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    teacher = _teacher()
    plan = _plan(teacher, epochs=5)
    reference = _student()
    uninterrupted = train_student(teacher, reference, plan, tmp_path / "whole")

    def stop_after_two(record: EpochRecord, best: int) -> None:
        if record.epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_student(teacher, _student(), plan, tmp_path / "split", stop_after_two)
    resumed_student = _student(seed=99)  # resuming must not depend on the fresh student's init
    resumed = train_student(teacher, resumed_student, plan, tmp_path / "split")
    assert resumed.resumed_from == 2
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4, 5]
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in uninterrupted.history]
    assert all(torch.equal(a, b) for a, b in zip(_weights(reference), _weights(resumed_student), strict=True))


def test_resume_false_starts_again(tmp_path: Path) -> None:
    teacher = _teacher()
    train_student(teacher, _student(), _plan(teacher, epochs=2), tmp_path)
    again = train_student(teacher, _student(), _plan(teacher, epochs=2, resume=False), tmp_path)
    assert again.resumed_from is None


def test_early_stop_keeps_the_last_epoch_with_the_best_score(tmp_path: Path) -> None:
    teacher = _teacher()
    # The labels are the teacher's own argmax: the held-out accuracy reaches a ceiling fast.
    outcome = train_student(teacher, _student(), _plan(teacher, epochs=60, patience=3, learning_rate=0.05), tmp_path)
    assert outcome.stopped_early and len(outcome.history) < 60
    best, first = best_epochs(outcome.history)
    assert outcome.best_epoch == best and len(outcome.history) - first == 3
    scores = [r.score for r in outcome.history]
    assert scores[best - 1] == max(scores) and all(s < max(scores) for s in scores[best:])


def test_best_epochs() -> None:
    history = [
        EpochRecord(epoch=e, learning_rate=0.1, train_loss=1.0, score=s, seconds=0.0)
        for e, s in enumerate([0.5, 0.9, 0.8, 0.9, 0.7], start=1)
    ]
    assert best_epochs(history) == (4, 2)


def test_the_teacher_is_run_in_eval_mode_without_gradients(tmp_path: Path) -> None:
    teacher = _teacher().train()
    before = _weights(teacher)
    train_student(teacher, _student(), _plan(teacher, epochs=2), tmp_path)
    assert not teacher.training
    assert all(parameter.grad is None for parameter in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(teacher), strict=True))
