"""The hls4ml export of the FPGA-style target: the QONNX partition (its Quant nodes, scales and
integers, and qonnx's own execution of it against the emulator), the refusals (no or several
accelerator segments, an operator hls4ml's reader does not take, a rounding it has no type for, a
missing toolchain), and a small CNN's C simulation bit for bit against the emulator.

Models are QDQ graphs built here with power-of-two scales, so every int8 value is known.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.errors import BackendError
from backends.fpga.hls import EXPORTABLE_OPS, INSTALL_HINT, export_hls_project, export_qonnx, missing_tools, toolchain
from backends.fpga.hls.compare import PartitionRuns
from backends.fpga.hls.export import explain
from backends.fpga.hls.qonnx_export import QUANT_DOMAIN, accelerator_segment, boundary
from backends.fpga.hls.results import IntegerComparison
from backends.fpga.partition import partition
from backends.fpga.profile import PROFILES, FpgaProfile, load_profile

RNG = np.random.default_rng(22)
PROFILE = load_profile("dpu-int8")
MISSING = missing_tools()
needs_qonnx = pytest.mark.skipif("qonnx" in MISSING, reason=f"qonnx is not installed ({INSTALL_HINT})")
needs_toolchain = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} missing ({INSTALL_HINT})")


class Qdq:
    """A QDQ graph with power-of-two scales: value = int * 2**-frac_bits."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def q(self, tensor: str, frac_bits: int) -> str:
        """tensor -> QuantizeLinear -> DequantizeLinear (int8); the dequantized name."""
        scale = self.constant(f"{tensor}_s", np.array(2.0**-frac_bits, dtype=np.float32))
        zero = self.constant(f"{tensor}_z", np.array(0, dtype=np.int8))
        self.nodes.append(
            helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}_q"], name=f"{tensor}_Q")
        )
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", scale, zero], [f"{tensor}_d"]))
        return f"{tensor}_d"

    def weight(self, name: str, shape: tuple[int, ...], frac_bits: int, bias: bool = False) -> str:
        """A random int8 weight (or int32 bias) behind a DequantizeLinear."""
        dtype = np.int32 if bias else np.int8
        values = RNG.integers(-3000 if bias else -128, 3000 if bias else 128, size=shape).astype(dtype)
        self.constant(name, values)
        scale = self.constant(f"{name}_s", np.array(2.0**-frac_bits, dtype=np.float32))
        zero = self.constant(f"{name}_z", np.array(0, dtype=dtype))
        self.nodes.append(helper.make_node("DequantizeLinear", [name, scale, zero], [f"{name}_d"]))
        return f"{name}_d"

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def model(self, inputs: dict[str, list[Any]], output: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "qdq",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            initializer=self.initializers,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def tiny_cnn(middle: str = "") -> onnx.ModelProto:
    """x [2, 6, 6] -> Conv 3x3 -> ReLU (coarser scale) -> Add x -> MaxPool 2x2 -> Flatten -> Gemm -> 5 logits.

    The output scales are coarser than the products', so requantization rounds (ties included);
    `middle` puts that float op between the Add and the pool (it falls back to the CPU).
    """
    g = Qdq()
    x = g.q("x", 5)
    conv = g.op("Conv", [x, g.weight("w1", (2, 2, 3, 3), 6), g.weight("b1", (2,), 11, bias=True)], "conv", pads=[1] * 4)
    relu = g.q(g.op("Relu", [g.q(conv, 3)], "relu"), 2)
    added = g.q(g.op("Add", [relu, x], "add"), 2)
    if middle:
        added = g.q(g.op(middle, [added], "middle"), 2)
    pooled = g.q(g.op("MaxPool", [added], "pool", kernel_shape=[2, 2], strides=[2, 2]), 2)
    flat = g.q(g.op("Flatten", [pooled], "flat"), 2)
    gemm = g.op("Gemm", [flat, g.weight("w2", (5, 18), 7), g.weight("b2", (5,), 9, bias=True)], "gemm", transB=1)
    return g.model({"x": ["batch", 2, 6, 6]}, g.op("Identity", [g.q(gemm, 1)], "logits"))


def tiny_mlp() -> onnx.ModelProto:
    """x [16] -> Gemm -> ReLU -> MatMul -> 4 outputs."""
    g = Qdq()
    hidden = g.op("Gemm", [g.q("x", 4), g.weight("w1", (16, 8), 6), g.weight("b1", (8,), 10, bias=True)], "hidden")
    relu = g.q(g.op("Relu", [g.q(hidden, 3)], "relu"), 3)
    out = g.q(g.op("MatMul", [relu, g.weight("w2", (8, 4), 7)], "out"), 1)
    return g.model({"x": ["batch", 16]}, g.op("Identity", [out], "y"))


def exported(model: onnx.ModelProto, x: np.ndarray, profile: FpgaProfile = PROFILE) -> tuple[Any, PartitionRuns]:
    """The model's QONNX partition, and the runs that give its boundary and the emulator's outputs."""
    plan = partition(model, profile)
    segment = accelerator_segment(plan)
    runs = PartitionRuns(model, plan, segment, profile)
    inputs, outputs = boundary(model, plan, segment)
    names = [fixed.tensor for fixed in (*inputs, *outputs)]
    shapes = {name: value.shape for name, value in zip(names, runs.boundary({"x": x}, names), strict=True)}
    return export_qonnx(model, plan, profile.arithmetic.rounding, shapes), runs


def test_the_partition_is_written_as_quant_nodes_with_power_of_two_scales() -> None:
    model = tiny_cnn()
    qonnx, _ = exported(model, RNG.normal(size=(3, 2, 6, 6)).astype(np.float32))
    graph = qonnx.model.graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    quants = [node for node in graph.node if node.op_type == "Quant"]

    assert [n.op_type for n in graph.node if n.op_type != "Quant"] == [
        "Conv",
        "Relu",
        "Add",
        "MaxPool",
        "Flatten",
        "Gemm",
    ]
    assert qonnx.nodes == ("conv", "relu", "add", "pool", "flat", "gemm")
    assert {node.domain for node in quants} == {QUANT_DOMAIN}
    for node in quants:
        scale = float(initializers[node.input[1]])
        assert math.frexp(scale)[0] == 0.5 and float(initializers[node.input[2]]) == 0.0
        attributes = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        assert attributes == {"signed": 1, "narrow": 0, "rounding_mode": b"ROUND"}  # half_even: AP_RND_CONV
    # Weights are Quant-ed initializers holding the integers times their scale; biases are 32-bit.
    weight = next(n for n in quants if n.input[0] == "w1_value")
    integers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert np.array_equal(initializers["w1_value"] * 2.0**6, integers["w1"])
    assert float(initializers[weight.input[3]]) == 8.0
    assert float(initializers[next(n for n in quants if n.input[0] == "b1_value").input[3]]) == 32.0
    # One input (the int8 image, 5 fraction bits), one output (the int8 logits, 1 fraction bit); batch 1.
    assert [(f.tensor, f.frac_bits) for f in qonnx.inputs] == [("x_q", 5)]
    assert [(f.tensor, f.frac_bits) for f in qonnx.outputs] == [("gemm_q", 1)]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 2, 6, 6]
    onnx.checker.check_model(qonnx.model)


