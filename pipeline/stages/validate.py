"""Validate stage: the parity chain PyTorch -> fp32 -> simplified -> pruned -> int8 on every target."""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx_ir as ir

from backends.base import PlacementReport, Session
from backends.registry import get_backend
from pipeline.artifacts import Artifact, sha256_file
from pipeline.errors import BackendError, JobError, first_line
from pipeline.feeds import describe_source
from pipeline.job import POLICY_SECTIONS, ConversionJob, Precision, TaskPolicy
from pipeline.llm.job import is_causal_lm, without_padding
from pipeline.llm.validate_generation import chain_reference, generation_parity
from pipeline.model_source import input_hashes
from pipeline.outputs import run_torch
from pipeline.parity.chain import Link, ParityChain, RunKey, Runs
from pipeline.parity.generation import GenerationParity
from pipeline.parity.localize import Localisation, localize
from pipeline.parity.report import Comparison, ParityReport
from pipeline.parity.summary import KeptFloat, ModelFile, Probe, QuantizationSummary, RunFacts, StageTiming
from pipeline.parity.target import PlacementLimits, ThreeWay
from pipeline.parity.writers import write_reports
from pipeline.quantization.performance import PerformanceCheck, performance_check
from pipeline.records import DistillRecord, ModelRecord, PruneRecord, QuantizeRecord, StageName, ValidateRecord
from pipeline.stages.base import NoPreconditions, StageContext, Target, resize_feeds
from pipeline.stages.distill import pytorch_model, teacher_model
from pipeline.stages.hls import hls_summaries
from pipeline.versions import tool_versions

logger = logging.getLogger(__name__)

PYTORCH = "pytorch"
TEACHER = "teacher"  # the job's model, when a distilled student takes its place as "pytorch"
CPU = "cpu"  # the reference backend of on-target parity

Sessions = dict[RunKey, Session]


@dataclass
class _Stream:
    """What one pass over the evaluation data measured, besides the chain's own accumulators."""

    chain: ParityChain
    output_names: list[str]
    on_target: dict[str, ThreeWay] = field(default_factory=dict)


