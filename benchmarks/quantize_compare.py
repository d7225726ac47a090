"""Static int8: onnxforge's quantize stage vs ONNX Runtime's quantize_static, same model, same data.

For each sample, onnxforge converts the job (export, simplify, quantize with everything on
automatic); ONNX Runtime's quantize_static then quantizes the same simplified fp32 model with the
same calibration batches (QDQ, per-channel, MinMax): with its defaults (every op type it knows)
and, for MiniLM, MatMul only. Every model is judged against that fp32 model:

- MiniLM: mean and min sentence-embedding cosine on the held-out sentences; latency on one
  batch of 16 x 128 tokens. onnxforge's int8 model has its GELUs fused into ONNX Runtime's
  BiasGelu; a row times the fp32 model with that fusion too, for a like-for-like ratio.
- Digits CNN: top-1 accuracy on the held-out split; latency on a batch of 256 images.

Latency: ONNX Runtime CPU, 2 intra-op threads (digits: 2 and 1), all graph optimisations, best of
20 runs. Goals (issue 5): MiniLM cosine >= 0.995 and int8/fp32 latency <= 0.7 (2 threads); digits
accuracy within 0.5 point of fp32 and latency <= 0.4.

Run from the repository root:  python benchmarks/quantize_compare.py [--samples minilm digits_cnn]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from rich.console import Console
from rich.table import Table

import pipeline
from pipeline.quantization.fusions import fuse_gelu

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the samples' data functions

from ort_timing import THREADS, Feeds, latency_ms, session  # noqa: E402 - beside this script

# ONNX Runtime's int8 convolutions use a second thread less well than its float ones (on this
# CNN, QLinearConv gains 1.4x from it, the NCHWc float Conv 2x), so both counts are shown.
DIGITS_THREADS = (2, 1)


class Reader(CalibrationDataReader):
    """Hands quantize_static the same batches the job calibrates on."""

    def __init__(self, batches: Callable[[], Iterable[Feeds]]) -> None:
        self._batches: Iterator[Feeds] = iter(batches())

    def get_next(self) -> Feeds | None:
        return next(self._batches, None)


def ort_quantize(fp32: Path, out: Path, batches: Callable[[], Iterable[Feeds]], op_types: list[str] | None) -> Path:
    start = time.perf_counter()
    quantize_static(
        fp32,
        out,
        Reader(batches),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        op_types_to_quantize=op_types,
    )
    logging.getLogger(__name__).info("ORT quantize_static %s: %.1fs", out.name, time.perf_counter() - start)
    return out


def convert(sample: str, folder: Path) -> pipeline.ConversionResult:
    try:
        return pipeline.convert(REPO / "samples" / sample / "job.toml", output_dir=folder / sample)
    except pipeline.ParityError as e:  # the comparison is still worth printing
        assert isinstance(e.result, pipeline.ConversionResult)
        return e.result


def minilm_rows(folder: Path) -> list[list[str]]:
    from samples.minilm.data import calibration_feeds, evaluation_feeds

    result = convert("minilm", folder)
    fp32 = result.path("simplify")
    evaluation = list(evaluation_feeds())
    reference = session(fp32)
    expected = [reference.run(None, feeds)[0] for feeds in evaluation]
    timed = next(iter(calibration_feeds()))  # 16 x 128
    fp32_ms = latency_ms(fp32, timed)
    matmul_only = ort_quantize(fp32, folder / "ort_matmul.onnx", calibration_feeds, ["MatMul"])
    candidates = {
        "ORT quantize_static, defaults": ort_quantize(fp32, folder / "ort_default.onnx", calibration_feeds, None),
        "ORT quantize_static, MatMul only": matmul_only,
        "onnxforge (automatic)": result.path("quantize"),
    }
    rows = [["fp32 (reference)", "1.0000", "1.0000", f"{fp32_ms:.1f}", "1.00"]]
    # onnxforge's int8 model has its GELUs fused into BiasGelu; the same fusion on the fp32 model
    # shows how much of the int8 gain that fusion alone is worth.
    fused_fp32 = onnx.load(str(fp32))
    fuse_gelu(fused_fp32)
    onnx.save(fused_fp32, str(folder / "fp32_biasgelu.onnx"))
    fused_ms = latency_ms(folder / "fp32_biasgelu.onnx", timed)
    rows.append(["fp32 + BiasGelu fusion", "", "", f"{fused_ms:.1f}", f"{fused_ms / fp32_ms:.2f}"])
    for label, model in candidates.items():
        runner = session(model)
        cosines = np.concatenate(
            [_cosine(runner.run(None, feeds)[0], ref) for feeds, ref in zip(evaluation, expected, strict=True)]
        )
        ms = latency_ms(model, timed)
        rows.append([label, f"{cosines.mean():.4f}", f"{cosines.min():.4f}", f"{ms:.1f}", f"{ms / fp32_ms:.2f}"])
    kept = result.artifacts["quantize"].metadata["kept_float"]
    rows[-1][0] += f" ({len(kept)} MatMuls float)"
    return rows


def digits_rows(folder: Path) -> list[list[str]]:
    result = convert("digits_cnn", folder)
    fp32 = result.path("simplify")
    with np.load(REPO / "samples" / "digits_cnn" / "data" / "heldout.npz") as data:
        images, labels = data["image"], data["label"]
    with np.load(REPO / "samples" / "digits_cnn" / "data" / "calibration.npz") as data:
        calibration = data["image"]

    def batches() -> Iterator[Feeds]:
        for start in range(0, len(calibration), 32):
            yield {"image": calibration[start : start + 32]}

    timed = {"image": np.resize(images, (256, *images.shape[1:]))}
    fp32_ms = {threads: latency_ms(fp32, timed, threads=threads) for threads in DIGITS_THREADS}
    fp32_accuracy = _accuracy(fp32, images, labels)
    candidates = {
        "ORT quantize_static, defaults": ort_quantize(fp32, folder / "ort_digits.onnx", batches, None),
        "onnxforge (automatic)": result.path("quantize"),
    }
    timings = [f"{fp32_ms[threads]:.2f} / 1.00" for threads in DIGITS_THREADS]
    rows = [["fp32 (reference)", f"{100 * fp32_accuracy:.2f}%", "0.00", *timings]]
    for label, model in candidates.items():
        accuracy = _accuracy(model, images, labels)
        drop = 100 * (fp32_accuracy - accuracy)
        timings = []
        for threads in DIGITS_THREADS:
            ms = latency_ms(model, timed, threads=threads)
            timings.append(f"{ms:.2f} / {ms / fp32_ms[threads]:.2f}")
        rows.append([label, f"{100 * accuracy:.2f}%", f"{drop:.2f}", *timings])
    return rows


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _accuracy(model: Path, images: np.ndarray, labels: np.ndarray) -> float:
    (logits,) = session(model).run(None, {"image": images})
    return float((logits.argmax(axis=1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", nargs="+", choices=["minilm", "digits_cnn"], default=["minilm", "digits_cnn"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    console = Console(width=140)
    benches = {
        "minilm": (
            f"MiniLM int8 vs fp32 (held-out sentences; latency 16x128, {THREADS} threads)",
            ("model", "cosine mean", "cosine min", "latency ms", "int8 / fp32"),
            minilm_rows,
        ),
        "digits_cnn": (
            "Digits CNN int8 vs fp32 (held-out split; latency batch 256)",
            (
                "model",
                "top-1",
                "drop (points)",
                *(f"ms / int8:fp32, {threads} thread{'s' * (threads > 1)}" for threads in DIGITS_THREADS),
            ),
            digits_rows,
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for sample in args.samples:
            title, columns, rows = benches[sample]
            table = Table(title=title)
            for column in columns:
                table.add_column(column)
            for row in rows(Path(tmp)):
                table.add_row(*row)
            console.print(table)


if __name__ == "__main__":
    main()
