"""Convert a randomly initialised decoder of at least 1 B parameters end to end and print each
stage's time and peak memory against the fp32 weight size, then the int4 model's decode speed
against the fp32 model's, interleaved in one run.

    python benchmarks/llm_scale.py                      # TinyLlama-1.1B's shape, int4 RTN
    python benchmarks/llm_scale.py --preset llama-150m  # a quick look at the same path
    python benchmarks/llm_scale.py --method gptq        # the data-aware method instead

The model is written once with ``save_pretrained`` under ``--work`` (a child process, so its
initialisation is not in any measured figure) and converted by ``onnxforge convert`` in another
child: export -> simplify -> int4 weight-only -> validate on cpu, with generation parity on a few
prompts of random tokens (the weights are random: agreement and perplexity are not meaningful,
memory and speed are). Peak memory per stage is the manifest's ``peak_rss_bytes`` (``VmHWM``
reset as each stage starts; file-backed pages, memory-mapped weights, count).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("llm_scale")


@dataclass(frozen=True)
class LlamaShape:
    """The config fields that set a Llama's size."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


#: TinyLlama-1.1B's shape (1.10 B parameters, 4.4 GB in fp32) and a 150 M one.
PRESETS: dict[str, LlamaShape] = {
    "tinyllama-1.1b": LlamaShape(32000, 2048, 5632, 22, 32, 4),
    "llama-150m": LlamaShape(32000, 768, 2048, 12, 12, 4),
}
SEQUENCE = 64
MEMORY_BOUND = 2.0  # the bar: peak RSS at most 2x the fp32 weights in every stage


def llama_config(preset: str) -> Any:
    """`preset`'s ``LlamaConfig``: its shape, 2,048 positions, untied embeddings (also `benchmarks/llm.py`'s)."""
    from transformers import LlamaConfig

    shape = dataclasses.asdict(PRESETS[preset])
    return LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


def build_model(folder: Path, preset: str) -> None:
    """Write a seeded random-init ``LlamaForCausalLM`` of `preset` to `folder` (run in a child)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(preset)).save_pretrained(folder)


def weight_bytes(folder: Path) -> int:
    """The fp32 weights' size: the safetensors files in `folder`."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def write_data(path: Path, vocab: int, rows: int, seed: int) -> None:
    """An .npz of `rows` random token rows of `SEQUENCE` tokens (input_ids, attention_mask)."""
    ids = np.random.default_rng(seed).integers(3, vocab, size=(rows, SEQUENCE), dtype=np.int64)
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))


