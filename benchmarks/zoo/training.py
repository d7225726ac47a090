"""Brief, deterministic training of the zoo's small nets, cached as safetensors.

:func:`trained_weights` trains a model at first use (seconds, fixed seed, one thread, Adam with a
cosine schedule) and saves its state dict under ``benchmarks/zoo/.cache/weights/``; later calls
return the cached file. The file name carries a hash of the recipe and the parameter shapes, so
a changed model or recipe trains afresh instead of failing to load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.zoo.data import Arrays, Split

logger = logging.getLogger(__name__)

#: Where weights (and the training summary beside them) are cached; override with $ONNXFORGE_ZOO_CACHE.
CACHE_DIR: Path = Path(os.environ.get("ONNXFORGE_ZOO_CACHE", Path(__file__).resolve().parent / ".cache"))

#: Bumped when the training loop changes meaningfully (invalidates every cached weight file).
RECIPE_VERSION: int = 1

Loss = Callable[[Tensor | tuple[Tensor, ...], dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class TrainSpec:
    """How one zoo model is trained.

    Attributes:
        loss: ``"ce"`` (cross-entropy on ``label``), ``"mse"`` (on ``target``) or ``"ce+ink"``
            (cross-entropy on the first output plus MSE of the third on the mean pixel).
        epochs: Passes over the training split.
        learning_rate: Peak Adam learning rate.
        batch_size: Samples per step.
        seed: Seeds initialisation and shuffling.
    """

    loss: str = "ce"
    epochs: int = 12
    learning_rate: float = 3e-3
    batch_size: int = 64
    seed: int = 0


def _ce(outputs: Tensor | tuple[Tensor, ...], batch: dict[str, Tensor]) -> Tensor:
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    return F.cross_entropy(logits, batch["label"])


def _mse(outputs: Tensor | tuple[Tensor, ...], batch: dict[str, Tensor]) -> Tensor:
    assert isinstance(outputs, Tensor)
    return F.mse_loss(outputs, batch["target"])


def _ce_ink(outputs: Tensor | tuple[Tensor, ...], batch: dict[str, Tensor]) -> Tensor:
    assert isinstance(outputs, tuple)
    ink = batch["image"].mean(dim=(1, 2, 3))[:, None]
    return F.cross_entropy(outputs[0], batch["label"]) + 10.0 * F.mse_loss(outputs[2], ink)


LOSSES: dict[str, Loss] = {"ce": _ce, "mse": _mse, "ce+ink": _ce_ink}


def _tensors(arrays: Arrays) -> dict[str, Tensor]:
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}


def evaluate(model: nn.Module, inputs: list[str], test: Arrays, loss: str) -> dict[str, float]:
    """Held-out figures: top-1 accuracy for classifiers (in %), the loss otherwise.

    Args:
        model: The model (switched to eval mode).
        inputs: Its input names, in ``forward`` order.
        test: The held-out arrays.
        loss: The :class:`TrainSpec` loss name.
    """
    model.eval()
    batch = _tensors(test)
    with torch.no_grad():
        outputs = model(*(batch[name] for name in inputs))
        figures = {"heldout_loss": float(LOSSES[loss](outputs, batch))}
        if "label" in batch:
            logits = outputs[0] if isinstance(outputs, tuple) else outputs
            figures["heldout_accuracy"] = 100.0 * float((logits.argmax(dim=1) == batch["label"]).float().mean())
    return figures


def _fit(model: nn.Module, inputs: list[str], train: Arrays, spec: TrainSpec) -> None:
    """The training loop: Adam, cosine decay, shuffled mini-batches."""
    data = _tensors(train)
    count = len(next(iter(data.values())))
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate, weight_decay=1e-4)
    steps = spec.epochs * -(-count // spec.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(spec.seed)
    loss_fn = LOSSES[spec.loss]
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(count, generator=generator)
        for begin in range(0, count, spec.batch_size):
            batch = {key: value[order[begin : begin + spec.batch_size]] for key, value in data.items()}
            optimizer.zero_grad()
            loss_fn(model(*(batch[name] for name in inputs)), batch).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def _cache_key(name: str, model: nn.Module, spec: TrainSpec, train: Arrays) -> str:
    """A hash of what the trained weights depend on: recipe, parameter shapes, training data."""
    shapes = sorted((key, tuple(value.shape)) for key, value in model.state_dict().items())
    digest = hashlib.sha256(json.dumps([RECIPE_VERSION, name, asdict(spec), shapes], default=str).encode())
    for key in sorted(train):
        digest.update(key.encode() + np.ascontiguousarray(train[key]).tobytes())
    return digest.hexdigest()[:12]


def trained_weights(
    name: str, build: Callable[[], nn.Module], inputs: list[str], split: Callable[[], Split], spec: TrainSpec
) -> tuple[Path, dict[str, float]]:
    """The cached trained weights of a zoo model, training them first when missing.

    Args:
        name: The zoo model's name (part of the file name).
        build: Returns the untrained model.
        inputs: The model's input names, in ``forward`` order (keys of the split's arrays).
        split: Returns the training and held-out data.
        spec: The training recipe.

    Returns:
        The safetensors file, and the training summary (held-out figures, seconds).
    """
    torch.manual_seed(spec.seed)
    model = build()
    data = split()
    stem = CACHE_DIR / "weights" / f"{name}-{_cache_key(name, model, spec, data.train)}"
    weights, summary_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and summary_path.is_file():
        return weights, json.loads(summary_path.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fair on a shared machine
    try:
        start = time.perf_counter()
        _fit(model, inputs, data.train, spec)
        summary = {**evaluate(model, inputs, data.test, spec.loss), "train_seconds": time.perf_counter() - start}
    finally:
        torch.set_num_threads(threads)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    summary_path.write_text(json.dumps(summary, indent=2))
    logger.info("trained %s in %.1f s: %s", name, summary["train_seconds"], summary)
    return weights, summary
