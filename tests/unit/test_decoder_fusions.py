"""The simplify stage's decoder fusions on hand-built opset-23 layers: the same outputs in ONNX
Runtime after the fold, and no fold where the pattern is not what it can prove (the exported
families are in tests/integration/test_decoder_export.py, slow)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass

from pipeline.llm.decoder_fusions import fuse_decoder, fuse_rotary_attention, fuse_skip_rms_norm

BATCH, SEQUENCE, PAST, HEADS, KV_HEADS, HEAD = 2, 3, 4, 4, 2, 8
HIDDEN = 16
INT64_MAX = 2**63 - 1


def _constant(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))


def _heads(nodes: list[onnx.NodeProto], source: str, heads: int) -> str:
    nodes.append(_constant(f"{source}_shape", [0, 0, heads, HEAD]))
    nodes.append(helper.make_node("Reshape", [source, f"{source}_shape"], [f"{source}_4d"]))
    nodes.append(helper.make_node("Transpose", [f"{source}_4d"], [f"{source}_heads"], perm=[0, 2, 1, 3]))
    return f"{source}_heads"


def _rotary(nodes: list[onnx.NodeProto], heads: str) -> str:
    nodes += [
        helper.make_node("Slice", [heads, "zero", "half", "last"], [f"{heads}_lo"]),
        helper.make_node("Slice", [heads, "half", "end", "last"], [f"{heads}_hi"]),
        helper.make_node("Neg", [f"{heads}_hi"], [f"{heads}_neg"]),
        helper.make_node("Concat", [f"{heads}_neg", f"{heads}_lo"], [f"{heads}_turned"], axis=-1),
        helper.make_node("Mul", [heads, "cos4"], [f"{heads}_plain"]),
        helper.make_node("Mul", [f"{heads}_turned", "sin4"], [f"{heads}_rot"]),
        helper.make_node("Add", [f"{heads}_plain", f"{heads}_rot"], [f"{heads}_rotated"]),
    ]
    return f"{heads}_rotated"


def attention_layer(second_half: str = "freqs", from_positions: bool = False) -> onnx.ModelProto:
    """One layer as the decoder export writes it: heads-first projections, the rotary spelled out,
    the cache grown by Concat, opset 23's Attention, the heads merged again; the frequencies an input,
    or (`from_positions`) computed from ``position_ids`` as transformers' rotary does."""
    nodes = _frequencies() if from_positions else []
    nodes += [
        _constant("zero", [0]),
        _constant("half", [HEAD // 2]),
        _constant("end", [INT64_MAX]),
        _constant("last", [-1]),
        _constant("heads_axis", [1]),
        helper.make_node("Concat", ["freqs", second_half], ["table"], axis=-1),
        helper.make_node("Cos", ["table"], ["cos"]),
        helper.make_node("Sin", ["table"], ["sin"]),
        helper.make_node("Unsqueeze", ["cos", "heads_axis"], ["cos4"]),
        helper.make_node("Unsqueeze", ["sin", "heads_axis"], ["sin4"]),
    ]
    query = _rotary(nodes, _heads(nodes, "q", HEADS))
    key = _rotary(nodes, _heads(nodes, "k", KV_HEADS))
    value = _heads(nodes, "v", KV_HEADS)
    nodes += [
        helper.make_node("Concat", ["past_key", key], ["present_key"], axis=2),
        helper.make_node("Concat", ["past_value", value], ["present_value"], axis=2),
        helper.make_node("Attention", [query, "present_key", "present_value", "mask"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        _constant("merged_shape", [0, 0, HEADS * HEAD]),
        helper.make_node("Reshape", ["context_t", "merged_shape"], ["output"]),
    ]
    cache = ["batch", KV_HEADS, "past", HEAD]
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "sequence", HEADS * HEAD]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", "sequence", KV_HEADS * HEAD]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", "sequence", KV_HEADS * HEAD]),
        helper.make_tensor_value_info("other", TensorProto.FLOAT, ["batch", "sequence", HEAD // 2]),
        helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", 1, "sequence", "total"]),
    ]
    if from_positions:
        inputs.insert(0, helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]))
    else:
        inputs.insert(3, helper.make_tensor_value_info("freqs", TensorProto.FLOAT, ["batch", "sequence", HEAD // 2]))
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        for name in ("output", "present_key", "present_value")
    ]
    graph = helper.make_graph(nodes, "layer", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


def _frequencies() -> list[onnx.NodeProto]:
    """``freqs = float(position_ids[..., None]) * inv_freq`` (transformers' default rotary)."""
    inverse = 1.0 / 10000 ** (np.arange(0, HEAD, 2, dtype=np.float32) / HEAD)
    return [
        _constant("minus_one", [-1]),
        helper.make_node("Constant", [], ["inv_freq"], value=numpy_helper.from_array(inverse, "inv_freq")),
        helper.make_node("Unsqueeze", ["position_ids", "minus_one"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["positions_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["positions_float", "inv_freq"], ["freqs"]),
    ]


def layer_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((BATCH, 1, SEQUENCE, PAST + SEQUENCE), dtype=bool)
    mask[1, :, :, :2] = False  # the second row left-padded
    feeds = {
        "q": rng.standard_normal((BATCH, SEQUENCE, HEADS * HEAD)),
        "k": rng.standard_normal((BATCH, SEQUENCE, KV_HEADS * HEAD)),
        "v": rng.standard_normal((BATCH, SEQUENCE, KV_HEADS * HEAD)),
        "freqs": rng.uniform(0, 3, (BATCH, SEQUENCE, HEAD // 2)),
        "other": rng.uniform(0, 3, (BATCH, SEQUENCE, HEAD // 2)),
        "past_key": rng.standard_normal((BATCH, KV_HEADS, PAST, HEAD)),
        "past_value": rng.standard_normal((BATCH, KV_HEADS, PAST, HEAD)),
    }
    positions = np.stack([np.arange(PAST, PAST + SEQUENCE), np.arange(PAST - 2, PAST - 2 + SEQUENCE)])
    floats = {name: value.astype(np.float32) for name, value in feeds.items()}
    return {**floats, "mask": mask, "position_ids": positions}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {value.name for value in session.get_inputs()}
    return session.run(None, {name: value for name, value in feeds.items() if name in names})


def fused(model: onnx.ModelProto, max_positions: int | None = None) -> tuple[onnx.ModelProto, int, int]:
    graph = ir.from_proto(model)
    counts = fuse_decoder(graph, max_positions)
    RemoveUnusedNodesPass()(graph)
    return ir.to_proto(graph), counts.attention, counts.skip_norm


def test_a_rotary_attention_layer_folds_into_three_ops_with_the_same_outputs() -> None:
    model = attention_layer()
    after, attention, _ = fused(model)

    ops = Counter(node.op_type for node in after.graph.node)
    assert attention == 1 and ops["Attention"] == 1 and ops["RotaryEmbedding"] == 2
    # the half-width caches are Cos / Sin of the frequencies themselves: no table Concat, no Unsqueeze
    assert ops == Counter({"RotaryEmbedding": 2, "Attention": 1, "Cos": 1, "Sin": 1}), ops
    assert [output.name for output in after.graph.output] == ["output", "present_key", "present_value"]
    onnx.checker.check_model(after, full_check=True)
    for before, now in zip(run(model, layer_feeds()), run(after, layer_feeds()), strict=True):
        np.testing.assert_allclose(now, before, rtol=1e-5, atol=1e-5)


def test_rotary_caches_from_positions_become_constant_tables_looked_up_by_position_ids() -> None:
    model = attention_layer(from_positions=True)
    after, attention, _ = fused(model, max_positions=16)

    ops = Counter(node.op_type for node in after.graph.node)
    assert attention == 1 and ops == Counter({"RotaryEmbedding": 2, "Attention": 1}), ops
    rotary = next(node for node in after.graph.node if node.op_type == "RotaryEmbedding")
    tables = {initializer.name: initializer.dims for initializer in after.graph.initializer}
    assert rotary.input[3] == "position_ids" and tables[rotary.input[1]] == [16, HEAD // 2]
    onnx.checker.check_model(after, full_check=True)
    for before, now in zip(run(model, layer_feeds()), run(after, layer_feeds()), strict=True):
        np.testing.assert_allclose(now, before, rtol=1e-5, atol=1e-5)


def test_without_a_table_length_the_caches_from_positions_are_computed_each_step() -> None:
    after, attention, _ = fused(attention_layer(from_positions=True))

    ops = Counter(node.op_type for node in after.graph.node)
    assert attention == 1 and ops["Cos"] == 1 and ops["Sin"] == 1 and not after.graph.initializer


def test_a_rotary_whose_halves_may_differ_is_not_folded() -> None:
    """RotaryEmbedding's half-width cache assumes cos = Concat(f, f): Concat(f, g) stays as it is."""
    model = attention_layer(second_half="other")
    graph = ir.from_proto(model)

    assert fuse_rotary_attention(graph) == 0
    assert Counter(node.op_type for node in graph.graph) == Counter(node.op_type for node in model.graph.node)


def test_below_opset_23_nothing_is_folded() -> None:
    model = attention_layer()
    graph = ir.from_proto(model)
    graph.opset_imports[""] = 22

    assert fuse_rotary_attention(graph) == 0


def norm_layer(stash_type: int = 1) -> onnx.ModelProto:
    """A residual Add, the RMS norm of its sum, and the sum used again (the next residual)."""
    weight = numpy_helper.from_array(np.linspace(0.5, 1.5, HIDDEN, dtype=np.float32), "gain")
    nodes = [
        helper.make_node("Add", ["x", "residual"], ["sum"]),
        helper.make_node("RMSNormalization", ["sum", "gain"], ["normed"], axis=-1, epsilon=1e-6, stash_type=stash_type),
        helper.make_node("Mul", ["normed", "sum"], ["out"]),
    ]
    shape = ["batch", "sequence", HIDDEN]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("x", "residual")]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)]
    graph = helper.make_graph(nodes, "norm", inputs, outputs, initializer=[weight])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_residual_add_and_rms_norm_fold_into_skip_simplified_layer_normalization() -> None:
    model = norm_layer()
    rng = np.random.default_rng(1)
    feeds = {name: rng.standard_normal((2, 3, HIDDEN)).astype(np.float32) for name in ("x", "residual")}

    after, _, skip = fused(model)

    assert skip == 1 and [node.op_type for node in after.graph.node] == ["SkipSimplifiedLayerNormalization", "Mul"]
    # The sum is read (the next residual); the mean and inverse deviation are not, so not requested.
    assert [bool(name) for name in after.graph.node[0].output] == [True, False, False, True]
    np.testing.assert_allclose(run(after, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stash_type", [0])
def test_a_norm_computed_in_another_precision_is_not_folded(stash_type: int) -> None:
    graph = ir.from_proto(norm_layer(stash_type))

    assert fuse_skip_rms_norm(graph) == 0
