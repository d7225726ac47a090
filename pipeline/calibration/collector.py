"""Stream calibration batches through the model and gather per-tensor statistics, a slice at a time.

Unlike ONNX Runtime's histogram calibrators, which keep every intermediate output of every batch
until the end, this keeps only a fixed-size `TensorHistogram` per tensor: memory depends on the
batch size and the model, not on the number of samples.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from pipeline.artifacts import storage_errors
from pipeline.calibration.histogram import HISTOGRAM_SAMPLE, TensorHistogram
from pipeline.onnx_io import PROTOBUF_LIMIT_BYTES
from pipeline.threads import cpu_threads, session_options

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
# Elements of exposed tensors one calibration run may produce (float32: 4 bytes each); two runs'
# tensors are held at once (one being binned while the next runs).
OUTPUT_BUDGET = 16 * 2**20


@dataclass
class CalibrationStats:
    """Statistics of every calibrated tensor, mergeable across workers.

    Attributes:
        tensors: Histogram per tensor name.
        batches: Batches seen.
        samples: Samples seen (first axis).
    """

    tensors: dict[str, TensorHistogram] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0

    def merge(self, other: CalibrationStats) -> None:
        """Add statistics gathered elsewhere on other data."""
        for name, histogram in other.tensors.items():
            if name in self.tensors:
                self.tensors[name].merge(histogram)
            else:
                self.tensors[name] = histogram.copy()
        self.batches += other.batches
        self.samples += other.samples


def select_tensors(model: onnx.ModelProto, op_types: set[str] | None, outputs: bool = True) -> list[str]:
    """Float activations read (and, with `outputs`, written) by nodes of the given op types.

    With `outputs`, the rule ONNX Runtime's calibrators use. `model` must carry value_info
    (shape inference). All nodes when `op_types` is None.
    """
    value_infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    initializers = {init.name for init in model.graph.initializer}
    selected: dict[str, None] = {}
    for node in model.graph.node:
        if op_types is not None and node.op_type not in op_types:
            continue
        for name in [*node.input, *node.output] if outputs else node.input:
            info = value_infos.get(name)
            if info is None or name in initializers or not info.type.HasField("tensor_type"):
                continue
            if info.type.tensor_type.elem_type in _FLOAT_TYPES:
                selected[name] = None
    return list(selected)


def collect_statistics(
    model: onnx.ModelProto,
    model_dir: Path,
    tensors: list[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    histograms: bool,
    threads: int = 0,
) -> CalibrationStats:
    """Run every batch through the model with `tensors` exposed, updating their statistics.

    Peak memory does not depend on the number of batches, nor on the batch size: a batch is
    run in slices whose exposed tensors stay under `OUTPUT_BUDGET` elements (the first slice
    is one sample, to measure). Histograms are updated on a thread pool, one tensor per task,
    while the next slice runs.

    Args:
        model: The (shape-inferred) model, weights loaded.
        model_dir: A folder on the same disk, where the augmented copy is written briefly.
        tensors: Tensor names to gather.
        batches: Feed dicts, consumed one at a time.
        histograms: Build histograms (for percentile / entropy / MSE), not only min/max.
        threads: ONNX Runtime intra-op threads (0: its default).

    Returns:
        The statistics.

    Raises:
        StorageError: The augmented copy could not be written in `model_dir` (disk full, permissions).
    """
    stats = CalibrationStats(tensors={name: TensorHistogram() for name in tensors})
    if not tensors:  # nothing of the op types to quantize: no model to run (ONNX Runtime wants an output)
        logger.info("no tensor to calibrate")
        return stats
    with storage_errors(model_dir):
        temporary = tempfile.TemporaryDirectory(dir=model_dir, prefix=".calibration-")
    with temporary as folder, ThreadPoolExecutor(max_workers=cpu_threads()) as pool:
        runner = _SliceRunner(
            session=_session(_save_augmented(model, tensors, Path(folder)), threads),
            pool=pool,
            tensors=tensors,
            histograms=[stats.tensors[name] for name in tensors],
            with_histogram=histograms,
        )
        for feeds in batches:
            stats.samples += runner.run_batch(feeds)
            stats.batches += 1
        runner.wait()
        # The session holds the augmented file: release it before the folder is removed.
        del runner
    logger.info("calibrated %d tensors on %d batches (%d samples)", len(tensors), stats.batches, stats.samples)
    return stats


@dataclass
class _SliceRunner:
    """Runs batches through the augmented model in slices, binning a slice's tensors on the pool
    while the next slice runs.

    Attributes:
        session: The augmented model's session (its outputs are `tensors`).
        pool: Threads the histograms are updated on, one tensor per task.
        tensors: The exposed tensor names, in output order.
        histograms: Their histograms, in the same order.
        with_histogram: Build histograms, not only min/max.
        per_sample: Exposed elements per sample, measured on the first slice (one sample).
        pending: The last slice's histogram updates.
    """

    session: ort.InferenceSession
    pool: ThreadPoolExecutor
    tensors: list[str]
    histograms: list[TensorHistogram]
    with_histogram: bool
    per_sample: int | None = None
    pending: list[Future[None]] = field(default_factory=list)

    def run_batch(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Run one batch, a slice at a time, and queue its histogram updates.

        Returns:
            The batch's sample count.
        """
        size = _batch_size(feeds)
        splittable = all(a.ndim and a.shape[0] == size for a in feeds.values())
        start = 0
        while start < size:
            step = self._slice_samples() if splittable else size
            outputs = self.session.run(self.tensors, {name: a[start : start + step] for name, a in feeds.items()})
            if self.per_sample is None:
                self.per_sample = max(1, sum(o.size for o in outputs) // min(step, size))
            # The previous slice's histograms filled while this slice ran.
            self.wait()
            # A batch's sample is split across its slices: the binned values per batch do
            # not depend on how it was sliced.
            sample = max(1, HISTOGRAM_SAMPLE * min(step, size - start) // size)
            self.pending = [
                self.pool.submit(self._update, *pair, sample) for pair in zip(self.histograms, outputs, strict=True)
            ]
            del outputs
            start += step
        return size

    def wait(self) -> None:
        """Wait for the queued histogram updates (re-raising their errors)."""
        for job in self.pending:
            job.result()
        self.pending = []

    def _slice_samples(self) -> int:
        """Samples per slice: one until the output size per sample is known, then the budget's worth."""
        return 1 if self.per_sample is None else max(1, OUTPUT_BUDGET // self.per_sample)

    def _update(self, histogram: TensorHistogram, values: np.ndarray, sample: int) -> None:
        histogram.update(values, with_histogram=self.with_histogram, sample=sample)


def _batch_size(feeds: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _save_augmented(model: onnx.ModelProto, tensors: list[str], folder: Path) -> Path:
    """Save a copy of the graph whose outputs are exactly the tensors to calibrate."""
    value_infos = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    del augmented.graph.output[:]
    augmented.graph.output.extend(value_infos[name] for name in tensors)
    path = folder / "augmented.onnx"
    weight_bytes = sum(len(tensor.raw_data) for tensor in augmented.graph.initializer)
    # Weights go to a sidecar file only when they would not fit in one protobuf.
    with storage_errors(path):
        onnx.save_model(
            augmented,
            str(path),
            save_as_external_data=weight_bytes > PROTOBUF_LIMIT_BYTES // 2,
            location="augmented.onnx.data",
        )
    return path


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = session_options(threads)
    # Histograms are binned on our threads while the session runs: idle ONNX Runtime threads
    # must sleep, not spin on the cores those threads need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
