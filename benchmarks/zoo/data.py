"""Data sets of the zoo: scikit-learn's digits in several shapes, synthetic signals, tokens, mels.

Every function is deterministic (fixed seeds) and returns a :class:`Split`: arrays by key for a
training part and a held-out part, first axis = samples. Input arrays are named like the model's
inputs; ``label`` holds int64 class labels and ``target`` a regression target where there is one.
Calibration data is drawn from ``train``, evaluation data is ``test``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

Arrays = dict[str, npt.NDArray[np.generic]]

#: Samples per split for the synthetic data sets (signals, tokens, mels).
SYNTHETIC_TRAIN: int = 512
SYNTHETIC_TEST: int = 128

#: Length of the synthetic waveforms, and their classes (frequency bands).
SIGNAL_LENGTH: int = 256
SIGNAL_CLASSES: int = 4

#: Token sequence length of the text models' data.
SEQUENCE: int = 32


@dataclass(frozen=True)
class Split:
    """A training part and a held-out part, arrays by key."""

    train: Arrays
    test: Arrays


@cache
def _digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """scikit-learn's digits scaled to [0, 1], ``[N, 8, 8]``, split 80/20 stratified (random_state 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    return train_x, train_y, test_x, test_y


def digits_images() -> Split:
    """``image`` float32 ``[N, 1, 8, 8]`` and ``label``."""
    train_x, train_y, test_x, test_y = _digits()
    return Split({"image": train_x[:, None], "label": train_y}, {"image": test_x[:, None], "label": test_y})


def digits_rows() -> Split:
    """``rows`` float32 ``[N, 8, 8]`` (8 steps of 8 pixels) and ``label``."""
    train_x, train_y, test_x, test_y = _digits()
    return Split({"rows": train_x, "label": train_y}, {"rows": test_x, "label": test_y})


def _upsample(images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """``[N, 8, 8]`` to ``[N, 1, 16, 16]`` by bilinear interpolation."""
    import torch
    from torch.nn import functional as F

    up = F.interpolate(torch.from_numpy(images)[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(up.numpy(), dtype=np.float32)


def digits_16() -> Split:
    """``image`` float32 ``[N, 1, 16, 16]`` (digits upsampled) and ``label``."""
    train_x, train_y, test_x, test_y = _digits()
    return Split({"image": _upsample(train_x), "label": train_y}, {"image": _upsample(test_x), "label": test_y})


def noisy_digits_16() -> Split:
    """``noisy`` float32 ``[N, 1, 16, 16]`` (upsampled digits + Gaussian noise, sigma 0.25, clipped)
    and ``target``, the clean image."""
    rng = np.random.default_rng(0)
    split = digits_16()

    def noisy(clean: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        noise = rng.normal(0.0, 0.25, size=clean.shape)
        return np.clip(clean + noise, 0.0, 1.0).astype(np.float32)

    return Split(
        {"noisy": noisy(split.train["image"]), "target": split.train["image"]},
        {"noisy": noisy(split.test["image"]), "target": split.test["image"]},
    )


def _signals(count: int, rng: np.random.Generator) -> Arrays:
    """Waveforms whose class is the band of their base frequency, with a harmonic, chirp and noise."""
    labels = rng.integers(0, SIGNAL_CLASSES, size=count)
    t = np.arange(SIGNAL_LENGTH) / SIGNAL_LENGTH
    low = 4.0 + 10.0 * labels + rng.uniform(0.0, 6.0, size=count)
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1))
    chirp = rng.uniform(-2.0, 2.0, size=(count, 1))
    base = np.sin(2 * np.pi * (low[:, None] + chirp * t) * t + phase)
    harmonic = rng.uniform(0.0, 0.5, size=(count, 1)) * np.sin(4 * np.pi * low[:, None] * t)
    noise = rng.normal(0.0, 1.0, size=(count, SIGNAL_LENGTH))
    amplitude = rng.uniform(0.5, 1.5, size=(count, 1))
    wave = amplitude * (base + harmonic) + noise
    return {"waveform": wave[:, None].astype(np.float32), "label": labels.astype(np.int64)}


def signals() -> Split:
    """``waveform`` float32 ``[N, 1, 256]`` and ``label`` (4 frequency bands)."""
    rng = np.random.default_rng(0)
    return Split(_signals(4 * SYNTHETIC_TRAIN, rng), _signals(2 * SYNTHETIC_TEST, rng))


def _tokens(count: int, vocab: int, pair: bool, rng: np.random.Generator) -> Arrays:
    """Random token ids with right padding (lengths 8..SEQUENCE), a mask, and segment ids for pairs."""
    lengths = rng.integers(8, SEQUENCE + 1, size=count)
    positions = np.arange(SEQUENCE)[None, :]
    mask = (positions < lengths[:, None]).astype(np.int64)
    # A Zipf-like draw: frequent low ids, as real text has frequent tokens.
    ids = np.minimum(rng.zipf(1.3, size=(count, SEQUENCE)), vocab - 1).astype(np.int64) * mask
    arrays: Arrays = {"input_ids": ids, "attention_mask": mask}
    if pair:
        first = rng.integers(3, lengths)  # where the second segment starts
        arrays["token_type_ids"] = ((positions >= first[:, None]) & (mask == 1)).astype(np.int64)
    return arrays


def tokens(vocab: int, pair: bool = False, mask: bool = True) -> Split:
    """Token batches for the text models: ``input_ids`` (and ``attention_mask``, ``token_type_ids``).

    Args:
        vocab: Vocabulary size (ids are below it; 0 pads).
        pair: Add ``token_type_ids`` (0 for the first segment, 1 for the second, 0 on padding).
        mask: Keep ``attention_mask``; without it (a causal LM fed whole sequences) nothing is padded.
    """
    rng = np.random.default_rng(0)
    train = _tokens(SYNTHETIC_TRAIN, vocab, pair, rng)
    test = _tokens(SYNTHETIC_TEST, vocab, pair, rng)
    if not mask:
        for part in (train, test):
            part["input_ids"] = np.maximum(
                np.minimum(rng.zipf(1.3, size=part["input_ids"].shape), vocab - 1), 1
            ).astype(np.int64)
            del part["attention_mask"]
    return Split(train, test)


def _mels(count: int, mels: int, frames: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Log-mel-like features: smooth over time and frequency, in Whisper's [-1, 1]-ish range."""
    raw = rng.normal(size=(count, mels, frames + 4))
    smooth = (raw[..., :-4] + raw[..., 1:-3] + raw[..., 2:-2] + raw[..., 3:-1] + raw[..., 4:]) / 5
    tilt = np.linspace(0.5, -0.5, mels)[None, :, None]
    return np.tanh(smooth + tilt).astype(np.float32)


def mel_features(mels: int, frames: int) -> Split:
    """``input_features`` float32 ``[N, mels, frames]``."""
    rng = np.random.default_rng(0)
    return Split(
        {"input_features": _mels(SYNTHETIC_TRAIN, mels, frames, rng)},
        {"input_features": _mels(SYNTHETIC_TEST, mels, frames, rng)},
    )
