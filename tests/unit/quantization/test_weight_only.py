"""Weight-only int4 / int8 quantization (MatMulNBits, blocked QDQ) on small decoders built here.

The decoder is a Llama-shaped graph written with onnx.helper (token embedding, RMSNorm,
single-head causal attention, SiLU-gated MLP, residuals, LM head), fast to build; its norms can
carry outlier channels, as trained LLMs' do, which is where data-aware methods pay.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    DefaultWeightOnlyQuantizer,
    MatMulNBitsQuantizer,
)

from pipeline.errors import JobError
from pipeline.llm.signature import DecoderSignature
from pipeline.quantization.weight_only import WeightOnlyQuantizer, WeightOnlySettings, load_model, quantize_weight_only
from pipeline.quantization.weight_only_blocks import (
    from_matmul_nbits,
    gather_tensors,
    hqq_codes,
    rtn_codes,
    to_matmul_nbits,
)
from pipeline.quantization.weight_only_calibration import ActivationReader, hessian_groups
from pipeline.quantization.weight_only_gptq import gptq_codes, hessian_factor
from pipeline.quantization.weight_only_graph import to_matmul_nbits_node
from pipeline.quantization.weight_only_mixed import (
    EXACT_QDQ,
    LogitJudge,
    LogitPolicy,
    MixedSettings,
    quantize_weight_only_mixed,
    rank_layers,
    split_feeds,
)
from tests.decoder_export import export_with_torchscript

VOCAB, HIDDEN, FFN, LAYERS = 96, 64, 128, 2


def _rms_norm(nodes: list[onnx.NodeProto], x: str, gain: str, out: str) -> None:
    nodes += [
        helper.make_node("Mul", [x, x], [f"{out}_sq"]),
        helper.make_node("ReduceMean", [f"{out}_sq", "axes_last"], [f"{out}_mean"], keepdims=1),
        helper.make_node("Add", [f"{out}_mean", "eps"], [f"{out}_var"]),
        helper.make_node("Sqrt", [f"{out}_var"], [f"{out}_rms"]),
        helper.make_node("Div", [x, f"{out}_rms"], [f"{out}_normed"]),
        helper.make_node("Mul", [f"{out}_normed", gain], [out]),
    ]


def _mask_nodes() -> list[onnx.NodeProto]:
    """bias [b, s, s]: causal (strict upper triangle) plus key padding, both -1e4."""
    return [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "one", "two"], ["seq"]),
        helper.make_node("Concat", ["seq", "seq"], ["square"], axis=0),
        helper.make_node(
            "ConstantOfShape", ["square"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))
        ),
        helper.make_node("Trilu", ["ones", "k_one"], ["future"], upper=1),
        helper.make_node("Mul", ["future", "neg_big"], ["causal"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one_f", "mask_f"], ["pad"]),
        helper.make_node("Mul", ["pad", "neg_big"], ["pad_bias"]),
        helper.make_node("Unsqueeze", ["pad_bias", "one"], ["pad_bias3"]),
        helper.make_node("Add", ["causal", "pad_bias3"], ["bias"]),
    ]


def _layer(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], x: str, i: int, rng, outliers: bool) -> str:
    gain = np.ones(HIDDEN, np.float32)
    if outliers:
        gain[:4] = 12.0
    weights[f"g1_{i}"], weights[f"g2_{i}"] = gain, gain.copy()
    for name, shape in (
        ("q", (HIDDEN, HIDDEN)),
        ("k", (HIDDEN, HIDDEN)),
        ("v", (HIDDEN, HIDDEN)),
        ("o", (HIDDEN, HIDDEN)),
        ("gate", (HIDDEN, FFN)),
        ("up", (HIDDEN, FFN)),
        ("down", (FFN, HIDDEN)),
    ):
        weights[f"W{name}_{i}"] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    p = f"l{i}_"
    _rms_norm(nodes, x, f"g1_{i}", f"{p}h")
    nodes += [
        helper.make_node("MatMul", [f"{p}h", f"W{n}_{i}"], [f"{p}{n}"], name=f"{p}{n}_proj") for n in ("q", "k", "v")
    ]
    nodes += [
        helper.make_node("Transpose", [f"{p}k"], [f"{p}kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", [f"{p}q", f"{p}kt"], [f"{p}scores"], name=f"{p}scores"),
        helper.make_node("Mul", [f"{p}scores", "inv_sqrt"], [f"{p}scaled"]),
        helper.make_node("Add", [f"{p}scaled", "bias"], [f"{p}masked"]),
        helper.make_node("Softmax", [f"{p}masked"], [f"{p}probs"], axis=-1),
        helper.make_node("MatMul", [f"{p}probs", f"{p}v"], [f"{p}attn"], name=f"{p}context"),
        helper.make_node("MatMul", [f"{p}attn", f"Wo_{i}"], [f"{p}o"], name=f"{p}o_proj"),
        helper.make_node("Add", [x, f"{p}o"], [f"{p}x1"]),
    ]
    _rms_norm(nodes, f"{p}x1", f"g2_{i}", f"{p}h2")
    nodes += [
        helper.make_node("MatMul", [f"{p}h2", f"Wgate_{i}"], [f"{p}gate"], name=f"{p}gate_proj"),
        helper.make_node("MatMul", [f"{p}h2", f"Wup_{i}"], [f"{p}up"], name=f"{p}up_proj"),
        helper.make_node("Sigmoid", [f"{p}gate"], [f"{p}sig"]),
        helper.make_node("Mul", [f"{p}gate", f"{p}sig"], [f"{p}silu"]),
        helper.make_node("Mul", [f"{p}silu", f"{p}up"], [f"{p}act"]),
        helper.make_node("MatMul", [f"{p}act", f"Wdown_{i}"], [f"{p}down"], name=f"{p}down_proj"),
        helper.make_node("Add", [f"{p}x1", f"{p}down"], [f"{p}x2"]),
    ]
    return f"{p}x2"


def build_decoder(
    path: Path, outliers: bool = False, seed: int = 0, layers: int = LAYERS, external: bool = False
) -> Path:
    """A Llama-shaped decoder: input_ids, attention_mask [b, s] -> logits [b, s, vocab]."""
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    if outliers:
        embed[:, :4] *= 6.0
    weights: dict[str, np.ndarray] = {
        "embed": embed,
        "axes_last": np.array([-1], np.int64),
        "eps": np.array(1e-6, np.float32),
        "one": np.array([1], np.int64),
        "k_one": np.array(1, np.int64),
        "two": np.array([2], np.int64),
        "one_f": np.array(1.0, np.float32),
        "neg_big": np.array(-1e4, np.float32),
        "inv_sqrt": np.array(1 / np.sqrt(HIDDEN), np.float32),
        "gf": np.ones(HIDDEN, np.float32),
        "Wlm": (rng.standard_normal((HIDDEN, VOCAB)) / np.sqrt(HIDDEN)).astype(np.float32),
    }
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x0"], name="embed_tokens"), *_mask_nodes()]
    x = "x0"
    for i in range(layers):
        x = _layer(nodes, weights, x, i, rng, outliers)
    _rms_norm(nodes, x, "gf", "final")
    nodes.append(helper.make_node("MatMul", ["final", "Wlm"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes,
        "decoder",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    if external:
        onnx.save(model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save(model, path)
    return path


SIGNATURE = DecoderSignature(layers=LAYERS, kv_heads=1, head_dim=HIDDEN, vocab=VOCAB)


def feeds(batches: int, seed: int, batch: int = 4, sequence: int = 16) -> list[dict[str, np.ndarray]]:
    """Full decoder feeds (empty past), some rows left-padded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        ids = rng.integers(0, VOCAB, (batch, sequence))
        mask = np.ones((batch, sequence), np.int64)
        mask[0, :3] = 0
        out.append(SIGNATURE.step_feeds(ids, mask))
    return out


