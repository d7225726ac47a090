"""onnxforge's int4 weight-only decoder beside onnxruntime-genai's model builder, same weights, same prompts.

The model (tinylm, the trained 2 M-parameter sample, by default; or a randomly initialised Llama
from ``--config``) is saved as a local Hugging Face folder. onnxforge converts it through its
Python API (``pipeline.convert``, ``model.task = "causal-lm"``, ``[quantize.weight_only]``): with
the builder's ``-p int4 -e cpu`` defaults (`llm_peer.PEER_SETTINGS`), with the same settings exported
at opset 18 ("unfused": attention, rotary and norms as plain ops, what the fusions gain shows) and,
for tinylm, with the sample job's own settings (GPTQ, mixed precision on the KL); the builder converts the same folder
(``python -m onnxruntime_genai.models.builder -p int4 -e cpu``, offline; and ``-p fp32``, so that the
graphs' share of a speed difference shows without quantization in either).

Every model decodes through onnxforge's generation code (`pipeline.llm.generate`,
`pipeline.parity.generation_run`): PyTorch first, then each ONNX model in an ONNX Runtime session
(CPU, 2 intra-op threads) and the builder's model also in onnxruntime-genai's own runtime
(``og.Generator``, greedy). The builder's graph takes no ``position_ids`` (its GroupQueryAttention
derives positions from the mask), so its decoder's signature leaves them out. Per model: perplexity on
held-out text, greedy agreement with PyTorch (mean share of the new tokens before the first
divergence), decode tokens / s and time to first token at batch 1 on the first prompt, and the
file's size with its external data. Speed is measured against the genai int4 model in the same run
with `pipeline.timing.compare_latency` (interleaved rounds; ratio = median, 95% interval).

Run from the repository root (``pip install -e .[samples,llm-peer]``; outputs in /tmp/llm_bench):
  python benchmarks/llm.py                      # tinylm, 8 prompts x 32 new tokens (7 min on 2 shared cores)
  python benchmarks/llm.py --config llama-150m --prompts 4 --budget-s 40   # random weights, for speed (14 min)
  python benchmarks/llm.py --config tinyllama-1.1b --prompts 2 --new-tokens 16 --budget-s 30 --variants peer
                                                # 1.1 B, random weights: 18 min, 18 GB peak
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import resource
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import pipeline
from pipeline.job.policies import GenerationPolicy
from pipeline.llm.generate import Decoder, OnnxDecoder, TorchDecoder, speed_runs
from pipeline.llm.pretrained import causal_lm
from pipeline.llm.signature import DecoderSignature
from pipeline.parity.generation import GenerationParity
from pipeline.parity.generation_run import GenerationCandidate, cut_prompts, run_generation_parity, token_rows
from pipeline.timing import RatioMeasurement, TimingSettings, compare_latency

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the samples' data functions

from llm_peer import (  # noqa: E402 - beside this script
    PEER_SETTINGS,
    PEER_WEIGHT_ONLY,
    RuntimeDecoder,
    build_genai,
    model_bytes,
    numbered_tokenizer,
    op_types,
    runtime_runs,
    save_hf_folder,
)
from llm_scale import PRESETS, llama_config  # noqa: E402 - beside this script
from ort_timing import THREADS, session  # noqa: E402 - beside this script

logger = logging.getLogger("benchmarks.llm")

SAMPLE_JOB = REPO / "samples" / "tinylm" / "job.toml"
PROMPT_TOKENS = 32
INPUTS = [
    {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
    {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"},
]
# The conversion's own generation parity, kept to one prompt and one token: this script measures.
CONVERSION_GENERATION = {"prompts": 1, "new_tokens": 1, "measure_speed": False,
                         "min_token_agreement": None, "max_perplexity_ratio": None}  # fmt: skip
PEER = "genai int4 (ORT session)"
RUNTIME = "genai int4 (onnxruntime-genai runtime)"


def variant_label(variant: str) -> str:
    """The table's name for onnxforge's int4 model made with `variant`'s settings."""
    return f"onnxforge int4 ({variant} settings)"


UNFUSED = variant_label("unfused")


@dataclass
class Bench:
    """One model and its data.

    Attributes:
        name: tinylm or the config's name.
        hf: The Hugging Face folder both converters read.
        data: The jobs' ``calibration`` and ``evaluation`` tables.
        rows: Held-out token rows (perplexity; the prompts are their starts).
        trained: The weights are trained (perplexity and agreement mean something).
    """

    name: str
    hf: Path
    data: dict[str, object]
    rows: list[np.ndarray]
    trained: bool


