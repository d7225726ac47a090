"""The digits CNN's hls4ml export: the fpga target's accelerator partition as an hls4ml (Vitis HLS)
project, its C simulation on all 360 held-out images against the emulator and against ONNX
Runtime's CPU QDQ, with the time of each step.

Goal (issue 22): the C simulation matches the emulator bit for bit (or every differing value is
explained). Converts the sample with ``targets = [fpga]`` and ``hls = true`` (the job's evaluation
data are the 360 held-out images), so it runs the hls stage exactly as a job does. Needs the
``fpga-hls`` extra and g++.

Usage: python benchmarks/fpga_hls.py [--keep FOLDER]  (FOLDER: keep the output folder, hls/ included)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import pipeline
from backends.fpga.hls import INSTALL_HINT, missing_tools
from pipeline.records import HlsRecord

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "digits_cnn"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the output folder here instead of a temporary one")
    arguments = parser.parse_args()
    console = Console()
    missing = missing_tools()
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory() as scratch:
        out = arguments.keep or Path(scratch) / "out"
        job = pipeline.load_job(SAMPLE / "job.toml", targets=[{"backend": "fpga", "options": {"hls": True}}])
        result = pipeline.convert(job, output_dir=out)
        summary = result.artifacts["hls"].record_as(HlsRecord).summary
        build = summary.build
        table = Table(title=f"digits CNN: hls4ml C simulation on {build.samples} held-out images")
        for column in ("comparison", "values", "differing", "max difference (steps)"):
            table.add_column(column, justify="left" if column == "comparison" else "right")
        for label, comparison in (
            ("C simulation vs emulator", build.vs_emulator),
            ("C simulation vs CPU QDQ", build.vs_cpu_qdq),
            ("emulator vs CPU QDQ", build.emulator_vs_cpu_qdq),
        ):
            table.add_row(label, str(comparison.values), str(comparison.mismatches), str(comparison.max_difference))
        console.print(table)
        console.print(f"{summary.verdict()}.")
        for difference in build.differences:
            console.print(f"  - {difference}")
        steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in build.seconds.items())
        console.print(f"steps: {steps}; hls stage {result.timings['hls']:.1f} s; load {os.getloadavg()[0]:.2f}")
        console.print(f"{len(build.nodes)} nodes, {build.backend} / {build.io_type} / {build.part}; synthesise with:")
        console.print(f"  cd {out / summary.project} && {build.synthesis_command}")


if __name__ == "__main__":
    main()
