"""ONNX Runtime sessions and latency as every benchmark measures them: CPU provider, 2 threads unless told;
latency through `pipeline.timing`, the module the search and the speed guard use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.timing import measure_latency_ms

THREADS = 2
Feeds = dict[str, np.ndarray]


def session(path: Path, threads: int = THREADS) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads and all graph optimisations (the default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(model: Path, feeds: Feeds, threads: int = THREADS) -> float:
    """The model's typical latency on `feeds` in milliseconds (`pipeline.timing.measure_latency_ms`:
    warm-up, then the median of timed runs); ratios between models come from `compare_latency`."""
    runner = session(model, threads)
    return measure_latency_ms(lambda: runner.run(None, feeds))
