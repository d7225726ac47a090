"""A decoder's rotary cos / sin as constant tables over every position, run once instead of at every step.

The export computes the rotary embedding's half-width ``cos`` and ``sin`` [batch, sequence,
head_dim / 2] from ``position_ids`` at every decode step (``Unsqueeze``, ``Cast``, ``Mul`` by the
inverse frequencies, ``Cos`` / ``Sin``: five nodes a step whatever the model's size).
``RotaryEmbedding`` also takes tables of [positions, head_dim / 2] with the ``position_ids`` to look
up, as onnxruntime-genai's graphs do. `constant_table` runs the graph's own ops from
``position_ids`` to the table on ``0 .. positions - 1`` with ONNX's reference evaluator, when those
ops provably work position by position (elementwise ops and ``Unsqueeze``, on one int64 graph
input and constants): any rotary scaling the export traced (linear, NTK, Llama 3, YaRN factors in
the frequencies, ``attention_scaling`` as a ``Mul``) comes with them unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx.reference
import onnx_ir as ir

logger = logging.getLogger(__name__)

# Ops that map each position's values to that position's values (Unsqueeze only adds axes).
_PER_POSITION = frozenset({"Unsqueeze", "Cast", "Mul", "Div", "Add", "Sub", "Neg", "Cos", "Sin", "Identity"})
# A table larger than this stays computed each step: a 131,072-position context at head size 128
# takes 32 MiB a table in float32; a million positions would add 512 MiB to the model.
MAX_TABLE_BYTES = 64 << 20


def constant_table(table: ir.Value, positions: int) -> tuple[ir.Value, np.ndarray] | None:
    """`table` ([1 or batch, sequence, width]) for positions ``0 .. positions - 1``, and the graph
    input it is computed from.

    Args:
        table: A value computed per position from one int64 [batch, sequence] graph input.
        positions: How many positions the table covers (the model's ``max_position_embeddings``).

    Returns:
        (the ``position_ids`` input, the [positions, width] table), or None when `table` is not
        computed that way or the table would exceed `MAX_TABLE_BYTES`.
    """
    found = _position_cone(table)
    if found is None:
        return None
    nodes, source = found
    try:
        first = _evaluate(nodes, source, table, np.zeros((1, 1), dtype=np.int64))  # the row's size, cheaply
        if first.nbytes * positions > MAX_TABLE_BYTES:
            logger.info("rotary table of %d positions over %d bytes: computed each step", positions, MAX_TABLE_BYTES)
            return None
        values = _evaluate(nodes, source, table, np.arange(positions, dtype=np.int64)[None, :])
    except Exception as e:  # noqa: BLE001 - a constant that does not broadcast over every position: no table
        logger.info("rotary table not made (%s: %s); the caches stay computed each step", type(e).__name__, e)
        return None
    if values.ndim != 3 or values.shape[:2] != (1, positions):
        return None
    return source, np.ascontiguousarray(values[0])


def _position_cone(table: ir.Value) -> tuple[list[ir.Node], ir.Value] | None:
    """The nodes `table` is computed by (in order) and the one graph input they read, if every node
    is a per-position op whose other inputs are constants."""
    nodes: list[ir.Node] = []
    sources: set[ir.Value] = set()
    pending, seen = [table], set[ir.Value]()
    while pending:
        value = pending.pop()
        if value in seen or ir.convenience.get_const_tensor(value) is not None:
            continue
        seen.add(value)
        node = value.producer()
        if node is None:
            sources.add(value)
            continue
        if node.op_type not in _PER_POSITION or node.domain not in ("", "ai.onnx") or len(nodes) > 32:
            return None
        nodes.append(node)
        pending.extend(input_ for input_ in node.inputs if input_ is not None)
    source = next(iter(sources)) if len(sources) == 1 else None
    if not nodes or source is None or not source.is_graph_input() or not _int64_matrix(source):
        return None
    return _in_graph_order(nodes), source


def _int64_matrix(value: ir.Value) -> bool:
    return value.dtype == ir.DataType.INT64 and value.shape is not None and len(value.shape) == 2


def _in_graph_order(nodes: list[ir.Node]) -> list[ir.Node]:
    members = set(nodes)
    graph = nodes[0].graph
    assert graph is not None
    return [node for node in graph if node in members]


def _evaluate(nodes: list[ir.Node], source: ir.Value, output: ir.Value, feed: np.ndarray) -> np.ndarray:
    """Run copies of `nodes` in a graph of their own, `feed` in place of `source`."""
    positions = ir.Value(name="positions", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(feed.shape))
    copies: dict[ir.Value, ir.Value] = {source: positions}
    constants: list[ir.Value] = []
    replayed: list[ir.Node] = []
    for node in nodes:
        inputs: list[ir.Value | None] = []
        for value in node.inputs:
            if value is not None and value not in copies:  # a constant (the cone's other leaves)
                tensor = ir.convenience.get_const_tensor(value)
                copies[value] = ir.Value(name=f"constant_{len(constants)}", const_value=tensor)
                constants.append(copies[value])
            inputs.append(None if value is None else copies[value])
        copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), num_outputs=len(node.outputs))
        for before, after in zip(node.outputs, copy.outputs, strict=True):
            after.name = f"value_{len(copies)}"
            copies[before] = after
        replayed.append(copy)
    opset = nodes[0].graph.opset_imports.get("", 23) if nodes[0].graph is not None else 23
    graph = ir.Graph(
        [positions], [copies[output]], nodes=replayed, initializers=constants, opset_imports={"": opset}, name="table"
    )
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    outputs = onnx.reference.ReferenceEvaluator(proto).run(None, {"positions": feed})
    assert isinstance(outputs, list)  # a dict only for intermediate=True
    return np.asarray(outputs[0])
