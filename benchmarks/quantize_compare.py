"""What onnxforge ships per target against what a peer would ship, same model, same data, one run.

MiniLM, cpu target: onnxforge converts the sample (export, simplify, the per-target search);
ONNX Runtime's ``quantize_dynamic`` (per-channel int8 weights, the usual CPU recipe, and the one
the issue names) and its per-tensor variant quantize the same simplified fp32 model. Each is judged
on the held-out sentences (mean and min sentence-embedding cosine to fp32) and timed on one batch
of 16 x 128 tokens with `pipeline.timing.compare_latency` (interleaved rounds, a ratio with its
95% interval), against fp32 and against ``quantize_dynamic`` per-channel. Goal (issue 18): the
shipped model's cosine >= 0.995 and its latency <= 0.8x that of ``quantize_dynamic`` per-channel.

Digits, ``targets = [cpu, fpga]``: the job writes two int8 models; the cpu one must have
per-channel weights and no power-of-two scales, both must pass, and the cpu one's latency ratio to
fp32 must equal a cpu-only job's within the timing interval (the fpga's constraints no longer
touch the cpu model). Both are timed against fp32 and against each other.

The openvino target (issue 17) is not in this repository yet: its rows are absent.

Run from the repository root:  python benchmarks/quantize_compare.py [--samples minilm digits]
(MiniLM about 10-15 minutes on 2 cores, most of it the conversion's search; digits about 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import pipeline
from pipeline.timing import RatioMeasurement, compare_latency

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the samples' data functions

from ort_timing import THREADS, Feeds, session  # noqa: E402 - beside this script

MINILM_GOAL_COSINE = 0.995
MINILM_GOAL_RATIO = 0.8


def convert(sample: str, folder: Path, **overrides: object) -> pipeline.ConversionResult:
    """Convert a sample job (a failed parity gate still returns the result: it is worth printing)."""
    job = pipeline.load_job(REPO / "samples" / sample / "job.toml", output_dir=folder, **overrides)
    try:
        return pipeline.convert(job)
    except pipeline.ParityError as e:
        assert isinstance(e.result, pipeline.ConversionResult)
        return e.result


def timed(baseline: Path, candidate: Path, feeds: Feeds) -> RatioMeasurement:
    """candidate / baseline latency on `feeds`, each in a fresh session."""
    first, second = session(baseline), session(candidate)
    return compare_latency(lambda: first.run(None, feeds), lambda: second.run(None, feeds))


def cosines(model: Path, evaluation: list[Feeds], expected: list[np.ndarray]) -> np.ndarray:
    """Per-sample cosine of the model's first output to the expected outputs."""
    runner = session(model)
    return np.concatenate(
        [_cosine(runner.run(None, feeds)[0], ref) for feeds, ref in zip(evaluation, expected, strict=True)]
    )


def ort_dynamic(fp32: Path, out: Path, per_channel: bool) -> Path:
    """ONNX Runtime's dynamic quantization, int8 weights (defaults otherwise)."""
    quantize_dynamic(fp32, out, per_channel=per_channel, weight_type=QuantType.QInt8)
    return out


def minilm_rows(folder: Path) -> list[list[str]]:
    from samples.minilm.data import calibration_feeds, evaluation_feeds

    result = convert("minilm", folder / "minilm")
    fp32, shipped = result.path("simplify"), result.path("quantize")
    decision = result.report.quantization[0].decision
    evaluation = list(evaluation_feeds())
    reference = session(fp32)
    expected = [reference.run(None, feeds)[0] for feeds in evaluation]
    batch = next(iter(calibration_feeds()))  # 16 x 128
    peer = ort_dynamic(fp32, folder / "ort_dynamic_per_channel.onnx", per_channel=True)
    models = {
        f"onnxforge, shipped ({decision.shipped if decision else 'int8'})": shipped,
        "ORT quantize_dynamic, per-channel": peer,
        "ORT quantize_dynamic, per-tensor": ort_dynamic(fp32, folder / "ort_dynamic.onnx", per_channel=False),
    }
    rows = [["fp32 (simplified)", "1.0000", "1.0000", "1.00", "", ""]]
    for label, model in models.items():
        cosine = cosines(model, evaluation, expected)
        to_fp32 = timed(fp32, model, batch)
        to_peer = timed(peer, model, batch) if model != peer else None
        goal = ""
        if model == shipped:
            met = cosine.mean() >= MINILM_GOAL_COSINE and to_peer is not None and to_peer.high <= MINILM_GOAL_RATIO
            goal = "met" if met else f"missed (cosine >= {MINILM_GOAL_COSINE}, <= {MINILM_GOAL_RATIO}x peer)"
        rows.append([label, f"{cosine.mean():.4f}", f"{cosine.min():.4f}", to_fp32.describe(),
                     to_peer.describe() if to_peer else "1 (the peer)", goal])  # fmt: skip
    return rows


