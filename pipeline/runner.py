"""Run one job: check everything up front, run the stages in a staging folder, publish it whole."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from backends.base import Backend
from backends.resolve import options_help as backend_options_help
from backends.resolve import resolve_target
from pipeline.artifacts import Artifact, Manifest, StageRun, write_atomic
from pipeline.errors import (
    BackendError,
    BackendOptionError,
    BackendUnavailableError,
    JobError,
    OnnxforgeError,
    ParityError,
    StageError,
    StorageError,
)
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, DataSource
from pipeline.llm.job import decoder_job, decoder_signature, is_causal_lm, prepare_decoder_data
from pipeline.model_source import load_model
from pipeline.parity.report import ParityReport
from pipeline.processes import peak_rss_bytes, release_freed_memory, reset_peak_rss, resident_bytes
from pipeline.publish import MANIFEST, Publication
from pipeline.records import ExportRecord, ValidateRecord
from pipeline.result import ConversionResult
from pipeline.stage_cache import StageCache
from pipeline.stages import STAGES
from pipeline.stages.base import TRUNK, Branch, BranchingStage, PreparedInputs, Stage, StageContext, Target
from pipeline.versions import tool_versions

logger = logging.getLogger(__name__)

#: Above this resident size the runner collects garbage between stages (a 1 B model's run).
COLLECT_ABOVE_BYTES = 4 * 2**30


@dataclass(frozen=True)
class StageEvent:
    """Progress of a job, for whoever displays it (the CLI's rich status, a batch log).

    Attributes:
        job: The job name.
        stage: The stage name.
        status: What happened; ``progress``: a long stage finished one of its steps.
        seconds: How long the stage took (0 until finished).
        done: Steps done (progress events; e.g. training epochs).
        total: Steps planned (progress events).
        detail: What the last step measured (progress events), e.g. its loss.
    """

    job: str
    stage: str
    status: Literal["started", "progress", "finished", "skipped", "restored"]
    seconds: float = 0.0
    done: int = 0
    total: int = 0
    detail: str = ""


ProgressCallback = Callable[[StageEvent], None]


def run_job(
    job: ConversionJob, on_event: ProgressCallback | None = None, cache: StageCache | None = None
) -> ConversionResult:
    """Convert one job end to end and publish its output folder.

    Every input is checked before anything is written. The output folder is locked for the
    run; stages write into a staging folder beside `job.output_dir`, which replaces the output
    folder only once the manifest is in it, so a failed or killed run leaves an earlier output
    complete and nothing half-written (`pipeline.publish`).

    Args:
        job: The validated job.
        on_event: Called as each stage starts and finishes (or is restored).
        cache: Where stage outputs are kept by content key; a stage whose key is there is
            restored instead of run (resume). None: every stage runs.

    Returns:
        The result, when every parity gate passed.

    Raises:
        JobError: The job's model, data or targets are not usable (nothing written), or another
            run holds the output folder's lock (`pipeline.publish`).
        BackendError: A target backend is unknown or unavailable (nothing written).
        StageError: A stage failed (the output folder is left as it was).
        StorageError: The filesystem refused a write (disk full, permissions), naming the path.
        ParityError: A parity gate failed; the artifacts and reports are published first and
            the result is attached as ``error.result``.
    """
    notify = on_event or (lambda event: None)
    job, checked = preflight(job)
    publication = Publication.start(job.output_dir, job.origin)  # the folder locked, leftovers recovered
    staging = publication.staging
    try:
        ctx = StageContext.prepared(job, staging, checked)
        del checked  # the context holds the model now, and may release it (`release_source_module`)
        _run_stages(ctx, notify, cache)
        runs = ctx.stage_runs
        report_artifact = _report_artifact(ctx)
        report = ParityReport.model_validate_json((staging / report_artifact.path).read_text())
        manifest = _manifest(job, ctx, runs, report)
        write_atomic(staging / MANIFEST, manifest.model_dump_json(indent=2))
        publication.publish()
    except (OSError, StageError) as e:  # a refused write (disk full, permissions), perhaps wrapped by a stage
        refused = e if isinstance(e, OSError) else StorageError.found_in(e)
        if refused is None:
            raise
        raise StorageError.while_staging(refused, staging, job.output_dir) from e
    finally:
        publication.close()  # the staging folder deleted unless published, the lock released
    result = ConversionResult(
        job=job.name,
        output_dir=job.output_dir,
        artifacts=ctx.artifacts,
        report=report,
        manifest_path=job.output_dir / MANIFEST,
        timings={run.name: run.seconds for run in runs},
    )
    if report.verdict != "pass":
        raise ParityError(job.name, report.failures, job.output_dir / report_artifact.path, result)
    return result


def preflight(job: ConversionJob) -> tuple[ConversionJob, PreparedInputs]:
    """Resolve targets, load the model, check the data and every enabled stage's preconditions:
    every bad-input error, before anything is written.

    Returns:
        The job as the stages see it (a causal LM's: its decoder's graph inputs and outputs, see
        `pipeline.llm.job`) and what was loaded.

    Raises:
        JobError: The model source, data, target options or a stage's settings are not usable.
        BackendError: A target is unavailable here.
    """
    targets = [_resolve_target(job, index) for index in range(len(job.targets))]
    source = load_model(job)
    signature = decoder_signature(job, source) if is_causal_lm(job) else None
    calibration = _feeds(job, job.calibration, "calibration")
    evaluation = _feeds(job, job.parity_data, "evaluation" if job.evaluation else "calibration")
    assert evaluation is not None
    if signature is not None:
        prepare_decoder_data(signature, calibration, evaluation)
        job = decoder_job(job, signature)
    inputs = PreparedInputs(source, calibration, evaluation, targets)
    for stage in STAGES:
        if stage.enabled(job):
            stage.check(job, inputs)
    return job, inputs


def _resolve_target(job: ConversionJob, index: int) -> Target:
    """The job's `index`-th target, resolved by `backends.resolve`; its typed errors in the job's terms."""
    spec = job.targets[index]
    key = f"targets[{index}]"
    try:
        resolved = resolve_target(spec.backend, spec.options)
    except BackendOptionError as e:
        option = f"{key}.options.{e.option}" if e.option else f"{key}.options"
        raise JobError(job.origin, option, f"{e.problem} (backend {spec.backend!r}, {e.hint})") from e
    except BackendUnavailableError as e:
        raise BackendUnavailableError(spec.backend, f"{e.reason} (job {job.origin}, {key})", e.hint) from e
    except BackendError as e:  # unknown, or its module cannot be loaded
        raise JobError(job.origin, f"{key}.backend", str(e)) from e
    return Target(spec=spec, backend=resolved.backend, options=resolved.options)


def options_help(backend: Backend) -> str:
    """The options a backend accepts, for error messages: ``options: a, b, c``."""
    return backend_options_help(backend)


def _feeds(job: ConversionJob, source: DataSource | None, key: str) -> FeedSource | None:
    if source is None:
        return None
    feeds = FeedSource(source, job.inputs, origin=job.origin, key=key, python_path=job.python_path)
    feeds.check()
    return feeds


def _run_stages(ctx: StageContext, notify: ProgressCallback, cache: StageCache | None) -> None:
    """Every stage in order, a branching stage once per branch; each run into the context as it
    finishes (validate reports the times so far)."""
    for stage in STAGES:
        for branch in _branches(stage, ctx):
            ctx.branch = branch
            ctx.stage_runs.append(_run_stage(stage, ctx, notify, cache))
        ctx.branch = TRUNK


def _branches(stage: Stage, ctx: StageContext) -> list[Branch]:
    """The runs a stage makes: one per group of targets for a branching stage, else one (the trunk)."""
    if isinstance(stage, BranchingStage) and stage.enabled(ctx.job):
        return stage.branches(ctx)
    return [TRUNK]


def _run_stage(stage: Stage, ctx: StageContext, notify: ProgressCallback, cache: StageCache | None) -> StageRun:
    """Run (or restore, or skip) one stage for the context's branch; its artifact under the branch's key."""
    name = ctx.branch.artifact_key(stage.name)
    if not stage.enabled(ctx.job):
        notify(StageEvent(ctx.job.name, name, "skipped"))
        return StageRun(name=name, seconds=0.0, artifact=None)
    key = stage.key(ctx) if cache is not None else None
    restored = cache.restore(key, ctx.workdir) if cache is not None and key is not None else None
    if restored is not None:
        ctx.artifacts[name] = restored
        notify(StageEvent(ctx.job.name, name, "restored"))
        return StageRun(name=name, seconds=0.0, artifact=restored, restored=True)
    notify(StageEvent(ctx.job.name, name, "started"))
    ctx.progress = lambda done, total, detail: notify(
        StageEvent(ctx.job.name, name, "progress", done=done, total=total, detail=detail)
    )
    # What earlier stages freed is not this stage's; collecting cycles costs 0.25 s with torch
    # loaded, so only a large process pays it.
    release_freed_memory(collect=(resident_bytes() or 0) > COLLECT_ABOVE_BYTES)
    measuring_memory = reset_peak_rss()  # the peak from here on is this stage's
    start = time.perf_counter()
    try:
        artifact = stage.run(ctx)
    except OnnxforgeError:
        raise
    except Exception as e:  # anything unexpected becomes a StageError naming the stage
        raise StageError(stage.name, ctx.job.name, f"{type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes() if measuring_memory else None
    ctx.artifacts[name] = artifact
    if cache is not None and key is not None:
        cache.store(key, artifact, ctx.workdir)
    notify(StageEvent(ctx.job.name, name, "finished", seconds))
    logger.info("job %s: %s done in %.2fs", ctx.job.name, name, seconds)
    return StageRun(name=name, seconds=round(seconds, 4), artifact=artifact, peak_rss_bytes=peak)


def _report_artifact(ctx: StageContext) -> Artifact:
    """The parity report validation wrote (validation always runs)."""
    artifact = ctx.artifact_with(ValidateRecord)
    assert artifact is not None, "the validate stage always runs"
    return artifact


def _manifest(job: ConversionJob, ctx: StageContext, runs: list[StageRun], report: ParityReport) -> Manifest:
    export = ctx.record(ExportRecord)
    assert export is not None, "the export stage always runs"
    return Manifest(
        job=job.name,
        job_file=str(job.source_file) if job.source_file else None,
        job_sha256=hashlib.sha256(job.model_dump_json().encode()).hexdigest(),
        # Validation hashed the inputs for the report already: the weights and data are read once.
        input_hashes=report.input_hashes,
        tool_versions=tool_versions(),
        stages=runs,
        exporter={"used": export.exporter, "fallback_reason": export.fallback_reason},
        parity=report.verdicts(),
        verdict=report.verdict,
    )
