"""Unit tests of the QDQ rewrite (power-of-two scales), the recipe and the CPU reduce_range rule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibration.collector import CalibrationStats, collect_statistics, select_tensors
from pipeline.calibration.histogram import TensorHistogram
from pipeline.calibration.ranges import compute_range
from pipeline.quantization import cpu
from pipeline.quantization.performance import float_compute_nodes
from pipeline.quantization.qdq import QdqSettings, power_of_two_scale, quantize_qdq
from pipeline.quantization.recipe import (
    TRANSFORMER_OP_TYPES,
    choose_recipe,
    irregular_tensor_nodes,
    is_transformer,
)
from pipeline.stages.quantize import QuantizeStage
from tests.unit.calibration.masked_attention import MASK, MASK_ADD, MASKED, SOFTMAX, masked_attention_model
from tests.unit.stages.test_quantize import make_context, make_job, make_target

OPSET = [helper.make_opsetid("", 17)]

# --- models --------------------------------------------------------------------------------------


def _weight(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(scale=0.3, size=shape).astype(np.float32), name)


def mlp_model() -> onnx.ModelProto:
    """y = Relu(x @ W1) @ W2, shape-inferred; W1's columns differ in scale (per-channel scales differ)."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(16, 8)) * np.geomspace(0.01, 2.0, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(w1, "w1"), _weight(rng, "w2", 8, 4)],
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=OPSET))