@needs_qonnx
@pytest.mark.parametrize("build", [tiny_cnn, tiny_mlp], ids=["cnn", "mlp"])
def test_qonnx_runs_the_partition_to_the_emulators_integers(build: Any) -> None:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    model = build()
    shape = [4, *(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])]
    x = RNG.normal(scale=1.5, size=shape).astype(np.float32)
    qonnx, runs = exported(model, x)
    names = [f.tensor for f in (*qonnx.inputs, *qonnx.outputs)]
    (integers, cpu) = runs.boundary({"x": x}, names)
    (emulated,) = runs.emulate(qonnx, [integers])
    (source,), (result,) = qonnx.inputs, qonnx.outputs
    wrapper = ModelWrapper(qonnx.model).transform(InferShapes())
    for sample in range(len(x)):  # the QONNX graph has batch 1, as hls4ml takes it
        feeds = {f"{source.tensor}_input": integers[sample : sample + 1].astype(np.float32) * 2.0**-source.frac_bits}
        value = execute_onnx(wrapper, feeds)[result.tensor] * 2.0**result.frac_bits
        assert np.array_equal(value[0], emulated[sample]), sample
    assert np.array_equal(emulated, cpu)


def test_a_partition_split_by_a_cpu_node_is_refused_with_its_segments() -> None:
    model = tiny_cnn(middle="Sigmoid")  # not in the profile: runs on the CPU between two accelerator runs

    with pytest.raises(BackendError, match=r"2 separate segments \(conv \.\. add; pool \.\. gemm\)") as error:
        exported(model, RNG.normal(size=(1, 2, 6, 6)).astype(np.float32))
    assert "set hls = false" in str(error.value)


def test_a_model_with_nothing_on_the_accelerator_is_refused() -> None:
    g = Qdq()
    model = g.model({"x": ["batch", 4]}, g.op("Sigmoid", ["x"], "y"))

    with pytest.raises(BackendError, match="no node of the model runs on the accelerator"):
        accelerator_segment(partition(model, PROFILE))


