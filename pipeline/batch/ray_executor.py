"""The Ray executor: the same jobs as Ray tasks, on an existing cluster or a local instance.

Each job is a task in a fresh worker process (``max_calls=1``), so a segfault or an OOM kill takes
down that job only, as with the local executor. Stage events come back through a Ray queue. Job
outputs are written where the job says: on a multi-node cluster, `output_dir` (and the data the
job reads) must be on storage every node sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Unpack

from pipeline.batch.base import BatchOverrides, BatchSettings, IsolatingExecutor, WorkerResult
from pipeline.batch.worker import convert_one, limit_process
from pipeline.errors import BackendError
from pipeline.job import ConversionJob
from pipeline.runner import StageEvent

INSTALL_HINT = 'pip install "onnxforge[ray]"'
# A small object store: only results and events travel through it.
_OBJECT_STORE_BYTES = 128 * 2**20


def _task(
    job_json: str,
    source_file: str | None,
    resume: bool,
    events: Any,
    memory_limit_mb: int | None,
    threads: int | None,
) -> str:
    """Runs in a Ray worker process: limit it, convert one job, return its result as JSON."""
    limit_process(memory_limit_mb, threads)

    return convert_one(job_json, source_file, resume, events.put, memory_limit_mb).model_dump_json()


class _RayLauncher:
    """Submits jobs as Ray tasks, polls and cancels them; their events come back through a Ray queue."""

    def __init__(self, ray: Any, settings: BatchSettings) -> None:
        from ray.util.queue import Queue

        self._ray = ray
        self._settings = settings
        self._events = Queue(actor_options={"num_cpus": 0})
        self._task = ray.remote(max_calls=1, max_retries=0, num_cpus=1)(_task)

    def start(self, job: ConversionJob) -> Any:
        settings = self._settings
        return self._task.remote(
            job.model_dump_json(),
            str(job.source_file) if job.source_file else None,
            settings.resume,
            self._events,
            settings.memory_limit_mb,
            settings.threads_per_job(),
        )

    def poll(self, handle: Any) -> WorkerResult | None:
        """The finished task's result; a dead worker is a crash."""
        ray = self._ray
        done, _ = ray.wait([handle], num_returns=1, timeout=0)
        if not done:
            return None
        try:
            return WorkerResult.model_validate_json(ray.get(handle))
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:
            return WorkerResult(status="crashed", message=f"the job's Ray worker died: {type(e).__name__}")
        except ray.exceptions.RayError as e:
            return WorkerResult(status="failed", message=f"Ray error: {type(e).__name__}: {str(e).splitlines()[0]}")

    def kill(self, handle: Any) -> None:
        self._ray.cancel(handle, force=True)

    def drain(self) -> Iterator[StageEvent]:
        from ray.util.queue import Empty

        while True:
            try:
                yield self._events.get_nowait()
            except Empty:
                return


class RayExecutor(IsolatingExecutor):
    """Runs jobs as Ray tasks, `workers` at a time (a timed-out task is cancelled, its worker killed).

    The cluster is `settings.ray_address` (``ray.init(address=...)``, e.g. ``"auto"`` or
    ``"ray://head:10001"``); None starts a local instance with `workers` CPUs, stopped when the
    batch ends.

    Args:
        settings: The batch settings (default: `BatchSettings()`'s defaults).
        **overrides: Settings that replace those in `settings`.

    Raises:
        BackendError: Ray is not installed (and, when a batch runs, the cluster cannot be reached).
    """

    poll_seconds = 0.2

    def __init__(self, settings: BatchSettings | None = None, **overrides: Unpack[BatchOverrides]) -> None:
        try:
            import ray
        except ImportError as e:
            raise BackendError("ray", "Ray is not installed", INSTALL_HINT) from e
        super().__init__(settings, **overrides)
        self._ray = ray

    @contextmanager
    def _launcher(self) -> Iterator[_RayLauncher]:
        started_here = not self._ray.is_initialized()
        if started_here:
            self._connect()
        try:
            yield _RayLauncher(self._ray, self.settings)
        finally:
            if started_here:
                self._ray.shutdown()

    def _connect(self) -> None:
        ray = self._ray
        address = self.settings.ray_address
        try:
            if address is None:
                ray.init(
                    num_cpus=self.settings.workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    object_store_memory=_OBJECT_STORE_BYTES,
                    configure_logging=False,
                )
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ...
            where = address or "a local instance"
            raise BackendError("ray", f"cannot start or reach Ray at {where}: {e}", "check the address") from e
