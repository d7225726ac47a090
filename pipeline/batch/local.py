"""The local executor: every job in a process of its own on this machine, with a timeout and a memory limit.

A job that segfaults, is OOM-killed, hangs or raises is reported with its status and cause; the
others are not affected. Nothing half-written stays visible: a killed job's staging folder is
removed (the runner publishes an output folder only once it is complete). The batch process owns
its job processes and their fork server: they die with it (`pipeline.batch.lifetime`).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pipeline.batch.base import BatchSettings, IsolatingExecutor, WorkerResult
from pipeline.batch.death import OomCounter, death_cause, oom_counters, oom_evidence
from pipeline.batch.lifetime import Lifeline, bind_to_batch, scratch_folder, start_owned
from pipeline.batch.worker import convert_one, limit_process
from pipeline.job import ConversionJob
from pipeline.runner import StageEvent

# Imported once by the fork server (names it cannot import are skipped): first the guard that
# ties it to the batch process, then the pipeline, and what torch and ONNX Runtime otherwise
# import lazily on a job's first export and quantization.
_PRELOAD = [
    "pipeline.batch.forkserver_guard",
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
    oom_before: list[OomCounter]  # the kernel's OOM-kill counters when the job started


def _child(
    job_json: str,
    source_file: str | None,
    result_file: str,
    events: Any,
    memory_limit_mb: int | None,
    threads: int | None,
    resume: bool,
    lifeline: Any,
) -> None:
    """Runs in the job's process: tie it to the batch, convert one job, write its result as JSON."""
    bind_to_batch(lifeline)
    limit_process(memory_limit_mb, threads)

    result = convert_one(job_json, source_file, resume, events.put, memory_limit_mb)
    Path(result_file).write_text(result.model_dump_json(), encoding="utf-8")


class _LocalLauncher:
    """Starts, polls and kills job processes; their events come back through one queue.

    Every job holds a read end of the batch's lifeline (`pipeline.batch.lifetime.Lifeline`).
    """

    def __init__(self, settings: BatchSettings, scratch: Path, context: Any, lifeline: Lifeline) -> None:
        self._settings = settings
        self._scratch = scratch
        self._context = context
        self._lifeline = lifeline
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
                self._lifeline.reader,
            ),
            name=f"onnxforge-{job.name}",
        )
        oom_before = oom_counters()
        process.start()
        return _LocalJob(process, result_file, oom_before)

    def poll(self, handle: _LocalJob) -> WorkerResult | None:
        if handle.process.is_alive():
            return None
        handle.process.join()
        if handle.result_file.is_file():
            return WorkerResult.model_validate_json(handle.result_file.read_text(encoding="utf-8"))
        exitcode = handle.process.exitcode
        evidence = oom_evidence(handle.oom_before) if exitcode is not None and exitcode < 0 else None
        return WorkerResult(status="crashed", message=death_cause(exitcode, evidence))

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
        """A launcher with its scratch folder and lifeline, both gone when the batch ends.

        The fork server (where one is used, and unless it runs already) is started here, owned by
        this process: it dies with it.
        """
        context = _job_process_context()
        if context.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            start_owned(forkserver.ensure_running)
        lifeline = Lifeline(context)
        try:
            with scratch_folder() as scratch:
                yield _LocalLauncher(self.settings, scratch, context, lifeline)
        finally:
            lifeline.close()


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
