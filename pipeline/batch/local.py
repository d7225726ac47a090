"""The local executor: every job in a process of its own on this machine, with a timeout and a memory limit.

A job that segfaults, is OOM-killed, hangs or raises is reported with its status and cause; the
others are not affected. Nothing half-written stays visible: a killed job's staging folder is
removed (the runner publishes an output folder only once it is complete).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pipeline.batch.base import BatchSettings, IsolatingExecutor, WorkerResult
from pipeline.batch.worker import convert_one, limit_process
from pipeline.job import ConversionJob
from pipeline.runner import StageEvent

# Imported once by the fork server (names it cannot import are skipped): the pipeline, and what
# torch and ONNX Runtime otherwise import lazily on a job's first export and quantization.
_PRELOAD = [
    "pipeline.api",
    "pipeline.batch.local",
    "pipeline.batch.worker",
    "torch._dynamo",
    "torch.onnx._internal.exporter._core",
    "onnxscript.optimizer",
    "onnxruntime.quantization",
]


@dataclass
class _LocalJob:
    process: BaseProcess
    result_file: Path


def _child(
    job_json: str,
    source_file: str | None,
    result_file: str,
    events: Any,
    memory_limit_mb: int | None,
    threads: int | None,
    resume: bool,
) -> None:
    """Runs in the job's process: convert one job, write its result as JSON."""
    limit_process(memory_limit_mb, threads)

    result = convert_one(job_json, source_file, resume, events.put, memory_limit_mb)
    Path(result_file).write_text(result.model_dump_json(), encoding="utf-8")


class _LocalLauncher:
    """Starts, polls and kills job processes; their events come back through one queue."""

    def __init__(self, settings: BatchSettings, scratch: Path) -> None:
        self._settings = settings
        self._scratch = scratch
        self._context = _job_process_context()
        self._events = self._context.Queue()

    def start(self, job: ConversionJob) -> _LocalJob:
        result_file = self._scratch / f"{job.name}.json"
        settings = self._settings
        process = self._context.Process(
            target=_child,
            args=(
                job.model_dump_json(),
                str(job.source_file) if job.source_file else None,
                str(result_file),
                self._events,
                settings.memory_limit_mb,
                settings.threads_per_job(),
                settings.resume,
            ),
            name=f"onnxforge-{job.name}",
        )
        process.start()
        return _LocalJob(process, result_file)

    def poll(self, handle: _LocalJob) -> WorkerResult | None:
        if handle.process.is_alive():
            return None
        handle.process.join()
        if handle.result_file.is_file():
            return WorkerResult.model_validate_json(handle.result_file.read_text(encoding="utf-8"))
        return WorkerResult(status="crashed", message=_death_cause(handle.process.exitcode))

    def kill(self, handle: _LocalJob) -> None:
        handle.process.kill()
        handle.process.join()

    def drain(self) -> Iterator[StageEvent]:
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return


class LocalExecutor(IsolatingExecutor):
    """Runs jobs in processes of their own on this machine, `workers` at a time (see `IsolatingExecutor`)."""

    @contextmanager
    def _launcher(self) -> Iterator[_LocalLauncher]:
        with tempfile.TemporaryDirectory(prefix="onnxforge-batch-") as scratch:
            yield _LocalLauncher(self.settings, Path(scratch))


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