class ValidateStage(NoPreconditions):
    """Measure parity along the chain and write report.json and report.md."""

    name = StageName.VALIDATE

    def enabled(self, job: ConversionJob) -> bool:
        """Validation always runs: it is the product's promise."""
        return True

    def key(self, ctx: StageContext) -> str | None:
        """Never cached: parity (and the speed guard) are measured on every run."""
        return None

    def run(self, ctx: StageContext) -> Artifact:
        """Stream the evaluation data through PyTorch and every model on every target."""
        start = time.perf_counter()
        chains = {
            target.name: [artifact.path for artifact in _distinct_models(ctx.model_chain(target.name))]
            for target in ctx.targets
        }
        links = chain_links(ctx)
        with ExitStack() as stack:
            sessions: Sessions = {
                (target.name, path): stack.enter_context(self._open(ctx, target, path))
                for target in ctx.targets
                for path in chains[target.name]
            }
            output_names = next(iter(sessions.values())).output_names
            # Before the data streams through: a misnamed override is bad input, found at once.
            _check_output_overrides(ctx.job, output_names)
            chain = ParityChain(links, output_names, rtol=ctx.job.parity.fp32.rtol, is_classifier=ctx.job.is_classifier)
            stream = _Stream(chain, output_names, self._on_target(ctx, sessions, stack, output_names))
            self._stream(ctx, sessions, stream)
            comparisons = chain.judge(ctx.job.parity) + self._shape_checks(ctx, sessions, stream)
            placements = [self._placement(ctx, target, chains[target.name][-1]) for target in ctx.targets]
            performance = self._performance(ctx, sessions, placements)
            generation = self._generation(ctx, sessions)
        facts = run_facts(ctx, time.perf_counter() - start)
        if generation is not None:
            facts = facts.model_copy(update={"generation": generation})
        report = self._report(ctx, stream, comparisons, placements, performance, facts)
        report_path = write_reports(report, ctx.workdir)
        logger.info("parity %s: %s", ctx.job.name, report.verdict)
        return Artifact(
            stage=self.name,
            path=report_path.name,
            sha256=sha256_file(report_path),
            record=ValidateRecord(verdict=report.verdict),
        )

    def _report(
        self,
        ctx: StageContext,
        stream: _Stream,
        comparisons: list[Comparison],
        placements: list[PlacementReport],
        performance: list[PerformanceCheck],
        facts: RunFacts,
    ) -> ParityReport:
        pruning, distillation = ctx.record(PruneRecord), ctx.record(DistillRecord)
        return ParityReport.build(
            job=ctx.job.name,
            data=describe_source(ctx.job.parity_data, "evaluation" if ctx.job.evaluation else "calibration"),
            samples=stream.chain.samples,
            notes=_notes(ctx, stream.chain),
            comparisons=comparisons,
            performance=performance,
            pruning=pruning.summary if pruning is not None else None,
            distillation=distillation.summary if distillation is not None else None,
            localisations=self._localise(ctx, comparisons),
            placements=placements,
            on_target=[three_way.result() for three_way in stream.on_target.values()],
            limits={target.name: _placement_limits(target) for target in ctx.targets},
            facts=facts,
        )

    def _stream(self, ctx: StageContext, sessions: Sessions, stream: _Stream) -> None:
        """One pass over the data: every model on every target sees each batch once."""
        for batch in ctx.evaluation:
            runs = self._run_all(ctx, sessions, batch.feeds, stream.output_names)
            stream.chain.update(runs, batch.size, batch.labels)
            for target, three_way in stream.on_target.items():
                float_model, int8 = three_way.float_model, three_way.int8_model
                three_way.update(runs[(CPU, float_model)], runs[(CPU, int8)], runs[(target, int8)])

    def _run_all(self, ctx: StageContext, sessions: Sessions, feeds: dict[str, np.ndarray], names: list[str]) -> Runs:
        """Outputs of PyTorch (when there is a module) and of every session, on one batch."""
        runs: Runs = {}
        for role, model in ((TEACHER, teacher_model(ctx)), (PYTORCH, pytorch_model(ctx))):
            if model is not None:
                torch_outputs = run_torch(chain_reference(model) if is_causal_lm(ctx.job) else model, feeds)
                runs.update({(target.name, role): torch_outputs for target in ctx.targets})
        for key, session in sessions.items():
            produced = session.run(feeds)
            runs[key] = [produced[name] for name in names]
        if is_causal_lm(ctx.job):
            runs = {key: without_padding(feeds, names, values) for key, values in runs.items()}
        return runs

    def _generation(self, ctx: StageContext, sessions: Sessions) -> GenerationParity | None:
        """A causal LM's generation parity on every (target, model), against PyTorch (None otherwise)."""
        model = pytorch_model(ctx)
        if not is_causal_lm(ctx.job) or model is None:
            return None
        records = {artifact.path: artifact.record_as(ModelRecord) for artifact in ctx.all_models()}
        return generation_parity(ctx.job, model, ctx.evaluation, sessions, records)

    def _shape_checks(self, ctx: StageContext, sessions: Sessions, stream: _Stream) -> list[Comparison]:
        """The whole chain again at each extra shape the job lists (inputs cut or tiled from the example).

        Float links (export, simplify) must hold at any shape and are gated. Pruned and int8 links
        are measured but not gated here: cut or tiled copies of one batch are not the data their
        task-level policy is about. Accuracy is measured on the evaluation data only.
        """
        example = ctx.example_batch().feeds
        job = ctx.job
        comparisons = []
        for sizes in job.export.check_shapes:
            runs = self._run_all(ctx, sessions, resize_feeds(example, job.inputs, sizes), stream.output_names)
            at_shape = ParityChain(
                stream.chain.links, stream.output_names, rtol=job.parity.fp32.rtol, is_classifier=job.is_classifier
            )
            at_shape.update(runs, ctx.example_batch().size)
            for comparison in at_shape.judge(job.parity):
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
        three_ways = {}
        cpu = get_backend(CPU)
        for target in ctx.targets:
            pair = _quantized_pair(ctx, target.name)
            if pair is None or target.name == CPU:
                continue
            for path in pair:  # the target's own int8 model on the CPU reference too
                if (CPU, path) not in sessions:
                    try:
                        sessions[(CPU, path)] = stack.enter_context(cpu.open(ctx.workdir / path))
                    except BackendError as e:
                        raise _model_error(ctx, e, "open", path, CPU) from e
            three_ways[target.name] = ThreeWay(target.name, *pair, output_names)
        return three_ways

    def _placement(self, ctx: StageContext, target: Target, model: str) -> PlacementReport:
        """Where each node of the final model runs on the target."""
        try:
            return target.backend.placement(ctx.workdir / model, target.options)
        except BackendError as e:
            raise _model_error(ctx, e, "place", model, target.name) from e

    def _performance(
        self, ctx: StageContext, sessions: Sessions, placements: list[PlacementReport]
    ) -> list[PerformanceCheck]:
        """int8 vs the model it was quantized from, timed on each target whose sessions time the device.

        The CPU guard explains itself with the unfused Q/DQ count its placement already measured on
        the int8 model (the last of the chain when quantize ran); other targets show theirs in the
        Placement section.
        """
        feeds = ctx.example_batch().feeds
        unfused = {placement.backend: placement.unfused_qdq for placement in placements}
        checks = []
        for target in ctx.targets:
            pair = _quantized_pair(ctx, target.name)
            if pair is None or not target.capabilities.measured_latency:
                continue
            before, int8 = pair
            checks.append(
                performance_check(
                    target.name,
                    sessions[(target.name, before)],
                    sessions[(target.name, int8)],
                    ctx.workdir / int8,
                    feeds,
                    unfused_qdq=unfused[target.name] if target.name == CPU else None,
                    required=ctx.job.quantize.require_speedup,
                )
            )
        return checks

    def _open(self, ctx: StageContext, target: Target, path: str) -> Session:
        try:
            return target.backend.open(ctx.workdir / path, target.options)
        except BackendError as e:
            raise _model_error(ctx, e, "open", path, target.name) from e