def logits(path: Path, data: list[dict[str, np.ndarray]], **config: str) -> np.ndarray:
    options = ort.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run(["logits"], {k: v for k, v in f.items() if k in names})[0] for f in data])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-token cosine of two logit arrays [batch, seq, vocab]."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def nodes_of(path: Path, op_type: str) -> list[onnx.NodeProto]:
    return [node for node in onnx.load(str(path), load_external_data=False).graph.node if node.op_type == op_type]


def attribute(node: onnx.NodeProto, name: str) -> object:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("decoders")
    return {
        "plain": build_decoder(folder / "plain.onnx"),
        "outliers": build_decoder(folder / "outliers.onnx", outliers=True),
    }


@pytest.fixture(scope="module")
def calibration() -> list[dict[str, np.ndarray]]:
    return feeds(8, seed=1)


@pytest.fixture(scope="module")
def held_out() -> list[dict[str, np.ndarray]]:
    return feeds(3, seed=2)


def quantized_cosine(model: Path, out: Path, settings: WeightOnlySettings, calibration, held_out) -> float:
    quantize_weight_only(model, out, settings, calibration)
    return cosine(logits(model, held_out), logits(out, held_out, **EXACT_QDQ))


def test_matmulnbits_nodes_have_the_bits_and_block_size_and_run(decoders, calibration, held_out, tmp_path) -> None:
    out = tmp_path / "int4.onnx"
    result = quantize_weight_only(decoders["plain"], out, WeightOnlySettings(bits=4, block_size=32), calibration)
    nbits = nodes_of(out, "MatMulNBits")
    # 7 per layer, the LM head float; q, k, v run as one MatMulNBits, gate and up as another
    assert len(result.quantized) == 14 and len(nbits) == 8
    assert {(attribute(n, "bits"), attribute(n, "block_size")) for n in nbits} == {(4, 32)}
    assert {(attribute(n, "K"), attribute(n, "N")) for n in nbits} == {(64, 192), (64, 64), (64, 256), (128, 64)}
    assert {n.domain for n in nbits} == {"com.microsoft"}
    assert result.lm_head == "lm_head" and "lm_head" in result.kept and result.embeddings == {}
    assert [n.name for n in nodes_of(out, "MatMul") if n.name == "lm_head"] == ["lm_head"]
    assert [n.name for n in nodes_of(out, "Gather")] == ["embed_tokens"]
    # the activation x activation MatMuls (scores, context) are not weights: untouched
    assert {n.name for n in nodes_of(out, "MatMul")} == {
        "lm_head",
        "l0_scores",
        "l0_context",
        "l1_scores",
        "l1_context",
    }
    assert result.bytes_after < 0.3 * result.bytes_before + 2 * HIDDEN * VOCAB * 4
    assert cosine(logits(decoders["plain"], held_out), logits(out, held_out)) > 0.98


