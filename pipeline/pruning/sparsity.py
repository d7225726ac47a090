"""Unstructured and N:M weight sparsity: zero the smallest weights of Conv, Gemm and MatMul layers.

Zeros are stored densely, so the graph does not shrink and ONNX Runtime's CPU provider runs it
at dense speed; what sparsity buys is size once the file is compressed, and (for 2:4 along the
input channels) the layout sparse tensor cores accept (TensorRT with sparsity enabled).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from pipeline.pruning.channels import constant, layer_name, weight_axes
from pipeline.pruning.structured import own_input, set_constant

Pattern = Literal["unstructured", "n:m"]


@dataclass(frozen=True)
class LayerSparsity:
    """What sparsity did to one layer.

    Attributes:
        node: The node's name.
        layer: Its readable layer name.
        parameters: Weight elements.
        zeros: Zero weights after pruning.
        skipped: Why the layer was left dense (None: pruned).
    """

    node: str
    layer: str
    parameters: int
    zeros: int
    skipped: str | None = None

    @property
    def sparsity(self) -> float:
        """Share of zero weights."""
        return self.zeros / self.parameters if self.parameters else 0.0


def sparsify(
    model: ir.Model,
    pattern: Pattern,
    ratio: float,
    n: int,
    m: int,
    scope: Literal["layer", "global"],
    skip: Callable[[ir.Node], bool],
) -> list[LayerSparsity]:
    """Zero weights in place by magnitude.

    Args:
        model: The model.
        pattern: ``unstructured`` (the smallest `ratio` of weights) or ``n:m`` (in every run of
            `m` consecutive weights along the input channels, keep the `n` largest).
        ratio: Share of weights to zero (unstructured).
        n: Weights kept per run (n:m).
        m: Run length (n:m).
        scope: ``layer``: each layer loses `ratio` of its weights; ``global``: one magnitude
            threshold over all layers, so layers with many small weights lose more.
        skip: Layers to leave dense.

    Returns:
        One entry per Conv / Gemm / MatMul layer with a constant weight.
    """
    layers = [node for node in model.graph if _weight_axis(node) is not None]
    eligible = [node for node in layers if not skip(node)]
    threshold = None
    if pattern == "unstructured" and scope == "global" and eligible:
        magnitudes = np.concatenate([np.abs(constant(node.inputs[1])).ravel() for node in eligible])  # type: ignore[arg-type]
        threshold = _threshold(magnitudes, ratio)
    results = []
    for node in layers:
        weight = constant(node.inputs[1])
        assert weight is not None
        name = node.name or ""
        if node not in eligible:
            results.append(LayerSparsity(name, layer_name(node), weight.size, int((weight == 0).sum()), "skipped"))
            continue
        if pattern == "n:m":
            axis = _weight_axis(node)
            assert axis is not None
            if weight.shape[axis] % m:
                reason = f"{weight.shape[axis]} input channels are not a multiple of {m}"
                results.append(LayerSparsity(name, layer_name(node), weight.size, int((weight == 0).sum()), reason))
                continue
            pruned = n_of_m(weight, axis, n, m)
        else:
            limit = threshold if threshold is not None else _threshold(np.abs(weight).ravel(), ratio)
            pruned = np.where(np.abs(weight) <= limit, 0, weight).astype(weight.dtype)
        set_constant(own_input(model.graph, node, 1), pruned)
        results.append(LayerSparsity(name, layer_name(node), weight.size, int((pruned == 0).sum())))
    return results


def n_of_m(weight: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Keep the `n` largest-magnitude weights of every `m` consecutive ones along `axis`."""
    moved = np.moveaxis(weight, axis, -1)
    runs = moved.reshape(-1, m)
    # Stable order: among equal magnitudes the earlier weight is kept, so results are deterministic.
    order = np.argsort(-np.abs(runs), axis=1, kind="stable")
    mask = np.zeros_like(runs, dtype=bool)
    np.put_along_axis(mask, order[:, :n], True, axis=1)
    return np.moveaxis(np.where(mask, runs, 0).reshape(moved.shape), -1, axis).astype(weight.dtype)


def follows_n_of_m(weight: np.ndarray, axis: int, n: int, m: int) -> bool:
    """Whether every run of `m` weights along `axis` has at most `n` non-zeros."""
    runs = np.moveaxis(weight, axis, -1).reshape(-1, m)
    return bool(((runs != 0).sum(axis=1) <= n).all())


def compressed_weight_bytes(model: ir.Model) -> tuple[int, int]:
    """Weight bytes of the model as stored, and after zlib (what sparsity saves on disk or the wire)."""
    raw = compressed = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            data = value.const_value.tobytes()
            raw += len(data)
            compressed += len(zlib.compress(data, 6))
    return raw, compressed


def _weight_axis(node: ir.Node) -> int | None:
    """The weight axis holding a layer's input channels (None: not a layer with constant weights)."""
    weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim < 2 or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv" or (node.op_type in ("Gemm", "MatMul") and weight.ndim == 2):
        return weight_axes(node)[0]
    return None


def _threshold(magnitudes: np.ndarray, ratio: float) -> float:
    """The magnitude at or below which `ratio` of the weights lie (-1 when none are to go)."""
    count = int(round(ratio * magnitudes.size))
    if count <= 0:
        return -1.0
    return float(np.partition(magnitudes, count - 1)[count - 1])