def run_facts(ctx: StageContext, validate_seconds: float) -> RunFacts:
    """What the report shows of the run besides parity: model files, quantize's choices, stage times
    (validate's own up to now), tool versions and input hashes."""
    timings = [
        StageTiming(
            stage=run.name,
            seconds=run.seconds,
            status="restored" if run.restored else "skipped" if run.artifact is None else "ran",
        )
        for run in ctx.stage_runs
    ]
    timings.append(StageTiming(stage=StageName.VALIDATE, seconds=round(validate_seconds, 4), status="ran"))
    models = [
        ModelFile(
            stage=a.stage,
            file=a.path,
            bytes=sum((ctx.workdir / name).stat().st_size for name in [a.path, *a.external_data]),
        )
        for a in ctx.all_models()
    ]
    return RunFacts(
        models=models,
        quantization=_quantization(ctx),
        stage_timings=timings,
        hls=hls_summaries(ctx),
        tool_versions=tool_versions(),
        input_hashes=input_hashes(ctx.job, ctx.source),
    )


def _quantization(ctx: StageContext) -> list[QuantizationSummary]:
    """Per int8 model: the mixed-precision probes and the nodes kept float (empty: the job does not quantize)."""
    return [
        _quantization_summary(artifact) for artifact in ctx.all_models() if isinstance(artifact.record, QuantizeRecord)
    ]


def _quantization_summary(artifact: Artifact) -> QuantizationSummary:
    record = artifact.record_as(QuantizeRecord)
    return QuantizationSummary(
        model=artifact.path,
        targets=artifact.targets,
        recipe=record.recipe,
        probes=[
            Probe(kept_float=p.kept_float, passed=p.passed, summary=p.summary) for p in record.mixed_precision_probes
        ],
        kept_float=[
            KeptFloat(node=node, reason=why, damage=record.kept_float_damage.get(node))
            for node, why in record.kept_float.items()
        ],
        dynamic_nodes=record.dynamic_nodes,
        decision=record.decision,
        shipped_precision=record.shipped_precision,
    )


def _model_error(ctx: StageContext, error: BackendError, action: str, path: str, target: str) -> BackendError:
    """A backend that cannot open or place one of the job's models: bad input (the user's model or
    target), named by the model's file, the stage that made it, and the target."""
    artifact = next((a for a in ctx.artifacts.values() if a.path == path), None)
    made_by = f", from the {artifact.stage} stage" if artifact is not None else ""
    given = ctx.job.model.onnx
    if artifact is not None and artifact.stage == StageName.EXPORT and given is not None:
        made_by = f", the job's model.onnx {given}"
    reason = error.reason.replace(f"{ctx.workdir}{os.sep}", "")  # the staging folder is gone by the time it is read
    problem = f"cannot {action} {path} (job {ctx.job.name!r}{made_by}) on target {target!r}: {reason}"
    return BackendError(error.backend, problem, error.hint)