def digits_rows(folder: Path) -> list[list[str]]:
    alone = convert("digits_cnn", folder / "cpu_only")
    both = convert("digits_cnn", folder / "cpu_fpga", targets=[{"backend": "cpu"}, {"backend": "fpga"}])
    fp32 = alone.path("simplify")
    with np.load(REPO / "samples" / "digits_cnn" / "data" / "heldout.npz") as data:
        images = data["image"]
    batch = {"image": np.resize(images, (256, *images.shape[1:]))}
    cpu_only, cpu_of_two, fpga = alone.path("quantize"), both.path("quantize", "cpu"), both.path("quantize", "fpga")
    same = cpu_only.read_bytes() == cpu_of_two.read_bytes()
    rows = []
    for label, result, model in (
        ("cpu-only job: cpu model", alone, cpu_only),
        ("cpu + fpga job: cpu model", both, cpu_of_two),
        ("cpu + fpga job: fpga model", both, fpga),
    ):
        target = "fpga" if model == fpga else "cpu"
        summary = next(s for s in result.report.summary if s.target == target)
        rows.append([label, model.name, summary.verdict, _weights(model), timed(fp32, model, batch).describe()])
    against = timed(cpu_only, cpu_of_two, batch)
    rows.append(["cpu model of [cpu, fpga] / of [cpu]", "byte-identical" if same else "differ", "", "",
                 against.describe() + (" (contains 1)" if against.low <= 1 <= against.high else "")])  # fmt: skip
    return rows


def _weights(model: Path) -> str:
    """How the model's int8 weights are scaled: per-channel or per-tensor, powers of two or not."""
    graph = onnx.load(str(model)).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    scales = [
        values[node.input[1]]
        for node in graph.node
        if node.op_type == "DequantizeLinear" and values.get(node.input[0], np.zeros(0)).ndim > 1
    ]
    channel = "per-channel" if any(s.size > 1 for s in scales) else "per-tensor"
    power = all(np.all(np.log2(s) == np.round(np.log2(s))) for s in scales)
    return f"{channel}, {'pow2' if power else 'free'} scales"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


BENCHES: dict[str, tuple[str, tuple[str, ...], Callable[[Path], Iterable[list[str]]]]] = {
    "minilm": (
        f"MiniLM, cpu target (held-out sentences; latency 16x128, {THREADS} threads, 95% intervals)",
        ("model", "cosine mean", "cosine min", "latency / fp32", "latency / ORT dynamic per-channel", "goal"),
        minilm_rows,
    ),
    "digits": (
        f"Digits CNN, targets [cpu] and [cpu, fpga] (latency batch 256, {THREADS} threads, 95% intervals)",
        ("model", "file", "verdict", "int8 weights", "latency / fp32"),
        digits_rows,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", choices=sorted(BENCHES), default=["minilm", "digits"])
    parser.add_argument("--work-dir", type=Path, help="keep the conversions here (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    console = Console(width=160)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work_dir or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for sample in args.samples:
            title, columns, rows = BENCHES[sample]
            table = Table(title=escape(title))  # the titles and cells hold [brackets], not markup
            for column in columns:
                table.add_column(column)
            for row in rows(tmp):
                table.add_row(*(escape(cell) for cell in row))
            console.print(table)


if __name__ == "__main__":
    main()
