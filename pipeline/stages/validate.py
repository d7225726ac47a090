"""Validate stage: the parity chain PyTorch -> fp32 -> simplified -> pruned -> int8 on every target."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx_ir as ir

from backends.base import PlacementReport, Session
from backends.registry import get_backend
from pipeline.artifacts import Artifact, sha256_file
from pipeline.distillation.summary import DistillationSummary
from pipeline.errors import BackendError, JobError, StageError, first_line
from pipeline.feeds import describe_source
from pipeline.job import ConversionJob, TaskPolicy
from pipeline.outputs import classifier_index, run_torch
from pipeline.parity.localize import Localisation, localize
from pipeline.parity.metrics import AccuracyCounter, OutputComparator
from pipeline.parity.policy import Precision, accuracy_drop_check, fp32_checks, task_checks
from pipeline.parity.report import AccuracyParity, Comparison, OutputParity, ParityReport
from pipeline.parity.target import ThreeWay
from pipeline.parity.writers import write_reports
from pipeline.pruning.summary import PruningSummary
from pipeline.quantization.performance import PerformanceCheck, performance_check
from pipeline.stages.base import StageContext, Target, resize_feeds

logger = logging.getLogger(__name__)

PYTORCH = "pytorch"
TEACHER = "teacher"  # the job's model, when a distilled student takes its place as "pytorch"
CPU = "cpu"  # the reference backend of on-target parity
# Which policy judges each stage's output against the model before it.
_PRECISION: dict[str, Precision] = {
    "distill": "distilled",
    "export": "fp32",
    "simplify": "fp32",
    "prune": "pruned",
    "quantize": "int8",
}

# The [parity.*] section of each task-level precision.
_POLICY_SECTION: dict[Precision, str] = {"distilled": "distill", "pruned": "prune", "int8": "int8"}

Sessions = dict[tuple[str, str], Session]
Runs = dict[tuple[str, str], list[np.ndarray]]


@dataclass
class _Step:
    """One link of the chain on one target, accumulating as batches stream through."""

    stage: str
    target: str
    reference: str
    candidate: str
    comparators: list[OutputComparator] = field(default_factory=list)

    def update(self, runs: Runs) -> None:
        """Compare the candidate's outputs on one batch with the reference's."""
        reference = runs[(self.target, self.reference)]
        candidate = runs[(self.target, self.candidate)]
        for comparator, ref, cand in zip(self.comparators, reference, candidate, strict=True):
            comparator.update(ref, cand)


@dataclass
class _Stream:
    """What one pass over the evaluation data measured, besides the steps' own accumulators."""

    output_names: list[str] = field(default_factory=list)
    classifier: int | None = None
    accuracy: dict[tuple[str, str], AccuracyCounter] = field(default_factory=dict)
    on_target: dict[str, ThreeWay] = field(default_factory=dict)
    samples: int = 0
    comparators_ready: bool = False


