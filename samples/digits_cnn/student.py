"""The digits CNN's distillation student: the teacher's layout at half the width, a quarter of the parameters.

``DigitsStudent`` keeps :class:`~samples.digits_cnn.model.DigitsCNN`'s shape (three 3x3 convolutions
with batch norm and ReLU, two 2x2 max pools, a two-layer head), so it exports, quantizes and maps to
the FPGA-style accelerator the same way, with 16/32/32 channels and a 48-unit hidden layer instead of
32/64/64 and 128: 21,050 parameters against the teacher's 90,250 (0.23x).

``build_student`` is the factory the distillation job names; it returns an untrained student (the
distill stage seeds its initialisation).
"""

from __future__ import annotations

import torch
from torch import nn

from samples.digits_cnn.model import NUM_CLASSES


class DigitsStudent(nn.Module):
    """A narrow DigitsCNN: ``image [batch, 1, 8, 8]`` in, ``logits [batch, 10]`` out.

    Args:
        widths: Output channels of the three convolutions.
        hidden: Units of the hidden layer of the head.
        num_classes: Number of output logits.
    """

    def __init__(
        self, widths: tuple[int, int, int] = (16, 32, 32), hidden: int = 48, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        first, second, third = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, first, kernel_size=3, padding=1),
            nn.BatchNorm2d(first),
            nn.ReLU(),
            nn.Conv2d(first, second, kernel_size=3, padding=1),
            nn.BatchNorm2d(second),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(second, third, kernel_size=3, padding=1),
            nn.BatchNorm2d(third),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(third * 2 * 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Class logits ``[batch, num_classes]`` of images ``[batch, 1, 8, 8]`` scaled to [0, 1]."""
        return self.classifier(self.features(image))


def build_student(width: int = 16, hidden: int = 48) -> DigitsStudent:
    """An untrained student; `width` is the first convolution's channels (the others are twice it).

    Args:
        width: Channels of the first convolution; the second and third have ``2 * width``.
        hidden: Units of the head's hidden layer.
    """
    return DigitsStudent(widths=(width, 2 * width, 2 * width), hidden=hidden)
