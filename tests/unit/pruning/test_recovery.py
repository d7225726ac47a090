"""Least-squares recovery: a removed channel that duplicates a kept one is recovered exactly."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from pipeline.pruning.channels import analyse_channels
from pipeline.pruning.probe import channel_rows
from pipeline.pruning.recovery import recover
from pipeline.pruning.structured import remove_channels
from tests.unit.pruning.conftest import FeedForward, copy_model, run

Exported = Callable[[nn.Module, torch.Tensor], ir.Model]


class ConvPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 6, 3, padding=1)
        self.second = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def duplicate(layer: nn.Module, copy: int, of: int) -> None:
    """Output channel `copy` computes exactly what channel `of` does."""
    with torch.no_grad():
        layer.weight[copy] = layer.weight[of]  # type: ignore[index,operator]
        layer.bias[copy] = layer.bias[of]  # type: ignore[index,operator]


def prune_channel(model: ir.Model, producer: str, channel: int) -> tuple[ir.Model, list, dict]:
    """Remove one channel of the group `producer` heads; the model before, the sinks, the kept map."""
    original = copy_model(model)
    analysis = analyse_channels(model)
    group = next(g for g in analysis.groups if g.name == producer)
    kept = np.array([c for c in range(group.channels) if c != channel])
    remove_channels(model, analysis, {group.space: kept})
    return original, group.sinks, {}


@pytest.mark.parametrize(
    ("module", "producer", "shape"),
    [(ConvPair, "first", (4, 2, 6, 6)), (Mlp, "hidden", (64, 8)), (FeedForward, "up", (8, 5, 16))],
)
def test_duplicate_channel_is_recovered_exactly(
    exported: Exported, module: type[nn.Module], producer: str, shape: tuple[int, ...]
) -> None:
    net = module()
    duplicate(getattr(net, producer), copy=3, of=1)
    model = exported(net, torch.randn(*shape))
    original, sinks, kept_outputs = prune_channel(model, producer, channel=3)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    sliced = copy_model(model)

    (result,) = recover(original, model, sinks, batches, kept_outputs)

    assert result.skipped is None
    assert result.error_before > 0.05  # dropping the duplicate halves channel 1's contribution
    assert result.error_after < 1e-3
    x = rng.standard_normal(shape).astype(np.float32)  # data the fit never saw
    reference = run(original, x)
    assert np.abs(run(model, x) - reference).max() < 1e-3 * np.abs(reference).max()
    assert np.abs(run(sliced, x) - reference).max() > 1e-2 * np.abs(reference).max()


def test_recovery_keeps_weights_when_nothing_can_be_gained(exported: Exported) -> None:
    net = Mlp()
    with torch.no_grad():
        net.hidden.weight[3] = 0
        net.hidden.bias[3] = -1.0  # ReLU(-1) = 0: the channel is dead, slicing loses nothing
    model = exported(net, torch.randn(16, 8))
    original, sinks, kept_outputs = prune_channel(model, "hidden", channel=3)
    before = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items() if v.const_value}
    batches = [{"x": np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)}]

    (result,) = recover(original, model, sinks, batches, kept_outputs)

    assert result.error_before < 1e-6
    assert result.skipped is not None
    for name, array in before.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)  # type: ignore[union-attr]


def test_channel_rows_drop_padding_tokens() -> None:
    hidden = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [batch, sequence, channels]
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    rows = channel_rows(hidden, -1, mask)
    np.testing.assert_array_equal(rows, hidden[mask.astype(bool)])
    assert channel_rows(hidden, -1).shape == (6, 4)
    assert channel_rows(np.zeros((2, 5, 3, 3)), 1).shape == (18, 5)  # NCHW: channels last
