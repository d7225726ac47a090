"""Validate stage: the parity chain PyTorch -> fp32 -> simplified -> int8 on every target."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from backends.base import Session
from pipeline.artifacts import Artifact, sha256_file
from pipeline.errors import BackendError, StageError
from pipeline.job import ConversionJob, DataSource
from pipeline.parity.metrics import AccuracyCounter, OutputComparator
from pipeline.parity.policy import Precision, accuracy_drop_check, fp32_checks, int8_checks
from pipeline.parity.report import AccuracyParity, Comparison, OutputParity, ParityReport, write_reports
from pipeline.stages.base import StageContext, Target, iter_torch_outputs

logger = logging.getLogger(__name__)

PYTORCH = "pytorch"
# Which policy judges each stage's output against the model before it.
_PRECISION: dict[str, Precision] = {"export": "fp32", "simplify": "fp32", "quantize": "int8"}


@dataclass
class _Step:
    """One link of the chain on one target, accumulating as batches stream through."""

    stage: str
    target: str
    reference: str
    candidate: str
    comparators: list[OutputComparator] = field(default_factory=list)
    accuracy: AccuracyCounter = field(default_factory=AccuracyCounter)


@dataclass
class _Stream:
    """What one pass over the evaluation data measured, besides the steps' own accumulators."""

    output_names: list[str] = field(default_factory=list)
    classifier: int | None = None
    pytorch_accuracy: AccuracyCounter = field(default_factory=AccuracyCounter)
    samples: int = 0


class ValidateStage:
    """Measure parity along the chain and write report.json and report.md."""

    name = "validate"

    def enabled(self, job: ConversionJob) -> bool:
        """Validation always runs: it is the product's promise."""
        return True

    def run(self, ctx: StageContext) -> Artifact:
        """Stream the evaluation data through PyTorch and every model on every target."""
        models = [ctx.artifacts[stage].path for stage in _PRECISION if stage in ctx.artifacts]
        stages = [stage for stage in _PRECISION if stage in ctx.artifacts]
        references = [PYTORCH, *models[:-1]]  # each model is judged against the one before it
        steps = [
            _Step(stage, target.name, reference, candidate)
            for target in ctx.targets
            for stage, reference, candidate in zip(stages, references, models, strict=True)
        ]
        stream = self._stream(ctx, models, steps)
        report = ParityReport.build(
            job=ctx.job.name,
            data=_describe_data(ctx.job.parity_data, "evaluation" if ctx.job.evaluation else "calibration"),
            samples=stream.samples,
            notes=_notes(ctx.job, stream),
            comparisons=[self._comparison(ctx.job, step, stream) for step in steps],
        )
        report_path = write_reports(report, ctx.workdir)
        logger.info("parity %s: %s", ctx.job.name, report.verdict)
        return Artifact(
            stage=self.name,
            path=report_path.name,
            sha256=sha256_file(report_path),
            metadata={"verdict": report.verdict},
        )

    def _stream(self, ctx: StageContext, models: list[str], steps: list[_Step]) -> _Stream:
        """One pass over the data: every model on every target sees each batch once."""
        stream = _Stream()
        rtol = ctx.job.parity.fp32.rtol
        with ExitStack() as stack:
            sessions = {
                (target.name, path): stack.enter_context(self._open(ctx, target, path))
                for target in ctx.targets
                for path in models
            }
            for batch, torch_outputs in iter_torch_outputs(ctx.model, ctx.evaluation):
                if not stream.output_names:
                    stream.output_names = next(iter(sessions.values())).output_names
                    stream.classifier = _classifier_output(torch_outputs) if ctx.job.is_classifier else None
                    for step in steps:
                        step.comparators = [
                            OutputComparator(rtol, classifier=index == stream.classifier)
                            for index in range(len(stream.output_names))
                        ]
                runs = {(target.name, PYTORCH): torch_outputs for target in ctx.targets}
                for key, session in sessions.items():
                    produced = session.run(batch.feeds)
                    runs[key] = [produced[name] for name in stream.output_names]
                classifier, labels = stream.classifier, batch.labels
                for step in steps:
                    candidate = runs[(step.target, step.candidate)]
                    reference = runs[(step.target, step.reference)]
                    for comparator, ref, cand in zip(step.comparators, reference, candidate, strict=True):
                        comparator.update(ref, cand)
                    if classifier is not None and labels is not None:
                        step.accuracy.update(candidate[classifier], labels)
                if classifier is not None and labels is not None:
                    stream.pytorch_accuracy.update(torch_outputs[classifier], labels)
                stream.samples += batch.size
        return stream

    def _open(self, ctx: StageContext, target: Target, path: str) -> Session:
        try:
            return target.backend.open(ctx.workdir / path, target.options)
        except BackendError as e:
            raise StageError(self.name, ctx.job.name, f"cannot open {path} on {target.name}: {e}") from e

    def _comparison(self, job: ConversionJob, step: _Step, stream: _Stream) -> Comparison:
        precision = _PRECISION[step.stage]
        outputs = []
        for name, comparator in zip(stream.output_names, step.comparators, strict=True):
            metrics = comparator.result()
            checks = (
                fp32_checks(metrics, job.parity.fp32) if precision == "fp32" else int8_checks(metrics, job.parity.int8)
            )
            outputs.append(OutputParity(name=name, metrics=metrics, checks=checks))
        accuracy = None
        if stream.classifier is not None and step.accuracy.total:
            reference_accuracy = stream.pytorch_accuracy.accuracy
            check = None
            if precision == "int8":
                check = accuracy_drop_check(reference_accuracy, step.accuracy.accuracy, job.parity.int8)
            accuracy = AccuracyParity(
                output=stream.output_names[stream.classifier],
                reference=reference_accuracy,
                candidate=step.accuracy.accuracy,
                check=check,
            )
        return Comparison(
            stage=step.stage,
            target=step.target,
            reference=step.reference,
            candidate=step.candidate,
            precision=precision,
            outputs=outputs,
            accuracy=accuracy,
        )


def _classifier_output(outputs: list[np.ndarray]) -> int | None:
    """Index of the first output shaped [samples, classes], used for top-1 accuracy."""
    for index, array in enumerate(outputs):
        if array.ndim == 2 and array.shape[1] > 1:
            return index
    return None


def _describe_data(source: DataSource, section: str) -> str:
    where = source.npz.name if source.npz is not None else source.factory
    return f"{section} data ({where})"


def _notes(job: ConversionJob, stream: _Stream) -> list[str]:
    notes = []
    if job.evaluation is None:
        notes.append("The job has no [evaluation] data: parity was measured on the calibration data.")
    if job.parity.int8.max_accuracy_drop is not None and not stream.pytorch_accuracy.total:
        reason = "no [samples, classes] classifier output" if stream.classifier is None else "no labels in the data"
        notes.append(f"parity.int8.max_accuracy_drop was not checked: {reason}.")
    return notes