Runs = tuple[Callable[[], object], Callable[[], object]]
Timed = dict[str, tuple[RatioMeasurement, RatioMeasurement]]
"""Per row label: its (decode, prefill) latency against the peer's."""


@dataclass
class Row:
    """One model of the table.

    Attributes:
        label: Its name in the table.
        settings: How it was made.
        path: Its ONNX file (None: PyTorch).
        decoder: Its decoder.
        runs: (prefill, decode) callables for timing (set once the quality figures are taken).
    """

    label: str
    settings: str
    path: Path | None
    decoder: Decoder
    runs: Runs | None = None


def tinylm_bench(work: Path) -> Bench:
    """tinylm's trained weights as a Hugging Face folder; the sample's data factories."""
    from samples.tinylm.data import evaluation_feeds
    from samples.tinylm.model import load_pretrained
    from samples.tinylm.tokenizer import load_tokenizer

    hf = work / "hf"
    if not (hf / "config.json").is_file():
        save_hf_folder(load_pretrained(), load_tokenizer(), hf)
    data: dict[str, object] = {"calibration": {"factory": "samples.tinylm.data:calibration_feeds"},
            "evaluation": {"factory": "samples.tinylm.data:evaluation_feeds"}}  # fmt: skip
    return Bench("tinylm", hf, data, token_rows(evaluation_feeds()), trained=True)


def config_bench(spec: str, work: Path, rows: int, seed: int = 0) -> Bench:
    """A randomly initialised causal LM from a preset or a config.json (file or folder), saved with a
    word-level tokenizer for the builder; random token rows as the jobs' data (npz)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec in PRESETS:
        config = llama_config(spec)
    else:
        path = Path(spec)
        config = AutoConfig.for_model(**json.loads((path / "config.json" if path.is_dir() else path).read_text()))
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        torch.manual_seed(seed)
        save_hf_folder(AutoModelForCausalLM.from_config(config), numbered_tokenizer(config.vocab_size), hf)
    generator = np.random.default_rng(seed)
    data: dict[str, object] = {}
    for name, count in (("calibration", 8), ("evaluation", rows)):
        ids = generator.integers(1, config.vocab_size, size=(count, 2 * PROMPT_TOKENS), dtype=np.int64)
        np.savez(work / f"{name}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
        data[name] = {"npz": str(work / f"{name}.npz"), "batch_size": 4}
    with np.load(work / "evaluation.npz") as held_out:
        return Bench(Path(spec).stem, hf, data, token_rows([dict(held_out)]), trained=False)


BUILDER_QUANTIZATION = "builder's: " + PEER_SETTINGS[: PEER_SETTINGS.index(", QKV")]
VARIANT_SETTINGS = {
    "peer": BUILDER_QUANTIZATION + "; opset 23: attention, rotary and norms fused, q/k/v and gate/up joined",
    "unfused": BUILDER_QUANTIZATION + "; exported at opset 18: attention, rotary and norms as plain ops",
}


def job_raw(bench: Bench, variant: str, out: Path) -> dict[str, Any]:
    """The conversion job as data: the builder's defaults ("peer"; "unfused": the same at opset 18,
    where the decoder's attention and norms stay plain ops) or tinylm's sample settings ("sample":
    its ``[quantize]`` and ``[parity.int8]`` tables as the sample job file has them)."""
    parity: dict[str, Any] = {"generation": dict(CONVERSION_GENERATION)}
    export: dict[str, Any] = {"opset": 18} if variant == "unfused" else {}
    if variant in ("peer", "unfused"):
        quantize: dict[str, Any] = {"mixed_precision": False, "weight_only": dict(PEER_WEIGHT_ONLY)}
    else:
        sample = tomllib.loads(SAMPLE_JOB.read_text())
        quantize, parity["int8"] = sample["quantize"], sample["parity"]["int8"]
    return {
        "name": f"{bench.name}-{variant}",
        "output_dir": str(out),
        "python_path": [str(REPO)],
        "model": {
            "factory": "pipeline.llm.pretrained:causal_lm",
            "kwargs": {"path": str(bench.hf)},
            "task": "causal-lm",
        },
        "inputs": INPUTS,
        **bench.data,
        "export": export,
        "quantize": quantize,
        "parity": parity,
        "targets": [{"backend": "cpu"}],
    }


def convert(bench: Bench, variant: str, out: Path, reuse: bool) -> dict[str, Any]:
    """Run the job in a child process (a 150 M model's export peaks near 4 GB, which this process then
    never holds); its manifest's stages by name. A failed parity gate is fine: the files are written."""
    if not (reuse and (out / "manifest.json").is_file()):
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(run_job, job_raw(bench, variant, out), variant).result()
        logger.info("converted %s in %.0f s", out, time.perf_counter() - started)
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["verdict"] != "pass":
        logger.info(
            "%s: the job's verdict is %s (its own policy; see %s)", variant, manifest["verdict"], out / "report.md"
        )
    return {stage["name"]: stage["artifact"] for stage in manifest["stages"] if stage["artifact"]}


