"""The digits CNN on the FPGA-style backend: partition, cost-model latency, memory plan, and on-target
error per rounding mode against CPU QDQ; the emulator's wall time beside ONNX Runtime's.

Usage: python benchmarks/fpga_digits.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

import pipeline
from backends.fpga import FpgaBackend, FpgaOptions
from backends.fpga.profile import PROFILES

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "digits_cnn"


def _profile(folder: Path, rounding: str) -> str:
    text = (PROFILES / "dpu-int8.toml").read_text()
    path = folder / f"{rounding}.toml"
    path.write_text(text.replace('rounding = "half_even"', f'rounding = "{rounding}"'))
    return str(path)


def _best_ms(run, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def main() -> None:
    console = Console()
    data = np.load(SAMPLE / "data" / "heldout.npz")
    images, labels = data["image"], data["label"]
    with tempfile.TemporaryDirectory() as folder:
        job = pipeline.load_job(SAMPLE / "job.toml", targets=[{"backend": "fpga"}])
        result = pipeline.convert(job, output_dir=Path(folder) / "out")
        int8, before = result.path("quantize"), result.path("simplify")
        cpu = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
        reference = ort.InferenceSession(str(before), providers=["CPUExecutionProvider"]).run(None, {"image": images})[
            0
        ]
        cpu_int8 = cpu.run(None, {"image": images})[0]
        placement = FpgaBackend().placement(int8)
        estimate = placement.accelerator
        assert estimate is not None
        step = (reference.max() - reference.min()) / 255

        summary = Table(title=f"digits CNN on fpga ({estimate.profile}), {len(images)} held-out images")
        for column in (
            "compute nodes on accelerator",
            "est. latency / image",
            "cycles",
            "utilisation",
            "activation peak (pooled / no reuse)",
            "weights on chip",
        ):
            summary.add_column(column)
        segment = estimate.segments[0]
        summary.add_row(
            f"{placement.compute_nodes - placement.fallback_nodes} of {placement.compute_nodes}",
            f"{estimate.latency_us} us",
            str(estimate.cycles),
            f"{estimate.utilization:.0%}",
            f"{segment.peak_activation_bytes:,} / {segment.unshared_activation_bytes:,} B",
            f"{estimate.weight_bytes:,} B ({'fits' if estimate.weights_fit else 'streams'})",
        )
        console.print(summary)

        table = Table(title="int8 on the emulator vs CPU QDQ, per rounding mode (errors vs the float model)")
        for column in (
            "rounding",
            "top-1",
            "CPU QDQ max err",
            "target max err",
            "limit (+1 step)",
            "max |target - CPU QDQ| in steps",
            "values differing",
            "emulator ms",
            "CPU QDQ ms",
        ):
            table.add_column(column)
        cpu_ms = _best_ms(lambda: cpu.run(None, {"image": images}))
        for rounding in ("half_even", "half_up", "floor"):
            options = FpgaOptions(profile=_profile(Path(folder), rounding))
            with FpgaBackend().open(int8, options) as session:
                target = session.run({"image": images})["logits"]
                emulator_ms = _best_ms(lambda: session.run({"image": images}))  # used at once
            cpu_error = np.abs(cpu_int8 - reference).max()
            target_error = np.abs(target - reference).max()
            table.add_row(
                rounding,
                f"{100 * (target.argmax(1) == labels).mean():.2f}%",
                f"{cpu_error:.4f}",
                f"{target_error:.4f}",
                f"{cpu_error + step:.4f} ({'pass' if target_error <= cpu_error + step else 'FAIL'})",
                f"{np.abs(target - cpu_int8).max() / step:.2f}",
                f"{int((target != cpu_int8).sum())} of {target.size}",
                f"{emulator_ms:.1f}",
                f"{cpu_ms:.2f}",
            )
        console.print(table)


if __name__ == "__main__":
    main()
