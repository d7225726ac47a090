"""The public entry points: convert a job given as an object or a job file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pipeline.batch.executor import Executor, JobOutcome, make_executor
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
    workers: int = 1,
    timeout_s: float = 3600.0,
    memory_limit_mb: int | None = None,
    on_event: ProgressCallback | None = None,
    resume: bool = False,
    executor: Literal["local", "ray"] | Executor = "local",
    ray_address: str | None = None,
) -> list[JobOutcome]:
    """Convert many jobs, each in its own process; one bad job never raises out of the batch.

    Args:
        jobs: Jobs, or job file paths (those are validated first: a bad file raises JobError
            before anything runs).
        workers: Jobs run at once.
        timeout_s: A job still running after this long is killed ("timeout").
        memory_limit_mb: Address-space limit of each job's process (torch alone maps a few GB
            of address space: leave headroom).
        on_event: Receives every job's `StageEvent`s.
        resume: Restore unchanged stage outputs from the cache (see `convert`).
        executor: "local" (spawned processes), "ray" (Ray tasks; needs the `ray` extra), or an
            `Executor` object (then the settings above are its own).
        ray_address: With "ray": the cluster to use (None: a local Ray instance).

    Returns:
        One `JobOutcome` per job, in order: passed, parity_failed, failed, crashed or timeout.

    Raises:
        JobError: A job file does not validate (nothing has run).
        BackendError: The executor is unknown, or Ray is missing or unreachable.
    """
    resolved = [job if isinstance(job, ConversionJob) else load_job(job) for job in jobs]
    if isinstance(executor, str):
        executor = make_executor(
            executor,
            workers=workers,
            timeout_s=timeout_s,
            memory_limit_mb=memory_limit_mb,
            resume=resume,
            ray_address=ray_address,
        )
    return executor.run(resolved, on_event)
