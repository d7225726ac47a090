"""Unit tests of `DistillStage`: its preconditions, a short real training, and who is "pytorch" after it.

The teacher is a small ``torch.nn.Module`` built here; the students come from a factory module
written into a temporary folder that is on the job's python_path, as a user's would be. Training
and held-out data are small random .npz files read through real `FeedSource`s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

import pipeline
from pipeline.artifacts import sha256_file
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob
from pipeline.model_source import SourceModel
from pipeline.records import DistillRecord, StageName
from pipeline.stages.base import PreparedInputs, StageContext
from pipeline.stages.distill import STUDENT_WEIGHTS, DistillStage, pytorch_model, teacher_model
from pipeline.stages.export import ExportStage
from pipeline.stages.validate import PYTORCH, TEACHER, chain_links
from tests.conftest import resolved_target

FEATURES, CLASSES = 6, 4
EPOCHS = 3
# A module name no other test imports: the factory module is cached in sys.modules once imported.
STUDENTS = "distill_stage_students"
STUDENT_SOURCE = f"""
import torch


def small(hidden=8):
    return torch.nn.Sequential(torch.nn.Linear({FEATURES}, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, {CLASSES}))


def too_few_classes():
    return torch.nn.Sequential(torch.nn.Linear({FEATURES}, 8), torch.nn.ReLU(), torch.nn.Linear(8, {CLASSES - 1}))


def two_outputs():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear({FEATURES}, {CLASSES})

        def forward(self, x):
            return self.fc(x), self.fc(x)

    return TwoHeads()
"""


def make_teacher() -> torch.nn.Module:
    torch.manual_seed(123)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES)).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The student factory module and the data, written once."""
    root = tmp_path_factory.mktemp("distill")
    (root / f"{STUDENTS}.py").write_text(STUDENT_SOURCE)
    teacher = make_teacher()
    for name, seed, count in (("train.npz", 1, 96), ("heldout.npz", 2, 32)):
        x = np.random.default_rng(seed).normal(size=(count, FEATURES)).astype(np.float32)
        with torch.no_grad():
            labels = teacher(torch.from_numpy(x)).argmax(dim=1).numpy().astype(np.int64)
        np.savez(root / name, x=x, label=labels)
        np.savez(root / f"unlabelled_{name}", x=x)
    return root


def make_job(
    folder: Path,
    out: Path,
    student: str = "small",
    *,
    labels: bool = True,
    task: str = "classification",
    **distill: Any,
) -> ConversionJob:
    """A job distilling `student` from the teacher; labelled classifier data unless `labels` is False."""

    def data(name: str) -> dict[str, Any]:
        if labels:
            return {"npz": folder / name, "labels": "label", "batch_size": 16}
        return {"npz": folder / f"unlabelled_{name}", "batch_size": 16}

    return ConversionJob.model_validate(
        {
            "name": "tiny_distill",
            "model": {"factory": "torch.nn:Identity", "task": task},
            "inputs": [{"name": "x", "shape": ["batch", FEATURES]}],
            "evaluation": data("heldout.npz"),
            "distill": {
                "student": f"{STUDENTS}:{student}",
                "data": data("train.npz"),
                "epochs": EPOCHS,
                "learning_rate": 0.01,
                "checkpoint_dir": out.parent / "checkpoints",
                **distill,
            },
            "quantize": {"enabled": False},
            "output_dir": out,
            "python_path": [folder],
        }
    )


def evaluation(job: ConversionJob) -> FeedSource:
    assert job.evaluation is not None
    return FeedSource(job.evaluation, job.inputs, origin=job.origin, key="evaluation", python_path=job.python_path)


def prepared(job: ConversionJob, teacher: torch.nn.Module) -> PreparedInputs:
    return PreparedInputs(
        source=SourceModel(module=teacher),
        calibration=None,
        evaluation=evaluation(job),
        targets=[resolved_target("cpu")],
    )


def make_context(job: ConversionJob, teacher: torch.nn.Module, workdir: Path) -> StageContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return StageContext.prepared(job, workdir, prepared(job, teacher))


