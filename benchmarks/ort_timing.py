"""ONNX Runtime sessions and latency as every benchmark measures them: CPU provider, 2 threads unless told."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

THREADS = 2
Feeds = dict[str, np.ndarray]


def session(path: Path, threads: int = THREADS) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads and all graph optimisations (the default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(model: Path, feeds: Feeds, repeats: int = 20, threads: int = THREADS) -> float:
    """Best of `repeats` runs after one warm-up, in milliseconds."""
    runner = session(model, threads)
    runner.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return 1000 * best
