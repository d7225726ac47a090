"""The public entry points: convert a job (an object or a job file), many jobs, or a batch manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Unpack

from pipeline.batch.base import BatchOverrides, BatchResult, BatchSettings, Executor, JobOutcome, OutcomeCallback
from pipeline.batch.manifest import BatchManifest, load_manifest
from pipeline.batch.registry import make_executor
from pipeline.batch.report import write_summary
from pipeline.job import ConversionJob, load_job
from pipeline.result import ConversionResult
from pipeline.runner import ProgressCallback, run_job
from pipeline.stage_cache import StageCache


def convert(
    job: ConversionJob | str | Path,
    *,
    output_dir: str | Path | None = None,
    on_event: ProgressCallback | None = None,
    resume: bool = False,
) -> ConversionResult:
    """Convert one model: export, simplify, quantize, validate parity on every target.

    Args:
        job: A `ConversionJob`, or the path of a job file (TOML).
        output_dir: Replaces the job's output folder (relative to the current directory).
        on_event: Called with a `StageEvent` as each stage starts and finishes.
        resume: Keep stage outputs by content key in the cache ($ONNXFORGE_CACHE_DIR, else
            ~/.cache/onnxforge) and restore those whose inputs, settings and tool versions are
            unchanged: after an interruption only unfinished work is redone.

    Returns:
        The result: artifacts, parity report, timings, manifest path.

    Raises:
        JobError: Bad job file, model factory or data (exit code 2 in the CLI); nothing written.
        BackendError: A target is unknown or unavailable here (exit code 2); nothing written.
        StageError: A stage failed (exit code 3); an earlier output folder is left as it was.
        ParityError: A parity gate failed (exit code 1); the artifacts and reports are written
            and the result is in ``error.result``.
    """
    if isinstance(job, ConversionJob):
        resolved = job if output_dir is None else job.model_copy(update={"output_dir": Path(output_dir).resolve()})
    else:
        overrides = {"output_dir": str(Path(output_dir).resolve())} if output_dir is not None else {}
        resolved = load_job(job, **overrides)
    return run_job(resolved, on_event, StageCache() if resume else None)


def convert_many(
    jobs: Sequence[ConversionJob | str | Path],
    *,
    executor: str | Executor | None = None,
    on_event: ProgressCallback | None = None,
    on_outcome: OutcomeCallback | None = None,
    **overrides: Unpack[BatchOverrides],
) -> list[JobOutcome]:
    """Convert many jobs, each in its own process; one bad job never raises out of the batch.

    Args:
        jobs: Jobs, or job file paths (those are validated first: a bad file raises JobError
            before anything runs).
        executor: A name from `pipeline.batch.registry.EXECUTORS` ("local": processes on this
            machine, the default; "ray": Ray tasks, needs the `ray` extra), or an `Executor`
            object (then `overrides` do not apply: its settings are its own).
        on_event: Receives every job's `StageEvent`s.
        on_outcome: Receives each job's `JobOutcome` as it finishes (after that job's events).
        **overrides: `BatchSettings` fields replacing their defaults: ``workers`` (jobs at once),
            ``timeout_s`` (a job still running then is killed: "timeout"), ``memory_limit_mb``
            (address-space limit per job process; torch alone maps a few GB: leave headroom),
            ``resume`` (restore unchanged stage outputs from the cache, see `convert`),
            ``threads`` (per job), ``ray_address`` (with "ray": the cluster; None: a local one).

    Returns:
        One `JobOutcome` per job, in order: passed, parity_failed, failed, crashed or timeout.

    Raises:
        JobError: A job file or a setting does not validate (nothing has run).
        BackendError: The executor is unknown, or Ray is missing or unreachable.
    """
    resolved = [job if isinstance(job, ConversionJob) else load_job(job) for job in jobs]
    runner = _executor(BatchSettings().with_overrides(overrides), executor)
    return runner.run(resolved, on_event, on_outcome)


def convert_batch(
    manifest: str | Path | BatchManifest,
    *,
    executor: str | Executor | None = None,
    summary_dir: str | Path | None = None,
    on_event: ProgressCallback | None = None,
    on_outcome: OutcomeCallback | None = None,
    **overrides: Unpack[BatchOverrides],
) -> BatchResult:
    """Run a batch manifest's jobs (as `convert_many`) and write summary.json, summary.md and junit.xml.

    Args:
        manifest: A manifest file (TOML: ``[batch]``, ``[defaults]``, ``[[jobs]]``), or a
            `BatchManifest` built in Python.
        executor: Replaces the manifest's executor (a name, or an `Executor` object).
        summary_dir: Replaces the manifest's summary folder (relative to the current directory).
        on_event: Receives every job's `StageEvent`s.
        on_outcome: Receives each job's `JobOutcome` as it finishes (after that job's events).
        **overrides: `BatchSettings` fields replacing the manifest's (see `convert_many`).

    Returns:
        The outcomes, in the manifest's order, and the path of summary.json (the other two
        files are beside it); ``result.exit_code`` is what ``onnxforge batch`` exits with.

    Raises:
        JobError: The manifest, one of its jobs or a setting does not validate (nothing has run).
        BackendError: The executor is unknown, or Ray is missing or unreachable.
    """
    loaded = manifest if isinstance(manifest, BatchManifest) else load_manifest(manifest)
    settings = loaded.settings.with_overrides(overrides)
    if summary_dir is not None:
        settings = settings.model_copy(update={"summary_dir": Path(summary_dir).resolve()})
    outcomes = _executor(settings, executor).run(list(loaded.jobs), on_event, on_outcome)
    summary = write_summary(outcomes, loaded.jobs, settings.summary_dir)
    return BatchResult(outcomes=outcomes, summary_path=summary)


def _executor(settings: BatchSettings, executor: str | Executor | None) -> Executor:
    """`executor` itself when it is one, else the executor it (or else `settings`) names."""
    if executor is None:
        return make_executor(settings)
    if isinstance(executor, str):
        return make_executor(settings.model_copy(update={"executor": executor}))
    return executor
