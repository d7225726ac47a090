"""Training-free recovery: re-fit the layers after removed channels by least squares.

For each layer that reads pruned channels (a *sink*), in graph order, the pruned model's inputs
to it X' and the unpruned model's outputs of it Y are streamed over the calibration data into
the normal equations [X' 1]^T [X' 1] and [X' 1]^T Y. Solving them gives the weights (and bias)
that make the pruned layer reproduce the unpruned layer's output as closely as a linear map of
what is left can. Sinks are fitted one after another, so each sees its predecessors' new weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F  # the conventional name

from pipeline.pruning.channels import Sink, attribute, constant, weight_axes
from pipeline.pruning.probe import Probe, channel_rows
from pipeline.pruning.structured import own_input, set_constant

logger = logging.getLogger(__name__)

# Rows (output positions) a batch adds to the normal equations; more are sampled down.
MAX_ROWS_PER_BATCH = 8192
# Share of rows held out to choose the ridge strength (and to report the errors on).
HOLDOUT_SHARE = 0.2
# Ridge strengths tried, relative to the mean diagonal of X'^T X.
STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Below this relative error the sliced layer is already exact; a re-fit must gain at least this share.
EXACT = 1e-6
MIN_GAIN = 1e-3


@dataclass(frozen=True)
class RecoveryResult:
    """How well one sink reproduces the unpruned outputs, before and after its re-fit.

    Errors are measured on calibration rows held out of the fit.

    Attributes:
        node: The sink node's name.
        error_before: Relative error ||Y' - Y|| / ||Y|| with the weights merely sliced.
        error_after: The same after the re-fit.
        rows: Output positions the fit used (held-out ones included).
        skipped: Why the sink was not re-fitted (None: it was).
    """

    node: str
    error_before: float
    error_after: float
    rows: int
    skipped: str | None = None


class _NormalEquations:
    """Streaming sums for least squares with an intercept column."""

    def __init__(self, features: int, outputs: int) -> None:
        self.gram = np.zeros((features + 1, features + 1))
        self.cross = np.zeros((features + 1, outputs))
        self.target_energy = 0.0
        self.rows = 0

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        augmented = np.hstack([inputs.astype(np.float64), np.ones((inputs.shape[0], 1))])
        self.gram += augmented.T @ augmented
        self.cross += augmented.T @ targets.astype(np.float64)
        self.target_energy += float((targets.astype(np.float64) ** 2).sum())
        self.rows += inputs.shape[0]

    def merged(self, other: _NormalEquations) -> _NormalEquations:
        total = _NormalEquations(self.gram.shape[0] - 1, self.cross.shape[1])
        total.gram, total.cross = self.gram + other.gram, self.cross + other.cross
        total.target_energy, total.rows = self.target_energy + other.target_energy, self.rows + other.rows
        return total

    def relative_error(self, solution: np.ndarray) -> float:
        """||[X 1] W - Y|| / ||Y|| from the sums alone."""
        residual = (solution * (self.gram @ solution)).sum() - 2 * (solution * self.cross).sum() + self.target_energy
        return float(np.sqrt(max(residual, 0.0) / max(self.target_energy, 1e-30)))

    def solve(self, start: np.ndarray, strength: float, with_intercept: bool) -> np.ndarray:
        """Ridge least squares pulled towards `start` (the sliced weights), not towards zero.

        With little data the solution stays near the weights the model already had instead of
        over-fitting the calibration rows.
        """
        features = self.gram.shape[0] - 1
        size = features + 1 if with_intercept else features
        damping = strength * max(float(np.mean(np.diag(self.gram)[:features])), 1e-12)
        rhs = self.cross[:size] + damping * start[:size]
        if not with_intercept:
            rhs = rhs - np.outer(self.gram[:size, features], start[features])
        solution = np.linalg.solve(self.gram[:size, :size] + damping * np.eye(size), rhs)
        return solution if with_intercept else np.vstack([solution, start[features:]])


class _Split:
    """Normal equations of the fit rows and of the held-out rows."""

    def __init__(self, features: int, outputs: int) -> None:
        self.fit = _NormalEquations(features, outputs)
        self.holdout = _NormalEquations(features, outputs)
        self._rng = np.random.default_rng(0)

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        if inputs.shape[0] > MAX_ROWS_PER_BATCH:
            chosen = np.sort(self._rng.choice(inputs.shape[0], MAX_ROWS_PER_BATCH, replace=False))
            inputs, targets = inputs[chosen], targets[chosen]
        held = self._rng.random(inputs.shape[0]) < HOLDOUT_SHARE
        self.fit.add(inputs[~held], targets[~held])
        self.holdout.add(inputs[held], targets[held])

    def best(self, start: np.ndarray, with_intercept: bool) -> tuple[np.ndarray | None, float, float]:
        """The re-fit on all rows at the strength that did best on the held-out rows.

        Returns:
            The solution (None when no strength beats the sliced weights), and the held-out
            errors of the sliced weights and of the chosen strength's fit.
        """
        before = self.holdout.relative_error(start)
        trials = [(self.holdout.relative_error(self.fit.solve(start, s, with_intercept)), s) for s in STRENGTHS]
        error, strength = min(trials)
        if not np.isfinite(error) or before <= EXACT or error >= before * (1 - MIN_GAIN):
            return None, before, before
        return self.fit.merged(self.holdout).solve(start, strength, with_intercept), before, error


def recover(
    original: ir.Model,
    pruned: ir.Model,
    sinks: list[Sink],
    batches: Iterable[Mapping[str, np.ndarray]],
    kept_outputs: Mapping[str, np.ndarray],
    mask_input: str | None = None,
) -> list[RecoveryResult]:
    """Re-fit every sink's weights (and bias) of `pruned` in place, in graph order.

    Args:
        original: The model before pruning (shape-inferred); its sink outputs are the targets.
        pruned: The pruned model, with the same node and tensor names.
        sinks: The sinks whose input channels were removed.
        batches: Calibration feed dicts; iterated once per sink.
        kept_outputs: Output channels kept, by node name, for sinks whose own outputs were
            pruned too (their targets are those channels of the unpruned output).
        mask_input: The input holding a [batch, sequence] token mask: only real tokens' rows
            enter the fit.

    Returns:
        One result per sink.
    """
    by_name = {node.name: node for node in pruned.graph}
    order = {node.name: index for index, node in enumerate(pruned.graph)}
    results = []
    for sink in sorted(sinks, key=lambda s: order[s.node.name or ""]):
        node = by_name[sink.node.name or ""]
        why_not = _unsupported(node)
        if why_not is not None:
            results.append(RecoveryResult(node.name or "", float("nan"), float("nan"), 0, why_not))
            continue
        results.append(_refit(node, original, pruned, batches, kept_outputs.get(node.name or ""), mask_input))
    return results


def _refit(
    node: ir.Node,
    original: ir.Model,
    pruned: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    kept_outputs: np.ndarray | None,
    mask_input: str | None,
) -> RecoveryResult:
    data = node.inputs[0]
    assert data is not None
    bias_slot = _bias_slot(node)
    # The fit reproduces the layer's output with its bias: a bias in a following Add counts.
    output = bias_slot[0].outputs[0] if bias_slot is not None else node.outputs[0]
    weights = _as_matrix(node)
    equations = _Split(weights.shape[0], weights.shape[1])
    # Probes expose one tensor each, so only the layers up to this one run.
    inputs = Probe(pruned, [data.name or ""])
    targets = Probe(original, [output.name or ""])
    for feeds in batches:
        mask = feeds.get(mask_input) if mask_input and node.op_type != "Conv" else None
        x = _rows(node, inputs.run(feeds)[data.name or ""], mask)
        y = channel_rows(targets.run(feeds)[output.name or ""], 1 if node.op_type == "Conv" else -1, mask)
        equations.add(x, y if kept_outputs is None else y[:, kept_outputs])
    current = np.vstack([weights, _current_bias(node, bias_slot, weights.shape[1])[None, :]])
    solution, before, after = equations.best(current, with_intercept=bias_slot is not None)
    rows = equations.fit.rows + equations.holdout.rows
    if solution is None:
        logger.info("recovery %s: no re-fit lowers the held-out error (%.4f); weights kept", node.name, before)
        return RecoveryResult(node.name or "", before, before, rows, "no re-fit lowered the held-out error")
    _write_back(node, pruned.graph, solution, bias_slot)
    logger.info("recovery %s: held-out relative error %.4f -> %.4f (%d rows)", node.name, before, after, rows)
    return RecoveryResult(node.name or "", before, after, rows)


def _unsupported(node: ir.Node) -> str | None:
    if node.op_type == "Conv":
        weight = constant(node.inputs[1])
        auto_pad = node.attributes.get("auto_pad")
        if weight is None or weight.ndim != 4:
            return "only 2-D convolutions are re-fitted"
        if attribute(node, "group", 1) != 1:
            return "grouped convolutions are not re-fitted"
        if auto_pad is not None and auto_pad.value not in ("NOTSET", ""):
            return "convolutions with auto_pad are not re-fitted"
    if node.op_type == "Gemm":
        alpha, beta = node.attributes.get("alpha"), node.attributes.get("beta")
        if (alpha is not None and alpha.value != 1.0) or (beta is not None and beta.value != 1.0):
            return "Gemm with alpha or beta other than 1 is not re-fitted"
    return None


def _as_matrix(node: ir.Node) -> np.ndarray:
    """The weights as [input features, outputs]: what multiplies a row of inputs."""
    weight = constant(node.inputs[1])
    assert weight is not None
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    return weight.T if _transposed(node) else weight


def _transposed(node: ir.Node) -> bool:
    """Whether a Gemm stores its weight as [outputs, inputs] (transB)."""
    return node.op_type == "Gemm" and weight_axes(node)[0] == 1


def _rows(node: ir.Node, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Inputs as rows of features: im2col patches for a Conv, last axis otherwise."""
    if node.op_type != "Conv":
        return channel_rows(x, -1, mask)
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    kernel = tuple(constant(node.inputs[1]).shape[2:])  # type: ignore[union-attr]
    top, left, bottom, right = attributes.get("pads", (0, 0, 0, 0))
    tensor = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    patches = F.unfold(
        tensor,
        kernel_size=kernel,
        dilation=tuple(attributes.get("dilations", (1, 1))),
        stride=tuple(attributes.get("strides", (1, 1))),
    )
    return patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()