def test_an_operator_hls4ml_does_not_take_is_named() -> None:
    g = Qdq()
    clipped = g.q(g.op("Clip", [g.q("x", 4), g.constant("lo", np.array(0, np.float32))], "clip"), 4)
    model = g.model({"x": ["batch", 8]}, g.op("Identity", [clipped], "y"))

    assert "Clip" not in EXPORTABLE_OPS
    with pytest.raises(BackendError, match=r"node clip \(Clip\): Clip has no layer in hls4ml's ONNX reader"):
        exported(model, RNG.normal(size=(2, 8)).astype(np.float32))


def test_a_result_the_cpu_reads_in_float_is_refused() -> None:
    g = Qdq()
    gemm = g.op("Gemm", [g.q("x", 4), g.weight("w", (8, 4), 6), g.weight("b", (4,), 10, bias=True)], "gemm")
    model = g.model({"x": ["batch", 8]}, g.op("Sigmoid", [gemm], "y"))  # the accumulators leave in float

    with pytest.raises(BackendError, match=r"node gemm \(Gemm\): its result leaves the accelerator in float"):
        exported(model, RNG.normal(size=(2, 8)).astype(np.float32))


def test_a_rounding_hls4ml_has_no_type_for_is_refused(tmp_path: Path) -> None:
    text = (PROFILES / "dpu-int8.toml").read_text()
    (tmp_path / "up.toml").write_text(text.replace('rounding = "half_even"', 'rounding = "half_up"'))
    half_up = load_profile(str(tmp_path / "up.toml"))

    with pytest.raises(BackendError, match="rounds requantization half_up"):
        exported(tiny_mlp(), RNG.normal(size=(2, 16)).astype(np.float32), half_up)


@pytest.mark.parametrize(
    "attribute, value", [("PACKAGES", ("hls4ml_is_not_installed", "qonnx")), ("COMPILER", "g++-x")]
)
def test_a_missing_toolchain_says_what_to_install(monkeypatch: pytest.MonkeyPatch, attribute: str, value: Any) -> None:
    monkeypatch.setattr(toolchain, attribute, value)
    missing = "hls4ml_is_not_installed" if attribute == "PACKAGES" else "g++-x"

    with pytest.raises(BackendError, match=re.escape(f"needs {missing} (not found")) as error:
        toolchain.require_toolchain()
    assert error.value.exit_code == 2 and "pip install 'onnxforge[fpga-hls]'" in str(error.value)


def test_differences_are_explained_by_saturated_accumulators_or_called_a_bug() -> None:
    differing = IntegerComparison(values=100, mismatches=3, max_difference=2)

    assert explain(IntegerComparison(values=100), {}, PROFILE) == []
    (saturated,) = explain(differing, {"conv": 2}, PROFILE)
    assert "2 accumulations overflowed the profile's 32-bit accumulator (conv: 2)" in saturated
    (unexplained,) = explain(differing, {}, PROFILE)
    assert "3 values differ (by up to 2 steps)" in unexplained and "bug" in unexplained


@pytest.mark.slow
@needs_toolchain
def test_a_small_cnns_c_simulation_matches_the_emulator_bit_for_bit(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), path)
    x = RNG.normal(scale=1.5, size=(40, 2, 6, 6)).astype(np.float32)

    build = export_hls_project(path, PROFILE, tmp_path / "hls", [{"x": x[:24]}, {"x": x[24:]}])

    assert build.samples == 40 and build.vs_emulator.values == 200
    assert build.bit_exact and build.differences == []
    assert build.vs_cpu_qdq.max_difference == 0 and build.emulator_vs_cpu_qdq.exact
    kinds = {layer.kind for layer in build.layers}
    assert {"Conv2D", "Dense", "Pooling2D"} <= kinds
    conv = next(layer for layer in build.layers if layer.kind == "Conv2D")
    # Products carry 5 + 6 fraction bits: the profile's 32-bit accumulator has 21 integer bits.
    assert conv.types["accum_t"].startswith("ap_fixed<32,21,AP_RND_CONV,AP_WRAP")
    assert conv.types["result_t"].startswith("ap_fixed<8,5,AP_RND_CONV,AP_SAT")
    readme = (tmp_path / "hls" / "README.md").read_text()
    assert "vitis-run --mode hls --tcl build_prj.tcl" in readme and "**Bit-exact**" in readme
    assert (tmp_path / "hls" / "model.qonnx.onnx").is_file() and (
        tmp_path / "hls" / "firmware" / "myproject.cpp"
    ).is_file()
    assert (tmp_path / "hls" / "tb_data" / "tb_input_features.dat").read_text().count("\n") == 24
