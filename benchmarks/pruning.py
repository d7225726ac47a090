"""Structured pruning: size, compute, fp32 latency and task quality, with and without recovery.

Each variant is a real `pipeline.convert` run (export, simplify, prune; quantization off) of a
bundled sample; the unpruned row is the simplified model of the same run. Measured per variant:

- parameters and multiply-accumulates per sample (Conv / Gemm / MatMul) from the prune record;
- fp32 latency, ONNX Runtime CPU, 2 intra-op threads, all graph optimisations, best of N runs,
  and its ratio to the unpruned model measured in the same process;
- digits CNN: top-1 accuracy on the held-out split (360 images) and the drop in points;
  MiniLM: sentence-embedding cosine to the unpruned model on the held-out sentences.

Goals (issue 4): digits with 50% of channels pruned, latency ratio <= 0.55 and accuracy drop
<= 1 point with recovery (the drop without recovery beside it); MiniLM with 30% of the FFN
neurons pruned: latency ratio and cosine with and without recovery.

Run from the repository root:  python benchmarks/pruning.py [--samples digits_cnn minilm]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import pipeline
from pipeline.job import load_job

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the samples' data functions

from ort_timing import Feeds, latency_ms, session  # noqa: E402 - beside this script


@dataclass
class Row:
    variant: str
    parameters: int
    macs: int
    latency_ms: float
    quality: str


def prune(job_file: Path, out: Path, structured: dict[str, Any], **overrides: Any) -> pipeline.ConversionResult:
    """Convert with the given [prune.structured] table; parity gates off (measured here instead)."""
    parity = {"prune": {"min_cosine": -1.0, "max_accuracy_drop": 100.0}}
    job = load_job(
        job_file,
        output_dir=str(out),
        prune={"structured": structured},
        quantize={"enabled": False},
        parity=parity,
        **overrides,
    )
    return pipeline.convert(job)


def measure(
    results: dict[str, pipeline.ConversionResult], feeds: Feeds, quality: Callable[[Path], str]
) -> tuple[list[Row], float]:
    """One row for the unpruned model (from the first run) and one per variant; the reference latency."""
    first = next(iter(results.values()))
    summary = first.report.pruning
    assert summary is not None
    original = first.path("simplify")
    reference_ms = latency_ms(original, feeds)
    rows = [Row("unpruned (simplified fp32)", summary.parameters[0], summary.macs[0], reference_ms, quality(original))]
    for name, result in results.items():
        record = result.report.pruning
        assert record is not None
        model = result.path("prune")
        rows.append(Row(name, record.parameters[1], record.macs[1], latency_ms(model, feeds), quality(model)))
    return rows, reference_ms


def digits(folder: Path) -> tuple[Table, list[str]]:
    data = np.load(REPO / "samples/digits_cnn/data/heldout.npz")
    images, labels = data["image"], data["label"]
    batch = {"image": np.resize(images, (256, *images.shape[1:])).astype(np.float32)}

    def accuracy(model: Path) -> str:
        (logits,) = session(model).run(None, {"image": images})
        return f"{(logits.argmax(axis=1) == labels).mean():.4f}"

    job = REPO / "samples/digits_cnn/job.toml"
    base = {"ratio": 0.5, "round_to": 8}
    variants: dict[str, dict[str, Any]] = {
        "50% channels, activation, no recovery": {**base, "recovery": False},
        "50% channels, activation + recovery": {**base, "recovery": True},
        "50% channels, L1 norm + recovery": {**base, "criterion": "l1", "recovery": True},
    }
    results = {name: prune(job, folder / f"digits{i}", spec) for i, (name, spec) in enumerate(variants.items())}
    rows, reference_ms = measure(results, batch, accuracy)
    drops = {row.variant: 100 * (float(rows[0].quality) - float(row.quality)) for row in rows[1:]}
    table = _table("Digits CNN, batch 256, fp32", rows, "top-1 accuracy", reference_ms, drops, "drop (points)")
    ratio = rows[2].latency_ms / reference_ms
    verdicts = [
        f"digits latency ratio with recovery {ratio:.2f} (goal <= 0.55): {'met' if ratio <= 0.55 else 'MISSED'}",
        f"digits accuracy drop with recovery {drops[rows[2].variant]:.2f} points (goal <= 1), "
        f"without recovery {drops[rows[1].variant]:.2f}",
    ]
    return table, verdicts


def minilm(folder: Path) -> tuple[Table, list[str]]:
    from samples.minilm.data import calibration_feeds, evaluation_feeds

    batch = next(iter(calibration_feeds()))  # 16 x 128 tokens
    evaluation = list(evaluation_feeds())
    job = REPO / "samples/minilm/job.toml"
    overrides: dict[str, Any] = {"export": {"check_shapes": []}}
    variants: dict[str, dict[str, Any]] = {
        "30% FFN neurons, no recovery": {"ratio": 0.3, "recovery": False},
        "30% FFN neurons + recovery": {"ratio": 0.3, "recovery": True},
    }
    results = {
        name: prune(job, folder / f"minilm{i}", spec, **overrides) for i, (name, spec) in enumerate(variants.items())
    }
    reference = _embeddings(next(iter(results.values())).path("simplify"), evaluation)

    def cosine(model: Path) -> str:
        embeddings = _embeddings(model, evaluation)
        norms = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1)
        values = (embeddings * reference).sum(1) / norms
        return f"{values.mean():.4f} / {values.min():.4f}"

    rows, reference_ms = measure(results, batch, cosine)
    table = _table("MiniLM, batch 16 x 128 tokens, fp32", rows, "cosine mean / min", reference_ms, {}, "")
    verdicts = [
        f"MiniLM 30% FFN: latency ratio {rows[2].latency_ms / reference_ms:.2f}, cosine (mean / min) with recovery "
        f"{rows[2].quality}, without {rows[1].quality}"
    ]
    return table, verdicts


def _embeddings(model: Path, batches: list[Feeds]) -> np.ndarray:
    runner = session(model)
    return np.concatenate([runner.run(None, feeds)[0] for feeds in batches])


def _table(
    title: str, rows: list[Row], quality: str, reference_ms: float, extra: dict[str, float], extra_name: str
) -> Table:
    table = Table(title=title)
    columns = ["variant", "parameters", "MACs / sample", "latency ms", "latency ratio", quality]
    for column in columns + ([extra_name] if extra else []):
        table.add_column(column)
    for row in rows:
        cells = [
            row.variant,
            f"{row.parameters:,}",
            f"{row.macs:,}",
            f"{row.latency_ms:.3f}",
            f"{row.latency_ms / reference_ms:.2f}",
            row.quality,
        ]
        if extra:
            cells.append(f"{extra[row.variant]:.2f}" if row.variant in extra else "-")
        table.add_row(*cells)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", default=["digits_cnn", "minilm"], choices=["digits_cnn", "minilm"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=140)
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="onnxforge-bench-prune-") as folder:
        for sample in args.samples:
            table, lines = (digits if sample == "digits_cnn" else minilm)(Path(folder))
            console.print(table)
            verdicts += lines
    for line in verdicts:
        console.print(line)


if __name__ == "__main__":
    main()
