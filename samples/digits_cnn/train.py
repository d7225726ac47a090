"""Train the digits CNN sample and write its weights and data files.

Run from the repository root::

    python -m samples.digits_cnn.train [--epochs N] [--seed S] [--out-dir DIR]

It loads scikit-learn's 8x8 digits (bundled with scikit-learn, so nothing is
downloaded), scales pixels from 0..16 to [0, 1], holds out a stratified 20 %
split (``random_state=0``) and trains :class:`~samples.digits_cnn.model.DigitsCNN`
deterministically on the rest with Adam and cross-entropy. It then writes, each
atomically (temporary file in the same folder, then ``os.replace``):

* ``weights.safetensors``: the trained state dict;
* ``data/calibration.npz``: ``image`` float32 ``[256, 1, 8, 8]``, drawn from the
  training split, for int8 calibration;
* ``data/heldout.npz``: ``image`` float32 ``[N, 1, 8, 8]`` and ``label`` int64
  ``[N]``, the whole held-out split, for accuracy and parity checks.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from samples.digits_cnn.model import DigitsCNN

logger = logging.getLogger(__name__)

SAMPLE_DIR: Path = Path(__file__).parent
"""Default output folder: the sample's own folder."""

NUM_CALIBRATION: int = 256
"""Number of training-split images saved for int8 calibration."""

BATCH_SIZE: int = 64
LEARNING_RATE: float = 2e-3
WEIGHT_DECAY: float = 1e-4


def load_dataset() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Loads scikit-learn's digits as CNN-ready arrays.

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 8, 8]`` scaled to ``[0, 1]`` and
        int64 ``[N]``.
    """
    digits = load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    return np.ascontiguousarray(images), labels


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes a file atomically: to a temporary file beside it, then renames.

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


def _save_npz(path: Path, **arrays: npt.NDArray[np.generic]) -> None:
    """Saves arrays to an uncompressed ``.npz`` file atomically.

    Args:
        path: Destination ``.npz`` path.
        **arrays: Arrays to store, by key.
    """

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)  # a file object, so numpy appends no ".npz"

    _atomic_write(path, write)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Computes top-1 accuracy.

    Args:
        model: Model to evaluate (switched to eval mode).
        images: Float32 ``[N, 1, 8, 8]``.
        labels: Int64 ``[N]``.

    Returns:
        Top-1 accuracy as a fraction in ``[0, 1]``.
    """
    model.eval()
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    return float((predictions == labels).float().mean().item())


def train(epochs: int, seed: int, out_dir: Path) -> float:
    """Trains the model and writes the weights and data files.

    Args:
        epochs: Number of passes over the training split.
        seed: Seed for weight initialisation, shuffling and the calibration draw.
        out_dir: Folder receiving ``weights.safetensors`` and ``data/``.

    Returns:
        Final held-out top-1 accuracy as a fraction in ``[0, 1]``.
    """
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    images, labels = load_dataset()
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    logger.info("digits: %d training, %d held-out images", len(train_x), len(test_x))

    x_train = torch.from_numpy(train_x)
    y_train = torch.from_numpy(train_y)
    x_test = torch.from_numpy(test_x)
    y_test = torch.from_numpy(test_y)

    model = DigitsCNN()
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("DigitsCNN: %d parameters", num_params)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss = 0.0
        for begin in range(0, len(order), BATCH_SIZE):
            idx = order[begin : begin + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            total_loss += float(loss.item()) * len(idx)
        scheduler.step()
        accuracy = evaluate(model, x_test, y_test)
        logger.info(
            "epoch %3d/%d  loss %.4f  held-out accuracy %.2f%%",
            epoch,
            epochs,
            total_loss / len(order),
            100.0 * accuracy,
        )
    logger.info("training took %.1f s", time.perf_counter() - start)

    model.eval()
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    _atomic_write(out_dir / "weights.safetensors", lambda tmp: save_file(state, str(tmp)))

    rng = np.random.default_rng(seed)
    calibration_idx = np.sort(rng.choice(len(train_x), size=NUM_CALIBRATION, replace=False))
    data_dir = out_dir / "data"
    _save_npz(
        data_dir / "calibration.npz",
        image=np.ascontiguousarray(train_x[calibration_idx], dtype=np.float32),
    )
    _save_npz(
        data_dir / "heldout.npz",
        image=np.ascontiguousarray(test_x, dtype=np.float32),
        label=np.ascontiguousarray(test_y, dtype=np.int64),
    )
    logger.info("wrote %s and %s", out_dir / "weights.safetensors", data_dir)
    logger.info("final held-out top-1 accuracy: %.2f%% (%d images)", 100.0 * accuracy, len(test_x))
    return accuracy


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses command-line options.

    Args:
        argv: Arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(
        prog="python -m samples.digits_cnn.train",
        description="Train the digits CNN sample and write weights.safetensors and data/*.npz.",
    )
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=SAMPLE_DIR,
        help=f"output folder (default: the sample folder, {SAMPLE_DIR})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point.

    Args:
        argv: Arguments (without the program name); ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train(epochs=args.epochs, seed=args.seed, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
