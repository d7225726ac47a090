"""Train the tinylm sample: its tokenizer, then the model, on the Python standard library's source.

Run from the repository root::

    python -m samples.tinylm.train [--steps N] [--seed S] [--out-dir DIR]

It trains a byte-level BPE (:mod:`samples.tinylm.tokenizer`) on the training files
(:mod:`samples.tinylm.corpus`), tokenises them into one stream, and trains
:func:`samples.tinylm.model.tiny_llama_config`'s ``LlamaForCausalLM`` on random windows of
that stream (AdamW, linear warm-up then cosine decay, gradient clipping, one thread,
deterministic algorithms, every draw from ``--seed``). It prints the train and held-out
perplexity, the unigram baseline and a greedy continuation of a held-out prompt, and writes,
each atomically (a temporary file beside it, then ``os.replace``):

* ``tokenizer.json``;
* ``weights/model.safetensors`` (float32 state dict; the training facts in its metadata);
* ``weights/config.json`` (the ``LlamaConfig``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from .corpus import EVALUATION_FILES, held_out_files, read_text, training_files
from .data import prompt_windows
from .metrics import greedy_continuation, perplexity, unigram_perplexity
from .model import MAX_POSITIONS, build_model, tiny_llama_config
from .tokenizer import TOKENIZER_PATH, encode_files, train_tokenizer

logger = logging.getLogger(__name__)

SAMPLE_DIR: Path = Path(__file__).resolve().parent
"""Default output folder: the sample's own folder."""

#: Training windows scored for the train perplexity (a fixed draw from the seed).
TRAIN_EVAL_WINDOWS: int = 64