def chain_links(ctx: StageContext) -> list[Link]:
    """The parity chain on every target: each model judged against the one before it.

    The root is PyTorch (the teacher, then its student, when the job distils), or the ONNX file
    given (the export artifact, which is then the root and not a link). Each link's precision is
    the one its stage's record names.
    """
    distilled = ctx.artifact_with(DistillRecord)
    links = []
    for target in ctx.targets:
        models = _distinct_models(ctx.model_chain(target.name))
        judged: list[Artifact] = [*([distilled] if distilled is not None else []), *models]
        if distilled is not None:
            roots = [TEACHER, PYTORCH]
        elif ctx.source.module is not None:
            roots = [PYTORCH]
        else:
            roots, judged = [], judged[1:]
        chain = [*roots, *(model.path for model in models)]
        for artifact, reference, candidate in zip(judged, chain[:-1], chain[1:], strict=True):
            precision = type(artifact.record).precision if artifact.record is not None else None
            assert precision is not None, f"the {artifact.stage} artifact is no link of the parity chain"
            links.append(Link.on_target(artifact.stage, target.name, reference, candidate, precision))
    return links


def _quantized_pair(ctx: StageContext, target: str) -> tuple[str, str] | None:
    """The model quantize started from, and the int8 model it wrote for `target` (None: the job does not quantize)."""
    quantized = ctx.artifact_with(QuantizeRecord, target)
    if quantized is None or quantized.record_as(QuantizeRecord).shipped_precision == "fp32":
        return None
    before = next(a.path for a in ctx.artifacts.values() if a.sha256 == quantized.parent_sha256)
    return before, quantized.path


def _distinct_models(chain: list[Artifact]) -> list[Artifact]:
    """A chain without a stage's artifact that is the model before it (quantize shipping the float
    model for a target): nothing to compare, the chain ends at that float model."""
    return [a for index, a in enumerate(chain) if index == 0 or a.path != chain[index - 1].path]


def _check_output_overrides(job: ConversionJob, output_names: list[str]) -> None:
    """Every [parity.outputs.NAME] must name an output of the model."""
    for name in job.parity.outputs:
        if name not in output_names:
            raise JobError(
                job.origin, f"parity.outputs.{name}", f"the model has no output {name!r}; its outputs: {output_names}"
            )


def _notes(ctx: StageContext, chain: ParityChain) -> list[str]:
    job = ctx.job
    notes = []
    if job.evaluation is None:
        notes.append("The job has no [evaluation] data: parity was measured on the calibration data.")
    if ctx.source.module is None:
        notes.append("The model came as an ONNX file: the chain starts at it; there is no PyTorch reference.")
    task_level = {link.precision for link in chain.links} - {"fp32"}
    if job.export.check_shapes and task_level - {"distilled"}:
        notes.append(
            "At the export.check_shapes sizes, pruned and int8 models are measured but not gated: their inputs are "
            "cut or tiled copies of one evaluation batch, not the data the task-level policy is about."
        )
    if ctx.artifact_with(QuantizeRecord) is not None:
        for target in ctx.targets:
            if not target.capabilities.measured_latency:
                notes.append(
                    f"{target.name} runs on an emulator: its int8 latency is the cost model's estimate in the "
                    "Placement section, not a timing."
                )
    return notes + _dropped_notes(ctx) + _unchecked_accuracy_notes(job, chain, task_level)


def _dropped_notes(ctx: StageContext) -> list[str]:
    """Samples the parity data lost to NaN or infinity (``nonfinite = "drop"``)."""
    dropped = ctx.evaluation.dropped_samples
    if not dropped:
        return []
    section = "evaluation" if ctx.job.evaluation is not None else "calibration"
    return [f"{dropped} samples holding NaN or infinity were left out of the parity data ({section}.nonfinite = drop)."]


def _unchecked_accuracy_notes(job: ConversionJob, chain: ParityChain, precisions: set[Precision]) -> list[str]:
    """Which accuracy-drop limits could not be checked, and why."""
    if chain.accuracy_measured:
        return []
    classifier = chain.roles.classifier if chain.roles is not None else None
    reason = "no [samples, classes] classifier output" if classifier is None else "no labels in the data"
    notes = []
    for precision in ("distilled", "pruned", "int8"):
        rule = job.parity.section(precision)
        if precision in precisions and isinstance(rule, TaskPolicy) and rule.max_accuracy_drop is not None:
            notes.append(f"parity.{POLICY_SECTIONS[precision]}.max_accuracy_drop was not checked: {reason}.")
    return notes


def _placement_limits(target: Target) -> PlacementLimits:
    """What the target's job entry asks of its placement."""
    spec = target.spec
    return PlacementLimits(spec.max_fallback, spec.min_accelerator_share, spec.require_accelerator_share)
