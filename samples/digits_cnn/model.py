"""The digits CNN sample model.

A small convolutional network for scikit-learn's 8x8 handwritten digits
(``sklearn.datasets.load_digits``). It takes an ``image`` input of shape
``[batch, 1, 8, 8]`` (float32, raw pixel values 0..16 divided by 16 so they lie
in ``[0, 1]``) and returns ``logits`` of shape ``[batch, 10]``.

Every convolution is followed by ``BatchNorm2d`` so that later pipeline stages
have batch norms to fold, and most of the compute is in the convolutions so
that int8 and pruning benchmarks measure convolution speed.

The trained weights live in ``weights.safetensors`` beside this file; they are
produced by ``python -m samples.digits_cnn.train``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS_PATH: Path = Path(__file__).parent / "weights.safetensors"
"""Where :func:`load_trained` reads the trained state dict from."""

NUM_CLASSES: int = 10
"""Number of digit classes (0-9)."""


class DigitsCNN(nn.Module):
    """Small CNN classifying 8x8 grey-scale digits into 10 classes.

    Layout: three 3x3 convolutions (32, 64, 64 channels), each with batch norm
    and ReLU, two 2x2 max pools (8x8 -> 4x4 -> 2x2), then a two-layer MLP head.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        """Builds the layers.

        Args:
            num_classes: Number of output logits.
        """
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Computes class logits.

        Args:
            image: Float32 tensor of shape ``[batch, 1, 8, 8]`` with pixel
                values scaled to ``[0, 1]``.

        Returns:
            Float32 logits of shape ``[batch, num_classes]``.
        """
        return self.classifier(self.features(image))


def load_trained() -> DigitsCNN:
    """Builds a :class:`DigitsCNN` and loads the bundled trained weights.

    Returns:
        The trained model, in eval mode.

    Raises:
        FileNotFoundError: If ``weights.safetensors`` is missing (run
            ``python -m samples.digits_cnn.train`` to create it).
    """
    if not WEIGHTS_PATH.is_file():
        raise FileNotFoundError(
            f"{WEIGHTS_PATH} not found; run `python -m samples.digits_cnn.train` to create it"
        )
    model = DigitsCNN()
    model.load_state_dict(load_file(str(WEIGHTS_PATH)), strict=True)
    model.eval()
    return model
