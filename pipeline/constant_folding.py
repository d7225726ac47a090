"""Folding the constant subgraphs onnxscript's optimizer leaves, when folding does not grow the model.

onnxscript skips any node with a constant input over 8,192 elements, so a GRU's recurrent weight
(192 x 64), sliced into its gates and concatenated back in ONNX's gate order, stays as
Slice -> Concat -> Unsqueeze nodes. No per-node size rule can fold that chain: each Slice alone
adds a 64 x 64 tensor while the weight stays (the other Slices read it). Judged as one subgraph,
the chain replaces the weight with a tensor of the same size. So the rule here is per constant
subgraph (nodes computed only from initializers, linked by the values between them and by the
large initializers they share): it is folded when the tensors the rest of the graph reads from
it take at most `FOLD_GROWTH_CAP_BYTES` more than the initializers only it reads, which go with
it. An Expand / Tile / ConstantOfShape of a small constant into a large tensor stays a node.
The evaluation is onnxscript's (`fold_constants`, told which nodes to fold); a node of several
outputs (a Split of a weight), which onnxscript does not fold, is run by ONNX's reference evaluator.
Quantize / Dequantize nodes, random ops and If / Loop / Scan are never folded.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx.reference
import onnx_ir as ir
import onnxscript.optimizer

logger = logging.getLogger(__name__)

# How much bigger than the initializers it replaces a folded subgraph may be: 1 MiB, what
# onnxscript itself lets one folded node add (its output limit, 512 x 512 float32 elements).
FOLD_GROWTH_CAP_BYTES = 1 << 20
# Kept even on constant inputs: the quantization parameters are what these nodes carry.
_QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Where onnxscript's folding logs (its warning on several-output nodes is dropped while it runs).
_ONNXSCRIPT_FOLDING_LOGGER = "onnxscript.optimizer._constant_folding"
# Different values on each run: not constants, even with constant inputs.
_RANDOM_OPS = frozenset({"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"})


@dataclass(frozen=True)
class ConstantSubgraph:
    """Connected nodes computed only from constants, and what folding them would cost.

    Attributes:
        nodes: The nodes, in graph order.
        result_bytes: Bytes of the values the rest of the graph reads from them (None: a shape
            or type is not known, so the cost is not either).
        freed_bytes: Bytes of the initializers only these nodes read, dropped when they are folded.
    """

    nodes: tuple[ir.Node, ...]
    result_bytes: int | None
    freed_bytes: int

    @property
    def foldable(self) -> bool:
        """Whether folding grows the model by at most `FOLD_GROWTH_CAP_BYTES`."""
        return self.result_bytes is not None and self.result_bytes <= self.freed_bytes + FOLD_GROWTH_CAP_BYTES

    def describe(self) -> str:
        """E.g. ``Slice x3, Concat, Unsqueeze (49152 B from 49152 B)``, for the log."""
        ops = Counter(node.op_type for node in self.nodes)
        names = ", ".join(op if count == 1 else f"{op} x{count}" for op, count in ops.items())
        result = "unknown size" if self.result_bytes is None else f"{self.result_bytes} B"
        return f"{names} ({result} from {self.freed_bytes} B)"


def is_constant_node(node: ir.Node, constants: set[ir.Value] | None = None) -> bool:
    """Whether a node computes a constant: it has inputs, all constants, and is deterministic.

    Args:
        node: The node.
        constants: Values also taken as constants (outputs of constant nodes before them).
    """
    inputs = [value for value in node.inputs if value is not None]
    if not inputs or node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM_OPS | _QUANTIZATION_OPS:
        return False
    return all(_is_constant_value(value) or (constants is not None and value in constants) for value in inputs)


def constant_nodes_left(graph: ir.Graph) -> dict[str, int]:
    """Nodes of a graph whose inputs are all constants (initializers, Constant nodes), by op type."""
    return dict(sorted(Counter(node.op_type for node in graph if is_constant_node(node)).items()))


def constant_subgraphs(graph: ir.Graph) -> list[ConstantSubgraph]:
    """The constant subgraphs of a graph's main level, each with its folding cost."""
    members: list[ir.Node] = []
    constants: set[ir.Value] = set()
    for node in graph:  # graph order is topological: a node's constant inputs are known before it
        if is_constant_node(node, constants) and not _has_subgraphs(node):
            members.append(node)
            constants.update(node.outputs)
    groups = _linked_groups(members, constants)
    return [_costed(nodes) for nodes in groups]


class _SeveralOutputsWarning(logging.Filter):
    """Drops onnxscript's "Skipping constant folding for op Split with multiple outputs." warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that warning: `fold_constant_subgraphs` folds those nodes after the optimizer."""
        return "with multiple outputs" not in record.getMessage()


@contextmanager
def several_outputs_warning_dropped() -> Iterator[None]:
    """While the optimizer runs: its warning on several-output nodes would be wrong (they are folded next)."""
    source = logging.getLogger(_ONNXSCRIPT_FOLDING_LOGGER)
    quiet = _SeveralOutputsWarning()
    source.addFilter(quiet)
    try:
        yield
    finally:
        source.removeFilter(quiet)