#: Steps between two log lines.
LOG_EVERY: int = 40


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does; every field is recorded in the weights' metadata.

    Attributes:
        steps: Optimizer steps.
        batch_size: Windows per step.
        sequence: Tokens per window.
        learning_rate: Peak learning rate.
        warmup_steps: Linear warm-up steps before the cosine decay.
        final_lr_fraction: The learning rate at the last step, as a fraction of the peak.
        weight_decay: AdamW weight decay of the matrices (none on norms).
        seed: Seed of the initialisation and of the window draws.
        threads: torch threads (1 by default: on a busy 2-core machine two threads ran 3-5x
            slower than one, waiting on each other).
    """

    steps: int = 1200
    batch_size: int = 4
    sequence: int = MAX_POSITIONS
    learning_rate: float = 4e-3
    warmup_steps: int = 120
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 1


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file atomically: to a temporary file beside it, then rename.

    Args:
        path: Final destination.
        write: Called with the temporary path; must create the file's content there.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp creates 0600; give the usual permissions of a shipped file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (embeddings, projections), not on norms."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=(0.9, 0.95))


def _lr_factor(step: int, settings: TrainSettings) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up, then cosine decay."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return settings.final_lr_fraction + (1.0 - settings.final_lr_fraction) * cosine


def _windows(stream: torch.Tensor, starts: torch.Tensor, sequence: int) -> torch.Tensor:
    """The windows of ``stream`` beginning at ``starts``: int64 ``[len(starts), sequence]``."""
    return torch.stack([stream[start : start + sequence] for start in starts.tolist()])


def train_model(stream: np.ndarray, settings: TrainSettings) -> tuple[LlamaForCausalLM, float]:
    """Train a fresh tinylm on random windows of a token stream.

    Args:
        stream: The training token stream, int64 ``[tokens]``.
        settings: The run's settings.

    Returns:
        The trained model in eval mode and the training wall time in seconds.
    """
    torch.manual_seed(settings.seed)
    model = build_model(tiny_llama_config())
    model.train()
    optimizer = _optimizer(model, settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    tokens = torch.from_numpy(stream)
    draws = torch.Generator().manual_seed(settings.seed)
    started = time.perf_counter()
    for step in range(settings.steps):
        starts = torch.randint(0, len(tokens) - settings.sequence, (settings.batch_size,), generator=draws)
        batch = _windows(tokens, starts, settings.sequence)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % LOG_EVERY == 0 or step == settings.steps - 1:
            elapsed = time.perf_counter() - started
            logger.info("step %4d  loss %.3f  lr %.2e  %.0f s", step, loss_value, schedule.get_last_lr()[0], elapsed)
    model.eval()
    return model, time.perf_counter() - started


def train_perplexity(model: torch.nn.Module, stream: np.ndarray, settings: TrainSettings) -> float:
    """Perplexity on a fixed draw of :data:`TRAIN_EVAL_WINDOWS` training windows."""
    draws = torch.Generator().manual_seed(settings.seed + 1)
    starts = torch.randint(0, len(stream) - settings.sequence, (TRAIN_EVAL_WINDOWS,), generator=draws)
    windows = _windows(torch.from_numpy(stream), starts, settings.sequence).numpy()
    return perplexity(model, windows.reshape(-1), window=settings.sequence)


def evaluate(
    model: torch.nn.Module, tokenizer: Tokenizer, streams: dict[str, np.ndarray], settings: TrainSettings
) -> dict[str, int | float | str]:
    """The figures the README quotes: perplexities, the unigram baseline, a greedy continuation.

    Args:
        model: The trained model.
        tokenizer: The tokenizer.
        streams: ``"train"`` and ``"evaluation"`` token streams.
        settings: The run's settings.

    Returns:
        Figures by name (perplexities as floats, the example prompt and continuation as text).
    """
    held_out = streams["evaluation"]
    prompt = prompt_windows(held_out)[0]
    continuation = greedy_continuation(model, prompt, 32)
    return {
        "train_perplexity": train_perplexity(model, streams["train"], settings),
        "heldout_perplexity": perplexity(model, held_out, window=settings.sequence),
        "heldout_unigram_perplexity": unigram_perplexity(held_out, tokenizer.get_vocab_size()),
        "example_prompt": tokenizer.decode(prompt.tolist()),
        "example_continuation": tokenizer.decode(continuation.tolist()),
    }


def save(model: LlamaForCausalLM, tokenizer: Tokenizer, out_dir: Path, facts: dict[str, str]) -> None:
    """Write ``tokenizer.json``, ``weights/model.safetensors`` and ``weights/config.json``.

    Args:
        model: The trained model.
        tokenizer: The tokenizer it was trained with.
        out_dir: The sample folder (or another one).
        facts: Training facts, stored as the safetensors metadata.
    """
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    weights = out_dir / "weights"
    _atomic_write(out_dir / TOKENIZER_PATH.name, lambda tmp: tokenizer.save(str(tmp), pretty=True))
    _atomic_write(weights / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata=facts))
    _atomic_write(weights / "config.json", lambda tmp: model.config.to_json_file(str(tmp)))


def run(settings: TrainSettings, out_dir: Path) -> dict[str, int | float | str]:
    """Train the tokenizer and the model, evaluate, and save everything to ``out_dir``.

    Args:
        settings: The run's settings.
        out_dir: Where ``tokenizer.json`` and ``weights/`` go.

    Returns:
        The figures of :func:`evaluate`, plus the parameter count and training time.
    """
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    files = training_files()
    tokenizer = train_tokenizer(read_text(path) for path in files)
    streams = {
        "train": encode_files(tokenizer, files),
        "evaluation": encode_files(tokenizer, held_out_files(EVALUATION_FILES)),
    }
    sizes = len(files), len(streams["train"]), len(streams["evaluation"])
    logger.info("%d training files, %d tokens; held out: %d tokens", *sizes)
    model, seconds = train_model(streams["train"], settings)
    figures: dict[str, int | float | str] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_seconds": round(seconds, 1),
        **evaluate(model, tokenizer, streams, settings),
    }
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "settings": json.dumps(asdict(settings)),
        "train_tokens": str(len(streams["train"])),
        "figures": json.dumps({k: v for k, v in figures.items() if not isinstance(v, str)}),
    }
    save(model, tokenizer, out_dir, facts)
    return figures


def main(argv: list[str] | None = None) -> None:
    """Command line entry point.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).
    """
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--out-dir", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args(argv)
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    settings = TrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        threads=args.threads,
        warmup_steps=max(1, args.steps // 10),
    )
    figures = run(settings, args.out_dir)
    for name, value in figures.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}:\n{value}")


if __name__ == "__main__":
    main()
