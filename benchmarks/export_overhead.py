"""Export time of the samples through onnxforge's export stage vs the bare torch.onnx.export call.

Both run in this process, alternating, best of N (the exporter's own run-to-run noise is
larger than onnxforge's overhead on the small sample), same model, same example inputs, same exporter options
(dynamo, optimize=False, opset 18, the job's dynamic dims); the bare call saves its ONNXProgram.
onnxforge adds: output naming, the ONNX checker with shape inference on the saved file, the
dynamic-dim check, atomic saving, and a run of the saved model against PyTorch (parity). The goal
is an overhead <= 1.15x excluding that parity run.

Run from the repository root:  python benchmarks/export_overhead.py [--repeats 7] [--samples digits_cnn minilm]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pipeline.job import load_job
from pipeline.outputs import torch_inputs
from pipeline.runner import preflight
from pipeline.stages.base import StageContext
from pipeline.stages.export import ExportStage, torch_dynamic_shapes

REPO = Path(__file__).resolve().parent.parent
GOAL = 1.15


def bare_export(ctx: StageContext, folder: Path) -> float:
    """Seconds for the plain exporter call plus saving, as a user would write it."""
    job = ctx.job
    assert ctx.source.module is not None
    example = torch_inputs(ctx.example_batch().feeds)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            ctx.source.module,
            example,
            dynamo=True,
            input_names=[spec.name for spec in job.inputs],
            output_names=job.model.output_names,
            dynamic_shapes=torch_dynamic_shapes(job.inputs),
            opset_version=job.export.opset_for(decoder=False),
            optimize=False,
            verbose=False,
        )
    assert program is not None
    program.save(str(folder / "bare.onnx"), external_data=False)
    return time.perf_counter() - start


def onnxforge_export(ctx: StageContext) -> tuple[float, float]:
    """Seconds for the export stage, and the part of it spent running the model against PyTorch."""
    start = time.perf_counter()
    artifact = ExportStage().run(ctx)
    total = time.perf_counter() - start
    return total, float(artifact.metadata["seconds"]["pytorch_check"])


def measure(sample: str, repeats: int) -> dict[str, float]:
    job = load_job(REPO / "samples" / sample / "job.toml")
    prepared = preflight(job)
    bare, ours, ours_without_parity = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ctx = StageContext.prepared(job, folder, prepared)
        bare_export(ctx, folder)  # warm-up: first-call imports and registrations
        for _ in range(repeats):
            bare.append(bare_export(ctx, folder))
            total, parity = onnxforge_export(ctx)
            ours.append(total)
            ours_without_parity.append(total - parity)
    return {
        "bare": min(bare),
        "ours": min(ours),
        "ours_without_parity": min(ours_without_parity),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", nargs="+", default=["digits_cnn", "minilm"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    title = f"export: onnxforge vs bare torch.onnx.export (best of {args.repeats}, {torch.get_num_threads()} threads)"
    table = Table(title=title)
    columns = ("sample", "bare export+save", "onnxforge export stage", "ratio", "without parity run", "ratio", "goal")
    for column in columns:
        table.add_column(column)
    for sample in args.samples:
        times = measure(sample, args.repeats)
        ratio = times["ours"] / times["bare"]
        ratio_without = times["ours_without_parity"] / times["bare"]
        table.add_row(
            sample,
            f"{times['bare']:.2f} s",
            f"{times['ours']:.2f} s",
            f"{ratio:.2f}x",
            f"{times['ours_without_parity']:.2f} s",
            f"{ratio_without:.2f}x",
            f"<= {GOAL}: " + ("met" if ratio_without <= GOAL else "MISSED"),
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