@pytest.mark.parametrize("symmetric", [True, False])
def test_joined_projections_compute_what_one_matmulnbits_each_does(decoders, held_out, tmp_path, symmetric) -> None:
    """MatMuls of one activation at one precision become one MatMulNBits and a Split, on the same
    codes: the logits are those of a MatMulNBits per MatMul; an int8 q keeps k and v joined apart."""
    quantizer = WeightOnlyQuantizer(decoders["plain"], WeightOnlySettings(bits=4, symmetric=symmetric))
    plan = quantizer.default_plan()
    joined, separate = tmp_path / "joined.onnx", tmp_path / "separate.onnx"
    quantizer.write(joined, plan, 2**30)
    model = load_model(decoders["plain"])
    nodes = {node.name: node for node in model.graph}
    for name, bits in plan.items():
        to_matmul_nbits_node(model, nodes[name], quantizer.codes(name, bits), accuracy_level=0)
    ir.save(ir.external_data.load_to_model(model), separate)
    assert len(nodes_of(separate, "MatMulNBits")) == 14 and len(nodes_of(joined, "MatMulNBits")) == 8
    np.testing.assert_allclose(logits(joined, held_out), logits(separate, held_out), rtol=1e-5, atol=1e-5)
    mixed = tmp_path / "mixed.onnx"
    quantizer.write(mixed, {**plan, "l0_q_proj": 8}, 2**30)
    widths = sorted((attribute(n, "bits"), attribute(n, "N")) for n in nodes_of(mixed, "MatMulNBits"))
    assert widths.count((4, 128)) == 1 and widths.count((8, 64)) == 1 and widths.count((4, 192)) == 1


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_round_to_nearest_is_onnx_runtimes_quantizer_byte_for_byte(bits: int, symmetric: bool) -> None:
    weight = np.random.default_rng(3).standard_normal((96, 40)).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
            "one",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 96])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 40])],
            [numpy_helper.from_array(weight, "W")],
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    theirs = [numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer]
    ours = [t for t in to_matmul_nbits(rtn_codes(weight, bits, 32, symmetric)) if t is not None]
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, sorted(theirs, key=lambda t: -t.ndim), strict=True):
        np.testing.assert_array_equal(mine.reshape(reference.shape), reference)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_embeddings_are_onnx_runtimes_gather_numbers(symmetric: bool) -> None:
    """A table quantized as its transpose through MLAS gives what ORT's own Gather path writes."""
    table = np.random.default_rng(6).standard_normal((50, 64)).astype(np.float32)
    packed, scales, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(table, 1, 32, symmetric)
    theirs = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)
    data, our_scales, _ = gather_tensors(rtn_codes(np.ascontiguousarray(table.T), 4, 32, symmetric))
    np.testing.assert_array_equal(np.asarray(data).astype(np.int16).reshape(-1) & 0x0F, theirs)
    np.testing.assert_array_equal(our_scales, scales)


