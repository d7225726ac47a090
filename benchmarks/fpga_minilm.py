"""MiniLM on the FPGA-style backend's transformer profile (npu-int8), beside the cpu target, in one job.

The sample job with ``targets = [cpu, fpga (npu-int8)]`` and the int8 policy the issue sets for the
fpga target (cosine >= 0.99, job-wide here: the policy is per job), and the same job with the cpu
target alone. Printed: the fpga target's share of MACs on the accelerator (cost model, 1 x 128
tokens), its int16 activations, cosine on the emulated target, the on-target error against the
limit (CPU QDQ error + one int8 step); and whether the cpu target's model is byte-identical to the
cpu-only job's (the fpga target must not change it). The profile's CNN sibling (dpu-int8, int8 only)
runs the same model too, for contrast.

Run from the repository root:  python benchmarks/fpga_minilm.py  (about 12 minutes on 2 cores).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import pipeline
from pipeline.records import QuantizeRecord

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the samples' data functions

NPU: dict[str, object] = {
    "backend": "fpga",
    "options": {"profile": "npu-int8", "cost_dims": ["batch=1", "sequence=128"]},
}
DPU: dict[str, object] = {
    "backend": "fpga",
    "options": {"profile": "dpu-int8", "cost_dims": ["batch=1", "sequence=128"]},
}
POLICY = {"int8": {"min_cosine": 0.99}}
# The static recipe only: the cpu search otherwise times its candidates, and a timing-dependent
# choice would hide what the comparison is about (whether the fpga target changes the cpu model).
QUANTIZE = {"recipes": ["static"]}


def convert(folder: Path, targets: list[dict[str, object]]) -> pipeline.ConversionResult:
    """The MiniLM sample with `targets` (a failed parity gate still returns the result)."""
    job = pipeline.load_job(
        REPO / "samples" / "minilm" / "job.toml", output_dir=folder, targets=targets, parity=POLICY, quantize=QUANTIZE
    )
    try:
        return pipeline.convert(job)
    except pipeline.ParityError as e:
        assert isinstance(e.result, pipeline.ConversionResult)
        return e.result


def fpga_row(result: pipeline.ConversionResult, profile: str) -> list[str]:
    """The fpga target's figures: MAC share, int16 activations, cosine, on-target error vs limit."""
    placement = next(p for p in result.report.placements if p.backend == "fpga")
    estimate = placement.accelerator
    share = "-" if estimate is None or estimate.mac_share is None else f"{estimate.mac_share:.1%}"
    record = result.artifact("quantize", "fpga").record_as(QuantizeRecord)
    link = next(
        c for c in result.report.comparisons if c.stage == "quantize" and c.target == "fpga" and c.shape is None
    )
    cosine = next(check.value for output in link.outputs for check in output.checks if check.metric == "cosine_mean")
    (on_target,) = [p for p in result.report.on_target if p.target == "fpga"]
    errors = "; ".join(f"{o.target_error:.4f} {'<=' if o.passed else '>'} {o.limit:.4f}" for o in on_target.outputs)
    return [
        profile,
        f"{placement.compute_nodes - placement.fallback_nodes} of {placement.compute_nodes}",
        share,
        str(len(record.int16_activations)),
        f"{cosine:.4f}",
        errors,
        "pass" if link.passed and all(o.passed for o in on_target.outputs) else "FAIL",
    ]


def digest(path: Path) -> str:
    """sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="onnxforge-fpga-minilm-") as scratch:
        folder = Path(scratch)
        both = convert(folder / "cpu_npu", [{"backend": "cpu"}, NPU])
        alone = convert(folder / "cpu", [{"backend": "cpu"}])
        cnn = convert(folder / "dpu", [DPU])
        table = Table(title="MiniLM on the fpga target (emulated), policy cosine >= 0.99, 80 evaluation sentences")
        for column in ("profile", "compute nodes on accelerator", "MACs on accelerator", "int16 activations",
                       "cosine", "on-target error <= limit", "result"):  # fmt: skip
            table.add_column(column)
        table.add_row(*fpga_row(both, "npu-int8"))
        table.add_row(*fpga_row(cnn, "dpu-int8"))
        console.print(table)
        same = digest(both.path("quantize", "cpu")) == digest(alone.path("quantize"))
        console.print(
            f"cpu target's model with the fpga target in the job: {both.artifact('quantize', 'cpu').path}; "
            f"byte-identical to the cpu-only job's: {'yes' if same else 'NO'}"
        )


if __name__ == "__main__":
    main()