def _bias_slot(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where the layer's bias lives: its own input 2, or the constant of a single following Add."""
    if node.op_type in ("Conv", "Gemm"):
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        array = constant(bias)
        usable = bias is None or (array is not None and array.ndim == 1)
        return (node, 2) if usable else None
    consumers = node.outputs[0].consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Add" and not node.outputs[0].is_graph_output():
        add = consumers[0]
        for index, value in enumerate(add.inputs):
            array = constant(value)
            if array is not None and array.ndim == 1:
                return (add, index)
    return None


def _current_bias(node: ir.Node, slot: tuple[ir.Node, int] | None, outputs: int) -> np.ndarray:
    if slot is None:
        return np.zeros(outputs)
    owner, index = slot
    array = constant(owner.inputs[index]) if index < len(owner.inputs) else None
    return np.zeros(outputs) if array is None else np.broadcast_to(array, (outputs,)).astype(np.float64)


def _write_back(node: ir.Node, graph: ir.Graph, solution: np.ndarray, slot: tuple[ir.Node, int] | None) -> None:
    weight = constant(node.inputs[1])
    assert weight is not None
    matrix = solution[:-1].astype(weight.dtype)
    if node.op_type == "Conv":
        fitted = matrix.T.reshape(weight.shape)
    elif _transposed(node):
        fitted = np.ascontiguousarray(matrix.T)
    else:
        fitted = matrix
    set_constant(own_input(graph, node, 1), fitted)
    if slot is None:
        return
    owner, index = slot
    bias = solution[-1].astype(weight.dtype)
    if index < len(owner.inputs) and owner.inputs[index] is not None:
        set_constant(own_input(graph, owner, index), bias)
    else:
        value = ir.Value(name=f"{node.name}.recovered_bias", shape=ir.Shape(bias.shape), type=node.inputs[1].type)  # type: ignore[union-attr]
        value.const_value = ir.tensor(bias, name=value.name)
        graph.register_initializer(value)
        owner.resize_inputs(index + 1)
        owner.replace_input_with(index, value)
