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
    comparators: list[OutputComparator]
    accuracy: AccuracyCounter = field(default_factory=AccuracyCounter)


class ValidateStage:
    """Measure parity along the chain and write report.json and report.md."""

    name = "validate"

    def enabled(self, job: ConversionJob) -> bool:
        """Validation always runs: it is the product's promise."""
        return True

    def run(self, ctx: StageContext) -> Artifact:
        """Stream the evaluation data through PyTorch and every model on every target."""
        models = [(stage, ctx.artifacts[stage].path) for stage in _PRECISION if stage in ctx.artifacts]
        rtol = ctx.job.parity.fp32.rtol
        steps = [
            _Step(stage, target.name, reference, candidate, [])
            for target in ctx.targets
            for (stage, candidate), reference in zip(models, [PYTORCH] + [path for _, path in models][:-1], strict=True)
        ]
        output_names: list[str] = []
        classifier: int | None = None
        pytorch_accuracy = AccuracyCounter()
        samples = 0
        with ExitStack() as stack:
            sessions = {
                (target.name, path): stack.enter_context(self._open(ctx, target, path))
                for target in ctx.targets
                for _, path in models
            }
            for batch, torch_outputs in iter_torch_outputs(ctx.model, ctx.evaluation):
                if not output_names:
                    output_names = next(iter(sessions.values())).output_names
                    classifier = _classifier_output(torch_outputs) if ctx.job.is_classifier else None
                    for step in steps:
                        step.comparators = [
                            OutputComparator(rtol, classifier=index == classifier) for index in range(len(output_names))
                        ]
                runs = {PYTORCH: torch_outputs}
                for (target_name, path), session in sessions.items():
                    produced = session.run(batch.feeds)
                    runs[f"{target_name}:{path}"] = [produced[name] for name in output_names]
                for step in steps:
                    reference = runs[step.reference if step.reference == PYTORCH else f"{step.target}:{step.reference}"]
                    candidate = runs[f"{step.target}:{step.candidate}"]
                    for comparator, ref, cand in zip(step.comparators, reference, candidate, strict=True):
                        comparator.update(ref, cand)
                    if batch.labels is not None and classifier is not None:
                        step.accuracy.update(candidate[classifier], batch.labels)
                if batch.labels is not None and classifier is not None:
                    pytorch_accuracy.update(torch_outputs[classifier], batch.labels)
                samples += batch.size
        comparisons = [
            self._comparison(ctx.job, step, output_names, classifier, pytorch_accuracy) for step in steps
        ]
        report = ParityReport.build(
            job=ctx.job.name,
            data=_describe_data(ctx.job.parity_data, "evaluation" if ctx.job.evaluation else "calibration"),
            samples=samples,
            notes=_notes(ctx.job, classifier, pytorch_accuracy),
            comparisons=comparisons,
        )
        report_path = write_reports(report, ctx.workdir)
        logger.info("parity %s: %s", ctx.job.name, report.verdict)
        return Artifact(
            stage=self.name,
            path=report_path.name,
            sha256=sha256_file(report_path),
            metadata={"verdict": report.verdict},
        )

    def _open(self, ctx: StageContext, target: Target, path: str) -> Session:
        try:
            return target.backend.open(ctx.workdir / path, target.options)
        except BackendError as e:
            raise StageError(self.name, ctx.job.name, f"cannot open {path} on {target.name}: {e}") from e

    def _comparison(
        self,
        job: ConversionJob,
        step: _Step,
        output_names: list[str],
        classifier: int | None,
        pytorch_accuracy: AccuracyCounter,
    ) -> Comparison:
        precision = _PRECISION[step.stage]
        outputs = []
        for name, comparator in zip(output_names, step.comparators, strict=True):
            metrics = comparator.result()
            checks = (
                fp32_checks(metrics, job.parity.fp32) if precision == "fp32" else int8_checks(metrics, job.parity.int8)
            )
            outputs.append(OutputParity(name=name, metrics=metrics, checks=checks))
        accuracy = None
        if classifier is not None and step.accuracy.total:
            check = None
            if precision == "int8":
                check = accuracy_drop_check(pytorch_accuracy.accuracy, step.accuracy.accuracy, job.parity.int8)
            accuracy = AccuracyParity(
                output=output_names[classifier],
                reference=pytorch_accuracy.accuracy,
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


def _notes(job: ConversionJob, classifier: int | None, pytorch_accuracy: AccuracyCounter) -> list[str]:
    notes = []
    if job.evaluation is None:
        notes.append("The job has no [evaluation] data: parity was measured on the calibration data.")
    if job.parity.int8.max_accuracy_drop is not None and not pytorch_accuracy.total:
        reason = "no [samples, classes] classifier output" if classifier is None else "no labels in the data"
        notes.append(f"parity.int8.max_accuracy_drop was not checked: {reason}.")
    return notes