@pytest.fixture(scope="module")
def distilled(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[StageContext, torch.nn.Module, Any]:
    """The stage run once: the context (with the artifact added, as the runner does), the teacher, the artifact."""
    root = tmp_path_factory.mktemp("run")
    teacher = make_teacher()
    ctx = make_context(make_job(folder, root / "out"), teacher, root / "work")
    artifact = DistillStage().run(ctx)
    ctx.artifacts[artifact.stage] = artifact
    return ctx, teacher, artifact


def test_enabled_follows_the_distill_section(folder: Path, tmp_path: Path) -> None:
    job = make_job(folder, tmp_path / "out")

    assert DistillStage().enabled(job)
    assert not DistillStage().enabled(job.model_copy(update={"distill": None}))
    assert not DistillStage().enabled(make_job(folder, tmp_path / "out", enabled=False))


def test_check_passes_for_a_student_that_fits_the_teacher(folder: Path, tmp_path: Path) -> None:
    job = make_job(folder, tmp_path / "out")

    DistillStage().check(job, prepared(job, make_teacher()))  # raises nothing

    assert not (tmp_path / "out").exists() and not (tmp_path / "checkpoints").exists()  # nothing written


@pytest.mark.parametrize(
    ("student", "expected"),
    [
        ("too_few_classes", f"outputs of shapes [(16, {CLASSES - 1})] but the teacher [(16, {CLASSES})]"),
        ("two_outputs", f"outputs of shapes [(16, {CLASSES}), (16, {CLASSES})] but the teacher [(16, {CLASSES})]"),
        ("no_such_factory", "no_such_factory"),
    ],
)
def test_check_rejects_a_student_that_does_not_fit(folder: Path, tmp_path: Path, student: str, expected: str) -> None:
    job = make_job(folder, tmp_path / "out", student=student)

    with pytest.raises(pipeline.JobError) as caught:
        DistillStage().check(job, prepared(job, make_teacher()))

    assert caught.value.key == "distill.student"
    assert expected in caught.value.problem


def test_check_rejects_kd_without_a_classifier(folder: Path, tmp_path: Path) -> None:
    # No labels anywhere and task "other": there are no class scores for kd to soften.
    job = make_job(folder, tmp_path / "out", labels=False, task="other", loss="kd")
    assert not job.is_classifier

    with pytest.raises(pipeline.JobError) as caught:
        DistillStage().check(job, prepared(job, make_teacher()))

    assert caught.value.key == "distill.loss"
    assert "kd needs a classifier" in caught.value.problem


def test_check_rejects_training_data_without_the_model_inputs(folder: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, features=np.zeros((16, FEATURES), np.float32))
    job = make_job(folder, tmp_path / "out", data={"npz": wrong, "batch_size": 16})

    with pytest.raises(pipeline.JobError) as caught:
        DistillStage().check(job, prepared(job, make_teacher()))

    assert caught.value.key.startswith("distill.data")
    assert "features" in caught.value.problem and "'x'" in caught.value.problem


def test_run_writes_the_student_and_a_distill_record(distilled: tuple[StageContext, torch.nn.Module, Any]) -> None:
    ctx, teacher, artifact = distilled

    assert artifact.stage == "distill"
    assert artifact.path == STUDENT_WEIGHTS
    weights = ctx.workdir / STUDENT_WEIGHTS
    assert artifact.sha256 == sha256_file(weights)
    assert artifact.parent_sha256 is None
    assert sorted(p.name for p in ctx.workdir.iterdir()) == [STUDENT_WEIGHTS]  # checkpoints live elsewhere
    summary = artifact.record_as(DistillRecord).summary
    assert summary.student == f"{STUDENTS}:small"
    assert summary.loss == "kd" and summary.metric == "accuracy" and summary.alpha == 0.5
    assert summary.epochs_planned == EPOCHS
    assert 1 <= len(summary.history) <= EPOCHS
    assert [record.epoch for record in summary.history] == list(range(1, len(summary.history) + 1))
    assert 1 <= summary.best_epoch <= len(summary.history)
    best = summary.history[summary.best_epoch - 1].score
    assert best == max(record.score for record in summary.history)
    assert summary.resumed_from is None
    assert summary.batch_shape == {"x": [16, FEATURES]}
    assert summary.student_model.parameters == FEATURES * 8 + 8 + 8 * CLASSES + CLASSES
    assert summary.teacher.parameters == sum(p.numel() for p in teacher.parameters())
    assert summary.teacher.score == 1.0  # the held-out labels are the teacher's own argmax
    assert summary.student_model.score == pytest.approx(best)
    assert Path(summary.checkpoints).is_dir()
    assert artifact.metadata["summary"]["best_epoch"] == summary.best_epoch  # as the manifest shows it


def test_the_written_weights_are_the_factorys_student(distilled: tuple[StageContext, torch.nn.Module, Any]) -> None:
    ctx, _, _ = distilled
    state = safetensors.torch.load_file(str(ctx.workdir / STUDENT_WEIGHTS))

    assert sorted(state) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert tuple(state["0.weight"].shape) == (8, FEATURES)
    assert tuple(state["2.weight"].shape) == (CLASSES, 8)


def test_after_the_run_pytorch_is_the_student_and_the_job_model_is_the_teacher(
    distilled: tuple[StageContext, torch.nn.Module, Any],
) -> None:
    ctx, teacher, _ = distilled

    student = pytorch_model(ctx)

    assert student is not None and student is not teacher
    assert teacher_model(ctx) is teacher
    assert pytorch_model(ctx) is student  # loaded once
    state = safetensors.torch.load_file(str(ctx.workdir / STUDENT_WEIGHTS))
    assert all(torch.equal(tensor, state[name]) for name, tensor in student.state_dict().items())
    assert not student.training
    x = torch.from_numpy(np.random.default_rng(9).normal(size=(5, FEATURES)).astype(np.float32))
    with torch.no_grad():
        assert student(x).shape == teacher(x).shape == (5, CLASSES)
        assert not torch.allclose(student(x), teacher(x))


def test_without_a_distill_artifact_pytorch_is_the_job_model(folder: Path, tmp_path: Path) -> None:
    teacher = make_teacher()
    ctx = make_context(make_job(folder, tmp_path / "out"), teacher, tmp_path / "work")

    assert pytorch_model(ctx) is teacher
    assert teacher_model(ctx) is None


def test_the_parity_chain_starts_teacher_then_student(distilled: tuple[StageContext, torch.nn.Module, Any]) -> None:
    ctx, _, _ = distilled

    links = chain_links(ctx)

    assert [(link.stage, link.reference, link.candidate, link.precision) for link in links] == [
        (StageName.DISTILL, TEACHER, PYTORCH, "distilled")
    ]


def test_the_export_key_changes_with_the_student(
    distilled: tuple[StageContext, torch.nn.Module, Any], tmp_path: Path
) -> None:
    ctx, teacher, artifact = distilled
    plain = make_context(ctx.job, teacher, tmp_path / "plain")
    with_student = ExportStage().key(ctx)

    assert with_student is not None
    assert with_student == ExportStage().key(ctx)
    assert ExportStage().key(plain) != with_student  # no student: the teacher is exported
    plain.artifacts[artifact.stage] = artifact.model_copy(update={"sha256": "f" * 64})
    assert ExportStage().key(plain) not in (with_student, None)  # another student, another key


def test_the_same_training_resumes_from_its_checkpoint_and_gives_the_same_student(
    distilled: tuple[StageContext, torch.nn.Module, Any], tmp_path: Path
) -> None:
    ctx, teacher, artifact = distilled
    again = make_context(ctx.job, teacher, tmp_path / "again")

    assert DistillStage().key(again) == DistillStage().key(ctx)
    second = DistillStage().run(again)

    summary = second.record_as(DistillRecord).summary
    assert summary.resumed_from == len(artifact.record_as(DistillRecord).summary.history)
    assert second.sha256 == artifact.sha256


def test_another_seed_is_another_training(
    distilled: tuple[StageContext, torch.nn.Module, Any], folder: Path, tmp_path: Path
) -> None:
    ctx, teacher, artifact = distilled
    job = make_job(folder, tmp_path / "out", seed=1)
    other = make_context(job, teacher, tmp_path / "work")

    assert DistillStage().key(other) != DistillStage().key(ctx)
    second = DistillStage().run(other)

    assert second.record_as(DistillRecord).summary.resumed_from is None
    assert second.sha256 != artifact.sha256


def test_an_unlabelled_embedding_job_learns_by_cosine(folder: Path, tmp_path: Path) -> None:
    job = make_job(folder, tmp_path / "out", labels=False, task="embedding", epochs=2)
    ctx = make_context(job, make_teacher(), tmp_path / "work")

    summary = DistillStage().run(ctx).record_as(DistillRecord).summary

    assert (summary.loss, summary.metric, summary.alpha) == ("cosine", "cosine", None)
    assert 1 <= len(summary.history) <= 2 and 1 <= summary.best_epoch <= len(summary.history)
    assert summary.teacher.score == 1.0  # the teacher agrees with itself
    assert -1.0 <= summary.student_model.score <= 1.0
