"""Calibration of MiniLM: peak memory and time, onnxforge's streaming histograms vs ONNX Runtime.

Each measurement runs in its own process (peak RSS is per process), on the same fp32 model
(exported and simplified by onnxforge) and the same data: N sentences from the sample, cycled,
tokenised and padded to 128 tokens, batches of 16. ORT calibrates the inputs and outputs of MatMul /
Gemm; onnxforge's transformer recipe needs only their inputs (it puts no Q/DQ on MatMul outputs),
and a third row gives onnxforge ORT's tensor set for a like-for-like time.

Goals (issue 5): onnxforge with a histogram method at 256 samples <= 1.5 GB peak RSS and no
slower than ORT MinMax on the same data; its peak RSS at 16 and 256 samples within 20%.

Every case runs `--rounds` times (default 3), the cases alternating; the table shows the median
time and the largest peak. Imports and tokenizer set-up are outside the timed part.

Run from the repository root:  python benchmarks/calibration_memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OP_TYPES = ["MatMul", "Gemm"]
CASES = [
    ("onnxforge mse, recipe tensors (MatMul inputs)", "onnxforge", 16),
    ("onnxforge mse, recipe tensors (MatMul inputs)", "onnxforge", 256),
    ("onnxforge mse, ORT's tensor set (inputs+outputs)", "onnxforge-all", 256),
    ("ORT MinMax", "ort-minmax", 256),
    ("ORT Percentile (histograms in memory)", "ort-percentile", 16),
    ("ORT Percentile (histograms in memory)", "ort-percentile", 64),
]


def feeds(samples: int) -> Iterator[dict[str, np.ndarray]]:
    """`samples` sentences of the MiniLM sample, cycled, as [16, 128] batches."""
    sys.path.insert(0, str(REPO))
    from samples.minilm.data import MAX_LENGTH, _feeds, load_sentences

    sentences = load_sentences()
    chosen = [sentences[i % len(sentences)] for i in range(samples)]
    yield from _feeds(chosen, pad_to=MAX_LENGTH)


def run_onnxforge(model_path: Path, samples: int, outputs: bool) -> None:
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    from pipeline.calibration.collector import collect_statistics, select_tensors
    from pipeline.calibration.ranges import compute_range

    model = load_model_with_shape_infer(model_path)
    tensors = select_tensors(model, set(OP_TYPES), outputs=outputs)
    stats = collect_statistics(model, model_path.parent, tensors, feeds(samples), histograms=True)
    ranges = {name: compute_range(h, "mse") for name, h in stats.tensors.items()}
    assert len(ranges) == len(tensors)


def run_ort(model_path: Path, samples: int, method: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = feeds(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    calibration_method = CalibrationMethod.MinMax if method == "ort-minmax" else CalibrationMethod.Percentile
    with tempfile.TemporaryDirectory(dir=model_path.parent) as folder:
        calibrator = create_calibrator(
            model_path,
            OP_TYPES,
            augmented_model_path=str(Path(folder) / "augmented.onnx"),
            calibrate_method=calibration_method,
        )
        calibrator.collect_data(Reader())
        calibrator.compute_data()


def worker(model_path: Path, tool: str, samples: int) -> None:
    """Run one case and print its seconds and peak RSS as JSON."""
    # Imports and tokenizer set-up stay outside the timed part, for every case alike.
    list(feeds(16))
    import onnxruntime.quantization.calibrate
    import onnxruntime.quantization.quant_utils  # noqa: F401

    import pipeline.calibration.collector
    import pipeline.calibration.ranges  # noqa: F401

    start = time.perf_counter()
    if tool.startswith("onnxforge"):
        run_onnxforge(model_path, samples, outputs=tool == "onnxforge-all")
    else:
        run_ort(model_path, samples, tool)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_gb": peak_rss_kib() / 2**20}))


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec
    from the parent, which here exported MiniLM with torch (1.28 GB) before starting the workers."""
    from pipeline.processes import peak_rss_bytes

    peak = peak_rss_bytes()
    if peak is None:  # no VmHWM: the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024


def prepare_model(folder: Path) -> Path:
    """Export and simplify the MiniLM sample with onnxforge (quantize off)."""
    import pipeline

    job = pipeline.load_job(REPO / "samples" / "minilm" / "job.toml")
    job = job.model_copy(update={"quantize": job.quantize.model_copy(update={"enabled": False})})
    export = job.export.model_copy(update={"check_shapes": []})
    job = job.model_copy(update={"output_dir": folder / "fp32", "export": export})
    return pipeline.convert(job).path("simplify")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per case (median time, largest peak)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "TOOL", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], int(args.worker[2]))
        return
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        model_path = prepare_model(Path(tmp))
        runs: dict[int, list[dict[str, float]]] = {index: [] for index in range(len(CASES))}
        # Rounds alternate the cases, so a slow spell of the machine touches them all alike.
        for _ in range(args.rounds):
            for index, (_, tool, samples) in enumerate(CASES):
                completed = subprocess.run(
                    [sys.executable, __file__, "--worker", str(model_path), tool, str(samples)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[index].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    rows = [
        (
            label,
            samples,
            {
                "seconds": statistics.median(r["seconds"] for r in runs[index]),
                "peak_gb": max(r["peak_gb"] for r in runs[index]),
            },
        )
        for index, (label, _, samples) in enumerate(CASES)
    ]
    minmax = next(result for label, samples, result in rows if label == "ORT MinMax")
    table = Table(
        title=f"MiniLM calibration, sequence 128, batches of 16 (one process per run; median of {args.rounds})"
    )
    for column in ("method", "samples", "peak RSS", "time", "time / ORT MinMax (256)"):
        table.add_column(column)
    for label, samples, result in rows:
        ratio = result["seconds"] / minmax["seconds"]
        table.add_row(label, str(samples), f"{result['peak_gb']:.2f} GB", f"{result['seconds']:.1f} s", f"{ratio:.2f}x")
    ours = {samples: result for label, samples, result in rows if label.startswith("onnxforge mse, recipe")}
    growth = ours[256]["peak_gb"] / ours[16]["peak_gb"] - 1
    console = Console(width=140)
    console.print(table)
    console.print(
        f"onnxforge peak RSS 256 vs 16 samples: {100 * growth:+.1f}% (goal within 20%); "
        f"at 256: {ours[256]['peak_gb']:.2f} GB (goal <= 1.5); time vs ORT MinMax: "
        f"{ours[256]['seconds'] / minmax['seconds']:.2f}x (goal <= 1.0)"
    )


if __name__ == "__main__":
    main()
