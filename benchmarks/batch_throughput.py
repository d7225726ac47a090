"""Batch throughput: 20 small jobs (variants of the digits sample), 2 workers against 1, and the
cost of running each job in its own process.

The 20 jobs cross four calibration methods with five pruning setups (none, 25% and 50% of the
channels, 50% ranked globally, 2:4 sparsity), so no two share a cached stage; resume is off.
Three runs, in one process, same jobs:

- in-process: `pipeline.convert` on each job in turn, in this process (no isolation);
- local executor, 1 worker: each job in its own spawned process;
- local executor, 2 workers: two jobs at a time, each with one of the two cores;
- local executor, 1 worker held to 1 thread: separates the parallelism from the thread setting.

Goal (issue 8): 2 workers >= 1.8x the throughput of 1 worker on 2 cores. The isolation overhead
per job is (1-worker time - in-process time) / jobs: a fresh interpreter importing torch, ONNX
Runtime and the pipeline, and the process start.

Run from the repository root:  python benchmarks/batch_throughput.py [--jobs 20]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import pipeline
from pipeline.batch.local import LocalExecutor

REPO = Path(__file__).resolve().parent.parent
METHODS = ("mse", "minmax", "percentile", "entropy")
PRUNING: dict[str, dict[str, Any]] = {
    "none": {},
    "channels 25%": {"structured": {"ratio": 0.25}},
    "channels 50%": {"structured": {"ratio": 0.5, "round_to": 8}},
    "channels 50% global": {"structured": {"ratio": 0.5, "scope": "global"}},
    "2:4 sparsity": {"sparsity": {"pattern": "n:m"}},
}


def jobs(folder: Path, count: int) -> list[pipeline.ConversionJob]:
    """`count` distinct variants of the digits sample job, writing under `folder`."""
    sample = REPO / "samples" / "digits_cnn"
    raw = tomllib.loads((sample / "job.toml").read_text())
    raw["python_path"] = [str(REPO)]
    for section in ("calibration", "evaluation"):
        raw[section]["npz"] = str(sample / raw[section]["npz"])
    # Gates measured, not enforced: throughput counts every job, pass or fail.
    raw["parity"] = {"prune": {"min_cosine": -1.0, "max_accuracy_drop": 100.0}, "int8": {"min_cosine": 0.9}}
    variants = list(itertools.product(METHODS, PRUNING))[:count]
    result = []
    for index, (method, pruning) in enumerate(variants):
        job = {**raw, "name": f"digits_{index:02d}", "output_dir": str(folder / f"job{index:02d}")}
        job["quantize"] = {"calibration_method": method, "calibration_cache": False}
        if PRUNING[pruning]:
            job["prune"] = PRUNING[pruning]
        result.append(pipeline.validate_job(job, origin=f"variant {method} / {pruning}"))
    return result


def timed(run: Any) -> tuple[float, list[str]]:
    start = time.perf_counter()
    statuses = run()
    return time.perf_counter() - start, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=120)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxforge-bench-batch-") as scratch:
        folder = Path(scratch)

        def in_process() -> list[str]:
            statuses = []
            for job in jobs(folder / "inproc", args.jobs):
                try:
                    pipeline.convert(job)
                    statuses.append("passed")
                except pipeline.OnnxforgeError as e:
                    statuses.append(type(e).__name__)
            return statuses

        def executor(workers: int, threads: int | None = None) -> Any:
            def run() -> list[str]:
                runner = LocalExecutor(workers=workers, timeout_s=600, threads=threads)
                outcomes = runner.run(jobs(folder / f"w{workers}t{threads}", args.jobs))
                return [outcome.status for outcome in outcomes]

            return run

        for name, run in (
            ("in-process, one after another", in_process),
            ("local executor, 1 worker (2 threads per job)", executor(1)),
            ("local executor, 2 workers (1 thread per job)", executor(2)),
            ("local executor, 1 worker, 1 thread per job", executor(1, threads=1)),
        ):
            seconds, statuses = timed(run)
            rows.append((name, seconds, statuses))
            console.print(f"{name}: {seconds:.1f} s", highlight=False)
    table = Table(title=f"{args.jobs} digits jobs (export, simplify, prune, quantize, validate), 2 cores")
    for column in ("run", "seconds", "jobs / minute", "vs 1 worker", "passed"):
        table.add_column(column)
    one_worker = rows[1][1]
    for name, seconds, statuses in rows:
        passed = sum(status == "passed" for status in statuses)
        table.add_row(
            name, f"{seconds:.1f}", f"{60 * len(statuses) / seconds:.1f}", f"{one_worker / seconds:.2f}x", str(passed)
        )
    console.print(table)
    speedup = one_worker / rows[2][1]
    same_threads = rows[3][1] / rows[2][1]
    overhead = (one_worker - rows[0][1]) / args.jobs
    console.print(f"2 workers vs 1: {speedup:.2f}x (goal >= 1.8: {'met' if speedup >= 1.8 else 'MISSED'})")
    console.print(f"2 workers vs 1 worker at 1 thread per job each: {same_threads:.2f}x (the cores' share alone)")
    console.print(f"isolation overhead per job (1 worker vs in-process): {overhead:.2f} s")


if __name__ == "__main__":
    main()