def write_job(work: Path, model: Path, vocab: int, method: str, lm_head: bool) -> Path:
    """The conversion job: the folder's model as a causal LM, int4 weight-only (the LM head too
    when `lm_head`), cpu."""
    write_data(work / "calibration.npz", vocab, rows=8, seed=1)
    write_data(work / "evaluation.npz", vocab, rows=4, seed=2)
    job = {
        "name": f"llm-scale-{method}{'-head' if lm_head else ''}",
        "python_path": [str(ROOT)],
        "output_dir": "out",
        "model": {
            "factory": "pipeline.llm.pretrained:causal_lm",
            "kwargs": {"path": str(model)},
            "task": "causal-lm",
        },
        "inputs": [
            {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
            {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"},
        ],
        # Weights beside the graph whatever the size, as a 1 B model's must be (above 2 GiB).
        "export": {"external_data_threshold_mb": 16},
        "calibration": {"npz": "calibration.npz", "batch_size": 2},
        "evaluation": {"npz": "evaluation.npz", "batch_size": 2},
        "quantize": {
            "mixed_precision": False,
            "weight_only": {"bits": 4, "block_size": 32, "method": method, "lm_head": lm_head},
        },
        "targets": [{"backend": "cpu"}],
        # Random weights: agreement means nothing, the verdict is not the point here.
        "parity": {
            "int8": {"min_cosine": 0.0},
            "generation": {
                "prompts": 2,
                "prompt_tokens": 16,
                "new_tokens": 16,
                "min_token_agreement": 0.0,
                "max_perplexity_ratio": 1e6,
            },
        },
    }
    path = work / "job.toml"
    path.write_bytes(tomli_w.dumps(job).encode())
    return path


def convert(job: Path) -> tuple[int, float, str]:
    """`onnxforge convert` on `job` in a child: exit code, seconds, the last lines it printed."""
    start = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("onnxforge")), "convert", str(job)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
    return done.returncode, time.perf_counter() - start, tail


def stage_table(manifest: dict, weights: int) -> tuple[Table, bool]:
    """Each stage's seconds and peak RSS, and whether every stage kept within `MEMORY_BOUND`."""
    table = Table(title=f"Stages (fp32 weights {weights / 2**30:.2f} GiB)")
    for column in ("stage", "seconds", "peak RSS (GiB)", "x fp32 weights", f"<= {MEMORY_BOUND:g}x"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    within = True
    for run in manifest["stages"]:
        peak = run.get("peak_rss_bytes")
        if run.get("artifact") is None or peak is None:
            continue
        ratio = peak / weights
        within &= ratio <= MEMORY_BOUND
        table.add_row(
            run["name"], f"{run['seconds']:.1f}", f"{peak / 2**30:.2f}", f"{ratio:.2f}", "yes" if ratio <= 2 else "NO"
        )
    return table, within


def generation_rows(report: dict) -> Table:
    """The report's per-model decode speed (timed one model after the other, in validate)."""
    table = Table(title="Validate's generation figures (sequential, batch 1)")
    for column in ("model", "tokens / s", "TTFT (ms)", "agreement"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model in (report.get("generation") or {}).get("models", []):
        speed = model.get("speed") or {}
        agreement = (model.get("agreement") or {}).get("token_agreement")
        table.add_row(
            f"{model['model']} ({model['precision']})",
            f"{speed.get('tokens_per_s', float('nan')):.2f}",
            f"{speed.get('ttft_ms', float('nan')):.0f}",
            "-" if agreement is None else f"{agreement:.3f}",
        )
    return table


def interleaved_decode(out: Path, model: Path, rounds: int) -> Table:
    """int4 against fp32 decode at batch 1, A/B interleaved with an interval of the ratio."""
    import onnxruntime as ort
    from transformers import AutoConfig

    from pipeline.llm.generate import OnnxDecoder, speed_runs
    from pipeline.llm.signature import DecoderSignature
    from pipeline.timing import TimingSettings, compare_latency

    signature = DecoderSignature.from_config(AutoConfig.from_pretrained(model, local_files_only=True))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    decoders = [
        OnnxDecoder(ort.InferenceSession(str(out / name), options, providers=["CPUExecutionProvider"]), signature)
        for name in ("model.fp32.onnx", "model.int4.onnx")
    ]
    prompt = np.arange(3, 3 + 16, dtype=np.int64)
    steps = 16

    fp32, int4 = (speed_runs(decoder, prompt, steps)[1] for decoder in decoders)  # decode steps, as decode_speed
    settings = TimingSettings(warmup=1, min_rounds=rounds, max_rounds=rounds * 2, budget_s=600.0)
    ratio = compare_latency(fp32, int4, settings)
    title = f"Decode at batch 1, fp32 and int4 interleaved ({ratio.rounds} rounds of {steps} steps, 16-token prompt)"
    table = Table(title=title)
    for column in ("fp32 tokens / s", "int4 tokens / s", "int4 speed-up", "interval"):
        table.add_column(column, justify="right")
    speedup, low, high = 1 / ratio.ratio, 1 / ratio.high, 1 / ratio.low
    rates = [1000 * steps / milliseconds for milliseconds in (ratio.baseline_ms, ratio.candidate_ms)]
    table.add_row(f"{rates[0]:.2f}", f"{rates[1]:.2f}", f"{speedup:.2f}x", f"[{low:.2f}, {high:.2f}]")
    return table


def main() -> int:
    """Build (once), convert, print the tables; exit 1 if the conversion failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--method", choices=["rtn", "gptq", "hqq"], default="rtn")
    parser.add_argument("--lm-head", action="store_true", help="quantize the LM head too (default: it stays float)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnxforge-llm-scale"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the child that writes the model
    args = parser.parse_args()
    if args.build is not None:
        build_model(args.build, args.preset)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = args.work / args.preset / "model"
    if not (model / "config.json").is_file():
        logger.info("writing a random-init %s to %s", args.preset, model)
        subprocess.run([sys.executable, __file__, "--preset", args.preset, "--build", str(model)], check=True)
    work = args.work / args.preset / (args.method + ("-head" if args.lm_head else ""))
    work.mkdir(parents=True, exist_ok=True)
    job = write_job(work, model, PRESETS[args.preset].vocab_size, args.method, args.lm_head)
    code, seconds, tail = convert(job)
    console = Console()
    console.print(f"onnxforge convert {job}: exit {code} in {seconds:.0f} s")
    if code != 0:
        console.print(tail)
        return 1
    out = work / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    table, within = stage_table(manifest, weight_bytes(model))
    console.print(table)
    console.print(f"every stage within {MEMORY_BOUND:g}x the fp32 weights: {'yes' if within else 'NO'}")
    console.print(generation_rows(json.loads((out / "report.json").read_text())))
    console.print(interleaved_decode(out, model, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