def test_packing_round_trips_and_dequantizes_as_matmulnbits_runs() -> None:
    weight = np.random.default_rng(4).standard_normal((80, 33)).astype(np.float32)  # K not a multiple of 32
    for codes in (rtn_codes(weight, 4, 32, False), rtn_codes(weight, 8, 16, True), hqq_codes(weight, 4, 32)):
        packed, scales, zeros = to_matmul_nbits(codes)
        again = from_matmul_nbits(packed, scales, zeros, codes.bits, codes.block_size, 80)
        np.testing.assert_array_equal(again.codes, codes.codes)
        inputs = ["x", "B", "S"] + (["Z"] if zeros is not None else [])
        tensors = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
        tensors += [numpy_helper.from_array(zeros, "Z")] if zeros is not None else []
        node = helper.make_node(
            "MatMulNBits",
            inputs,
            ["y"],
            domain="com.microsoft",
            K=80,
            N=33,
            bits=codes.bits,
            block_size=codes.block_size,
        )
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [80, 80])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [80, 33])],
            tensors,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        )
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (rows,) = session.run(None, {"x": np.eye(80, dtype=np.float32)})
        np.testing.assert_allclose(rows, codes.dequantize(), atol=1e-6)
        assert np.abs(codes.dequantize() - weight).max() < (0.25 if codes.bits == 4 else 0.02) * np.abs(weight).max()


def test_int8_is_closer_to_float_than_int4_and_128_blocks_lose_more_than_32(
    decoders, calibration, held_out, tmp_path
) -> None:
    model = decoders["plain"]
    int4 = quantized_cosine(model, tmp_path / "a.onnx", WeightOnlySettings(bits=4), calibration, held_out)
    int4_128 = quantized_cosine(
        model, tmp_path / "b.onnx", WeightOnlySettings(bits=4, block_size=128), calibration, held_out
    )
    int8 = quantized_cosine(model, tmp_path / "c.onnx", WeightOnlySettings(bits=8), calibration, held_out)
    assert int8 > 0.9999 > int4 > int4_128 > 0.98
    assert {attribute(n, "bits") for n in nodes_of(tmp_path / "c.onnx", "MatMulNBits")} == {8}


def test_gptq_and_hqq_are_closer_than_rtn_on_outlier_channels(decoders, calibration, held_out, tmp_path) -> None:
    model = decoders["outliers"]
    rtn = quantized_cosine(model, tmp_path / "rtn.onnx", WeightOnlySettings(method="rtn"), calibration, held_out)
    hqq = quantized_cosine(model, tmp_path / "hqq.onnx", WeightOnlySettings(method="hqq"), calibration, held_out)
    gptq = quantized_cosine(model, tmp_path / "gptq.onnx", WeightOnlySettings(method="gptq"), calibration, held_out)
    gptq_sym = quantized_cosine(
        model, tmp_path / "gs.onnx", WeightOnlySettings(method="gptq", symmetric=True), calibration, held_out
    )
    assert min(gptq, gptq_sym) > rtn + 0.01 and gptq > hqq
    # HQQ fits each block to its weights, not to the layer's output: on these random weights it
    # lands on either side of RTN (0.932 here vs 0.940; 0.934 vs 0.927 on other feeds)
    assert abs(hqq - rtn) < 0.02
    assert {attribute(n, "bits") for n in nodes_of(tmp_path / "gptq.onnx", "MatMulNBits")} == {4}


