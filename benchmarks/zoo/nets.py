"""Hand-written zoo models: CNN blocks, recurrent, encoder-decoder, 1-D conv and multi-head nets.

All take data derived from scikit-learn's 8x8 digits (see :mod:`benchmarks.zoo.data`), except
:class:`AudioConv1d`, which takes synthetic 1-D signals. Shapes are in each ``forward``'s docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

NUM_CLASSES: int = 10


def _conv_bn(cin: int, cout: int, kernel: int = 3, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv2d (same padding, no bias) + BatchNorm2d (+ ReLU6 when ``act``)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3, 1x1 expand, plus the identity (or a 1x1 projection)."""

    def __init__(self, cin: int, mid: int, cout: int) -> None:
        """Builds the three convolutions and, when widths differ, the projection shortcut."""
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut: nn.Module = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        """``relu(expand(conv(reduce(x))) + shortcut(x))``."""
        return F.relu(self.expand(self.conv(self.reduce(x))) + self.shortcut(x))


class ResNetDigits(nn.Module):
    """A small ResNet of bottleneck blocks for 8x8 digits."""

    def __init__(self) -> None:
        """Stem conv, three bottlenecks (one after a 2x2 pool), global average pool, linear."""
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(
            Bottleneck(32, 16, 64), Bottleneck(64, 16, 64), nn.MaxPool2d(2), Bottleneck(64, 32, 128)
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, image: Tensor) -> Tensor:
        """Logits ``[batch, 10]`` for ``image`` ``[batch, 1, 8, 8]`` in ``[0, 1]``."""
        return self.head(self.blocks(self.stem(image)).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, expand: int = 4) -> None:
        """Builds expand / depthwise / project convolutions."""
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            _conv_bn(cin, mid, kernel=1), _conv_bn(mid, mid, groups=mid), _conv_bn(mid, cout, kernel=1, act=False)
        )
        self.residual = cin == cout

    def forward(self, x: Tensor) -> Tensor:
        """The block, plus ``x`` when input and output widths match."""
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetDigits(nn.Module):
    """A MobileNet-style net of depthwise-separable inverted residuals for 8x8 digits."""

    def __init__(self) -> None:
        """Stem, four inverted residuals with one 2x2 pool, 1x1 head conv, pool, linear."""
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(1, 16),
            InvertedResidual(16, 24),
            InvertedResidual(24, 24),
            nn.AvgPool2d(2),
            InvertedResidual(24, 32),
            InvertedResidual(32, 32),
            _conv_bn(32, 128, kernel=1),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, image: Tensor) -> Tensor:
        """Logits ``[batch, 10]`` for ``image`` ``[batch, 1, 8, 8]`` in ``[0, 1]``."""
        return self.head(self.features(image).mean(dim=(2, 3)))


class RowRnn(nn.Module):
    """A GRU or LSTM reading an 8x8 digit row by row (8 steps of 8 features), last state to logits."""

    def __init__(self, cell: str = "gru", hidden: int = 64) -> None:
        """Builds a 1-layer ``nn.GRU`` or ``nn.LSTM`` (``batch_first``) and a linear head.

        Args:
            cell: ``"gru"`` or ``"lstm"``.
            hidden: Hidden size.
        """
        super().__init__()
        kind = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = kind(input_size=8, hidden_size=hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, rows: Tensor) -> Tensor:
        """Logits ``[batch, 10]`` for ``rows`` ``[batch, steps, 8]`` (steps = 8 for digits)."""
        out, _ = self.rnn(rows)
        return self.head(out[:, -1])


class UNet(nn.Module):
    """A small U-Net (two down, two up, skip concatenation) denoising 16x16 digit images."""

    def __init__(self, width: int = 16) -> None:
        """Builds the encoder, bottleneck, transposed-conv decoder and 1x1 output conv."""
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_conv_bn(1, w), _conv_bn(w, w))
        self.enc2 = nn.Sequential(_conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w))
        self.mid = nn.Sequential(_conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = nn.Sequential(_conv_bn(4 * w, 2 * w), _conv_bn(2 * w, 2 * w))
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = nn.Sequential(_conv_bn(2 * w, w), _conv_bn(w, w))
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, noisy: Tensor) -> Tensor:
        """The denoised image ``[batch, 1, 16, 16]`` for ``noisy`` ``[batch, 1, 16, 16]``."""
        e1 = self.enc1(noisy)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return torch.sigmoid(self.out(d1))


class AudioConv1d(nn.Module):
    """A 1-D conv net over raw waveforms (strided conv front end, dilated convs, pooled head)."""

    def __init__(self, classes: int = 4, width: int = 32) -> None:
        """Builds the conv stack and the linear head.

        Args:
            classes: Output logits.
            width: Channels of the conv stack.
        """
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(1, w, 9, stride=4, padding=4),
            nn.BatchNorm1d(w),
            nn.ReLU(),
            nn.Conv1d(w, w, 3, padding=2, dilation=2),
            nn.BatchNorm1d(w),
            nn.ReLU(),
            nn.Conv1d(w, 2 * w, 3, stride=2, padding=1),
            nn.BatchNorm1d(2 * w),
            nn.ReLU(),
            nn.Conv1d(2 * w, 2 * w, 3, padding=4, dilation=4),
            nn.BatchNorm1d(2 * w),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * w, classes)

    def forward(self, waveform: Tensor) -> Tensor:
        """Logits ``[batch, classes]`` for ``waveform`` ``[batch, 1, time]`` (any length >= 16)."""
        return self.head(self.features(waveform).mean(dim=2))


class MultiHead(nn.Module):
    """A shared conv trunk with three heads: class logits, an L2-normalised embedding, a regression."""

    def __init__(self, embedding: int = 32) -> None:
        """Builds the trunk and the three heads."""
        super().__init__()
        self.trunk = nn.Sequential(
            _conv_bn(1, 32), nn.MaxPool2d(2), _conv_bn(32, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 128)
        )
        self.classify = nn.Linear(128, NUM_CLASSES)
        self.embed = nn.Linear(128, embedding)
        self.regress = nn.Linear(128, 1)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [batch, 10], embedding [batch, 32], ink [batch, 1])`` for ``image`` ``[batch, 1, 8, 8]``.

        ``ink`` regresses the image's mean pixel value (trained with MSE beside the cross-entropy).
        """
        features = F.relu(self.trunk(image))
        return self.classify(features), F.normalize(self.embed(features), dim=1), self.regress(features)
