"""How many CPU threads this process's job may use, and ONNX Runtime session options that honour it.

A batch running several jobs at once on one machine gives each job's process a share of the cores
(``ONNXFORGE_THREADS``, set by the executors); oversubscribed cores would make every job slower.
"""

from __future__ import annotations

import os

import onnxruntime as ort

THREADS_ENV = "ONNXFORGE_THREADS"


def job_threads() -> int:
    """The job's thread budget: ``$ONNXFORGE_THREADS``, else 0 (ONNX Runtime's default: all cores)."""
    value = os.environ.get(THREADS_ENV, "")
    return int(value) if value.isdigit() else 0


def cpu_threads() -> int:
    """Threads for our own thread pools: the job's budget, else every core."""
    return job_threads() or os.cpu_count() or 1


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Quiet session options (errors only) with `threads` intra-op threads (0: the job's budget)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or job_threads()
    options.log_severity_level = 3
    return options
