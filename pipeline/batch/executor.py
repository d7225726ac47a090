"""The local executor: every job in its own spawned process, with a timeout and a memory limit.

A job that segfaults, is OOM-killed, hangs or raises is reported with its status and cause; the
others are not affected. Nothing half-written stays visible: a killed job's staging folder is
removed (the runner publishes an output folder only once it is complete).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from pipeline.job import ConversionJob
from pipeline.runner import StageEvent

logger = logging.getLogger(__name__)

JobStatus = Literal["passed", "parity_failed", "failed", "crashed", "timeout"]
_POLL_SECONDS = 0.1


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
    job_json: str, source_file: str | None, result_file: str, events: Any, memory_limit_mb: int | None, resume: bool
) -> None:
    """Runs in the spawned process: convert one job, write the outcome as JSON."""
    if memory_limit_mb is not None:
        import resource

        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import pipeline
    from pipeline.errors import OnnxforgeError, ParityError

    outcome: dict[str, Any] = {"status": "passed", "message": ""}
    try:
        job = pipeline.validate_job(json.loads(job_json), origin=source_file or "batch job")
        if source_file:
            job = job.model_copy(update={"source_file": Path(source_file)})
        result = pipeline.convert(
            job, on_event=lambda event: events.put((event.job, event.stage, event.status)), resume=resume
        )
        outcome["verdicts"] = result.report.verdicts()
    except ParityError as e:
        outcome = {"status": "parity_failed", "message": str(e)}
        if e.result is not None:
            outcome["verdicts"] = e.result.report.verdicts()  # type: ignore[attr-defined]
    except OnnxforgeError as e:
        outcome = {"status": "failed", "message": f"{type(e).__name__}: {e}"}
    except MemoryError:
        outcome = {"status": "crashed", "message": f"out of memory (limit {memory_limit_mb} MB)"}
    except Exception as e:  # noqa: BLE001 - the batch reports any failure of a job as its outcome
        outcome = {"status": "failed", "message": f"internal error: {type(e).__name__}: {e}"}
    Path(result_file).write_text(json.dumps(outcome))


class LocalExecutor:
    """Runs jobs in spawned processes, `workers` at a time.

    Args:
        workers: Jobs run at once.
        timeout_s: Seconds after which a job's process is killed.
        memory_limit_mb: Address-space limit per job process (None: none).
        resume: Restore unchanged stage outputs from the stage cache.
    """

    def __init__(
        self, workers: int = 1, timeout_s: float = 3600.0, memory_limit_mb: int | None = None, resume: bool = False
    ) -> None:
        self._workers = workers
        self._timeout_s = timeout_s
        self._memory_limit_mb = memory_limit_mb
        self._resume = resume

    def run(
        self, jobs: list[ConversionJob], on_event: Callable[[StageEvent], None] | None = None
    ) -> list[JobOutcome]:
        """Run every job; return one outcome per job, in the jobs' order. Never raises for a job."""
        context = mp.get_context("spawn")  # fresh interpreters: no inherited threads or state
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
            _remove_staging(item.job)
            return self._outcome(item, "timeout", f"killed after {self._timeout_s:g} s", elapsed)
        process.join()
        if item.result_file.is_file():
            data = json.loads(item.result_file.read_text())
            return self._outcome(item, data["status"], data["message"], elapsed, data.get("verdicts", {}))
        _remove_staging(item.job)
        return self._outcome(item, "crashed", _death_cause(process.exitcode), elapsed)

    def _outcome(
        self, item: _Running, status: JobStatus, message: str, seconds: float, verdicts: dict[str, str] | None = None
    ) -> JobOutcome:
        return JobOutcome(
            job=item.job.name,
            status=status,
            seconds=round(seconds, 3),
            message=message,
            output_dir=str(item.job.output_dir),
            verdicts=verdicts or {},
        )

    @staticmethod
    def _drain(events: Any, on_event: Callable[[StageEvent], None] | None) -> None:
        while True:
            try:
                job, stage, status = events.get_nowait()
            except queue.Empty:
                return
            if on_event is not None:
                on_event(StageEvent(job, stage, status))


def _death_cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory: the kernel's OOM killer)" if name == "SIGKILL" else ""
        return f"the job's process died of {name}{hint}"
    return f"the job's process exited with code {exitcode} without a result"


def _remove_staging(job: ConversionJob) -> None:
    """A killed job leaves its hidden staging folder beside the output: remove it."""
    out = job.output_dir
    for leftover in out.parent.glob(f".{out.name}.staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)
