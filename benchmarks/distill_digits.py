"""Distillation on the digits sample: the students trained against the teacher (kd) beside
the same student trained on the labels alone, over several seeds, each converted to int8 and run on the
CPU and the FPGA-style backend.

Every run is the sample job `samples/digits_cnn/job_distilled.toml` through `pipeline.convert`; the
labels-only student differs only in ``alpha = 1`` (cross-entropy on the labels, no teacher term).
Accuracy is top-1 on the 360 held-out images (`data/heldout.npz`), which no training or epoch choice
saw (the best epoch and early stop use `data/validation.npz`).

Usage: python benchmarks/distill_digits.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

import pipeline

JOB = Path(__file__).resolve().parents[1] / "samples" / "digits_cnn" / "job_distilled.toml"


@dataclass(frozen=True)
class Run:
    """One trained and converted student."""

    seed: int
    teacher: float
    student: float
    int8_cpu: float
    int8_fpga: float
    epochs: int
    best_epoch: int
    train_seconds: float
    parameters: tuple[int, int]
    latency_ms: tuple[float, float]
    verdict: str


def convert(alpha: float, seed: int, width: int, hidden: int, folder: Path) -> Run:
    """Convert the sample job with this label weight, seed and student size (fresh checkpoints: no resume)."""
    settings = {
        "alpha": alpha,
        "seed": seed,
        "student_kwargs": {"width": width, "hidden": hidden},
        "checkpoint_dir": str(folder / "checkpoints"),
    }
    job = pipeline.load_job(JOB, distill=settings, output_dir=str(folder / "out"))
    try:
        result = pipeline.convert(job)
    except pipeline.ParityError as e:  # a student below the gate is a result to show, not a crash
        result = e.result
    summary = result.report.distillation
    assert summary is not None
    accuracy = {(c.stage, c.target): c.accuracy for c in result.report.comparisons if c.accuracy is not None}
    return Run(
        seed=seed,
        teacher=accuracy[("distill", "cpu")].reference,
        student=accuracy[("distill", "cpu")].candidate,
        int8_cpu=accuracy[("quantize", "cpu")].candidate,
        int8_fpga=accuracy[("quantize", "fpga")].candidate,
        epochs=len(summary.history),
        best_epoch=summary.best_epoch,
        train_seconds=sum(record.seconds for record in summary.history),
        parameters=(summary.teacher.parameters, summary.student_model.parameters),
        latency_ms=(summary.teacher.latency_ms, summary.student_model.latency_ms),
        verdict=result.report.verdict,
    )


def _percent(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{mean:.2f}%{spread} ({', '.join(f'{100 * v:.2f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", nargs="+", default=["16x48", "4x16"], help="students as WIDTHxHIDDEN")
    args = parser.parse_args()
    seeds = args.seeds
    console = Console(width=150)
    runs: dict[str, list[Run]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            width, hidden = map(int, size.split("x"))
            for name, alpha in (("kd (T 4, alpha 0.5)", 0.5), ("labels only", 1.0)):
                label = f"student {size}, {name}"
                for seed in seeds:
                    console.log(f"{label}, seed {seed}")
                    folder = Path(tmp) / f"{size}-{alpha}-{seed}"
                    runs.setdefault(label, []).append(convert(alpha, seed, width, hidden, folder))
    first = next(iter(runs.values()))[0]
    teacher_params = first.parameters[0]
    table = Table(title=f"digits: teacher vs students, held-out top-1 (360 images), seeds {seeds}")
    for column in (
        "model",
        "parameters",
        "PyTorch ms (batch 64)",
        "fp32 top-1",
        "int8 top-1 cpu",
        "int8 top-1 fpga",
        "epochs run (best)",
        "train s",
        "job verdicts",
    ):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row(
        "teacher", f"{teacher_params:,}", f"{first.latency_ms[0]:.2f}", _percent([first.teacher]), "", "", "", "", ""
    )
    for label, group in runs.items():
        student_params = group[0].parameters[1]
        table.add_row(
            label,
            f"{student_params:,} ({student_params / teacher_params:.2f}x)",
            f"{statistics.median(r.latency_ms[1] for r in group):.2f}",
            _percent([r.student for r in group]),
            _percent([r.int8_cpu for r in group]),
            _percent([r.int8_fpga for r in group]),
            ", ".join(f"{r.epochs} ({r.best_epoch})" for r in group),
            f"{statistics.mean(r.train_seconds for r in group):.1f}",
            " ".join(r.verdict for r in group),
        )
    console.print(table)
    for label, group in runs.items():
        gap = 100 * (statistics.mean(r.student for r in group) - first.teacher)
        console.print(
            f"{label} vs teacher: {gap:+.2f} points fp32 (goal for kd: within 1 point at <= 0.25x parameters)"
        )


if __name__ == "__main__":
    main()