class ValidateStage:
    """Measure parity along the chain and write report.json and report.md."""

    name = "validate"

    def enabled(self, job: ConversionJob) -> bool:
        """Validation always runs: it is the product's promise."""
        return True

    def key(self, ctx: StageContext) -> str | None:
        """Never cached: parity (and the speed guard) are measured on every run."""
        return None

    def run(self, ctx: StageContext) -> Artifact:
        """Stream the evaluation data through PyTorch and every model on every target."""
        stages = [stage for stage in _PRECISION if stage in ctx.artifacts and stage != "distill"]
        models = [ctx.artifacts[stage].path for stage in stages]
        # Each model is judged against the one before it; the root is PyTorch (the teacher, then its
        # student, when the job distils), or the ONNX file given.
        if "distill" in ctx.artifacts:
            roots, stages = [TEACHER, PYTORCH], ["distill", *stages]
        elif ctx.source.module is not None:
            roots = [PYTORCH]
        else:  # the given ONNX file (the export artifact) is the root, not a link
            roots, stages = [], stages[1:]
        chain = [*roots, *models]
        steps = [
            _Step(stage, target.name, reference, candidate)
            for target in ctx.targets
            for stage, reference, candidate in zip(stages, chain[:-1], chain[1:], strict=True)
        ]
        with ExitStack() as stack:
            sessions: Sessions = {
                (target.name, path): stack.enter_context(self._open(ctx, target, path))
                for target in ctx.targets
                for path in models
            }
            output_names = next(iter(sessions.values())).output_names
            # Before the data streams through: a misnamed override is bad input, found at once.
            _check_output_overrides(ctx.job, output_names)
            stream = _Stream(on_target=self._on_target(ctx, sessions, stack, output_names))
            self._stream(ctx, sessions, steps, stream)
            comparisons = [self._comparison(ctx.job, step, stream) for step in steps]
            comparisons += self._shape_checks(ctx, sessions, stream, steps)
            placements = [self._placement(ctx, target, models[-1]) for target in ctx.targets]
            performance = self._performance(ctx, sessions, placements)
        localisations = self._localise(ctx, comparisons)
        pruning = distillation = None
        if "prune" in ctx.artifacts:
            pruning = PruningSummary.model_validate(ctx.artifacts["prune"].metadata["summary"])
        if "distill" in ctx.artifacts:
            distillation = DistillationSummary.model_validate(ctx.artifacts["distill"].metadata["summary"])
        report = ParityReport.build(
            job=ctx.job.name,
            data=describe_source(ctx.job.parity_data, "evaluation" if ctx.job.evaluation else "calibration"),
            samples=stream.samples,
            notes=_notes(ctx, stream),
            comparisons=comparisons,
            performance=performance,
            pruning=pruning,
            distillation=distillation,
            localisations=localisations,
            placements=placements,
            on_target=[three_way.result() for three_way in stream.on_target.values()],
            max_fallback={target.name: target.spec.max_fallback for target in ctx.targets},
        )
        report_path = write_reports(report, ctx.workdir)
        logger.info("parity %s: %s", ctx.job.name, report.verdict)
        return Artifact(
            stage=self.name,
            path=report_path.name,
            sha256=sha256_file(report_path),
            metadata={"verdict": report.verdict},
        )

    def _stream(self, ctx: StageContext, sessions: Sessions, steps: list[_Step], stream: _Stream) -> None:
        """One pass over the data: every model on every target sees each batch once."""
        rtol = ctx.job.parity.fp32.rtol
        for batch in ctx.evaluation:
            runs = self._run_all(ctx, sessions, batch.feeds, stream)
            if not stream.comparators_ready:
                shapes = [array.shape for array in runs[next(iter(runs))]]
                stream.classifier = classifier_index(shapes) if ctx.job.is_classifier else None
                for step in steps:
                    step.comparators = _comparators(len(stream.output_names), rtol, stream.classifier)
                stream.comparators_ready = True
            for step in steps:
                step.update(runs)
            for target, three_way in stream.on_target.items():
                float_model, int8 = three_way.float_model, three_way.int8_model
                three_way.update(runs[(CPU, float_model)], runs[(CPU, int8)], runs[(target, int8)])
            if stream.classifier is not None and batch.labels is not None:
                for key, outputs in runs.items():
                    stream.accuracy.setdefault(key, AccuracyCounter()).update(outputs[stream.classifier], batch.labels)
            stream.samples += batch.size

    def _run_all(self, ctx: StageContext, sessions: Sessions, feeds: dict[str, np.ndarray], stream: _Stream) -> Runs:
        """Outputs of PyTorch (when there is a module) and of every session, on one batch."""
        if not stream.output_names:
            stream.output_names = next(iter(sessions.values())).output_names
        runs: Runs = {}
        teacher = ctx.source.module if "distill" in ctx.artifacts else None
        for role, model in ((TEACHER, teacher), (PYTORCH, ctx.pytorch_model)):
            if model is not None:
                torch_outputs = run_torch(model, feeds)
                runs.update({(target.name, role): torch_outputs for target in ctx.targets})
        for key, session in sessions.items():
            produced = session.run(feeds)
            runs[key] = [produced[name] for name in stream.output_names]
        return runs

    def _shape_checks(
        self, ctx: StageContext, sessions: Sessions, stream: _Stream, steps: list[_Step]
    ) -> list[Comparison]:
        """The whole chain again at each extra shape the job lists (inputs cut or tiled from the example).

        Float links (export, simplify) must hold at any shape and are gated. Pruned and int8 links
        are measured but not gated here: cut or tiled copies of one batch are not the data their
        task-level policy is about.
        """
        example = ctx.example_batch().feeds
        comparisons = []
        for sizes in ctx.job.export.check_shapes:
            runs = self._run_all(ctx, sessions, resize_feeds(example, ctx.job.inputs, sizes), stream)
            for template in steps:
                step = _Step(template.stage, template.target, template.reference, template.candidate)
                step.comparators = _comparators(len(stream.output_names), ctx.job.parity.fp32.rtol, stream.classifier)
                step.update(runs)
                # Accuracy is measured on the evaluation data only, not on these resized copies.
                comparison = self._comparison(ctx.job, step, stream)
                update: dict[str, object] = {"shape": dict(sizes), "accuracy": None}
                if comparison.precision != "fp32":
                    update["outputs"] = [output.model_copy(update={"checks": []}) for output in comparison.outputs]
                comparisons.append(comparison.model_copy(update=update))
        return comparisons

    def _localise(self, ctx: StageContext, comparisons: list[Comparison]) -> list[Localisation]:
        """Where the error enters, for each pair of ONNX models the policy asks about (once per pair)."""
        mode = ctx.job.parity.localize
        pairs = {
            (c.reference, c.candidate): None
            for c in comparisons
            if c.reference not in (PYTORCH, TEACHER)
            and c.shape is None
            and (mode == "always" or (mode == "on_failure" and not c.passed))
        }
        if mode == "never" or not pairs:
            return []
        batches = [batch.feeds for batch in islice(ctx.evaluation, ctx.job.parity.localize_batches)]
        results = []
        for reference, candidate in pairs:
            try:
                results.append(
                    localize(
                        ir.load(ctx.workdir / reference),
                        ir.load(ctx.workdir / candidate),
                        batches,
                        reference_name=reference,
                        candidate_name=candidate,
                    )
                )
            except Exception as e:  # noqa: BLE001 - a diagnostic: report why, keep the verdict
                logger.warning("localisation of %s vs %s failed: %s", candidate, reference, first_line(e))
        return results

    def _on_target(
        self, ctx: StageContext, sessions: Sessions, stack: ExitStack, output_names: list[str]
    ) -> dict[str, ThreeWay]:
        """Three-way accumulators for every non-CPU target, opening the CPU references when no target is CPU."""
        others = [target for target in ctx.targets if target.name != CPU]
        if "quantize" not in ctx.artifacts or not others:
            return {}
        before, int8 = _quantized_pair(ctx)
        cpu = get_backend(CPU)
        for path in (before, int8):
            if (CPU, path) not in sessions:
                sessions[(CPU, path)] = stack.enter_context(cpu.open(ctx.workdir / path))
        return {target.name: ThreeWay(target.name, before, int8, output_names) for target in others}

    def _placement(self, ctx: StageContext, target: Target, model: str) -> PlacementReport:
        """Where each node of the final model runs on the target."""
        try:
            return target.backend.placement(ctx.workdir / model, target.options)
        except BackendError as e:
            raise StageError(self.name, ctx.job.name, f"cannot place {model} on {target.name}: {e}") from e

    def _performance(
        self, ctx: StageContext, sessions: Sessions, placements: list[PlacementReport]
    ) -> list[PerformanceCheck]:
        """int8 vs the model it was quantized from, timed on each target whose sessions time the device.

        The CPU guard explains itself with the unfused Q/DQ count its placement already measured on
        the int8 model (the last of the chain when quantize ran); other targets show theirs in the
        Placement section.
        """
        if "quantize" not in ctx.artifacts:
            return []
        before, int8 = _quantized_pair(ctx)
        feeds = ctx.example_batch().feeds
        unfused = {placement.backend: placement.unfused_qdq for placement in placements}
        return [
            performance_check(
                target.name,
                sessions[(target.name, before)],
                sessions[(target.name, int8)],
                ctx.workdir / int8,
                feeds,
                unfused_qdq=unfused[target.name] if target.name == CPU else None,
            )
            for target in ctx.targets
            if target.backend.capabilities.measured_latency
        ]

    def _open(self, ctx: StageContext, target: Target, path: str) -> Session:
        try:
            return target.backend.open(ctx.workdir / path, target.options)
        except BackendError as e:
            raise StageError(self.name, ctx.job.name, f"cannot open {path} on {target.name}: {e}") from e

    def _comparison(self, job: ConversionJob, step: _Step, stream: _Stream) -> Comparison:
        precision = _PRECISION[step.stage]
        section = _POLICY_SECTION.get(precision, "int8")
        task_policy: TaskPolicy = getattr(job.parity, section)
        outputs = []
        for name, comparator in zip(stream.output_names, step.comparators, strict=True):
            metrics = comparator.result()
            override = job.parity.outputs.get(name)
            if precision == "fp32":
                checks = fp32_checks(metrics, (override and override.fp32) or job.parity.fp32)
            else:
                checks = task_checks(metrics, (override and getattr(override, section)) or task_policy)
            outputs.append(OutputParity(name=name, metrics=metrics, checks=checks))
        accuracy = None
        reference = stream.accuracy.get((step.target, step.reference))
        candidate = stream.accuracy.get((step.target, step.candidate))
        if stream.classifier is not None and reference is not None and candidate is not None and candidate.total:
            check = None
            if precision != "fp32":
                check = accuracy_drop_check(reference.accuracy, candidate.accuracy, task_policy)
            accuracy = AccuracyParity(
                output=stream.output_names[stream.classifier],
                reference=reference.accuracy,
                candidate=candidate.accuracy,
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


def _quantized_pair(ctx: StageContext) -> tuple[str, str]:
    """The model quantize started from, and the int8 model it wrote."""
    quantized = ctx.artifacts["quantize"]
    before = next(a.path for a in ctx.artifacts.values() if a.sha256 == quantized.parent_sha256)
    return before, quantized.path


def _check_output_overrides(job: ConversionJob, output_names: list[str]) -> None:
    """Every [parity.outputs.NAME] must name an output of the model."""
    for name in job.parity.outputs:
        if name not in output_names:
            raise JobError(
                job.origin, f"parity.outputs.{name}", f"the model has no output {name!r}; its outputs: {output_names}"
            )


def _comparators(count: int, rtol: float, classifier: int | None) -> list[OutputComparator]:
    return [OutputComparator(rtol, classifier=index == classifier) for index in range(count)]


def _notes(ctx: StageContext, stream: _Stream) -> list[str]:
    job = ctx.job
    notes = []
    if job.evaluation is None:
        notes.append("The job has no [evaluation] data: parity was measured on the calibration data.")
    if ctx.source.module is None:
        notes.append("The model came as an ONNX file: the chain starts at it; there is no PyTorch reference.")
    if job.export.check_shapes and any(stage in ctx.artifacts for stage in ("prune", "quantize")):
        notes.append(
            "At the export.check_shapes sizes, pruned and int8 models are measured but not gated: their inputs are "
            "cut or tiled copies of one evaluation batch, not the data the task-level policy is about."
        )
    if "quantize" in ctx.artifacts:
        for target in ctx.targets:
            if not target.backend.capabilities.measured_latency:
                notes.append(
                    f"{target.name} runs on an emulator: its int8 latency is the cost model's estimate in the "
                    "Placement section, not a timing."
                )
    reason = "no [samples, classes] classifier output" if stream.classifier is None else "no labels in the data"
    for stage in ("distill", "prune", "quantize"):
        section = _POLICY_SECTION[_PRECISION[stage]]
        policy: TaskPolicy = getattr(job.parity, section)
        if stage in ctx.artifacts and policy.max_accuracy_drop is not None and not stream.accuracy:
            notes.append(f"parity.{section}.max_accuracy_drop was not checked: {reason}.")
    return notes
