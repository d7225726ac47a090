"""What runs inside an isolated job process, whatever started it (a spawned process, a Ray task)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.batch.base import WorkerResult
from pipeline.threads import THREADS_ENV

if TYPE_CHECKING:
    from pipeline.runner import StageEvent

# Receives every StageEvent of the job (a queue's put: events are plain picklable dataclasses).
EventSink = Callable[["StageEvent"], None]


def limit_process(memory_limit_mb: int | None, threads: int | None) -> None:
    """Cap the current process: address space, and CPU threads for torch and ONNX Runtime.

    Call first thing in a fresh job process, before any work.
    """
    if memory_limit_mb is not None:
        import resource

        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch  # already imported with the pipeline package: set its pool explicitly

        torch.set_num_threads(threads)


def convert_one(
    job_json: str, source_file: str | None, resume: bool, emit: EventSink, memory_limit_mb: int | None
) -> WorkerResult:
    """Convert one job in this process; never raises for the job's own failure.

    Args:
        job_json: The validated job as JSON (``ConversionJob.model_dump_json``).
        source_file: The job file it came from, for messages.
        resume: Restore unchanged stage outputs from the stage cache.
        emit: Receives the job's `StageEvent`s (stages starting and finishing, progress).
        memory_limit_mb: The process's memory limit, named in an out-of-memory outcome.

    Returns:
        The job's status, message and parity verdicts (the executor makes a `JobOutcome` of it).
    """
    import pipeline
    from pipeline.errors import OnnxforgeError, ParityError

    try:
        job = pipeline.validate_job(json.loads(job_json), origin=source_file or "batch job")
        if source_file:
            job = job.model_copy(update={"source_file": Path(source_file)})
        result = pipeline.convert(job, on_event=emit, resume=resume)
        return WorkerResult(status="passed", verdicts=result.report.verdicts())
    except ParityError as e:
        verdicts = e.result.report.verdicts() if e.result is not None else {}  # type: ignore[attr-defined]
        return WorkerResult(status="parity_failed", message=str(e), verdicts=verdicts)
    except OnnxforgeError as e:
        return WorkerResult(status="failed", message=f"{type(e).__name__}: {e}")
    except MemoryError:
        return WorkerResult(status="crashed", message=f"out of memory (limit {memory_limit_mb} MB)")
    except Exception as e:  # noqa: BLE001 - the batch reports any failure of a job as its outcome
        return WorkerResult(status="failed", message=f"internal error: {type(e).__name__}: {e}")
