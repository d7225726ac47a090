"""Validate stage: the parity chain PyTorch -> fp32 -> simplified -> pruned -> int8 on every target."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx_ir as ir

from backends.base import PlacementReport, Session
from backends.registry import get_backend
from pipeline.artifacts import Artifact, sha256_file
from pipeline.errors import BackendError, JobError, first_line
from pipeline.feeds import describe_source
from pipeline.job import ConversionJob
from pipeline.llm.job import is_causal_lm, without_padding
from pipeline.llm.validate_generation import (
    DecoderReference,
    candidate_generation_of,
    chain_reference,
    generation_parity,
    pytorch_generation,
)
from pipeline.onnx_io import load_graph_only
from pipeline.outputs import run_torch
from pipeline.parity.chain import Link, ParityChain, RunKey, Runs
from pipeline.parity.generation import GenerationParity, ModelGeneration
from pipeline.parity.generation_run import generation_parity_of
from pipeline.parity.localize import Localisation, localize
from pipeline.parity.report import Comparison, ParityReport
from pipeline.parity.summary import RunFacts
from pipeline.parity.target import PlacementLimits, ThreeWay
from pipeline.parity.writers import write_reports
from pipeline.quantization.performance import PerformanceCheck, performance_check
from pipeline.records import DistillRecord, ModelRecord, PruneRecord, QuantizeRecord, StageName, ValidateRecord
from pipeline.stages.base import NoPreconditions, StageContext, Target, resize_feeds
from pipeline.stages.distill import pytorch_model, teacher_model
from pipeline.stages.source_weights import job_input_hashes, release_source_module
from pipeline.stages.validate_facts import artifact_bytes, report_notes, run_facts
from pipeline.stages.validate_runs import (
    HOLD_ONE_ABOVE_BYTES,
    BatchRuns,
    LiveRuns,
    OneAtATime,
    RecordedRuns,
    RunRequest,
    RunStore,
    record_one_at_a_time,
)

logger = logging.getLogger(__name__)

PYTORCH = "pytorch"
TEACHER = "teacher"  # the job's model, when a distilled student takes its place as "pytorch"
CPU = "cpu"  # the reference backend of on-target parity

Sessions = dict[RunKey, Session]
OpenKey = Callable[[RunKey], AbstractContextManager[Session]]
EVALUATION, SHAPE = "evaluation", "shape"  # the kinds of `RunRequest`


@dataclass
class _Models:
    """How the stage reaches its models: their outputs per request, a session per key for the
    speed guard, and generation parity (measured while the sessions were open, or on them now)."""

    output_names: list[str]
    runs: BatchRuns
    open_key: OpenKey
    generation: Callable[[], GenerationParity | None]


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
        """Run the evaluation data through PyTorch and every model on every target, and judge."""
        start = time.perf_counter()
        chains = {
            target.name: [artifact.path for artifact in _distinct_models(ctx.model_chain(target.name))]
            for target in ctx.targets
        }
        links = chain_links(ctx)
        keys = [(target.name, path) for target in ctx.targets for path in chains[target.name]]
        keys += [key for key in self._reference_keys(ctx) if key not in keys]
        with ExitStack() as stack:
            if _models_bytes(ctx, {path for _, path in keys}) > HOLD_ONE_ABOVE_BYTES:
                models = self._one_at_a_time(ctx, keys, stack)
            else:
                models = self._all_open(ctx, keys, stack)
            output_names = models.output_names
            chain = ParityChain(links, output_names, rtol=ctx.job.parity.fp32.rtol, is_classifier=ctx.job.is_classifier)
            stream = _Stream(chain, output_names, self._on_target(ctx, output_names))
            self._stream(ctx, models.runs, stream)
            comparisons = chain.judge(ctx.job.parity) + self._shape_checks(ctx, models.runs, stream)
            placements = [self._placement(ctx, target, chains[target.name][-1]) for target in ctx.targets]
            performance = self._performance(ctx, models.open_key, placements)
            generation = models.generation()
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

    def _all_open(self, ctx: StageContext, keys: list[RunKey], stack: ExitStack) -> _Models:
        """Every session open for the whole stage; each batch streams through all of them."""
        sessions: Sessions = {key: stack.enter_context(self._open_key(ctx, key)) for key in keys}
        output_names = next(iter(sessions.values())).output_names
        # Before the data streams through: a misnamed override is bad input, found at once.
        _check_output_overrides(ctx.job, output_names)
        return _Models(
            output_names=output_names,
            runs=LiveRuns(lambda feeds: self._run_all(ctx, sessions, feeds, output_names)),
            open_key=lambda key: nullcontext(sessions[key]),
            generation=lambda: self._generation(ctx, sessions),
        )

    def _one_at_a_time(self, ctx: StageContext, keys: list[RunKey], stack: ExitStack) -> _Models:
        """PyTorch first (then released), then each session alone, every output kept on disk
        (`pipeline.stages.validate_runs`)."""
        output_names = [output.name for output in load_graph_only(ctx.workdir / keys[0][1]).graph.output]
        _check_output_overrides(ctx.job, output_names)
        job_input_hashes(ctx)  # the manifest's weight hash, before PyTorch's weights go
        store = RunStore(ctx.workdir)
        stack.callback(store.close)
        causal = is_causal_lm(ctx.job)
        records = _model_records(ctx)
        reference: list[DecoderReference] = []
        found: list[ModelGeneration] = []

        def after_torch() -> None:
            model = pytorch_model(ctx)
            if causal and model is not None:
                reference.append(pytorch_generation(ctx.job, model, ctx.evaluation))
            del model
            release_source_module(ctx)

        def on_session(key: RunKey, session: Session) -> None:
            if reference:
                found.append(candidate_generation_of(ctx.job, reference[0], key, session, records))

        plan = OneAtATime(
            requests=lambda: _requests(ctx),
            torch_runs=lambda feeds: self._torch_runs(ctx, feeds),
            after_torch=after_torch,
            keys=keys,
            open_session=lambda key: self._open_key(ctx, key),
            clean=lambda feeds, values: without_padding(feeds, output_names, values) if causal else values,
            output_names=output_names,
            on_session=on_session,
        )
        record_one_at_a_time(plan, store)
        return _Models(
            output_names=output_names,
            runs=RecordedRuns(store),
            open_key=lambda key: self._open_key(ctx, key),
            generation=lambda: generation_parity_of(reference[0].generation, found) if reference else None,
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
            notes=report_notes(ctx, stream.chain),
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

    def _stream(self, ctx: StageContext, models: BatchRuns, stream: _Stream) -> None:
        """One pass over the data: every model on every target, each batch once."""
        for index, batch in enumerate(ctx.evaluation):
            runs = models.runs(RunRequest(EVALUATION, index, batch.feeds))
            stream.chain.update(runs, batch.size, batch.labels)
            for target, three_way in stream.on_target.items():
                float_model, int8 = three_way.float_model, three_way.int8_model
                three_way.update(runs[(CPU, float_model)], runs[(CPU, int8)], runs[(target, int8)])

    def _run_all(self, ctx: StageContext, sessions: Sessions, feeds: dict[str, np.ndarray], names: list[str]) -> Runs:
        """Outputs of PyTorch (when there is a module) and of every session, on one batch."""
        runs: Runs = {}
        for keys, outputs in self._torch_runs(ctx, feeds).items():
            runs.update(dict.fromkeys(keys, outputs))
        for key, session in sessions.items():
            produced = session.run(feeds)
            runs[key] = [produced[name] for name in names]
        if is_causal_lm(ctx.job):
            runs = {key: without_padding(feeds, names, values) for key, values in runs.items()}
        return runs

    def _torch_runs(
        self, ctx: StageContext, feeds: dict[str, np.ndarray]
    ) -> dict[tuple[RunKey, ...], list[np.ndarray]]:
        """PyTorch's outputs (the teacher's too when the job distils), each under its key on every target."""
        found = {}
        for role, model in ((TEACHER, teacher_model(ctx)), (PYTORCH, pytorch_model(ctx))):
            if model is not None:
                outputs = run_torch(chain_reference(model) if is_causal_lm(ctx.job) else model, feeds)
                found[tuple((target.name, role) for target in ctx.targets)] = outputs
        return found

    def _generation(self, ctx: StageContext, sessions: Sessions) -> GenerationParity | None:
        """A causal LM's generation parity on every (target, model), against PyTorch (None otherwise)."""
        model = pytorch_model(ctx)
        if not is_causal_lm(ctx.job) or model is None:
            return None
        records = _model_records(ctx)
        return generation_parity(ctx.job, model, ctx.evaluation, sessions, records)

    def _shape_checks(self, ctx: StageContext, models: BatchRuns, stream: _Stream) -> list[Comparison]:
        """The whole chain again at each extra shape the job lists (inputs cut or tiled from the example).

        Float links (export, simplify) must hold at any shape and are gated. Pruned and int8 links
        are measured but not gated here: cut or tiled copies of one batch are not the data their
        task-level policy is about. Accuracy is measured on the evaluation data only.
        """
        job = ctx.job
        comparisons = []
        for request, sizes in zip(_shape_requests(ctx), job.export.check_shapes, strict=True):
            runs = models.runs(request)
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

    def _reference_keys(self, ctx: StageContext) -> list[RunKey]:
        """The CPU runs on-target parity compares with: each non-CPU target's int8 model and the
        model it was quantized from, on the CPU reference."""
        keys = []
        for target in ctx.targets:
            pair = _quantized_pair(ctx, target.name)
            if pair is not None and target.name != CPU:
                keys += [(CPU, path) for path in pair]
        return keys

    def _on_target(self, ctx: StageContext, output_names: list[str]) -> dict[str, ThreeWay]:
        """Three-way accumulators for every non-CPU target with an int8 model."""
        three_ways = {}
        for target in ctx.targets:
            pair = _quantized_pair(ctx, target.name)
            if pair is not None and target.name != CPU:
                three_ways[target.name] = ThreeWay(target.name, *pair, output_names)
        return three_ways

    def _placement(self, ctx: StageContext, target: Target, model: str) -> PlacementReport:
        """Where each node of the final model runs on the target."""
        try:
            return target.backend.placement(ctx.workdir / model, target.options)
        except BackendError as e:
            raise _model_error(ctx, e, "place", model, target.name) from e

    def _performance(
        self, ctx: StageContext, open_key: OpenKey, placements: list[PlacementReport]
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
            with open_key((target.name, before)) as before_session, open_key((target.name, int8)) as int8_session:
                checks.append(
                    performance_check(
                        target.name,
                        before_session,
                        int8_session,
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

    def _open_key(self, ctx: StageContext, key: RunKey) -> Session:
        """The session of a run key: the target's backend, or the CPU reference of on-target parity."""
        name, path = key
        target = next((target for target in ctx.targets if target.name == name), None)
        if target is not None:
            return self._open(ctx, target, path)
        try:
            return get_backend(CPU).open(ctx.workdir / path)
        except BackendError as e:
            raise _model_error(ctx, e, "open", path, CPU) from e


def _models_bytes(ctx: StageContext, paths: set[str]) -> int:
    """The size on disk of the run's models named in `paths`, each file once."""
    artifacts = {artifact.path: artifact for artifact in ctx.all_models() if artifact.path in paths}
    return sum(artifact_bytes(ctx, artifact) for artifact in artifacts.values())


def _model_records(ctx: StageContext) -> dict[str, ModelRecord]:
    """Each model file's record (its precision names it in generation parity)."""
    return {artifact.path: artifact.record_as(ModelRecord) for artifact in ctx.all_models()}


def _requests(ctx: StageContext) -> Iterator[RunRequest]:
    """Everything every model runs on: each evaluation batch, then each export.check_shapes size."""
    for index, batch in enumerate(ctx.evaluation):
        yield RunRequest(EVALUATION, index, batch.feeds)
    yield from _shape_requests(ctx)


def _shape_requests(ctx: StageContext) -> list[RunRequest]:
    """The example batch cut or tiled to each export.check_shapes size."""
    example = ctx.example_batch().feeds
    return [
        RunRequest(SHAPE, index, resize_feeds(example, ctx.job.inputs, sizes))
        for index, sizes in enumerate(ctx.job.export.check_shapes)
    ]


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
        elif ctx.source.onnx_file is None:  # a module (perhaps released until validation rebuilds it)
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


def _placement_limits(target: Target) -> PlacementLimits:
    """What the target's job entry asks of its placement."""
    spec = target.spec
    return PlacementLimits(spec.max_fallback, spec.min_accelerator_share, spec.require_accelerator_share)
