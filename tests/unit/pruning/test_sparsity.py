"""Weight sparsity: the 2:4 pattern holds, unstructured ratios are met, and it is honest about size."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from pipeline.pruning.channels import constant
from pipeline.pruning.sparsity import compressed_weight_bytes, follows_n_of_m, n_of_m, sparsify
from tests.unit.pruning.conftest import BranchNet, ResidualNet, copy_model, run


def never(node: ir.Node) -> bool:
    return False


@pytest.fixture
def residual(exported) -> ir.Model:  # type: ignore[no-untyped-def]
    return exported(ResidualNet(), torch.randn(2, 3, 8, 8))


def test_two_of_four_along_input_channels(residual: ir.Model) -> None:
    layers = sparsify(residual, "n:m", 0.0, 2, 4, "layer", never)
    by_layer = {layer.layer: layer for layer in layers}
    # stem reads 3 input channels: not a multiple of 4, left dense with the reason.
    assert by_layer["stem"].skipped is not None and "multiple of 4" in by_layer["stem"].skipped
    for name in ("body1", "body2", "head", "fc"):
        assert by_layer[name].skipped is None
        assert by_layer[name].sparsity == pytest.approx(0.5)
    node = next(n for n in residual.graph if n.op_type == "Conv" and n.inputs[1].name == "body1.weight")  # type: ignore[union-attr]
    weight = constant(node.inputs[1])
    assert weight is not None and follows_n_of_m(weight, 1, 2, 4)


def test_n_of_m_keeps_the_largest() -> None:
    weight = np.array([[0.1, -5.0, 2.0, 0.3, 1.0, 1.0, -1.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(n_of_m(weight, 1, 2, 4), [[0, -5.0, 2.0, 0, 1.0, 1.0, 0, 0]])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_ratio_is_met(residual: ir.Model, scope: str) -> None:
    original = copy_model(residual)
    raw_before, compressed_before = compressed_weight_bytes(residual)
    layers = sparsify(residual, "unstructured", 0.7, 2, 4, scope, never)  # type: ignore[arg-type]
    zeros = sum(layer.zeros for layer in layers)
    parameters = sum(layer.parameters for layer in layers)
    assert zeros / parameters == pytest.approx(0.7, abs=0.01)
    if scope == "layer":
        assert all(layer.sparsity == pytest.approx(0.7, abs=0.02) for layer in layers)
    raw_after, compressed_after = compressed_weight_bytes(residual)
    assert raw_after == raw_before  # dense zeros: the stored size does not change
    assert compressed_after < 0.75 * compressed_before
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert run(residual, x).shape == run(original, x).shape


def test_skipped_layers_stay_dense(exported) -> None:  # type: ignore[no-untyped-def]
    model = exported(BranchNet(), torch.randn(1, 3, 6, 6))
    layers = sparsify(model, "unstructured", 0.5, 2, 4, "layer", lambda node: node.op_type == "Conv")
    assert all(layer.skipped == "skipped" and layer.zeros == 0 for layer in layers)