def fold_constant_subgraphs(model: ir.Model) -> list[ConstantSubgraph]:
    """Fold, in place, every constant subgraph whose folding keeps within the size rule.

    Returns:
        The subgraphs kept by the size rule (not folded), for the log.
    """
    subgraphs = constant_subgraphs(model.graph)
    chosen = {node for subgraph in subgraphs if subgraph.foldable for node in subgraph.nodes}
    for subgraph in subgraphs:
        logger.debug("constant subgraph %s: %s", subgraph.describe(), "folded" if subgraph.foldable else "kept")
    while chosen and _fold_round(model, chosen):
        pass
    return [subgraph for subgraph in subgraphs if not subgraph.foldable]


def _fold_round(model: ir.Model, chosen: set[ir.Node]) -> bool:
    """onnxscript's folding of the chosen one-output nodes, then the chosen several-output nodes
    whose inputs are now constants; whether one of those was folded (what reads it is then next)."""
    single = {node for node in chosen if len(node.outputs) == 1}
    if single:
        # The choice is made here, so onnxscript's own size limits are lifted for the chosen nodes.
        onnxscript.optimizer.fold_constants(
            model, input_size_limit=sys.maxsize, output_size_limit=sys.maxsize, should_fold=single.__contains__
        )
    ready = [
        node
        for node in model.graph
        if node in chosen and len(node.outputs) > 1 and all(v is None or v.const_value is not None for v in node.inputs)
    ]
    return sum(_fold_several_outputs(model, node) for node in ready) > 0


def _fold_several_outputs(model: ir.Model, node: ir.Node) -> bool:
    """Replace a node of several outputs (a Split of a weight) by initializers; whether it was.

    onnxscript folds one-output nodes only, so these are evaluated here, by ONNX's reference
    implementation (what onnxscript evaluates with).
    """
    feeds = {
        value.name: value.const_value.numpy()
        for value in node.inputs
        if value is not None and value.name is not None and value.const_value is not None
    }
    try:
        evaluator = onnx.reference.ReferenceEvaluator(ir.serde.serialize_node(node), opsets=dict(model.opset_imports))
        arrays = evaluator.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - an op it cannot run stays a node, listed as kept
        logger.info("constant %s %r not folded: %s: %s", node.op_type, node.name, type(e).__name__, e)
        return False
    graph = model.graph
    folded = []
    for output, array in zip(node.outputs, arrays, strict=True):
        numbers = np.asarray(array)
        tensor = ir.tensor(numbers, name=output.name)
        shape = ir.Shape(numbers.shape)
        value = ir.Value(name=output.name, type=ir.TensorType(tensor.dtype), shape=shape, const_value=tensor)
        graph.register_initializer(value)
        folded.append(value)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [], list(node.outputs), folded)
    return True


def _has_subgraphs(node: ir.Node) -> bool:
    """An If / Loop / Scan: neither onnxscript nor this module folds one (it is reported as kept)."""
    graphs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    return any(attr.type in graphs for attr in node.attributes.values())


def _is_constant_value(value: ir.Value) -> bool:
    if value.is_graph_input():
        return False  # an initializer that is also an input can be fed: not a constant
    producer = value.producer()
    if producer is not None:
        return producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")
    return value.const_value is not None


def _linked_groups(members: list[ir.Node], computed: set[ir.Value]) -> list[tuple[ir.Node, ...]]:
    """Members linked by a value one computes and another reads, or by a large initializer both read.

    Small shared initializers (axes, shapes, scalars) link nothing: they would join unrelated
    chains, and leaving one in place costs little.
    """
    parent = {node: node for node in members}

    def root(node: ir.Node) -> ir.Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    first_reader: dict[ir.Value, ir.Node] = {}
    for node in members:
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if value in computed and producer is not None:
                parent[root(node)] = root(producer)
            elif _tensor_bytes(value) > FOLD_GROWTH_CAP_BYTES:
                parent[root(node)] = root(first_reader.setdefault(value, node))
    groups: dict[ir.Node, list[ir.Node]] = {}
    for node in members:
        groups.setdefault(root(node), []).append(node)
    return [tuple(nodes) for nodes in groups.values()]


def _costed(nodes: tuple[ir.Node, ...]) -> ConstantSubgraph:
    """A subgraph with the bytes folding would write and the bytes it would drop."""
    inside = set(nodes)
    computed = {value for node in nodes for value in node.outputs}
    read_outside = [value for value in computed if value.is_graph_output() or _read_by_others(value, inside)]
    sizes = [_value_bytes(value) for value in read_outside]
    sources = {value for node in nodes for value in node.inputs if value is not None and value not in computed}
    freed = sum(
        _tensor_bytes(value) for value in sources if not value.is_graph_output() and not _read_by_others(value, inside)
    )
    result = None if any(size is None for size in sizes) else sum(size for size in sizes if size is not None)
    return ConstantSubgraph(nodes=nodes, result_bytes=result, freed_bytes=freed)


def _read_by_others(value: ir.Value, inside: set[ir.Node]) -> bool:
    return any(use.node not in inside for use in value.uses())


def _value_bytes(value: ir.Value) -> int | None:
    """Bytes of a value from its inferred type and shape (None: not known)."""
    if value.shape is None or value.dtype is None or not value.shape.is_static():
        return None
    try:
        return math.ceil(math.prod(value.shape.numpy()) * value.dtype.itemsize)
    except TypeError:  # strings have no fixed size
        return None


def _tensor_bytes(value: ir.Value) -> int:
    """Bytes of a constant's tensor (an initializer's or a Constant node's), 0 when not known."""
    tensor = value.const_value
    if tensor is None and (producer := value.producer()) is not None and "value" in producer.attributes:
        tensor = producer.attributes["value"].as_tensor()
    return tensor.nbytes if tensor is not None else 0
