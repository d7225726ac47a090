"""Distill stage: train a smaller student to imitate the job's model; the student is exported after."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from pipeline.artifacts import Artifact, sha256_file, write_with
from pipeline.distillation.losses import LossKind, make_loss
from pipeline.distillation.student import (
    build_student,
    check_student,
    latency_ms,
    load_student,
    parameter_count,
    state_bytes,
)
from pipeline.distillation.summary import DistillationSummary, EpochRecord, ModelSize, format_score
from pipeline.distillation.trainer import Metric, TrainingPlan, held_out_score, train_student
from pipeline.errors import JobError
from pipeline.feeds import Batch, FeedSource, describe_source
from pipeline.job import ConversionJob, DataSource, DistillOptions
from pipeline.model_source import model_hashes
from pipeline.outputs import classifier_index, flatten_outputs, torch_inputs
from pipeline.records import DistillRecord, StageName
from pipeline.stage_cache import content_key
from pipeline.stages.base import PreparedInputs, StageContext
from pipeline.stages.source_weights import source_module

logger = logging.getLogger(__name__)

STUDENT_WEIGHTS = "student.safetensors"


class DistillStage:
    """Train the job's student against its model (the teacher) and write the student's weights."""

    name = StageName.DISTILL

    def enabled(self, job: ConversionJob) -> bool:
        """When the job has an enabled [distill] section."""
        return job.distill is not None and job.distill.enabled

    def check(self, job: ConversionJob, inputs: PreparedInputs) -> None:
        """The training data is readable, the student builds and fits the teacher's outputs on a
        real training batch, and the loss suits the model.

        Raises:
            JobError: The data, the student or the loss does not fit the job.
        """
        train, validation = _feed_sources(job, inputs.evaluation)
        train.check()
        if validation is not inputs.evaluation:
            validation.check()
        assert inputs.source.module is not None, "the job validator rejects [distill] for ONNX-file sources"
        check_distillation(job, inputs.source.module, train)

    def key(self, ctx: StageContext) -> str | None:
        """The teacher's weights, the student factory, the training settings and both data sets."""
        job, options = ctx.job, _options(ctx.job)
        train, validation = _data(ctx)
        return content_key(
            self.name,
            {
                "teacher": model_hashes(job, ctx.source),
                "inputs": [spec.model_dump(mode="json") for spec in job.inputs],
                "settings": options.training_settings(),
                "data": train.digest(),
                "validation": validation.digest(),
            },
        )

    def run(self, ctx: StageContext) -> Artifact:
        """Train (resuming from the last checkpoint of the same training), then write the best student."""
        job, options = ctx.job, _options(ctx.job)
        teacher = ctx.source.module
        assert teacher is not None, "the job validator rejects [distill] for ONNX-file sources"
        train, validation = _data(ctx)
        classifier = teacher_classifier(job, teacher, ctx.example_batch().feeds)
        kind = loss_kind(job, classifier)
        has_labels = options.data.labels is not None
        metric: Metric = "accuracy" if classifier is not None and _validation_source(job).labels else "cosine"
        plan = TrainingPlan(
            options=options,
            loss=make_loss(kind, options.temperature, options.alpha, classifier),
            train_batches=lambda epoch: train.epoch(epoch, options.seed),
            validation=validation,
            metric=metric,
            classifier=classifier,
        )
        folder = checkpoint_folder(job, self.key(ctx) or "")
        student = build_student(job)

        def report(record: EpochRecord, best: int) -> None:
            score = format_score(metric, record.score)
            ctx.progress(record.epoch, options.epochs, f"loss {record.train_loss:.4f} · held-out {metric} {score}")
            logger.info("distill epoch %d/%d: %s (best epoch %d)", record.epoch, options.epochs, score, best)

        outcome = train_student(teacher, student, plan, folder, report)
        target = ctx.workdir / STUDENT_WEIGHTS
        state = {name: tensor.detach().contiguous() for name, tensor in student.state_dict().items()}
        write_with(target, lambda path: safetensors.torch.save_file(state, str(path)))
        example = ctx.example_batch()
        section = "distill.validation" if options.validation else "evaluation"
        summary = DistillationSummary(
            student=options.student,
            loss=kind,
            temperature=options.temperature,
            alpha=options.alpha if kind == "kd" and has_labels else None,
            metric=metric,
            validation=describe_source(_validation_source(job), section),
            teacher=_size(teacher, teacher, plan, example),
            student_model=_size(student, teacher, plan, example),
            batch_shape={name: list(array.shape) for name, array in example.feeds.items()},
            epochs_planned=options.epochs,
            best_epoch=outcome.best_epoch,
            stopped_early=outcome.stopped_early,
            resumed_from=outcome.resumed_from,
            history=outcome.history,
            checkpoints=str(folder),
            notes=_notes(job, kind, has_labels),
        )
        return Artifact(
            stage=self.name, path=STUDENT_WEIGHTS, sha256=sha256_file(target), record=DistillRecord(summary=summary)
        )