def test_onnx_runtimes_gptq_propagates_no_error_which_is_why_ours_exists() -> None:
    """ORT 1.32's GPTQ (its neural_compressor port) equals round-to-nearest on correlated inputs;
    if this starts failing, ORT fixed it and ``method = "gptq"`` could go back to it."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((128, 48)).astype(np.float32)
    inputs = rng.standard_normal((1024, 128)) @ (np.eye(128) + 0.3 * rng.standard_normal((128, 128)))
    hessian = inputs.T @ inputs / len(inputs)
    theirs = gptq(weight.copy(), hessian.copy(), num_bits=4, group_size=32, scheme="asym")
    rtn = rtn_codes(weight, 4, 32, symmetric=False).dequantize()
    np.testing.assert_allclose(theirs, rtn, atol=1e-5)
    ours = gptq_codes(weight, hessian_factor(hessian), 4, 32, symmetric=False).dequantize()

    def error(q: np.ndarray) -> float:
        return float(np.linalg.norm(inputs @ (q - weight)) / np.linalg.norm(inputs @ weight))

    assert error(ours) < 0.8 * error(rtn)


@pytest.mark.parametrize("bits", [4, 8])
def test_qdq_format_runs_and_matches_matmulnbits(decoders, calibration, held_out, tmp_path, bits: int) -> None:
    model = decoders["outliers"]
    settings = WeightOnlySettings(bits=bits, method="gptq", quantize_embeddings=True)
    quantize_weight_only(model, tmp_path / "nbits.onnx", settings, calibration)
    qdq = WeightOnlySettings(bits=bits, method="gptq", quantize_embeddings=True, format="qdq")
    quantize_weight_only(model, tmp_path / "qdq.onnx", qdq, calibration)
    loaded = onnx.load(str(tmp_path / "qdq.onnx"))
    assert {o.domain: o.version for o in loaded.opset_import}[""] == 21  # declared from 20
    dequantize = [n for n in loaded.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequantize) == 15 and {attribute(n, "block_size") for n in dequantize} == {32}
    types = {t.data_type for t in loaded.graph.initializer if t.name.endswith(f"_DQ_Q{bits}")}
    assert types == {TensorProto.UINT4 if bits == 4 else TensorProto.UINT8}
    assert not nodes_of(tmp_path / "qdq.onnx", "MatMulNBits")
    onnx.checker.check_model(loaded, full_check=True)
    np.testing.assert_allclose(
        logits(tmp_path / "qdq.onnx", held_out, **EXACT_QDQ), logits(tmp_path / "nbits.onnx", held_out), atol=2e-4
    )


def test_embeddings_and_lm_head_are_options(decoders, calibration, held_out, tmp_path) -> None:
    model = decoders["plain"]
    reference = logits(model, held_out)
    sizes = {}
    for bits in (4, 8):
        settings = WeightOnlySettings(bits=bits, quantize_embeddings=True, quantize_lm_head=True, symmetric=bits == 8)
        result = quantize_weight_only(model, tmp_path / f"all{bits}.onnx", settings, calibration)
        sizes[bits] = result.bytes_after
        assert result.embeddings == {"embed_tokens": bits} and "lm_head" in result.quantized and not result.kept
        (gather,) = nodes_of(tmp_path / f"all{bits}.onnx", "GatherBlockQuantized")
        assert attribute(gather, "block_size") == 32 and attribute(gather, "quantize_axis") == 1
        assert not nodes_of(tmp_path / f"all{bits}.onnx", "Gather")
        assert cosine(reference, logits(tmp_path / f"all{bits}.onnx", held_out)) > (0.97 if bits == 4 else 0.9999)
    default = quantize_weight_only(model, tmp_path / "default.onnx", WeightOnlySettings(), calibration)
    assert default.bytes_after > sizes[4] + 2 * 3 / 4 * HIDDEN * VOCAB * 4  # two float tables -> int4


def test_mixed_precision_meets_a_policy_full_int4_misses(decoders, calibration, tmp_path) -> None:
    model = decoders["outliers"]
    settings = WeightOnlySettings(bits=4)
    _, held, _ = split_feeds(calibration)
    full = LogitJudge(model, held).figures(quantize_weight_only(model, tmp_path / "full.onnx", settings).path)
    policy = LogitPolicy(min_cosine=0.97)
    assert not full.meets(policy)
    mixed = quantize_weight_only_mixed(model, tmp_path / "mixed.onnx", settings, calibration, MixedSettings(policy))
    assert mixed.met and mixed.figures is not None and mixed.figures.meets(policy)
    assert 0 < len(mixed.wider) < 14 and [probe.kept_float for probe in mixed.probes][0] == 0
    bits = {  # a joined node is named after its MatMuls: "l0_q_proj+l0_k_proj_Q4"
        name: attribute(n, "bits")
        for n in nodes_of(mixed.result.path, "MatMulNBits")
        for name in n.name.removesuffix("_Q4").removesuffix("_Q8").split("+")
    }
    assert {name for name, b in bits.items() if b == 8} == set(mixed.wider)
    assert mixed.result.bytes_after < 1.2 * quantize_weight_only(model, tmp_path / "full.onnx", settings).bytes_after


def test_damage_ranking_puts_first_what_costs_most(decoders, calibration, tmp_path) -> None:
    model = decoders["outliers"]
    calibrate, held, _ = split_feeds(calibration)
    quantizer = WeightOnlyQuantizer(model, WeightOnlySettings(bits=4), calibrate)
    judge = LogitJudge(model, held)
    ranked = rank_layers(quantizer, "damage", judge, scratch=tmp_path)
    assert len(ranked) == 14 and all(c.damage is not None and c.damage > 0 for c in ranked)
    assert [c.damage for c in ranked] == sorted((c.damage for c in ranked), reverse=True)
    proxy = rank_layers(quantizer, "proxy")
    assert {c.node for c in proxy} == {c.node for c in ranked}

    def cosine_with(plan: dict[str, int]) -> float:
        return judge.figures(quantizer.write(tmp_path / "one.onnx", plan, 2**30).path).cosine

    # alone in int4, the first costs the most on every held-out batch, not only the one ranked on
    assert cosine_with({ranked[0].node: 4}) < cosine_with({ranked[-1].node: 4})
    # kept float while the rest is int4, the first two (layer 0's q and k: their errors interact
    # in the scores, so either alone rescues little) buy more than the last two
    full = quantizer.default_plan()
    assert cosine_with({**full, **dict.fromkeys((c.node for c in ranked[:2]), 0)}) > cosine_with(
        {**full, **dict.fromkeys((c.node for c in ranked[-2:]), 0)}
    )


def test_external_data_is_read_in_place_and_written_beside(tmp_path) -> None:
    model = build_decoder(tmp_path / "ext.onnx", external=True)
    loaded = load_model(model)
    assert all(
        isinstance(v.const_value, ir.ExternalTensor)
        for v in loaded.graph.initializers.values()
        if v.const_value.nbytes > 4096
    )
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    result = quantize_weight_only(
        model, out, WeightOnlySettings(method="gptq"), feeds(4, seed=1), external_data_threshold_bytes=1024
    )
    assert (out.parent / "q.onnx.data").exists() and result.file_bytes < 0.45 * (
        model.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    )
    assert cosine(logits(model, feeds(1, seed=2)), logits(out, feeds(1, seed=2))) > 0.98
    inline = tmp_path / "elsewhere" / "inline.onnx"  # under the threshold, in another folder
    inline.parent.mkdir()
    quantize_weight_only(model, inline, WeightOnlySettings(), None, external_data_threshold_bytes=2**30)
    assert [f.name for f in inline.parent.iterdir()] == ["inline.onnx"]
    assert not any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(str(inline)).graph.initializer)
    assert cosine(logits(model, feeds(1, seed=2)), logits(inline, feeds(1, seed=2))) > 0.98


def test_hessians_skip_padding_and_groups_fit_the_budget(decoders) -> None:
    reader = ActivationReader(decoders["plain"], {"l0_h": TensorProto.FLOAT})
    padded = feeds(1, seed=7)[0]
    trimmed = {**padded, "input_ids": padded["input_ids"][1:], "attention_mask": padded["attention_mask"][1:]}
    first_row = {**padded, "input_ids": padded["input_ids"][:1, 3:], "attention_mask": padded["attention_mask"][:1, 3:]}
    rows = int(padded["attention_mask"].sum())
    together, tokens = reader.hessians(["l0_h"], [padded])
    assert tokens == rows == 4 * 16 - 3
    (trimmed_h, trimmed_tokens), (first_h, first_tokens) = (
        reader.hessians(["l0_h"], [f]) for f in (trimmed, first_row)
    )
    assert (trimmed_tokens, first_tokens) == (48, 13)
    together, apart = together["l0_h"] * rows, trimmed_h["l0_h"] * 48 + first_h["l0_h"] * 13
    np.testing.assert_allclose(together, apart, rtol=1e-4, atol=1e-4)
    assert hessian_groups({"a": 64, "b": 64, "c": 128}, budget_bytes=8 * 64 * 64 * 2) == [["a", "b"], ["c"]]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"bits": 3}, "bits"),
        ({"block_size": 24}, "block_size"),
        ({"method": "awq"}, "method"),
        ({"method": "hqq", "symmetric": True}, "symmetric"),
        ({"method": "hqq", "bits": 8}, "bits"),
        ({"method": "hqq", "format": "qdq"}, "format"),
        ({"accuracy_level": 5}, "accuracy_level"),
    ],
)
def test_settings_without_a_kernel_are_refused(settings: dict[str, object], key: str) -> None:
    with pytest.raises(JobError) as raised:
        WeightOnlySettings(**settings)  # type: ignore[arg-type]
    assert raised.value.key == f"quantize.weight_only.{key}"


def test_gptq_without_feeds_and_qdq_below_opset_18_are_refused(decoders, tmp_path) -> None:
    with pytest.raises(JobError, match="gptq needs calibration"):
        quantize_weight_only(decoders["plain"], tmp_path / "x.onnx", WeightOnlySettings(method="gptq"), None)
    old = onnx.load(str(decoders["plain"]))
    old.opset_import[0].version = 17
    onnx.save(old, tmp_path / "old.onnx")
    with pytest.raises(JobError, match="opset 17"):
        quantize_weight_only(tmp_path / "old.onnx", tmp_path / "y.onnx", WeightOnlySettings(format="qdq"))


def test_a_model_whose_matmul_weights_are_not_constants_is_refused(decoders, tmp_path) -> None:
    """torch's export feeds each Linear weight through a Transpose (simplify folds it): quantizing
    that graph would write an "int4" model that is the float one."""
    model = onnx.load(str(decoders["plain"]))
    for node in model.graph.node:
        if node.op_type == "MatMul":
            weight = node.input[1]
            node.input[1] = f"{weight}_t"
            model.graph.node.append(onnx.helper.make_node("Identity", [weight], [f"{weight}_t"]))
    onnx.save(model, tmp_path / "transposed.onnx")

    with pytest.raises(JobError, match="no MatMul with a constant 2-D float weight.*simplify"):
        quantize_weight_only(tmp_path / "transposed.onnx", tmp_path / "q.onnx", WeightOnlySettings())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory maps are read from /proc")
def test_quantizing_leaves_no_float_weight_resident(tmp_path) -> None:
    """Each weight's memory map closes once its codes exist, and the written model's when saved:
    a 1 B model's float weights do not all sit in memory beside its codes."""
    model = build_decoder(tmp_path / "ext.onnx", external=True)

    quantize_weight_only(model, tmp_path / "q.onnx", WeightOnlySettings(), None, external_data_threshold_bytes=1024)

    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith("ext.onnx.data")]
    assert mapped == []


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DecoderSignature]:
    """A random-init LlamaForCausalLM (2 layers, hidden 64, 4 heads, 2 KV heads) exported with its
    cache (TorchScript exporter, a few seconds; the dynamo exporter takes about 30 s here)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    signature = DecoderSignature.from_config(config)
    path = export_with_torchscript(model, signature, tmp_path_factory.mktemp("llama") / "llama.onnx")
    return path, signature


def test_an_exported_llama_decodes_with_its_cache_after_gptq_int4(llama, tmp_path) -> None:
    path, signature = llama
    rng = np.random.default_rng(8)
    prompts = [signature.step_feeds(rng.integers(0, 256, (4, 16)), np.ones((4, 16), np.int64)) for _ in range(6)]
    out = tmp_path / "llama.int4.onnx"
    result = quantize_weight_only(path, out, WeightOnlySettings(method="gptq", quantize_embeddings=True), prompts[:4])
    assert (
        result.lm_head is not None
        and result.lm_head.endswith("lm_head/MatMul")
        and list(result.kept) == [result.lm_head]
    )
    assert len(result.quantized) == 14 and list(result.embeddings)[0].endswith("embed_tokens/Gather")
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feeds_ in prompts[4:]:
        states = [feeds_, feeds_]
        for _ in range(3):  # the prompt, then two one-token steps on the cache
            expected, got = (
                dict(zip(signature.output_names(), s.run(None, f), strict=True))
                for s, f in zip((reference, quantized), states, strict=True)
            )
            assert got["present.1.value"].shape == expected["present.1.value"].shape
            assert cosine(expected["logits"], got["logits"]) > 0.98
            token = np.argmax(expected["logits"][:, -1:], axis=-1)
            mask = np.ones((4, expected["present.0.key"].shape[2] + 1), np.int64)
            states = [signature.step_feeds(token, mask, signature.next_past(o)) for o in (expected, got)]
