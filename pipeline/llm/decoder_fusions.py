"""Decoder graph fusions on onnx-ir: rotary attention with its cache, and residual + RMS norm.

The decoder export (`pipeline.llm.export_kernels`) writes each layer's attention as one opset-23
``Attention`` on heads-first tensors, with the projections reshaped and transposed to heads, the
rotary embedding spelled out as ``x * cos + rotate_half(x) * sin`` and the cache grown by
``Concat``: some 25 nodes a layer that run at every decode step. `fuse_rotary_attention` folds
each layer's into three: ``RotaryEmbedding`` on the query and on the key (opset 23, taking the
projections as they come, ``[batch, sequence, heads * head_dim]``) and an ``Attention`` that takes
the past key and value and returns the present ones itself; with the model's length known, the
rotary's cos / sin are constant tables looked up by ``position_ids`` (`pipeline.llm.rotary_tables`).
`fuse_skip_rms_norm` folds a residual
``Add`` and the ``RMSNormalization`` of its sum into ONNX Runtime's
``SkipSimplifiedLayerNormalization``, which also returns the sum for the next residual.

Both match structurally and only what they can prove: the rotary's two halves of ``cos`` and
``sin`` must come from one ``Concat(freqs, freqs)`` (what ``RotaryEmbedding``'s half-width caches
assume), the slices must be the two halves of the head, the transposes heads-first. Anything else
stays as it is; the validate stage checks every model against PyTorch either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from pipeline.llm.rotary_tables import constant_table

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# The first opset with Attention, RotaryEmbedding and RMSNormalization (what the export swaps in
# and these fusions write).
ATTENTION_OPSET = 23
_HEADS_FIRST = (0, 2, 1, 3)
# Ops that carry the cos / sin table from its Concat(freqs, freqs) to the rotary's Mul unchanged
# per half (transformers scales it by attention_scaling, casts it, adds the heads axis).
_HALF_PRESERVING = frozenset({"Unsqueeze", "Cast", "Mul", "Identity"})


@dataclass(frozen=True)
class FusionCounts:
    """What the decoder fusions folded.

    Attributes:
        attention: Layers whose rotary, cache Concat and attention became three nodes.
        skip_norm: Residual Add + RMSNormalization pairs fused.
        rotary_tables: cos / sin pairs made constant tables looked up by position.
    """

    attention: int = 0
    skip_norm: int = 0
    rotary_tables: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by the names records use."""
        return {
            "rotary_attention": self.attention,
            "skip_rms_norm": self.skip_norm,
            "constant_rotary_tables": self.rotary_tables,
        }


@dataclass(frozen=True)
class _Rotary:
    """``x * cos + rotate_half(x) * sin`` on heads-first `heads`."""

    heads: ir.Value
    cos: ir.Value
    sin: ir.Value


@dataclass(frozen=True)
class _AttentionMatch:
    node: ir.Node
    query: ir.Value  # [batch, sequence, heads * head_dim], before the rotary
    key: ir.Value
    value: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value
    present_value: ir.Value
    merge: ir.Node  # the Reshape that merges the heads of the output again
    query_heads: int
    kv_heads: int
    rotary: _Rotary | None  # None: no rotary embedding (learned positions, GPT-2)


def fuse_decoder(model: ir.Model, max_positions: int | None = None) -> FusionCounts:
    """Both fusions, where the graph has what they match; the dead nodes are left for the caller's
    dead-node pass.

    Args:
        model: The decoder's graph, changed in place.
        max_positions: The model's ``max_position_embeddings``: the rotary's cos / sin become
            constant tables that long, looked up by ``position_ids`` (None: computed at each step).
    """
    caches = _RotaryCaches(max_positions)
    attention = _fuse_attention(model, caches)
    counts = FusionCounts(attention, fuse_skip_rms_norm(model), caches.constant_pairs)
    if counts.attention or counts.skip_norm:
        logger.info(
            "decoder fusions: %d rotary attention layers (%d constant rotary tables), %d residual + RMS norm pairs",
            counts.attention,
            counts.rotary_tables,
            counts.skip_norm,
        )
    return counts