def run_job(raw: dict[str, Any], variant: str) -> None:
    """Validate and convert one job (`pipeline.convert`); a parity failure still writes every file."""
    job = pipeline.validate_job(raw, origin=f"benchmarks/llm.py ({variant})")
    try:
        pipeline.convert(job)
    except pipeline.ParityError:
        pass  # the parent reads the verdict from the manifest


def sample_settings(metadata: dict[str, Any]) -> str:
    """The sample variant's int4 model as its quantize record describes it."""
    wider = len(metadata["wider"])
    kind = "symmetric" if metadata["symmetric"] else "asymmetric"
    head = (
        "LM head int4"
        if metadata.get("lm_head") and metadata["lm_head"] not in metadata["kept_float"]
        else "LM head fp32"
    )
    return (f"{metadata['method'].upper()}, {kind}, block {metadata['block_size']}, accuracy level 4, {head}; "
            f"mixed: {wider} of {len(metadata['quantized'])} MatMuls int8 (sample job)")  # fmt: skip


def onnx_decoder(path: Path, signature: DecoderSignature) -> OnnxDecoder:
    """A decoder on a 2-thread ONNX Runtime session; ``position_ids`` fed only if the graph takes them."""
    runner = session(path)
    takes_positions = any(node.name == "position_ids" for node in runner.get_inputs())
    return OnnxDecoder(runner, dataclasses.replace(signature, position_ids=takes_positions))


def genai_folder(bench: Bench, work: Path, precision: str, reuse: bool) -> Path:
    """The builder's output for `precision` (built unless `reuse` and already there)."""
    folder = work / f"genai-{precision}"
    if not (reuse and (folder / "model.onnx").is_file()):
        build_genai(bench.hf, folder, precision)
    return folder


def build_rows(bench: Bench, work: Path, variants: list[str], policy: GenerationPolicy, reuse: bool) -> list[Row]:
    """Convert with each variant and with the builder (int4, and fp32 for the graphs' share of the
    difference); every model's decoder, PyTorch first."""
    jobs = {variant: convert(bench, variant, work / f"onnxforge-{variant}", reuse) for variant in variants}
    genai, genai_fp32 = (genai_folder(bench, work, precision, reuse) for precision in ("int4", "fp32"))
    model = causal_lm(str(bench.hf))
    signature = DecoderSignature.from_config(model.config)
    fp32 = work / f"onnxforge-{variants[0]}" / jobs[variants[0]]["simplify"]["path"]
    peer, peer_fp32 = genai / "model.onnx", genai_fp32 / "model.onnx"
    rows = [
        Row("PyTorch fp32", "transformers, eager attention", None, TorchDecoder(model)),
        Row(PEER, PEER_SETTINGS + " (builder defaults)", peer, onnx_decoder(peer, signature)),
        Row("genai fp32 (ORT session)", "builder -p fp32 -e cpu", peer_fp32, onnx_decoder(peer_fp32, signature)),
        Row("onnxforge fp32", "export + simplify", fp32, onnx_decoder(fp32, signature)),
    ]
    for variant, stages in jobs.items():
        path = work / f"onnxforge-{variant}" / stages["quantize"]["path"]
        metadata = stages["quantize"]["metadata"]
        text = VARIANT_SETTINGS[variant] if variant in VARIANT_SETTINGS else sample_settings(metadata)
        rows.append(Row(variant_label(variant), text, path, onnx_decoder(path, signature)))
    length = max(PROMPT_TOKENS + policy.new_tokens + 8, max(len(row) for row in bench.rows) + 1)
    runtime = RuntimeDecoder(genai, length, THREADS)
    rows.append(Row(RUNTIME, "the genai int4 file, og.Generator greedy", peer, runtime))
    return rows


