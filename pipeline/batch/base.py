"""The batch layer's base: its records, its settings, the Executor protocol and the one scheduling loop.

Executors differ only in how a job's process is started, polled, killed and how its events come
back (`JobLauncher`); `run_jobs` does the rest for all of them: at most `workers` jobs at once,
timeouts, events before each outcome, outcomes in the jobs' order.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypedDict, TypeVar, Unpack

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ExitCode, JobError
from pipeline.job import ConversionJob, describe_validation_error
from pipeline.publish import remove_leftovers
from pipeline.runner import ProgressCallback, StageEvent

logger = logging.getLogger(__name__)

JobStatus = Literal["passed", "parity_failed", "failed", "crashed", "timeout"]
OutcomeCallback = Callable[["JobOutcome"], None]
# Statuses whose job may have been killed mid-stage: its hidden staging folder is removed.
_UNFINISHED: frozenset[str] = frozenset({"failed", "crashed", "timeout"})
# How often running jobs are polled (an executor may poll less often).
POLL_SECONDS = 0.1


class WorkerResult(BaseModel):
    """What a job's own process reports; the executor adds the job's name, time and folder.

    Attributes:
        status: As in `JobOutcome`.
        message: The error or the cause of death ("" when passed).
        verdicts: Parity verdict per comparison ("stage@target"), when reports were written.
    """

    model_config = ConfigDict(frozen=True)

    status: JobStatus
    message: str = ""
    verdicts: dict[str, str] = {}


class JobOutcome(BaseModel):
    """What happened to one job of a batch.

    Attributes:
        job: The job name.
        status: passed, parity_failed (reports written, a gate failed), failed (an error with a
            message), crashed (the process died by a signal or exit), timeout (killed).
        seconds: Wall time of the job's process.
        message: The error or the cause of death ("" when passed).
        output_dir: The job's output folder.
        verdicts: Parity verdict per comparison ("stage@target"), when reports were written.
    """

    job: str
    status: JobStatus
    seconds: float
    message: str = ""
    output_dir: str
    verdicts: dict[str, str] = {}


class BatchSettings(BaseModel):
    """Every batch setting and its default, defined here once: the manifest's [batch] table,
    `pipeline.convert_many` / `convert_batch`, the executors and the CLI all start from these.

    Attributes:
        workers: Jobs run at once (each in its own process).
        timeout_s: A job still running after this many seconds is killed and reported "timeout".
        memory_limit_mb: Address-space limit of each job's process (None: no limit).
        resume: Restore unchanged stage outputs from the stage cache.
        threads: CPU threads per job (None: this machine's cores divided by `workers`).
        summary_dir: Where summary.json, summary.md and junit.xml go (in a manifest: relative to it).
        executor: A name from `pipeline.batch.registry.EXECUTORS`: ``local`` (processes on this
            machine) or ``ray`` (Ray tasks).
        ray_address: The Ray cluster to use (unset: a local Ray instance).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    workers: int = Field(default=1, ge=1)
    timeout_s: float = Field(default=3600.0, gt=0)
    memory_limit_mb: int | None = Field(default=None, ge=64)
    resume: bool = False
    threads: int | None = Field(default=None, ge=1)
    summary_dir: Path = Field(default=Path("batch-summary"), strict=False)
    executor: str = "local"
    ray_address: str | None = None

    def threads_per_job(self) -> int:
        """`threads`, else an equal share of this machine's cores for each of `workers` jobs."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    def with_overrides(self, overrides: BatchOverrides) -> BatchSettings:
        """These settings with `overrides` applied, validated.

        Raises:
            JobError: An override is out of range or of the wrong type (key ``batch.<name>``).
        """
        if not overrides:
            return self
        merged = {**self.model_dump(), **overrides}
        try:
            return BatchSettings.model_validate(merged)
        except ValidationError as e:
            key, problem = describe_validation_error(e.errors(include_url=False)[0], merged)
            raise JobError("batch settings", f"batch.{key}", problem) from e


class BatchOverrides(TypedDict, total=False):
    """The `BatchSettings` a caller may override by keyword (the API's ``**overrides``).

    The executor and the summary folder are named by their own parameters, since the executor
    may also be an `Executor` object.
    """

    workers: int
    timeout_s: float
    memory_limit_mb: int | None
    resume: bool
    threads: int | None
    ray_address: str | None


class Executor(Protocol):
    """Runs a batch's jobs in isolation and accounts for every one."""

    def run(
        self,
        jobs: list[ConversionJob],
        on_event: ProgressCallback | None = None,
        on_outcome: OutcomeCallback | None = None,
    ) -> list[JobOutcome]:
        """Run every job; one outcome per job, in the jobs' order. Never raises for a job."""
        ...


Handle = TypeVar("Handle")


class JobLauncher(Protocol[Handle]):
    """What an executor supplies to `run_jobs`: its way of running one job in isolation."""

    def start(self, job: ConversionJob) -> Handle:
        """Start the job in a process of its own; return what identifies it."""
        ...

    def poll(self, handle: Handle) -> WorkerResult | None:
        """The finished job's result (a dead process is a ``crashed`` result); None while it runs."""
        ...

    def kill(self, handle: Handle) -> None:
        """Stop the job's process now (it ran past its timeout)."""
        ...

    def drain(self) -> Iterator[StageEvent]:
        """The stage events every job has sent since the last drain."""
        ...


@dataclass
class _Running(Generic[Handle]):
    index: int
    job: ConversionJob
    handle: Handle
    started: float


class IsolatingExecutor:
    """An executor that runs each job in a process of its own through the shared loop.

    Subclasses supply `_launcher` (and may set `poll_seconds`).

    Args:
        settings: The batch settings (default: `BatchSettings()`'s defaults).
        **overrides: Settings that replace those in `settings`.
    """

    poll_seconds: float = POLL_SECONDS

    def __init__(self, settings: BatchSettings | None = None, **overrides: Unpack[BatchOverrides]) -> None:
        self.settings = (settings or BatchSettings()).with_overrides(overrides)

    def run(
        self,
        jobs: list[ConversionJob],
        on_event: ProgressCallback | None = None,
        on_outcome: OutcomeCallback | None = None,
    ) -> list[JobOutcome]:
        """Run every job; return one outcome per job, in the jobs' order. Never raises for a job."""
        with self._launcher() as launcher:
            return run_jobs(
                launcher,
                jobs,
                workers=self.settings.workers,
                timeout_s=self.settings.timeout_s,
                on_event=on_event,
                on_outcome=on_outcome,
                poll_seconds=self.poll_seconds,
            )

    def _launcher(self) -> AbstractContextManager[JobLauncher[Any]]:
        raise NotImplementedError


def run_jobs(
    launcher: JobLauncher[Handle],
    jobs: list[ConversionJob],
    *,
    workers: int,
    timeout_s: float,
    on_event: ProgressCallback | None = None,
    on_outcome: OutcomeCallback | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> list[JobOutcome]:
    """Run `jobs` through `launcher`, at most `workers` at a time; never raises for a job.

    Each running job is polled until it reports a result or runs past `timeout_s` (then it is
    killed: "timeout"). A job's events are passed to `on_event` before its outcome goes to
    `on_outcome`. A job that did not finish has its hidden staging folder removed. If the loop
    itself is stopped (an exception, a callback's included, or KeyboardInterrupt), every running
    job is killed before it propagates: no job outlives its batch.

    Returns:
        One outcome per job, in the jobs' order.
    """
    pending = deque(enumerate(jobs))
    running: list[_Running[Handle]] = []
    outcomes: dict[int, JobOutcome] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                index, job = pending.popleft()
                running.append(_Running(index, job, launcher.start(job), time.monotonic()))
            _drain(launcher, on_event)
            for item in list(running):
                outcome = _check(launcher, item, timeout_s)
                if outcome is None:
                    continue
                running.remove(item)
                outcomes[item.index] = outcome
                logger.info("job %s: %s %s", outcome.job, outcome.status, outcome.message)
                _drain(launcher, on_event)  # the job's last events before its outcome
                if on_outcome is not None:
                    on_outcome(outcome)
            if running:
                time.sleep(poll_seconds)
    except BaseException:
        _abandon(launcher, running)
        raise
    _drain(launcher, on_event)
    return [outcomes[index] for index in range(len(jobs))]


def _abandon(launcher: JobLauncher[Handle], running: list[_Running[Handle]]) -> None:
    """The batch is stopping early: kill every running job and remove its staging folder."""
    for item in running:
        logger.warning("job %s: killed, the batch is stopping", item.job.name)
        try:
            launcher.kill(item.handle)
        except Exception:  # keep killing the others; the batch's own error propagates
            logger.exception("job %s: could not be killed", item.job.name)
        remove_staging(item.job)


def _check(launcher: JobLauncher[Handle], item: _Running[Handle], timeout_s: float) -> JobOutcome | None:
    """The outcome of a finished (or overdue, then killed) job; None while it runs."""
    result = launcher.poll(item.handle)
    elapsed = time.monotonic() - item.started
    if result is None:
        if elapsed <= timeout_s:
            return None
        launcher.kill(item.handle)
        result = WorkerResult(status="timeout", message=f"killed after {timeout_s:g} s")
    if result.status in _UNFINISHED:
        remove_staging(item.job)
    return job_outcome(item.job, result, elapsed)


def _drain(launcher: JobLauncher[Any], on_event: ProgressCallback | None) -> None:
    for event in launcher.drain():
        if on_event is not None:
            on_event(event)


def job_outcome(job: ConversionJob, result: WorkerResult, seconds: float) -> JobOutcome:
    """A job's outcome record: its process's result, with the job's name, time and folder."""
    return JobOutcome(
        job=job.name,
        status=result.status,
        seconds=round(seconds, 3),
        message=result.message,
        output_dir=str(job.output_dir),
        verdicts=dict(result.verdicts),
    )


def remove_staging(job: ConversionJob) -> None:
    """A killed job leaves hidden folders beside its output (staging; an earlier output moved aside
    mid-publish) and its lock: take the lock over, restore or remove them, release it.

    Nothing is touched while another live run holds the folder (`pipeline.publish.remove_leftovers`).
    """
    remove_leftovers(job.output_dir, job.origin)


class BatchResult(BaseModel):
    """What `pipeline.convert_batch` returns.

    Attributes:
        outcomes: One per job, in the manifest's order.
        summary_path: The summary.json written (summary.md and junit.xml are beside it).
    """

    model_config = ConfigDict(frozen=True)

    outcomes: list[JobOutcome]
    summary_path: Path

    @property
    def exit_code(self) -> ExitCode:
        """The CLI's exit code: 3 a job failed, crashed or timed out, else 1 a parity gate failed, else 0."""
        statuses = {outcome.status for outcome in self.outcomes}
        if statuses & _UNFINISHED:
            return ExitCode.INTERNAL_ERROR
        if "parity_failed" in statuses:
            return ExitCode.PARITY_FAILED
        return ExitCode.OK
