"""Localisation cost on MiniLM: peak memory against one fp32 inference, and time.

Each measurement runs in a fresh process (peak RSS is per process):

- one fp32 inference: load the simplified fp32 MiniLM in ONNX Runtime and run one batch of
  16 x 128 tokens;
- localisation: the same fp32 model against its int8 QDQ rewrite (ONNX Runtime's quantize_static
  with defaults, the worst case: every op quantized, so every tensor has a Q/DQ copy to compare),
  on that batch.

Goal (issue 7): localisation peak RSS <= 2 x (one fp32 inference's peak RSS) + the model's size.

Run from the repository root:  python benchmarks/localize_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent

_PREPARE = """
import sys
sys.path.insert(0, {repo!r})
import pipeline
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
from samples.minilm.data import calibration_feeds
job = pipeline.load_job({job!r}, output_dir={out!r}, export={{"check_shapes": []}}, quantize={{"enabled": False}})
fp32 = pipeline.convert(job).path("simplify")
class Reader(CalibrationDataReader):
    def __init__(self):
        self.batches = iter(list(calibration_feeds())[:4])
    def get_next(self):
        return next(self.batches, None)
quantize_static(fp32, {int8!r}, Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
print(fp32)
"""

_INFERENCE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import onnxruntime as ort
from samples.minilm.data import calibration_feeds
feeds = next(iter(calibration_feeds()))
start = time.perf_counter()
session = ort.InferenceSession({fp32!r}, providers=["CPUExecutionProvider"])
session.run(None, feeds)
print(json.dumps({{"seconds": time.perf_counter() - start, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""

_LOCALISE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import onnx_ir as ir
from pipeline.parity.localize import localize
from samples.minilm.data import calibration_feeds
feeds = next(iter(calibration_feeds()))
start = time.perf_counter()
result = localize(ir.load({fp32!r}), ir.load({int8!r}), [feeds])
print(json.dumps({{
    "seconds": time.perf_counter() - start,
    "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "compared": result.compared,
    "first": result.first_diverging.tensor if result.first_diverging else None,
}}))
"""


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="onnxforge-bench-localize-") as folder:
        int8 = str(Path(folder) / "int8.onnx")
        fp32 = _run(
            _PREPARE.format(repo=str(REPO), job=str(REPO / "samples/minilm/job.toml"), out=f"{folder}/out", int8=int8)
        )
        inference = json.loads(_run(_INFERENCE.format(repo=str(REPO), fp32=fp32)))
        localised = json.loads(_run(_LOCALISE.format(repo=str(REPO), fp32=fp32, int8=int8)))
        model_mb = Path(fp32).stat().st_size / 2**20
    inference_mb, localise_mb = inference["rss"] / 1024, localised["rss"] / 1024
    limit = 2 * inference_mb + model_mb
    table = Table(title="MiniLM localisation, fp32 vs int8 (ORT defaults), one batch of 16 x 128 tokens")
    for column in ("run", "peak RSS", "time", "note"):
        table.add_column(column)
    table.add_row("one fp32 inference (load + run)", f"{inference_mb:.0f} MB", f"{inference['seconds']:.1f} s", "")
    table.add_row(
        "localisation",
        f"{localise_mb:.0f} MB",
        f"{localised['seconds']:.1f} s",
        f"{localised['compared']} steps; first below 40 dB: {localised['first']}",
    )
    table.add_row("limit: 2 x inference + model size", f"{limit:.0f} MB", "", f"model {model_mb:.0f} MB")
    console.print(table)
    verdict = "met" if localise_mb <= limit else "MISSED"
    console.print(f"localisation peak / limit: {localise_mb / limit:.2f} ({verdict})")


if __name__ == "__main__":
    main()
