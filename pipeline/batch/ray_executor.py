"""The Ray executor: the same jobs as Ray tasks, on an existing cluster or a local instance.

Each job is a task in a fresh worker process (``max_calls=1``), so a segfault or an OOM kill takes
down that job only, as with the local executor. Stage events come back through a Ray queue. Job
outputs are written where the job says: on a multi-node cluster, `output_dir` (and the data the
job reads) must be on storage every node sees.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.batch.executor import IsolatingExecutor, JobOutcome, job_outcome, remove_staging
from pipeline.batch.worker import convert_one, limit_process
from pipeline.errors import BackendError
from pipeline.job import ConversionJob
from pipeline.runner import StageEvent

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.2
INSTALL_HINT = 'pip install "onnxforge[ray]"'


def _task(
    job_json: str,
    source_file: str | None,
    resume: bool,
    events: Any,
    memory_limit_mb: int | None,
    threads: int | None,
) -> dict[str, Any]:
    """Runs in a Ray worker process: limit it, convert one job, return the outcome."""
    limit_process(memory_limit_mb, threads)

    return convert_one(job_json, source_file, resume, events.put, memory_limit_mb)


class RayExecutor(IsolatingExecutor):
    """Runs jobs as Ray tasks, `workers` at a time (a timed-out task is cancelled, its worker killed).

    Args:
        address: A running cluster (``ray.init(address=...)``, e.g. ``"auto"`` or
            ``"ray://head:10001"``); None starts a local instance with `workers` CPUs, stopped
            when the batch ends.
        **settings: `IsolatingExecutor`'s.

    Raises:
        BackendError: Ray is not installed, or the cluster cannot be reached.
    """

    def __init__(self, address: str | None = None, **settings: Any) -> None:
        try:
            import ray
        except ImportError as e:
            raise BackendError("ray", "Ray is not installed", INSTALL_HINT) from e
        super().__init__(**settings)
        self._ray = ray
        self._address = address

    def run(
        self,
        jobs: list[ConversionJob],
        on_event: Callable[[StageEvent], None] | None = None,
        on_outcome: Callable[[JobOutcome], None] | None = None,
    ) -> list[JobOutcome]:
        """Run every job; return one outcome per job, in the jobs' order. Never raises for a job."""
        ray = self._ray
        started_here = not ray.is_initialized()
        if started_here:
            self._connect()
        try:
            return self._run(jobs, on_event, on_outcome)
        finally:
            if started_here:
                ray.shutdown()

    def _connect(self) -> None:
        ray = self._ray
        try:
            if self._address is None:
                # A small object store: only outcomes and events travel through it.
                ray.init(
                    num_cpus=self._workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    object_store_memory=128 * 2**20,
                    configure_logging=False,
                )
            else:
                ray.init(address=self._address, log_to_driver=False, configure_logging=False)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ...
            where = self._address or "a local instance"
            raise BackendError("ray", f"cannot start or reach Ray at {where}: {e}", "check the address") from e

    def _run(
        self,
        jobs: list[ConversionJob],
        on_event: Callable[[StageEvent], None] | None,
        on_outcome: Callable[[JobOutcome], None] | None,
    ) -> list[JobOutcome]:
        ray = self._ray
        from ray.util.queue import Queue

        events = Queue(actor_options={"num_cpus": 0})
        task = ray.remote(max_calls=1, max_retries=0, num_cpus=1)(_task)
        pending = list(jobs)
        running: dict[Any, tuple[ConversionJob, float]] = {}
        outcomes: dict[str, JobOutcome] = {}
        while pending or running:
            while pending and len(running) < self._workers:
                job = pending.pop(0)
                ref = task.remote(
                    job.model_dump_json(),
                    str(job.source_file) if job.source_file else None,
                    self._resume,
                    events,
                    self._memory_limit_mb,
                    self._threads,
                )
                running[ref] = (job, time.monotonic())
            done, _ = ray.wait(list(running), num_returns=1, timeout=_POLL_SECONDS)
            self._drain(events, on_event)
            now = time.monotonic()
            for ref in list(running):
                job, started = running[ref]
                outcome = None
                if ref in done:
                    outcome = self._collect(ref, job, now - started)
                elif now - started > self._timeout_s:
                    ray.cancel(ref, force=True)
                    remove_staging(job)
                    outcome = job_outcome(job, "timeout", f"cancelled after {self._timeout_s:g} s", now - started)
                if outcome is not None:
                    del running[ref]
                    outcomes[job.name] = outcome
                    logger.info("job %s: %s %s", outcome.job, outcome.status, outcome.message)
                    self._drain(events, on_event)
                    if on_outcome is not None:
                        on_outcome(outcome)
        self._drain(events, on_event)
        return [outcomes[job.name] for job in jobs]

    def _collect(self, ref: Any, job: ConversionJob, seconds: float) -> JobOutcome:
        """The finished task's outcome; a dead worker is a crash."""
        exceptions = self._ray.exceptions
        try:
            data = self._ray.get(ref)
        except (exceptions.WorkerCrashedError, exceptions.OutOfMemoryError) as e:
            remove_staging(job)
            return job_outcome(job, "crashed", f"the job's Ray worker died: {type(e).__name__}", seconds)
        except exceptions.RayError as e:
            remove_staging(job)
            return job_outcome(job, "failed", f"Ray error: {type(e).__name__}: {str(e).splitlines()[0]}", seconds)
        return job_outcome(job, data["status"], data["message"], seconds, data.get("verdicts", {}))

    @staticmethod
    def _drain(events: Any, on_event: Callable[[StageEvent], None] | None) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                event = events.get_nowait()
            except Empty:
                return
            if on_event is not None:
                on_event(event)
