"""Channel analysis and removal on real exported models: skip connections, concat, depthwise,
flatten into a Gemm, a transformer FFN. Dead channels (all-zero weights and bias) contribute
nothing, so removing exactly them must leave the outputs unchanged: a strict parity check of
every slice the pass makes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from pipeline.pruning.channels import ChannelAnalysis, analyse_channels, layer_name
from pipeline.pruning.importance import weight_scores
from pipeline.pruning.structured import choose_channels, global_kept_counts, kept_count, remove_channels
from tests.unit.pruning.conftest import BranchNet, FeedForward, GroupedNet, ResidualNet, copy_model, run

Exported = Callable[[nn.Module, torch.Tensor], ir.Model]


def kill(layer: nn.Conv2d | nn.Linear, channels: list[int]) -> None:
    """Make output channels dead: zero weights and bias."""
    with torch.no_grad():
        layer.weight[channels] = 0
        assert layer.bias is not None
        layer.bias[channels] = 0


def prune_dead(model: ir.Model) -> tuple[ChannelAnalysis, dict[str, int]]:
    """Remove every zero-score channel of every prunable group; channel counts kept by group name."""
    analysis = analyse_channels(model)
    kept = {}
    for group in analysis.groups:
        if group.blocked is None:
            scores = weight_scores(group, "l1")
            kept[group.space] = choose_channels(scores, int((scores > 0).sum()))
    remove_channels(model, analysis, kept)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    return analysis, {group.name: len(kept.get(group.space, range(group.channels))) for group in analysis.groups}


def weight_shapes(model: ir.Model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(v.shape) for name, v in model.graph.initializers.items() if v.shape is not None}


def test_skip_connection_ties_both_sides_and_keeps_outputs(exported: Exported) -> None:
    net = ResidualNet()
    kill(net.stem, [2, 5, 11])
    kill(net.body2, [2, 5, 11])  # the skip adds stem and body2 channel by channel
    kill(net.body1, [0, 7])
    kill(net.head, [3])
    model = exported(net, torch.randn(2, 3, 8, 8))
    original = copy_model(model)
    analysis, kept = prune_dead(model)

    tied = next(g for g in analysis.groups if g.name == "stem")
    assert {layer_name(node) for node in tied.producers} == {"stem", "body2"}
    assert kept == {"stem": 13, "body1": 10, "head": 7, "fc": 5}
    shapes = weight_shapes(model)
    assert shapes["stem.weight"] == (13, 3, 3, 3)
    assert shapes["body1.weight"] == (10, 13, 3, 3)
    assert shapes["body2.weight"] == (13, 10, 3, 3)
    assert shapes["head.weight"] == (7, 13, 1, 1)
    assert shapes["fc.weight"] == (5, 7 * 4 * 4)  # flatten: 16 positions per head channel
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), run(original, x), atol=1e-5)


def test_concat_offsets_and_depthwise_follow(exported: Exported) -> None:
    net = BranchNet()
    kill(net.left, [1])
    kill(net.right, [4])
    with torch.no_grad():  # the depthwise filters of dead channels must add nothing either
        net.depthwise.bias[[1, 8 + 4]] = 0
    model = exported(net, torch.randn(2, 3, 6, 6))
    original = copy_model(model)
    _, kept = prune_dead(model)

    assert kept["left"] == 7 and kept["right"] == 5
    shapes = weight_shapes(model)
    assert shapes["depthwise.weight"] == (12, 1, 3, 3)
    assert shapes["out.weight"] == (4, 12, 1, 1)
    depthwise = next(node for node in model.graph if node.op_type == "Conv" and node.attributes["group"].value > 1)
    assert depthwise.attributes["group"].value == 12
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), run(original, x), atol=1e-5)


def test_transformer_ffn_prunes_hidden_neurons_only(exported: Exported) -> None:
    net = FeedForward()
    kill(net.up, [0, 10, 20, 30])
    model = exported(net, torch.randn(2, 5, 16))
    original = copy_model(model)
    analysis, kept = prune_dead(model)

    assert kept["up"] == 44
    down = next(g for g in analysis.groups if g.name == "down")
    assert down.blocked is not None and "not pruned" in down.blocked  # the residual adds the unpruned input
    x = np.random.default_rng(2).standard_normal((4, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), run(original, x), atol=1e-5)


def test_dynamic_batch_survives_pruning(exported: Exported) -> None:
    model = exported(ResidualNet(), torch.randn(2, 3, 8, 8))
    analysis = analyse_channels(model)
    kept = {g.space: choose_channels(weight_scores(g, "l2"), g.channels // 2) for g in analysis.groups if not g.blocked}
    remove_channels(model, analysis, kept)
    for batch in (1, 5):
        assert run(model, np.zeros((batch, 3, 8, 8), np.float32)).shape == (batch, 5)
    assert not isinstance(model.graph.inputs[0].shape[0], int)


def test_blocked_groups_say_why(exported: Exported) -> None:
    analysis = analyse_channels(exported(BranchNet(), torch.randn(2, 3, 6, 6)))
    reasons = {g.name: g.blocked for g in analysis.groups}
    assert reasons["left"] is None and reasons["right"] is None
    assert "ReduceMean" in (reasons["out"] or "")
    analysis = analyse_channels(exported(ResidualNet(), torch.randn(2, 3, 8, 8)))
    assert "graph output" in (next(g for g in analysis.groups if g.name == "fc").blocked or "")


@pytest.mark.parametrize(
    ("channels", "ratio", "round_to", "expected"),
    [(64, 0.5, 1, 32), (64, 0.3, 8, 48), (10, 0.99, 1, 1), (12, 0.5, 16, 12), (1536, 0.3, 1, 1075)],
)
def test_kept_count_rounds_to_hardware_multiples(channels: int, ratio: float, round_to: int, expected: int) -> None:
    assert kept_count(channels, ratio, round_to) == expected


def test_choose_channels_keeps_the_best_in_order() -> None:
    assert choose_channels(np.array([0.1, 3.0, 0.5, 2.0, 0.5]), 3).tolist() == [1, 2, 3]


def test_global_ranking_removes_the_share_across_layers() -> None:
    rng = np.random.default_rng(0)
    scores = {0: rng.random(32) * 10, 1: rng.random(64), 2: np.r_[np.full(56, 0.01), np.ones(8)]}
    counts = global_kept_counts(scores, 0.5, {0: 1, 1: 1, 2: 1})
    assert abs(sum(counts.values()) - 80) <= 2  # half of 160 channels, up to ties
    assert counts[2] == 8  # the layer whose channels are mostly idle loses most
    assert all(count >= 1 for count in counts.values())
    assert global_kept_counts(scores, 0.0, {0: 8, 1: 8, 2: 8}) == {0: 32, 1: 64, 2: 64}
    assert all(count % 8 == 0 for count in global_kept_counts(scores, 0.5, {0: 8, 1: 8, 2: 8}).values())


def test_grouped_convolution_loses_the_same_count_per_group(exported: Exported) -> None:
    net = GroupedNet()
    kill(net.first, [1, 6, 9, 12])  # one dead input channel in each of the 4 groups of 4
    kill(net.grouped, [0, 3, 5, 7])  # one dead output channel in each of the 4 groups of 2
    model = exported(net, torch.randn(2, 3, 6, 6))
    original = copy_model(model)
    analysis = analyse_channels(model)
    first = next(g for g in analysis.groups if g.name == "first")
    grouped = next(g for g in analysis.groups if g.name == "grouped")
    assert (first.partitions, grouped.partitions) == (4, 4)
    kept = {
        g.space: choose_channels(weight_scores(g, "l1"), 12 if g is first else 4, g.partitions)
        for g in (first, grouped)
    }
    assert kept[first.space].tolist() == [0, 2, 3, 4, 5, 7, 8, 10, 11, 13, 14, 15]
    remove_channels(model, analysis, kept)
    shapes = weight_shapes(model)
    assert shapes["first.weight"] == (12, 3, 3, 3)
    assert shapes["grouped.weight"] == (4, 3, 3, 3)  # 4 groups, 3 inputs and 1 output each
    assert shapes["last.weight"] == (2, 4, 1, 1)
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), run(original, x), atol=1e-5)


def test_kept_counts_honour_grouped_blocks() -> None:
    scores = np.array([5, 1, 1, 1, 1, 1, 1, 5], dtype=float)  # two blocks of 4
    assert choose_channels(scores, 2, partitions=2).tolist() == [0, 7]