def quality(
    rows: list[Row], prompts: list[np.ndarray], heldout: list[np.ndarray], policy: GenerationPolicy
) -> GenerationParity:
    """Agreement and perplexity of every ONNX row against PyTorch (the first row)."""
    candidates = [GenerationCandidate("cpu", row.label, "", row.decoder) for row in rows[1:]]
    return run_generation_parity(rows[0].decoder, candidates, prompts, heldout, policy)


def speeds(rows: list[Row], settings: TimingSettings) -> Timed:
    """Per row but the peer: (decode, prefill) latency against the peer's, interleaved in rounds."""
    peer = next(row for row in rows if row.label == PEER)
    assert peer.runs is not None
    found = {}
    for row in rows:
        if row is not peer and row.runs is not None:
            decode = compare_latency(peer.runs[1], row.runs[1], settings)
            prefill = compare_latency(peer.runs[0], row.runs[0], settings)
            logger.info("%s: decode %s, TTFT %s", row.label, decode.describe(), prefill.describe())
            found[row.label] = (decode, prefill)
    return found


def head_to_head(rows: list[Row], timed: Timed, settings: TimingSettings) -> list[str]:
    """The answer lines: onnxforge's int4 (builder's settings) decode against the builder's int4 in the
    same harness (from `speeds`) and in the genai runtime, onnxforge's fp32 graph against the
    builder's fp32 graph (the graphs' share: no quantization in either), and the fused int4 graph
    against the same int4 weights exported unfused (opset 18), each timed head to head."""
    by_label = {row.label: row for row in rows}
    ours = variant_label("peer")
    if ours not in timed:
        return []
    lines = [f"decode time, {ours} / {PEER} (same harness): {_verdict(timed[ours][0])}"]
    pairs = ((RUNTIME, ours), ("genai fp32 (ORT session)", "onnxforge fp32"), (UNFUSED, ours))
    for baseline, candidate in pairs:
        if baseline not in by_label:
            continue
        first, second = by_label[baseline].runs, by_label[candidate].runs
        if first is not None and second is not None:
            found = compare_latency(first[1], second[1], settings)
            lines.append(f"decode time, {candidate} / {baseline}: {_verdict(found)}")
    return lines


def _verdict(measured: RatioMeasurement) -> str:
    word = {True: "faster", False: "slower", None: "not told apart"}[measured.faster()]
    return f"{measured.describe()} ({word})"


def table_rows(rows: list[Row], parity: GenerationParity, timed: Timed, new_tokens: int) -> Iterable[list[str]]:
    """One line per model: size, perplexity, agreement, decode tok/s and TTFT with their ratios."""
    by_label = {model.model: model for model in parity.models[1:]}
    decode_ms = [decode.baseline_ms for decode, _ in timed.values()]
    ttft_ms = [prefill.baseline_ms for _, prefill in timed.values()]
    for index, row in enumerate(rows):
        figures = parity.models[0] if index == 0 else by_label[row.label]
        ppl = "-" if figures.perplexity is None else f"{figures.perplexity.value:.2f}"
        if figures.perplexity_ratio is not None:
            ppl += f" ({figures.perplexity_ratio:.4f}x)"
        agreement = figures.agreement
        agree = "reference" if agreement is None else f"{agreement.token_agreement:.1%} ({agreement.diverged} diverge)"
        size = "-" if row.path is None else f"{model_bytes(row.path) / 1e6:.2f}"
        if row.label == PEER:  # its own speed moved with the machine's load: the range over the comparisons
            rate = f"{_rate(max(decode_ms), new_tokens)}-{_rate(min(decode_ms), new_tokens)}"
            speed = [rate, "1 (baseline)", f"{min(ttft_ms):.2f}-{max(ttft_ms):.2f}", "1 (baseline)"]
        else:
            decode, prefill = timed[row.label]
            speed = [f"{_rate(decode.candidate_ms, new_tokens)} ({_rate(decode.baseline_ms, new_tokens)})",
                     decode.describe(), f"{prefill.candidate_ms:.2f} ({prefill.baseline_ms:.2f})",
                     prefill.describe()]  # fmt: skip
        yield [row.label, row.settings, size, ppl, agree, *speed]


def _rate(milliseconds: float, new_tokens: int) -> str:
    """Decode tokens / s of `new_tokens` steps taking `milliseconds`."""
    return f"{1000 * new_tokens / milliseconds:.0f}"


