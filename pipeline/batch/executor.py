"""The local executor: every job in its own spawned process, with a timeout and a memory limit.

A job that segfaults, is OOM-killed, hangs or raises is reported with its status and cause; the
others are not affected. Nothing half-written stays visible: a killed job's staging folder is
removed (the runner publishes an output folder only once it is complete).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from pipeline.batch.worker import convert_one, limit_process
from pipeline.errors import BackendError
from pipeline.job import ConversionJob
from pipeline.runner import StageEvent

logger = logging.getLogger(__name__)

JobStatus = Literal["passed", "parity_failed", "failed", "crashed", "timeout"]
_POLL_SECONDS = 0.1
# Imported once by the fork server (names it cannot import are skipped): the pipeline, and what
# torch and ONNX Runtime otherwise import lazily on a job's first export and quantization.
_PRELOAD = [
    "pipeline.api",
    "pipeline.batch.worker",
    "torch._dynamo",
    "torch.onnx._internal.exporter._core",
    "onnxscript.optimizer",
    "onnxruntime.quantization",
]


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


@dataclass
class _Running:
    job: ConversionJob
    process: BaseProcess
    result_file: Path
    started: float


def _child(
    job_json: str,
    source_file: str | None,
    result_file: str,
    events: Any,
    memory_limit_mb: int | None,
    threads: int | None,
    resume: bool,
) -> None:
    """Runs in the spawned process: convert one job, write the outcome as JSON."""
    limit_process(memory_limit_mb, threads)

    outcome = convert_one(job_json, source_file, resume, events.put, memory_limit_mb)
    Path(result_file).write_text(json.dumps(outcome))


class Executor(Protocol):
    """Runs a batch's jobs in isolation and accounts for every one."""

    def run(
        self,
        jobs: list[ConversionJob],
        on_event: Callable[[StageEvent], None] | None = None,
        on_outcome: Callable[[JobOutcome], None] | None = None,
    ) -> list[JobOutcome]:
        """Run every job; one outcome per job, in the jobs' order. Never raises for a job."""
        ...


def make_executor(
    kind: str,
    *,
    workers: int = 1,
    timeout_s: float = 3600.0,
    memory_limit_mb: int | None = None,
    resume: bool = False,
    ray_address: str | None = None,
) -> Executor:
    """The executor named `kind` ("local" or "ray") with these settings.

    Raises:
        BackendError: An unknown kind, or Ray asked for and not installed.
    """
    if kind == "local":
        return LocalExecutor(workers, timeout_s, memory_limit_mb, resume)
    if kind == "ray":
        from pipeline.batch.ray_executor import RayExecutor

        return RayExecutor(
            ray_address, workers=workers, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb, resume=resume
        )
    raise BackendError(kind, "unknown executor; available: local, ray", "use --executor local or --executor ray")


def threads_per_job(workers: int) -> int:
    """Each of `workers` concurrent jobs gets an equal share of this machine's cores."""
    return max(1, (os.cpu_count() or 1) // workers)


class IsolatingExecutor:
    """Settings shared by the executors that run each job in a process of its own.

    Args:
        workers: Jobs run at once.
        timeout_s: Seconds after which a job's process is killed.
        memory_limit_mb: Address-space limit per job process (None: none).
        resume: Restore unchanged stage outputs from the stage cache.
        threads: CPU threads per job (None: this machine's cores divided by `workers`).
    """

    def __init__(
        self,
        workers: int = 1,
        timeout_s: float = 3600.0,
        memory_limit_mb: int | None = None,
        resume: bool = False,
        threads: int | None = None,
    ) -> None:
        self._workers = workers
        self._timeout_s = timeout_s
        self._memory_limit_mb = memory_limit_mb
        self._resume = resume
        self._threads = threads or threads_per_job(workers)


class LocalExecutor(IsolatingExecutor):
    """Runs jobs in processes of their own on this machine, `workers` at a time (see `IsolatingExecutor`)."""

    def run(
        self,
        jobs: list[ConversionJob],
        on_event: Callable[[StageEvent], None] | None = None,
        on_outcome: Callable[[JobOutcome], None] | None = None,
    ) -> list[JobOutcome]:
        """Run every job; return one outcome per job, in the jobs' order. Never raises for a job."""
        context = _job_process_context()
        events = context.Queue()
        pending = list(jobs)
        running: list[_Running] = []
        outcomes: dict[str, JobOutcome] = {}
        with tempfile.TemporaryDirectory(prefix="onnxforge-batch-") as scratch:
            while pending or running:
                while pending and len(running) < self._workers:
                    running.append(self._start(context, pending.pop(0), Path(scratch), events))
                self._drain(events, on_event)
                for item in list(running):
                    outcome = self._check(item)
                    if outcome is not None:
                        running.remove(item)
                        outcomes[item.job.name] = outcome
                        logger.info("job %s: %s %s", outcome.job, outcome.status, outcome.message)
                        self._drain(events, on_event)  # the job's last events before its outcome
                        if on_outcome is not None:
                            on_outcome(outcome)
                time.sleep(_POLL_SECONDS)
            self._drain(events, on_event)
        return [outcomes[job.name] for job in jobs]

    def _start(self, context: Any, job: ConversionJob, scratch: Path, events: Any) -> _Running:
        result_file = scratch / f"{job.name}.json"
        process = context.Process(
            target=_child,
            args=(
                job.model_dump_json(),
                str(job.source_file) if job.source_file else None,
                str(result_file),
                events,
                self._memory_limit_mb,
                self._threads,
                self._resume,
            ),
            name=f"onnxforge-{job.name}",
        )
        process.start()
        return _Running(job, process, result_file, time.monotonic())

    def _check(self, item: _Running) -> JobOutcome | None:
        """The outcome of a finished (or overdue, then killed) job; None while it runs."""
        elapsed = time.monotonic() - item.started
        process = item.process
        if process.is_alive():
            if elapsed <= self._timeout_s:
                return None
            process.kill()
            process.join()
            remove_staging(item.job)
            return job_outcome(item.job, "timeout", f"killed after {self._timeout_s:g} s", elapsed)
        process.join()
        if item.result_file.is_file():
            data = json.loads(item.result_file.read_text())
            return job_outcome(item.job, data["status"], data["message"], elapsed, data.get("verdicts", {}))
        remove_staging(item.job)
        return job_outcome(item.job, "crashed", _death_cause(process.exitcode), elapsed)

    @staticmethod
    def _drain(events: Any, on_event: Callable[[StageEvent], None] | None) -> None:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            if on_event is not None:
                on_event(event)


def _job_process_context() -> Any:
    """Where job processes come from: forked from a server that has imported the pipeline once.

    Each job still gets its own process (a crash stays there), but not a fresh interpreter that
    imports torch and ONNX Runtime again: the fork server imports them once, single-threaded,
    before any model is loaded. Platforms without fork (Windows) spawn fresh interpreters.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _death_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory: the kernel's OOM killer)" if name == "SIGKILL" else ""
        return f"the job's process died of {name}{hint}"
    return f"the job's process exited with code {exitcode} without a result"


def job_outcome(
    job: ConversionJob, status: JobStatus, message: str, seconds: float, verdicts: dict[str, str] | None = None
) -> JobOutcome:
    """A job's outcome record."""
    return JobOutcome(
        job=job.name,
        status=status,
        seconds=round(seconds, 3),
        message=message,
        output_dir=str(job.output_dir),
        verdicts=verdicts or {},
    )


def remove_staging(job: ConversionJob) -> None:
    """A killed job leaves its hidden staging folder beside the output: remove it."""
    out = job.output_dir
    for leftover in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