def teacher_classifier(job: ConversionJob, teacher: torch.nn.Module, feeds: dict[str, np.ndarray]) -> int | None:
    """The teacher's ``[batch, classes]`` output when the job is a classifier (None otherwise)."""
    if not job.is_classifier:
        return None
    with torch.no_grad():
        return classifier_index([tuple(t.shape) for t in flatten_outputs(teacher.eval()(*torch_inputs(feeds)))])


def loss_kind(job: ConversionJob, classifier: int | None) -> LossKind:
    """The job's loss, with ``auto`` resolved: kd for classifiers, cosine for embeddings, else mse.

    Raises:
        JobError: kd was asked for but the model has no classifier output.
    """
    chosen = _options(job).loss
    if chosen == "kd" and classifier is None:
        raise JobError(
            job.origin,
            "distill.loss",
            'kd needs a classifier: model.task = "classification" (or labels in the evaluation data) and an '
            'output shaped [batch, classes]; use loss = "mse" or "cosine" for other outputs',
        )
    if chosen != "auto":
        return chosen
    if classifier is not None:
        return "kd"
    return "cosine" if job.model.task == "embedding" else "mse"


def check_distillation(job: ConversionJob, teacher: torch.nn.Module, train: FeedSource) -> None:
    """Up-front checks, before anything is written: the student builds and fits the teacher's
    outputs on a real training batch, and the loss suits the model.

    Raises:
        JobError: The student or the loss does not fit the job.
    """
    shapes = check_student(job, teacher, build_student(job), next(iter(train)))
    loss_kind(job, classifier_index(shapes) if job.is_classifier else None)


def checkpoint_folder(job: ConversionJob, key: str) -> Path:
    """This training's checkpoint folder: one per job name and training key, so a changed teacher,
    student, data or setting never resumes from another training's checkpoints."""
    root = job.distill_checkpoint_dir
    assert root is not None
    return root / f"{job.name}-{key[:16]}"


def _options(job: ConversionJob) -> DistillOptions:
    assert job.distill is not None
    return job.distill


def pytorch_model(ctx: StageContext) -> torch.nn.Module | None:
    """The PyTorch model the ONNX chain starts from: the distilled student when the job distils,
    else the job's model (None for an ONNX-file source)."""
    artifact = ctx.artifact_with(DistillRecord)
    if artifact is None:
        return source_module(ctx)
    if ctx.student is None:
        ctx.student = load_student(ctx.job, ctx.workdir / artifact.path)
    return ctx.student


def pytorch_program(ctx: StageContext) -> torch.export.ExportedProgram | None:
    """The ExportedProgram to export as it is (None when a student replaced the job's model)."""
    return None if ctx.artifact_with(DistillRecord) is not None else ctx.source.program


def teacher_model(ctx: StageContext) -> torch.nn.Module | None:
    """The job's own model when a distilled student replaced it in the chain (None otherwise)."""
    return ctx.source.module if ctx.artifact_with(DistillRecord) is not None else None


def _data(ctx: StageContext) -> tuple[FeedSource, FeedSource]:
    return _feed_sources(ctx.job, ctx.evaluation)


def _feed_sources(job: ConversionJob, evaluation: FeedSource) -> tuple[FeedSource, FeedSource]:
    """The training batches and the held-out batches (the evaluation data unless the job names its own)."""
    options = _options(job)
    train = FeedSource(options.data, job.inputs, origin=job.origin, key="distill.data", python_path=job.python_path)
    if options.validation is None:
        return train, evaluation
    validation = FeedSource(
        options.validation, job.inputs, origin=job.origin, key="distill.validation", python_path=job.python_path
    )
    return train, validation


def _validation_source(job: ConversionJob) -> DataSource:
    return _options(job).validation or job.parity_data


def _size(model: torch.nn.Module, teacher: torch.nn.Module, plan: TrainingPlan, example: Batch) -> ModelSize:
    return ModelSize(
        parameters=parameter_count(model),
        state_bytes=state_bytes(model),
        latency_ms=round(latency_ms(model, example), 4),
        score=held_out_score(model, teacher, plan.validation, plan.metric, plan.classifier),
    )


def _notes(job: ConversionJob, kind: LossKind, has_labels: bool) -> list[str]:
    notes = []
    if _options(job).validation is None:
        notes.append(
            "No [distill.validation] data: the best epoch and early stop were chosen on the evaluation data, "
            "which the parity chain also measures, so the student's figures there are slightly optimistic."
        )
    if kind == "kd" and not has_labels:
        notes.append("The training data has no labels: kd learned from the teacher alone (alpha unused).")
    return notes