def op_table(rows: list[Row]) -> Table:
    """Op types of onnxforge's int4 (builder's settings) and the builder's graph: as written and as
    ONNX Runtime runs them (after its fusions)."""
    peer = next(row for row in rows if row.label == PEER)
    ours = next(row for row in rows if row.label.startswith("onnxforge int4"))
    assert peer.path is not None and ours.path is not None
    counts = {f"{name}, {kind}": op_types(path, kind == "ORT-optimised")
              for name, path in (("onnxforge int4", ours.path), ("genai int4", peer.path))
              for kind in ("file", "ORT-optimised")}  # fmt: skip
    table = Table(title="Op types (nodes per op type; the decode step runs every node once)")
    table.add_column("op type")
    for column in counts:
        table.add_column(column, justify="right")
    table.add_row("all nodes", *(str(sum(count.values())) for count in counts.values()))
    for op in sorted(set().union(*counts.values()), key=lambda op: -max(count[op] for count in counts.values())):
        table.add_row(op, *(str(count[op] or "") for count in counts.values()))
    return table


def report(bench: Bench, rows: list[Row], parity: GenerationParity, timed: Timed, settings: TimingSettings,
           new_tokens: int) -> None:  # fmt: skip
    """Print the table, the head-to-head lines and the op types (the only output that is not logging)."""
    console = Console(width=200)
    title = (f"{bench.name}: {parity.prompts} held-out prompts x {new_tokens} new tokens, perplexity on "
             f"{parity.heldout_rows} rows ({parity.heldout_tokens} tokens); batch 1, {THREADS} threads; "
             f"speed against {PEER}: latency ratio, median [95% interval], interleaved rounds")  # fmt: skip
    table = Table(title=escape(title))
    for column in ("model", "settings", "file MB", "perplexity (/ PyTorch)", "greedy agreement",
                   "decode tok/s (peer's)", f"decode time / {PEER}", "TTFT ms (peer's)", f"TTFT / {PEER}"):  # fmt: skip
        table.add_column(escape(column))
    for cells in table_rows(rows, parity, timed, new_tokens):
        table.add_row(*(escape(cell) for cell in cells))
    console.print(table)
    for line in head_to_head(rows, timed, settings):
        console.print(escape(line))
    console.print(op_table(rows))
    if not bench.trained:
        console.print("Random weights: perplexity and agreement are not meaningful here; the rows are for speed.")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    console.print(f"peak memory of this process: {peak:.2f} GB; the machine is shared: ratios are interleaved rounds")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", help=f"a random-weight model: a preset ({', '.join(PRESETS)}) or a config.json")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts (32 tokens each)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt, and decode steps timed")
    parser.add_argument("--variants", nargs="+", choices=["peer", "unfused", "sample"],
                        help="onnxforge int4 variants (default: all; peer, unfused for --config)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=15.0, help="timing budget per comparison, seconds")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/llm_bench"), help="conversions and builds go here")
    parser.add_argument("--reuse", action="store_true", help="keep conversions and builds already in --work-dir")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("benchmarks.llm", "llm_peer"):
        logging.getLogger(name).setLevel(logging.INFO)
    import torch

    torch.set_num_threads(THREADS)
    work = args.work_dir / (Path(args.config).stem if args.config else "tinylm")
    work.mkdir(parents=True, exist_ok=True)
    bench = config_bench(args.config, work, args.prompts) if args.config else tinylm_bench(work)
    variants = args.variants or (["peer", "unfused"] if args.config else ["peer", "unfused", "sample"])
    policy = GenerationPolicy(prompts=args.prompts, prompt_tokens=PROMPT_TOKENS, new_tokens=args.new_tokens,
                              min_token_agreement=None, max_perplexity_ratio=None, measure_speed=False)  # fmt: skip
    prompts = cut_prompts(bench.rows, policy)
    rows = build_rows(bench, work, variants, policy, args.reuse)
    parity = quality(rows, prompts, bench.rows, policy)
    for row in rows:
        if isinstance(row.decoder, RuntimeDecoder):
            row.runs = runtime_runs(row.decoder, prompts[0], args.new_tokens)
        else:
            row.runs = speed_runs(row.decoder, prompts[0], args.new_tokens)
    settings = TimingSettings(budget_s=args.budget_s)
    report(bench, rows, parity, speeds(rows, settings), settings, args.new_tokens)


if __name__ == "__main__":
    main()
