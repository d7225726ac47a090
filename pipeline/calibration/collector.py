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
    """
    stats = CalibrationStats(tensors={name: TensorHistogram() for name in tensors})
    ordered = [stats.tensors[name] for name in tensors]
    per_sample: int | None = None

    def update(histogram: TensorHistogram, values: np.ndarray, sample: int) -> None:
        histogram.update(values, with_histogram=histograms, sample=sample)

    with (
        tempfile.TemporaryDirectory(dir=model_dir, prefix=".calibration-") as folder,
        ThreadPoolExecutor(max_workers=cpu_threads()) as pool,
    ):
        session = _session(_save_augmented(model, tensors, Path(folder)), threads)
        pending: list[Future[None]] = []
        for feeds in batches:
            size = _batch_size(feeds)
            splittable = all(a.ndim and a.shape[0] == size for a in feeds.values())
            start = 0
            while start < size:
                step = size if not splittable else (1 if per_sample is None else max(1, OUTPUT_BUDGET // per_sample))
                outputs = session.run(tensors, {name: a[start : start + step] for name, a in feeds.items()})
                if per_sample is None:
                    per_sample = max(1, sum(o.size for o in outputs) // min(step, size))
                # The previous slice's histograms filled while this slice ran.
                for job in pending:
                    job.result()
                # A batch's sample is split across its slices: the binned values per batch do
                # not depend on how it was sliced.
                sample = max(1, HISTOGRAM_SAMPLE * min(step, size - start) // size)
                pending = [pool.submit(update, *pair, sample) for pair in zip(ordered, outputs, strict=True)]
                del outputs
                start += step
            stats.batches += 1
            stats.samples += size
        for job in pending:
            job.result()
        del session
    logger.info("calibrated %d tensors on %d batches (%d samples)", len(tensors), stats.batches, stats.samples)
    return stats


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