def cnn_model() -> onnx.ModelProto:
    """logits = Flatten(Relu(Conv(x) + b)) @ W + bias: a classifier, nothing attention-like."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
            helper.make_node("Flatten", ["relu"], ["flat"], axis=1, name="flatten"),
            helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="fc"),
            helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_bias"),
        ],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
        initializer=[
            _weight(rng, "conv_w", 4, 3, 3, 3),
            _weight(rng, "conv_b", 4),
            _weight(rng, "fc_w", 4 * 6 * 6, 5),
            _weight(rng, "fc_b", 5),
        ],
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=OPSET))


def attention_model(norm: str | None = "LayerNormalization", weights_only: bool = False) -> onnx.ModelProto:
    """A MiniLM-style self-attention block: LayerNorm, Q/K/V projections, Softmax(Q K^T) V.

    Args:
        norm: "LayerNormalization", "ReduceMean" (a decomposed LayerNorm) or None.
        weights_only: K^T comes from a Constant node and V is a weight, so no MatMul multiplies
            two activations.
    """
    rng = np.random.default_rng(2)
    nodes = []
    initializers = [_weight(rng, name, 8, 8) for name in ("wq", "wk", "wv")]
    if norm == "LayerNormalization":
        initializers += [numpy_helper.from_array(np.ones(8, np.float32), "gamma")]
        initializers += [numpy_helper.from_array(np.zeros(8, np.float32), "beta")]
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"))
    elif norm == "ReduceMean":
        nodes.append(helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], name="mean"))
        nodes.append(helper.make_node("Sub", ["x", "mean"], ["ln"], name="center"))
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["ln"], name="no_norm"))
    nodes.append(helper.make_node("MatMul", ["ln", "wq"], ["q"], name="query"))
    if weights_only:
        keys = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "kt_value")
        nodes.append(helper.make_node("Constant", [], ["kt"], value=keys, name="keys"))
        nodes.append(helper.make_node("Identity", ["wv"], ["v"], name="value"))
    else:
        nodes.append(helper.make_node("MatMul", ["ln", "wk"], ["k"], name="key"))
        nodes.append(helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="key_t"))
        nodes.append(helper.make_node("MatMul", ["ln", "wv"], ["v"], name="value"))
    nodes += [
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["probs", "wv" if weights_only else "v"], ["context"], name="context"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 8])],
        [helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", 8, 8])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=OPSET)


def ranges_of(model: onnx.ModelProto, feeds: dict[str, np.ndarray], folder: Path) -> dict[str, tuple[float, float]]:
    """Activation ranges (MSE) from real data streamed through the model in two batches."""
    half = next(iter(feeds.values())).shape[0] // 2
    batches = [{k: v[:half] for k, v in feeds.items()}, {k: v[half:] for k, v in feeds.items()}]
    stats = collect_statistics(model, folder, select_tensors(model, None), batches, histograms=True)
    return {name: compute_range(h, "mse") for name, h in stats.tensors.items()}


def settings(power_of_two: bool, per_channel: bool = True) -> QdqSettings:
    return QdqSettings(
        per_channel=per_channel,
        activation_type="uint8",
        weight_type="int8",
        activation_symmetric=False,
        reduce_range=False,
        power_of_two=power_of_two,
    )


def qdq_parameters(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(tensor, scale, zero point) of every QuantizeLinear / DequantizeLinear node."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found.append((node.input[0], values[node.input[1]], values[node.input[2]]))
    return found


def is_power_of_two(scale: np.ndarray) -> bool:
    exponents = np.log2(scale.astype(np.float64))
    return bool(np.all(scale > 0) and np.all(exponents == np.round(exponents)))


MODELS = {
    "mlp": (mlp_model, {"x": np.random.default_rng(3).normal(size=(32, 16)).astype(np.float32)}),
    "cnn": (cnn_model, {"x": np.random.default_rng(4).normal(size=(32, 3, 6, 6)).astype(np.float32)}),
}


@pytest.fixture(scope="module")
def ranges(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, tuple[float, float]]]:
    folder = tmp_path_factory.mktemp("ranges")
    return {name: ranges_of(build(), feeds, folder) for name, (build, feeds) in MODELS.items()}


def assert_power_of_two_qdq(model: onnx.ModelProto, feeds: dict[str, np.ndarray], reference: onnx.ModelProto) -> None:
    found = qdq_parameters(model)
    assert found
    biases = {init.name for init in model.graph.initializer if init.data_type == TensorProto.INT32}
    for tensor, scale, zero_point in found:
        assert is_power_of_two(scale), (tensor, scale)
        assert not np.any(zero_point), tensor
        assert zero_point.dtype == (np.int32 if tensor in biases else np.int8), tensor
    # And it still computes the same function, give or take 8 bits.
    (expected,) = ort.InferenceSession(reference.SerializeToString()).run(None, feeds)
    (actual,) = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    cosine = np.sum(expected * actual) / (np.linalg.norm(expected) * np.linalg.norm(actual))
    assert cosine > 0.99


# --- power_of_two_scale --------------------------------------------------------------------------


def test_power_of_two_scale_is_the_smallest_that_does_not_clip() -> None:
    rng = np.random.default_rng(5)
    magnitudes = [*10.0 ** rng.uniform(-20, 20, size=5000), 1.0, 127.0, 0.5, 3e-9, 254.0]
    # float32 values around the exact boundaries 127 * 2**k (the ranges come from float32 data).
    for k in range(-30, 30):
        boundary = np.float32(127 * 2.0**k)
        magnitudes += [
            float(boundary),
            float(np.nextafter(boundary, np.float32(0))),
            float(np.nextafter(boundary, 1e30)),
        ]

    for magnitude in magnitudes:
        scale = power_of_two_scale(magnitude)
        assert math.log2(scale).is_integer(), magnitude
        assert magnitude <= 127 * scale < 2 * magnitude, magnitude


def test_power_of_two_scale_of_exact_boundaries_and_other_levels() -> None:
    assert power_of_two_scale(127.0) == 1.0
    assert power_of_two_scale(127.0 * 2**-10) == 2**-10
    assert power_of_two_scale(1.0, levels=1) == 1.0
    assert power_of_two_scale(1.5, levels=1) == 2.0
    assert power_of_two_scale(0.0) == power_of_two_scale(-1.0) == 1.0


def test_power_of_two_scale_never_clips_by_an_ulp() -> None:
    magnitude = math.nextafter(127 * 2.0**-10, math.inf)

    assert magnitude <= 127 * power_of_two_scale(magnitude)


# --- quantize_qdq --------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("mlp"),
        pytest.param("cnn"),
    ],
)
def test_power_of_two_values_give_power_of_two_scales(
    name: str,
    per_channel: bool,
    ranges: dict[str, dict[str, tuple[float, float]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build, feeds = MODELS[name]
    model = build()

    quantized = quantize_qdq(model, ranges[name], settings(True, per_channel), None, [])

    assert_power_of_two_qdq(quantized, feeds, model)


@pytest.mark.parametrize("per_channel", [True, False])
def test_power_of_two_scales_on_a_matmul_model(per_channel: bool, ranges: dict[str, Any]) -> None:
    build, feeds = MODELS["mlp"]
    model = build()

    quantized = quantize_qdq(model, ranges["mlp"], settings(True, per_channel), None, [])

    assert_power_of_two_qdq(quantized, feeds, model)


def test_stage_with_power_of_two_scales(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, make_job(tmp_path, quantize={"power_of_two_scales": True}), [make_target("cpu")])

    artifact = QuantizeStage().run(ctx)

    assert artifact.metadata["power_of_two_scales"] is True


@pytest.mark.parametrize("name", sorted(MODELS))
def test_without_power_of_two_scales_are_generally_not_powers_of_two(
    name: str, ranges: dict[str, dict[str, tuple[float, float]]]
) -> None:
    build, feeds = MODELS[name]
    model = build()

    quantized = quantize_qdq(model, ranges[name], settings(False), None, [])

    scales = [scale for _, scale, _ in qdq_parameters(quantized)]
    assert scales
    assert sum(not is_power_of_two(scale) for scale in scales) > len(scales) / 2
    zero_points = [zp for _, _, zp in qdq_parameters(quantized) if zp.dtype == np.uint8]
    assert zero_points and any(np.any(zp) for zp in zero_points)  # asymmetric uint8 activations


def test_excluded_nodes_keep_float_weights(ranges: dict[str, dict[str, tuple[float, float]]]) -> None:
    quantized = quantize_qdq(mlp_model(), ranges["mlp"], settings(False), None, ["fc2"])

    fc1 = next(n for n in quantized.graph.node if n.name == "fc1")
    fc2 = next(n for n in quantized.graph.node if n.name == "fc2")
    dequantized = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert set(fc1.input) <= dequantized
    assert fc2.input[1] == "w2"  # the float weight, untouched
    assert "w2" in {init.name for init in quantized.graph.initializer}


def test_float_compute_nodes_counts_an_excluded_node(
    ranges: dict[str, dict[str, tuple[float, float]]], tmp_path: Path
) -> None:
    quantized = quantize_qdq(mlp_model(), ranges["mlp"], settings(False), None, ["fc2"])
    path = tmp_path / "q.onnx"
    onnx.save(quantized, str(path))

    assert float_compute_nodes(path) == 1


def test_float_compute_nodes_of_fully_quantized_and_float_models(
    ranges: dict[str, dict[str, tuple[float, float]]], tmp_path: Path
) -> None:
    onnx.save(quantize_qdq(mlp_model(), ranges["mlp"], settings(False), None, []), str(tmp_path / "q.onnx"))
    onnx.save(mlp_model(), str(tmp_path / "f.onnx"))

    assert float_compute_nodes(tmp_path / "q.onnx") == 0
    assert float_compute_nodes(tmp_path / "f.onnx") == 2


def test_only_quantizes_just_the_named_node(ranges: dict[str, dict[str, tuple[float, float]]], tmp_path: Path) -> None:
    quantized = quantize_qdq(mlp_model(), ranges["mlp"], settings(False), None, [], only=["fc1"])

    path = tmp_path / "q.onnx"
    onnx.save(quantized, str(path))
    assert float_compute_nodes(path) == 1  # fc2
    fc1 = next(n for n in quantized.graph.node if n.name == "fc1")
    dequantized = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert set(fc1.input) <= dequantized


# --- recipe --------------------------------------------------------------------------------------


def test_minilm_style_attention_is_a_transformer() -> None:
    assert is_transformer(attention_model("LayerNormalization"))
    assert is_transformer(attention_model("ReduceMean"))  # LayerNorm decomposed by an older exporter


def test_cnn_and_incomplete_attention_are_not_transformers() -> None:
    assert not is_transformer(cnn_model())
    assert not is_transformer(mlp_model())
    assert not is_transformer(attention_model(norm=None))  # no normalisation
    assert not is_transformer(attention_model(weights_only=True))  # no MatMul of two activations
    assert not is_transformer(masked_attention_model())  # Softmax, but weights-only MatMuls and no norm


def test_choose_recipe_by_family() -> None:
    transformer = choose_recipe(attention_model(), None, [])
    generic = choose_recipe(cnn_model(), None, [])

    assert (transformer.family, transformer.op_types) == ("transformer", TRANSFORMER_OP_TYPES)
    assert (generic.family, generic.op_types) == ("generic", None)
    assert transformer.kept_float == generic.kept_float == {}
    assert transformer.quantize_outputs is False  # MatMul outputs feed float ops: no Q/DQ there
    assert generic.quantize_outputs is True


def test_choose_recipe_respects_the_job() -> None:
    recipe = choose_recipe(attention_model(), ["Conv", "Gemm"], ["query", "softmax"])

    assert recipe.family == "job"
    assert recipe.op_types == ("Conv", "Gemm")
    assert list(recipe.kept_float) == ["query", "softmax"]
    assert all("exclude_nodes" in reason for reason in recipe.kept_float.values())
    # Excludes apply whatever the family.
    assert list(choose_recipe(cnn_model(), None, ["fc"]).kept_float) == ["fc"]
    assert choose_recipe(cnn_model(), [], []).op_types == ()


def test_irregular_tensor_nodes_names_the_nodes_touching_non_finite_tensors() -> None:
    model = masked_attention_model()
    regular = TensorHistogram()
    regular.update(np.float32([0.1, 0.9]))
    stats = CalibrationStats(
        tensors={
            "probs": regular,
            MASKED: TensorHistogram(finite=10, nonfinite=6),
            MASK: TensorHistogram(finite=10, huge=6),  # finfo.min instead of -inf
        }
    )

    kept = irregular_tensor_nodes(model, stats)

    assert set(kept) == {MASK_ADD, SOFTMAX}
    assert repr(MASK) in kept[MASK_ADD] or repr(MASKED) in kept[MASK_ADD]
    assert repr(MASKED) in kept[SOFTMAX] and "6 non-finite" in kept[SOFTMAX]


def test_irregular_tensor_nodes_is_empty_for_regular_statistics() -> None:
    regular = TensorHistogram()
    regular.update(np.float32([1.0, -2.0]))

    assert irregular_tensor_nodes(masked_attention_model(), CalibrationStats({MASKED: regular})) == {}


# --- cpu -----------------------------------------------------------------------------------------


def test_needs_reduce_range_on_this_machine() -> None:
    reduce_range, reason = cpu.needs_reduce_range()

    assert isinstance(reduce_range, bool)
    assert "VNNI" in reason or "CPU" in reason
    flags = cpu.int8_dot_product_flags()
    if flags:  # a VNNI-class CPU never needs 7-bit weights
        assert not reduce_range and all(flag in reason for flag in flags)


@pytest.mark.parametrize(
    ("flags", "machine", "expected", "words"),
    [
        (None, "x86_64", False, "cannot inspect the CPU"),
        ((), "x86_64", True, "without VNNI"),
        ((), "AMD64", True, "without VNNI"),
        (("avx512_vnni",), "x86_64", False, "avx512_vnni"),
        (("asimddp",), "aarch64", False, "asimddp"),
        ((), "aarch64", False, "aarch64 CPU"),
    ],
)
def test_needs_reduce_range_rules(
    monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...] | None, machine: str, expected: bool, words: str
) -> None:
    monkeypatch.setattr(cpu, "int8_dot_product_flags", lambda: flags)
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)

    reduce_range, reason = cpu.needs_reduce_range()

    assert reduce_range is expected
    assert words in reason