def fuse_rotary_attention(model: ir.Model, max_positions: int | None = None) -> int:
    """Fold each matched layer's rotary, cache Concat and attention; returns how many (`max_positions`
    as for `fuse_decoder`)."""
    return _fuse_attention(model, _RotaryCaches(max_positions))


def _fuse_attention(model: ir.Model, caches: _RotaryCaches) -> int:
    if model.opset_imports.get("", 0) < ATTENTION_OPSET:
        return 0
    fused = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        match = _match_attention(node)
        if match is None:
            continue
        _rewrite_attention(model.graph, match, caches)
        fused += 1
    return fused


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Fold ``RMSNormalization(Add(a, b))`` into ``SkipSimplifiedLayerNormalization``; returns how many."""
    fused = 0
    for node in list(model.graph):
        add = _producer(node.inputs[0], "Add") if node.op_type == "RMSNormalization" else None
        if add is None or not _skip_norm_fits(node, add):
            continue
        first, second = add.inputs
        assert first is not None and second is not None
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        skip = ir.node(
            "SkipSimplifiedLayerNormalization",
            [first, second, node.inputs[1]],
            {"epsilon": epsilon},
            domain=MS_DOMAIN,
            num_outputs=4,
            name=f"{node.name}_skip",
        )
        model.graph.insert_before(node, skip)
        for before, after in ((node.outputs[0], skip.outputs[0]), (add.outputs[0], skip.outputs[3])):
            after.shape, after.type = before.shape, before.type
            ir.convenience.replace_all_uses_with(before, after, replace_graph_outputs=True)
        _omit_unused_outputs(skip)
        fused += 1
    if fused:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return fused


def _omit_unused_outputs(node: ir.Node) -> None:
    """Leave the node's optional outputs that nothing reads unnamed: ONNX Runtime computes and stores
    every named output (the norm's mean and inverse deviation, the last layer's unread sum), a cost
    at each decode step that an empty name (ONNX's "not requested") avoids."""
    for output in node.outputs[1:]:
        if not output.uses() and not output.is_graph_output():
            output.name = ""


def _skip_norm_fits(norm: ir.Node, add: ir.Node) -> bool:
    """A last-axis norm with a constant 1-D scale and no bias, on the sum of two same-shaped 3-D tensors."""
    axis = norm.attributes.get_int("axis", -1)
    shapes = [value.shape if value is not None else None for value in add.inputs]
    if any(shape is None or len(shape) != 3 for shape in shapes) or len(norm.inputs) != 2:
        return False
    assert shapes[0] is not None and shapes[1] is not None
    scale = norm.inputs[1]
    return (
        axis in (-1, 2)
        and norm.attributes.get_int("stash_type", 1) == 1
        and shapes[0][-1] == shapes[1][-1]
        and isinstance(shapes[0][-1], int)
        and scale is not None
        and scale.const_value is not None
        and len(scale.const_value.shape) == 1
        and all(output.uses() == [] for output in norm.outputs[1:])
    )


def _match_attention(node: ir.Node) -> _AttentionMatch | None:
    """The layer around an opset-23 Attention on heads-first tensors, or None if it is not the pattern."""
    if len(node.inputs) > 4 or any(output.uses() for output in node.outputs[1:]):
        return None
    if node.attributes.get_int("is_causal", 0) or node.attributes.get_int("qk_matmul_output_mode", 0):
        return None
    query, key, value = node.inputs[:3]
    key_concat, value_concat = _producer(key, "Concat"), _producer(value, "Concat")
    if query is None or key_concat is None or value_concat is None:
        return None
    if not (_cache_concat(key_concat) and _cache_concat(value_concat)):
        return None
    key_new = key_concat.inputs[1]
    query_rotary, key_rotary = _match_rotary(query), _match_rotary(key_new)
    if (query_rotary is None) != (key_rotary is None):
        return None
    if query_rotary is not None and key_rotary is not None:
        if (query_rotary.cos, query_rotary.sin) != (key_rotary.cos, key_rotary.sin):
            return None
        query, key_new = query_rotary.heads, key_rotary.heads
    query_source, key_source = _heads_source(query), _heads_source(key_new)
    value_source = _heads_source(value_concat.inputs[1])
    output = _output_reshape(node.outputs[0])
    if query_source is None or key_source is None or value_source is None or output is None:
        return None
    past_key, past_value = key_concat.inputs[0], value_concat.inputs[0]
    if not all(past is not None and past.shape is not None and len(past.shape) == 4 for past in (past_key, past_value)):
        return None
    assert past_key is not None and past_value is not None
    return _AttentionMatch(
        node=node,
        query=query_source[0],
        key=key_source[0],
        value=value_source[0],
        past_key=past_key,
        past_value=past_value,
        present_key=key_concat.outputs[0],
        present_value=value_concat.outputs[0],
        merge=output,
        query_heads=query_source[1],
        kv_heads=key_source[1],
        rotary=query_rotary,
    )


def _rewrite_attention(graph: ir.Graph, match: _AttentionMatch, caches: _RotaryCaches) -> None:
    """Insert (RotaryEmbedding x 2 +) Attention before the old Attention and move the layer's uses to them."""
    node = match.node
    query, key, added = match.query, match.key, list[ir.Node]()
    if match.rotary is not None:
        tables = caches.tables(graph, node, match.rotary)
        added = [
            ir.node("RotaryEmbedding", [source, *tables], {"num_heads": heads}, name=f"{node.name}_rotary_{kind}")
            for source, heads, kind in ((query, match.query_heads, "q"), (key, match.kv_heads, "k"))
        ]
        query, key = added[0].outputs[0], added[1].outputs[0]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    attributes: dict[str, float | int] = {"q_num_heads": match.query_heads, "kv_num_heads": match.kv_heads}
    scale = node.attributes.get("scale")
    if scale is not None:
        attributes["scale"] = scale.as_float()
    softcap = node.attributes.get_float("softcap", 0.0)
    if softcap:
        attributes["softcap"] = softcap
    attention = ir.node(
        "Attention",
        [query, key, match.value, mask, match.past_key, match.past_value],
        attributes,
        num_outputs=3,
        name=f"{node.name}_cached",
    )
    graph.insert_before(node, [*added, attention])
    old = [match.present_key, match.present_value]
    new = list(attention.outputs[1:])
    merged = match.merge.outputs[0]
    if merged.shape is not None and len(merged.shape) == 3:  # already the fused output's shape
        old.insert(0, merged)
        new.insert(0, attention.outputs[0])
    else:
        match.merge.replace_input_with(0, attention.outputs[0])
    for before, after in zip(old, new, strict=True):
        after.name, after.shape, after.type = before.name, before.shape, before.type
        before.name = None  # the graph output's name moves to the fused node's output
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


@dataclass
class _RotaryCaches:
    """The cos / sin inputs of the layers' RotaryEmbedding nodes, made once for the layers that share a table.

    Attributes:
        max_positions: The constant tables' length (None: the caches are computed at each step).
        made: Per (cos, sin) pair of the export's tables: the RotaryEmbedding inputs after ``x``.
    """

    max_positions: int | None
    made: dict[tuple[int, int], list[ir.Value]] = field(default_factory=dict)

    @property
    def constant_pairs(self) -> int:
        """The (cos, sin) pairs made constant tables (three RotaryEmbedding inputs after ``x``)."""
        return sum(1 for inputs in self.made.values() if len(inputs) == 3)

    def tables(self, graph: ir.Graph, before: ir.Node, rotary: _Rotary) -> list[ir.Value]:
        """``[cos_table, sin_table, position_ids]`` (constant [max_positions, head_dim / 2] tables,
        when both are computed per position from one input) or ``[cos, sin]`` of [batch, sequence,
        head_dim / 2] (`_half_table`)."""
        pair = (id(rotary.cos), id(rotary.sin))
        if pair not in self.made:
            halves = [_half_table(graph, before, table) for table in (rotary.cos, rotary.sin)]
            self.made[pair] = self._constant(graph, halves) or halves
        return self.made[pair]

    def _constant(self, graph: ir.Graph, halves: list[ir.Value]) -> list[ir.Value] | None:
        if self.max_positions is None:
            return None
        found = [constant_table(half, self.max_positions) for half in halves]
        if any(table is None for table in found) or len({id(table[0]) for table in found if table}) != 1:
            return None
        constants = []
        for name, table in zip(("cos", "sin"), found, strict=True):
            assert table is not None
            tensor = ir.tensor(table[1])
            value = ir.Value(name=f"rotary_{name}_table_{len(self.made)}", const_value=tensor)
            value.shape, value.type = ir.Shape(table[1].shape), ir.TensorType(tensor.dtype)
            graph.register_initializer(value)
            constants.append(value)
        assert found[0] is not None
        return [*constants, found[0][0]]


def _half_table(graph: ir.Graph, before: ir.Node, table: ir.Value) -> ir.Value:
    """The [batch, sequence, head_dim / 2] cache RotaryEmbedding takes: the table's ops replayed on
    the `freqs` of its ``Concat(freqs, freqs)`` without the heads axis' Unsqueeze (``Cos(freqs)``
    for ``Unsqueeze(Cos(Concat(freqs, freqs)), 1)``)."""
    chain = _table_chain(table)
    assert chain is not None  # matched by _match_rotary
    value, replayed = chain[0], []
    for node in chain[1]:
        if node.op_type == "Unsqueeze":
            continue
        copy = ir.Node(node.domain, node.op_type, [value, *node.inputs[1:]], list(node.attributes.values()))
        replayed.append(copy)
        value = copy.outputs[0]
    graph.insert_before(before, replayed)
    return value


def _match_rotary(value: ir.Value | None) -> _Rotary | None:
    """``heads * cos + Concat(-heads[..., h:], heads[..., :h]) * sin`` (either operand order)."""
    add = _producer(value, "Add")
    if add is None:
        return None
    for plain, rotated in _orders(add.inputs):
        plain_mul, rotated_mul = _producer(plain, "Mul"), _producer(rotated, "Mul")
        if plain_mul is None or rotated_mul is None:
            continue
        for heads, cos in _orders(plain_mul.inputs):
            for half_turn, sin in _orders(rotated_mul.inputs):
                if (
                    _is_rotate_half(half_turn, heads)
                    and _table_chain(cos) is not None
                    and _table_chain(sin) is not None
                ):
                    assert heads is not None and cos is not None and sin is not None
                    return _Rotary(heads=heads, cos=cos, sin=sin)
    return None


def _is_rotate_half(value: ir.Value | None, heads: ir.Value | None) -> bool:
    """`value` is ``Concat(Neg(heads[..., h:]), heads[..., :h])`` on the last axis, h half the head."""
    concat = _producer(value, "Concat")
    width = heads.shape[-1] if heads is not None and heads.shape is not None and len(heads.shape) == 4 else None
    if concat is None or len(concat.inputs) != 2 or not isinstance(width, int) or width % 2:
        return False
    if concat.attributes.get_int("axis", 0) not in (-1, 3):
        return False
    negated = _producer(concat.inputs[0], "Neg")
    upper = _producer(negated.inputs[0], "Slice") if negated is not None else None
    lower = _producer(concat.inputs[1], "Slice")
    return (
        upper is not None
        and lower is not None
        and _slices(upper, heads, width // 2, width, to_end=True)
        and _slices(lower, heads, 0, width // 2, to_end=False)
    )


def _slices(node: ir.Node, data: ir.Value | None, start: int, stop: int, *, to_end: bool) -> bool:
    """A unit-step Slice of `data`'s last axis from `start` to `stop` (`to_end`: `stop` is the
    axis' end, and any end past it is the same slice)."""
    if node.inputs[0] is not data or len(node.inputs) < 4:
        return False
    starts, ends, axes = (_int_list(value) for value in node.inputs[1:4])
    steps = _int_list(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if starts is None or ends is None or axes is None or steps is None:
        return False
    reaches = ends == [stop] or (to_end and len(ends) == 1 and ends[0] >= stop)
    return starts == [start] and axes in ([-1], [3]) and steps == [1] and reaches


def _table_chain(table: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """The `freqs` of the ``Concat(freqs, freqs)`` (last axis) `table` comes from and the ops from
    that Concat to `table` (in order), if they keep each half's values equal (so the two halves are
    the same, as a half-width rotary cache assumes) and add the heads axis once (``Unsqueeze`` at 1)."""
    chain: list[ir.Node] = []
    node = table.producer() if table is not None else None
    while node is not None and len(chain) < 8:
        if node.op_type == "Concat":
            freqs = node.inputs[0]
            equal = len(node.inputs) == 2 and freqs is node.inputs[1] and node.attributes.get_int("axis", 0) == -1
            unsqueezes = [step for step in chain if step.op_type == "Unsqueeze"]
            one_axis = len(unsqueezes) == 1 and _int_list(unsqueezes[0].inputs[1]) == [1]
            return (freqs, chain[::-1]) if equal and one_axis and freqs is not None else None
        if node.op_type not in _HALF_PRESERVING and node.op_type not in ("Cos", "Sin"):
            return None
        if node.op_type == "Mul" and not _scalar_factor(node):
            return None
        chain.append(node)
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return None


def _scalar_factor(mul: ir.Node) -> bool:
    """One of the Mul's operands is a constant scalar (the other is what the walk follows)."""
    factor = mul.inputs[1]
    tensor = ir.convenience.get_const_tensor(factor) if factor is not None else None
    return tensor is not None and tensor.size == 1


def _cache_concat(node: ir.Node) -> bool:
    """``Concat(past, new)`` on the sequence axis of heads-first tensors."""
    return len(node.inputs) == 2 and node.attributes.get_int("axis", 0) in (-2, 2)


def _heads_source(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """The [batch, sequence, heads * head_dim] tensor that `value` is ``Transpose(Reshape(.))`` of
    (heads-first), with its number of heads."""
    transpose = _producer(value, "Transpose")
    if transpose is None or tuple(transpose.attributes.get_ints("perm", ())) != _HEADS_FIRST:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None or reshape.inputs[0] is None:
        return None
    source, split = reshape.inputs[0], reshape.outputs[0].shape
    if source.shape is None or len(source.shape) != 3 or split is None or len(split) != 4:
        return None
    heads, width = split[2], split[3]
    if not (isinstance(heads, int) and isinstance(width, int) and source.shape[2] == heads * width):
        return None
    return source, heads


def _output_reshape(value: ir.Value) -> ir.Node | None:
    """The attention output's ``Reshape(Transpose(.))`` that merges the heads again: to [batch,
    sequence, heads * head_dim], or to [batch * sequence, heads * head_dim] (GPT-2's Conv1D)."""
    transpose = _only_user(value)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    if tuple(transpose.attributes.get_ints("perm", ())) != _HEADS_FIRST:
        return None
    reshape = _only_user(transpose.outputs[0])
    shape = value.shape
    merged = reshape.outputs[0].shape if reshape is not None and reshape.op_type == "Reshape" else None
    if merged is None or shape is None or len(merged) not in (2, 3) or len(shape) != 4:
        return None
    heads, width = shape[1], shape[3]
    if isinstance(heads, int) and isinstance(width, int) and merged[-1] == heads * width:
        return reshape
    return None


def _only_user(value: ir.Value) -> ir.Node | None:
    users = [use.node for use in value.uses()]
    return users[0] if len(users) == 1 and not value.is_graph_output() else None


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _orders(pair: Sequence[ir.Value | None]) -> Iterator[tuple[ir.Value | None, ir.Value | None]]:
    if len(pair) == 2:
        yield pair[0], pair[1]
        yield pair[1], pair[0]


def _int_list(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(item) for item in tensor.numpy().reshape(-1)]
