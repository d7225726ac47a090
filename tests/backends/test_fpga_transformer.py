"""The transformer profile (npu-int8): attention, LayerNorm, Softmax and GELU on the accelerator's
integer units, within one int8 step of ONNX Runtime's CPU QDQ run of the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from backends.base import QDQ_OPS
from backends.fpga import FpgaBackend, FpgaOptions
from backends.fpga.profile import load_profile
from backends.fpga.units import TransformerUnits
from tests.backends.test_fpga import QdqBuilder

RNG = np.random.default_rng(11)
HIDDEN = 16
NPU = FpgaOptions(profile="npu-int8")


def attention_block(path: Path) -> Path:
    """LayerNorm -> Q / K / V projections -> scaled scores -> Softmax -> P x V -> GELU, all QDQ with
    power-of-two scales; the reshape's shape is computed from the input's dynamic dimensions."""
    build = QdqBuilder()
    x = build.quantize("x", 5)
    gamma = build.weight("gamma", RNG.integers(40, 127, size=HIDDEN, dtype=np.int8), 6)
    beta = build.weight("beta", RNG.integers(-2000, 2000, size=HIDDEN, dtype=np.int32), 11)
    norm = build.quantize(build.op("LayerNormalization", [x, gamma, beta], "norm", axis=-1, epsilon=1e-5), 5)

    def project(name: str) -> str:
        weight = build.weight(f"w_{name}", RNG.integers(-128, 128, size=(HIDDEN, HIDDEN), dtype=np.int8), 9)
        bias = build.weight(f"b_{name}", RNG.integers(-128, 128, size=HIDDEN, dtype=np.int8), 8)
        product = build.quantize(build.op("MatMul", [norm, weight], f"{name}_mm"), 4)
        return build.quantize(build.op("Add", [product, bias], name), 4)

    query, key, value = project("q"), project("k"), project("v")
    shape = build.op("Shape", ["x"], "x_shape")
    key = build.quantize(build.op("Reshape", [key, shape], "k_view"), 4)
    key_t = build.quantize(build.op("Transpose", [key], "k_t", perm=[0, 2, 1]), 4)
    scores = build.quantize(build.op("MatMul", [query, key_t], "scores"), 1)
    scale = build.weight("scale", np.array(91, dtype=np.int8), 9)  # 91 / 512 ~ 1 / sqrt(32)
    scaled = build.quantize(build.op("Mul", [scores, scale], "scaled"), 3)
    probs = build.quantize(build.op("Softmax", [scaled], "probs", axis=-1), 7)
    context = build.quantize(build.op("MatMul", [probs, value], "context"), 4)
    build.nodes.append(helper.make_node("Gelu", [context], ["gelu"], name="gelu_node", domain="com.microsoft"))
    output = build.quantize("gelu", 4)
    return save_with_contrib_ops(build, path, output)


def save_with_contrib_ops(build: QdqBuilder, path: Path, output: str) -> Path:
    """The graph with input x [batch, sequence, HIDDEN], ONNX Runtime's com.microsoft ops allowed
    (Gelu, 16-bit Q / DQ): QdqBuilder.save imports the default domain only."""
    graph = helper.make_graph(
        build.nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=build.initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=9), path)
    return path


def feeds(batch: int = 3, sequence: int = 12) -> dict[str, np.ndarray]:
    codes = RNG.integers(-128, 128, size=(batch, sequence, HIDDEN))
    return {"x": (codes * 2.0**-5).astype(np.float32)}


def test_attention_runs_on_the_accelerator_within_one_step_of_cpu_qdq(tmp_path: Path) -> None:
    model = attention_block(tmp_path / "attention.onnx")
    data = feeds()

    placement = FpgaBackend().placement(model, NPU)
    with FpgaBackend().open(model, NPU) as session:
        accelerated = session.run(data)["gelu_d"]
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, data)[0]

    compute_on_cpu = [
        node.node for node in placement.nodes if node.device == "CPUExecutionProvider" and node.op_type not in QDQ_OPS
    ]
    assert compute_on_cpu == ["x_shape_node"]  # the Shape that computes the reshape's shape
    step = 2.0**-4
    assert np.abs(accelerated - cpu).max() <= step
    assert np.mean(accelerated == cpu) > 0.9


def test_the_cnn_profile_sends_attention_to_the_cpu_with_reasons(tmp_path: Path) -> None:
    model = attention_block(tmp_path / "attention.onnx")

    placement = FpgaBackend().placement(model)  # dpu-int8: MatMul only as a fully connected layer
    reasons = {node.node: node.reason for node in placement.nodes}

    assert "both inputs are activations" in reasons["scores_node"]
    assert "Softmax is not in profile dpu-int8's operators" == reasons["probs_node"]
    assert reasons["q_mm_node"] == ""  # the projections still run on the accelerator


def test_the_profile_lists_its_units_as_the_targets_op_types() -> None:
    npu = FpgaBackend().capabilities_for(NPU).quantization.accelerator_op_types
    dpu = FpgaBackend().capabilities_for(FpgaOptions()).quantization.accelerator_op_types

    assert {"LayerNormalization", "Softmax", "Gelu", "MatMul"} <= set(npu)
    assert "Softmax" not in dpu and "Conv" in dpu


def _units() -> TransformerUnits:
    return TransformerUnits(load_profile("npu-int8"), {})


@pytest.mark.parametrize("frac", [3, 5, 7])
def test_softmax_unit_is_within_one_output_step_of_the_exact_function(frac: int) -> None:
    codes = RNG.integers(-128, 128, size=(64, 40))
    node = helper.make_node("Softmax", ["x"], ["y"], name=f"softmax_{frac}", axis=-1)

    values, bits = _units().kernels()["Softmax"](node, [(codes, frac)])
    result = values * 2.0**-bits
    exact = np.exp(codes * 2.0**-frac - (codes * 2.0**-frac).max(axis=-1, keepdims=True))
    exact /= exact.sum(axis=-1, keepdims=True)

    assert np.abs(result - exact).max() < 2.0**-8 * 0.05  # far inside half an output step (2**-8)


@pytest.mark.parametrize("count", [16, 384])
def test_layer_norm_unit_matches_the_float_layer_norm(count: int) -> None:
    codes = RNG.integers(-128, 128, size=(32, count))
    codes[0] = 7  # a constant row: variance 0, only epsilon
    gamma = RNG.integers(-128, 128, size=count)
    beta = RNG.integers(-5000, 5000, size=count)
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", epsilon=1e-5)

    values, bits = _units().kernels()["LayerNormalization"](node, [(codes, 4), (gamma, 6), (beta, 12)])
    x = codes * 2.0**-4
    normalised = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    exact = normalised * gamma * 2.0**-6 + beta * 2.0**-12

    # Relative error of the 1/std table below 2**-11, plus 2**-12 on the normalised value.
    bound = np.abs(normalised * gamma * 2.0**-6) * 2.0**-10 + 2.0**-12 * 2.0 + 2.0**-bits
    assert np.all(np.abs(values * 2.0**-bits - exact) <= bound)


def test_gelu_unit_is_the_function_of_each_int8_code() -> None:
    codes = np.arange(-128, 128)
    exact_node = helper.make_node("Gelu", ["x"], ["y"], name="g", domain="com.microsoft")
    tanh_node = helper.make_node("Gelu", ["x"], ["y"], name="t", approximate="tanh")

    exact, bits = _units().kernels()["Gelu"](exact_node, [(codes, 4)])
    tanh, _ = _units().kernels()["Gelu"](tanh_node, [(codes, 4)])
    x = codes * 2.0**-4
    from math import erf

    reference = 0.5 * x * (1 + np.array([erf(v / np.sqrt(2)) for v in x]))
    assert np.abs(exact * 2.0**-bits - reference).max() <= 2.0 ** -(bits + 1)
    assert 0 < np.abs(tanh - exact).max() * 2.0**-bits < 1e-3  # a different function, close to erf's


def test_int16_activations_and_per_channel_weights_match_cpu_qdq(tmp_path: Path) -> None:
    """A16W8: an int16 LayerNorm output into a MatMul with per-channel power-of-two weights, then GELU
    on the int16 product: every node on the accelerator, within one output step of CPU QDQ."""
    build = QdqBuilder()
    x = build.quantize("x", 5)
    gamma = build.weight("gamma", RNG.integers(40, 127, size=HIDDEN, dtype=np.int8), 6)
    norm = build.op("LayerNormalization", [x, gamma], "norm", axis=-1)
    wide = _int16_qdq(build, norm, 12)
    weights = RNG.integers(-128, 128, size=(HIDDEN, HIDDEN), dtype=np.int8)
    fracs = RNG.integers(6, 10, size=HIDDEN)
    build.constant("w", weights)
    build.constant("w_s", (2.0**-fracs).astype(np.float32))
    build.constant("w_z", np.zeros(HIDDEN, dtype=np.int8))
    build.nodes.append(helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["w_d"], axis=1))
    product = _int16_qdq(build, build.op("MatMul", [wide, "w_d"], "mm"), 9)
    build.nodes.append(helper.make_node("Gelu", [product], ["gelu"], name="gelu_node", domain="com.microsoft"))
    output = build.quantize("gelu", 3)
    model = save_with_contrib_ops(build, tmp_path / "a16w8.onnx", output)
    data = feeds()

    placement = FpgaBackend().placement(model, NPU)
    with FpgaBackend().open(model, NPU) as session:
        accelerated = session.run(data)[output]
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, data)[0]

    assert [n.node for n in placement.nodes if n.device == "CPUExecutionProvider" and n.op_type not in QDQ_OPS] == []
    assert np.abs(accelerated - cpu).max() <= 2.0**-3
    assert np.mean(accelerated == cpu) > 0.95
    # The CNN profile takes neither int16 activations nor per-channel weights.
    reasons = {n.node: n.reason for n in FpgaBackend().placement(model).nodes}
    assert "not symmetric int8" in reasons["mm_node"] or "per-channel" in reasons["mm_node"]


def _int16_qdq(build: QdqBuilder, tensor: str, frac: int) -> str:
    """tensor -> int16 QuantizeLinear -> DequantizeLinear (ONNX Runtime's com.microsoft Q / DQ: 16-bit
    Q / DQ are standard ONNX only from opset 21)."""
    scale = build.constant(f"{tensor}_s16", np.array(2.0**-frac, dtype=np.float32))
    zero = build.constant(f"{tensor}_z16", np.array(0, dtype=np.int16))
    for op, source, result in (
        ("QuantizeLinear", tensor, f"{tensor}_q16"),
        ("DequantizeLinear", f"{tensor}_q16", f"{tensor}_d16"),
    ):
        build.nodes.append(helper.make_node(op, [source, scale, zero], [result], domain="com.microsoft"))
    return f"{tensor}_d16"


def test_a_matmul_read_in_float_leaves_the_accelerator_as_int32_accumulators(tmp_path: Path) -> None:
    """The CPU recipe's transformer MatMul (int8 inputs, float output) on an int8-only profile: the
    accelerator computes it, the CPU reads the dequantized accumulators."""
    build = QdqBuilder()
    x = build.quantize("x", 5)
    codes = RNG.integers(-128, 128, size=(HIDDEN, HIDDEN), dtype=np.int8)
    product = build.op("MatMul", [x, build.weight("w", codes, 8)], "product")
    probs = build.op("Softmax", [product], "probs", axis=-1)
    model = build.save(tmp_path / "float_out.onnx", {"x": ["batch", "sequence", HIDDEN]}, probs)
    data = feeds()

    placement = FpgaBackend().placement(model)
    with FpgaBackend().open(model) as session:
        accelerated = session.run(data)["probs"]
    devices = {node.node: node.device for node in placement.nodes}
    # The exact product (ONNX Runtime's AVX2 int8 kernel saturates pairs of u8 x s8 products, so
    # its QDQ run is no reference for full-range int8 here).
    exact = data["x"].astype(np.float64) @ (codes * 2.0**-8)
    exact = np.exp(exact - exact.max(axis=-1, keepdims=True))
    exact /= exact.sum(axis=-1, keepdims=True)

    assert devices["product_node"] == "fpga:dpu-int8"
    assert devices["probs_node"] == "CPUExecutionProvider"
    assert np.abs(accelerated - exact).max() < 1e-5  # exact sums; float32 rounding only
