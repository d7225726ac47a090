"""The FPGA-style backend: emulator bit-exactness against a direct computation, partition reasons,
the cost and memory model, and profiles.

The QDQ models are built by hand with power-of-two scales, so every int8 value is known and a
plain-Python reference (loops over integers) says exactly what the accelerator must output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import backends
from backends.errors import BackendError
from backends.fpga import FpgaBackend, FpgaOptions
from backends.fpga.cost import plan_buffers, static_shapes
from backends.fpga.emulator import shift_round
from backends.fpga.partition import partition
from backends.fpga.profile import load_profile

RNG = np.random.default_rng(7)


class QdqBuilder:
    """Builds a QDQ graph whose scales are powers of two: value = int * 2**-frac_bits."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def quantize(self, tensor: str, frac_bits: int, dtype: type = np.int8, scale: float | None = None) -> str:
        """tensor -> QuantizeLinear -> DequantizeLinear; returns the dequantized name."""
        scale_name = self.constant(f"{tensor}_s", np.array(scale or 2.0**-frac_bits, dtype=np.float32))
        zero_name = self.constant(f"{tensor}_z", np.array(0, dtype=dtype))
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [f"{tensor}_q"]))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", scale_name, zero_name], [f"{tensor}_d"]))
        return f"{tensor}_d"

    def weight(self, name: str, values: np.ndarray, frac_bits: int) -> str:
        """A constant integer tensor behind a DequantizeLinear (int8 weights, int32 biases)."""
        dtype = values.dtype.type
        self.constant(name, values)
        scale = self.constant(f"{name}_s", np.array(2.0**-frac_bits, dtype=np.float32))
        zero = self.constant(f"{name}_z", np.array(0, dtype=dtype))
        self.nodes.append(helper.make_node("DequantizeLinear", [name, scale, zero], [f"{name}_d"]))
        return f"{name}_d"

    def op(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{output}_node", **attrs))
        return output

    def save(self, path: Path, inputs: dict[str, list[str | int | None]], output: str) -> Path:
        graph = helper.make_graph(
            self.nodes,
            "qdq",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        onnx.save(model, path)
        return path


def round_shift(value: int, shift: int, rounding: str) -> int:
    """The reference requantizer, on Python integers (exact rational arithmetic)."""
    if shift <= 0:
        return value * 2**-shift
    quotient, remainder = divmod(value, 2**shift)  # floor division, remainder >= 0
    half = 2 ** (shift - 1)
    if rounding == "floor":
        return quotient
    if rounding == "half_up":
        return quotient + (remainder >= half)
    return quotient + (remainder > half or (remainder == half and quotient % 2 == 1))


def saturate(value: int) -> int:
    return max(-128, min(127, value))


def reference_conv(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int, shift: int, bias_shift: int, rounding: str
) -> np.ndarray:
    """Direct convolution on Python ints: sum of int8 products plus the aligned bias, then requantize."""
    n, c, h, width = x.shape
    co, _, k, _ = w.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (width + 2 * pad - k) // stride + 1
    out = np.zeros((n, co, ho, wo), dtype=np.int64)
    for b_i in range(n):
        for o in range(co):
            for i in range(ho):
                for j in range(wo):
                    total = 0
                    for ch in range(c):
                        for di in range(k):
                            for dj in range(k):
                                row, col = i * stride + di - pad, j * stride + dj - pad
                                if 0 <= row < h and 0 <= col < width:
                                    total += int(x[b_i, ch, row, col]) * int(w[o, ch, di, dj])
                    total += round_shift(int(b[o]), bias_shift, rounding)
                    out[b_i, o, i, j] = saturate(round_shift(total, shift, rounding))
    return out


def conv_model(path: Path, w: np.ndarray, b: np.ndarray, fracs: tuple[int, int, int, int], stride: int, pad: int):
    """x -> Q/DQ -> Conv(w, b) -> Q/DQ; fracs = (input, weight, bias, output) fraction bits."""
    f_in, f_w, f_b, f_out = fracs
    build = QdqBuilder()
    x = build.quantize("x", f_in)
    conv = build.op(
        "Conv",
        [x, build.weight("w", w, f_w), build.weight("b", b, f_b)],
        "y",
        strides=[stride, stride],
        pads=[pad] * 4,
        kernel_shape=list(w.shape[2:]),
    )
    return build.save(path, {"x": ["batch", w.shape[1], 7, 7]}, build.quantize(conv, f_out))


def run_fpga(model: Path, feeds: dict[str, np.ndarray], rounding: str = "half_even", tmp: Path | None = None):
    options = FpgaOptions()
    if rounding != "half_even":
        assert tmp is not None
        text = (backends.fpga.profile.PROFILES / "dpu-int8.toml").read_text()
        profile = tmp / f"{rounding}.toml"
        profile.write_text(text.replace('rounding = "half_even"', f'rounding = "{rounding}"'))
        options = FpgaOptions(profile=str(profile))
    with FpgaBackend().open(model, options) as session:
        return session.run(feeds)


def test_shift_round_modes() -> None:
    values = np.array([5, -5, 7, -7, 6, 4], dtype=np.int64)  # halves: 2.5, -2.5, 3.5, -3.5, 3, 2
    np.testing.assert_array_equal(shift_round(values, 1, "half_up"), [3, -2, 4, -3, 3, 2])
    np.testing.assert_array_equal(shift_round(values, 1, "half_even"), [2, -2, 4, -4, 3, 2])
    np.testing.assert_array_equal(shift_round(values, 1, "floor"), [2, -3, 3, -4, 3, 2])
    np.testing.assert_array_equal(shift_round(values, -2, "floor"), values * 4)


@pytest.mark.parametrize("rounding", ["half_even", "half_up", "floor"])
def test_conv_integers_match_a_direct_computation_bit_for_bit(tmp_path: Path, rounding: str) -> None:
    fracs = (5, 7, 10, 4)  # input 2^-5, weight 2^-7, bias 2^-10 (not input x weight: it is re-aligned), out 2^-4
    w = RNG.integers(-128, 128, size=(4, 3, 3, 3), dtype=np.int8)
    b = RNG.integers(-5000, 5000, size=(4,), dtype=np.int32)
    x_int = RNG.integers(-128, 128, size=(2, 3, 7, 7), dtype=np.int64)
    model = conv_model(tmp_path / "conv.onnx", w, b, fracs, stride=2, pad=1)

    out = run_fpga(model, {"x": (x_int * 2.0 ** -fracs[0]).astype(np.float32)}, rounding, tmp_path)["y_d"]

    shift = fracs[0] + fracs[1] - fracs[3]
    expected = reference_conv(x_int, w, b, 2, 1, shift, fracs[2] - (fracs[0] + fracs[1]), rounding)
    got = np.rint(out * 2.0 ** fracs[3]).astype(np.int64)
    np.testing.assert_array_equal(got, expected)
    assert np.abs(expected).max() == 128 or np.abs(expected).max() <= 127  # saturation is in range


def test_half_even_accelerator_equals_onnx_runtime_qdq(tmp_path: Path) -> None:
    """ONNX's QuantizeLinear rounds half to even: with that rounding the accelerator is CPU QDQ exactly.

    Exactly means the exact integer arithmetic QDQ defines, which ONNX Runtime's fused int8 Conv
    computes only where it cannot overflow: on x86 CPUs without VNNI its kernel adds u8 x s8 products
    in pairs into saturating int16 (vpmaddubsw), with int8 activations shifted by 128 to u8, and
    full-range int8 weights overflow those pairs (see the test below; the reason reduce_range exists).
    So: full-range weights against the exact integers; 7-bit weights, whose pairs fit in int16 on
    every kernel, against ONNX Runtime as well.
    """
    fracs = (5, 7, 12, 4)
    w = RNG.integers(-128, 128, size=(4, 3, 3, 3), dtype=np.int8)
    b = RNG.integers(-5000, 5000, size=(4,), dtype=np.int32)
    model = conv_model(tmp_path / "conv.onnx", w, b, fracs, stride=1, pad=1)
    x_int = RNG.integers(-128, 128, size=(3, 3, 7, 7))
    x = (x_int * 2.0**-5).astype(np.float32)
    shift, bias_shift = fracs[0] + fracs[1] - fracs[3], fracs[2] - (fracs[0] + fracs[1])

    fpga = run_fpga(model, {"x": x})["y_d"]
    exact = reference_conv(x_int, w, b, 1, 1, shift, bias_shift, "half_even") * 2.0 ** -fracs[3]
    np.testing.assert_array_equal(fpga, exact)

    w7 = (w >> 1).astype(np.int8)  # [-64, 63]: 2 x 255 x 64 < 2^15
    model7 = conv_model(tmp_path / "conv7.onnx", w7, b, fracs, stride=1, pad=1)
    fpga = run_fpga(model7, {"x": x})["y_d"]
    cpu = ort.InferenceSession(str(model7), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_array_equal(fpga, cpu)
    np.testing.assert_array_equal(fpga, reference_conv(x_int, w7, b, 1, 1, shift, bias_shift, "half_even") / 16)


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text(errors="replace").split()) if cpuinfo.is_file() else set()


# ONNX Runtime's (MLAS) AVX2 u8 x s8 kernel: the CPUs this characterisation was measured on.
_AVX2_WITHOUT_VNNI = "avx2" in _cpu_flags() and not _cpu_flags() & {"avx512bw", "avx512_vnni", "avx_vnni"}


def pair_saturating_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """A stride-1 int8 Conv accumulated as x86 kernels without VNNI do: activations + 128 as u8, products
    summed in pairs along (kernel row, kernel column, channel) into saturating int16, then in int32, less
    128 x the weight sum (the zero-point correction); plus the int32 bias. Returns int64 accumulators."""
    n, c, h, width = x.shape
    co, _, k, _ = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # zero point 0
    taps = [(di, dj, ch) for di in range(k) for dj in range(k) for ch in range(c)]
    cols = np.stack([padded[:, ch, di : di + h, dj : dj + width] for di, dj, ch in taps], -1) + 128
    weights = np.stack([w[:, ch, di, dj].astype(np.int64) for di, dj, ch in taps], -1)
    if len(taps) % 2:
        cols = np.concatenate([cols, np.zeros((*cols.shape[:-1], 1), np.int64)], -1)
        weights = np.concatenate([weights, np.zeros((co, 1), np.int64)], -1)
    products = cols[..., None, :] * weights  # [n, h, w, co, K]
    pairs = np.clip(products[..., 0::2] + products[..., 1::2], -(2**15), 2**15 - 1)
    accumulators = pairs.sum(-1) - 128 * weights.sum(-1) + b
    return np.moveaxis(accumulators, -1, 1)


@pytest.mark.skipif(not _AVX2_WITHOUT_VNNI, reason="characterises ONNX Runtime's AVX2 int8 kernel (x86 without VNNI)")
def test_onnx_runtime_int8_conv_saturates_int16_pairs_without_vnni(tmp_path: Path) -> None:
    """Why CPU QDQ is not the exact reference for full-range int8 weights on such a CPU: ONNX Runtime's
    fused QLinearConv equals the pair-saturating arithmetic above on every element, not the exact one."""
    rng = np.random.default_rng(16)  # its own generator: the module's draws stay as they were
    w = rng.integers(-128, 128, size=(4, 3, 3, 3), dtype=np.int8)
    b = rng.integers(-5000, 5000, size=(4,), dtype=np.int32)
    x_int = rng.integers(-128, 128, size=(3, 3, 7, 7))
    model = conv_model(tmp_path / "conv.onnx", w, b, (5, 7, 12, 4), stride=1, pad=1)

    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": (x_int * 2.0**-5).astype(np.float32)}
    )[0]
    saturating = np.clip(np.rint(pair_saturating_conv(x_int, w, b, 1) / 2**8), -128, 127) / 16
    exact = reference_conv(x_int, w, b, 1, 1, 8, 0, "half_even") / 16

    np.testing.assert_array_equal(cpu, saturating)
    assert (cpu != exact).sum() > 0.05 * cpu.size


def test_pools_add_gemm_and_layout_ops_match_cpu_qdq(tmp_path: Path) -> None:
    """A small CNN head: Relu, MaxPool, a residual Add of two scales, GlobalAveragePool, Flatten, Gemm."""
    build = QdqBuilder()
    x = build.quantize("x", 5)
    relu = build.quantize(build.op("Relu", [x], "relu"), 5)
    pool = build.quantize(build.op("MaxPool", [relu], "pool", kernel_shape=[2, 2], strides=[1, 1]), 5)
    skip = build.quantize(build.op("MaxPool", [x], "skip", kernel_shape=[2, 2], strides=[1, 1]), 6)
    added = build.quantize(build.op("Add", [pool, skip], "added"), 4)
    gap = build.quantize(build.op("GlobalAveragePool", [added], "gap"), 6)
    flat = build.quantize(build.op("Flatten", [gap], "flat"), 6)
    w = RNG.integers(-128, 128, size=(5, 3), dtype=np.int8)
    b = RNG.integers(-300, 300, size=(5,), dtype=np.int32)
    gemm = build.op("Gemm", [flat, build.weight("w", w, 7), build.weight("b", b, 13)], "logits", transB=1)
    model = build.save(tmp_path / "head.onnx", {"x": ["batch", 3, 6, 6]}, build.quantize(gemm, 3))
    feeds = {"x": (RNG.integers(-128, 128, size=(4, 3, 6, 6)) * 2.0**-5).astype(np.float32)}

    placement = FpgaBackend().placement(model)
    fpga = run_fpga(model, feeds)["logits_d"]
    cpu = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    assert placement.fallback_nodes == 0
    assert placement.compute_nodes == 7
    # GlobalAveragePool divides by a 16-bit fixed-point reciprocal, not exactly: within one output step.
    assert np.abs(fpga - cpu).max() <= 2.0**-3


def test_partition_gives_a_reason_for_every_cpu_node(tmp_path: Path) -> None:
    build = QdqBuilder()
    x = build.quantize("x", 5)
    w = RNG.integers(-128, 128, size=(4, 4), dtype=np.int8)
    fc = build.quantize(build.op("MatMul", [x, build.weight("w", w, 7)], "fc"), 4)
    scores = build.quantize(build.op("MatMul", [fc, x], "scores"), 3)  # activation x activation
    soft = build.op("Softmax", [scores], "soft", axis=-1)
    odd = build.quantize(build.op("Relu", [build.quantize(soft, 0, scale=0.3)], "odd"), 4)  # scale not 2^k
    model = build.save(tmp_path / "mixed.onnx", {"x": [4, 4]}, odd)

    placement = FpgaBackend().placement(model)
    reasons = {node.node: node.reason for node in placement.nodes if node.op_type not in ("QuantizeLinear",)}

    assert placement.nodes[[n.node for n in placement.nodes].index("fc_node")].device == "fpga:dpu-int8"
    assert "both inputs are activations" in reasons["scores_node"]
    assert "Softmax is not in profile dpu-int8's operators" in reasons["soft_node"]
    assert "is not a power of two" in reasons["odd_node"]
    assert placement.fallback_nodes == 3 and placement.compute_nodes == 4
    assert placement.fallback_share == pytest.approx(0.75)


def test_per_channel_weights_and_limits_fall_back_with_reasons(tmp_path: Path) -> None:
    build = QdqBuilder()
    x = build.quantize("x", 5)
    w = RNG.integers(-128, 128, size=(2, 1, 17, 17), dtype=np.int8)
    big = build.quantize(build.op("Conv", [x, build.weight("w", w, 7)], "big", kernel_shape=[17, 17]), 4)
    model = build.save(tmp_path / "big.onnx", {"x": [1, 1, 20, 20]}, big)

    node = next(n for n in FpgaBackend().placement(model).nodes if n.node == "big_node")

    assert node.device == "CPUExecutionProvider"
    assert "kernel [17, 17] exceeds the profile's kernel_max 16" in node.reason


def test_memory_plan_reuses_dead_buffers_and_never_overlaps_live_ones(tmp_path: Path) -> None:
    build = QdqBuilder()
    tensor = build.quantize("x", 5)
    for index in range(4):
        w = RNG.integers(-128, 128, size=(8, 8 if index else 3, 3, 3), dtype=np.int8)
        conv = build.op("Conv", [tensor, build.weight(f"w{index}", w, 7)], f"c{index}", pads=[1, 1, 1, 1])
        tensor = build.quantize(conv, 4)
    model_path = build.save(tmp_path / "chain.onnx", {"x": ["batch", 3, 16, 16]}, tensor)
    model = onnx.load(str(model_path))
    plan = partition(model, load_profile("dpu-int8"))
    items = plan.segments[1].accelerator_nodes

    buffers = plan_buffers(items, static_shapes(model, {}), plan.constants)
    report = FpgaBackend().placement(model_path)

    assert sorted(b.bytes for b in buffers) == [3 * 16 * 16] + [8 * 16 * 16] * 4
    for one in buffers:
        for other in buffers:
            if one is not other and one.first_step <= other.last_step and other.first_step <= one.last_step:
                assert one.offset + one.bytes <= other.offset or other.offset + other.bytes <= one.offset
    assert report.accelerator is not None
    segment = report.accelerator.segments[0]
    assert segment.peak_activation_bytes < segment.unshared_activation_bytes
    assert segment.peak_activation_bytes == 2 * 8 * 16 * 16  # two live 8x16x16 maps at a time
    # conv0: 16x16 pixels / 8 x 8 outputs / 16 x 3 inputs / 16 x 9 taps = 32 x 1 x 1 x 9 cycles
    assert report.accelerator.node_costs[0].cycles == 32 * 9
    assert report.accelerator.node_costs[0].macs == 8 * 16 * 16 * 3 * 9


def test_float_models_run_entirely_on_the_cpu(tmp_path: Path) -> None:
    build = QdqBuilder()
    model = build.save(tmp_path / "float.onnx", {"x": ["batch", 4]}, build.op("Relu", ["x"], "y"))

    placement = FpgaBackend().placement(model)
    with FpgaBackend().open(model) as session:
        y = session.run({"x": np.array([[-1.0, 2.0, -3.0, 4.0]], dtype=np.float32)})["y"]

    np.testing.assert_array_equal(y, [[0.0, 2.0, 0.0, 4.0]])
    assert placement.fallback_share == 1.0
    assert "is float (not quantized)" in placement.nodes[0].reason


def test_profiles_load_and_bad_profiles_are_clear_errors(tmp_path: Path) -> None:
    profile = load_profile("dpu-int8")
    assert profile.compute.macs_per_cycle == 2048
    assert {"Conv", "Gemm", "Relu", "Add", "MaxPool", "Concat", "Reshape"} <= set(profile.ops)

    with pytest.raises(BackendError, match="no built-in profile 'nope'; built-ins: dpu-int8"):
        load_profile("nope")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = 'x'\n[ops.Conv]\nkernel_max = 0\n")
    with pytest.raises(BackendError, match=r"ops\.Conv\.kernel_max"):
        load_profile(str(broken))
    broken.write_text("name = ")
    with pytest.raises(BackendError, match="not valid TOML"):
        load_profile(str(broken))
    with pytest.raises(BackendError, match="cannot read profile"):
        load_profile(str(tmp_path / "missing.toml"))


def test_a_profile_without_an_op_sends_it_to_the_cpu(tmp_path: Path) -> None:
    text = (backends.fpga.profile.PROFILES / "dpu-int8.toml").read_text().replace("[ops.MaxPool]", "[ops.MaxPoolX]")
    custom = tmp_path / "no-pool.toml"
    custom.write_text(text.replace('name = "dpu-int8"', 'name = "no-pool"'))
    build = QdqBuilder()
    x = build.quantize("x", 5)
    pool = build.quantize(build.op("MaxPool", [x], "pool", kernel_shape=[2, 2]), 5)
    model = build.save(tmp_path / "pool.onnx", {"x": [1, 2, 4, 4]}, build.quantize(build.op("Relu", [pool], "r"), 5))

    placement = FpgaBackend().placement(model, FpgaOptions(profile=str(custom)))
    feeds = {"x": (RNG.integers(-128, 128, size=(1, 2, 4, 4)) * 2.0**-5).astype(np.float32)}
    fpga = run_fpga(model, feeds)["r_d"]
    with FpgaBackend().open(model, FpgaOptions(profile=str(custom))) as session:
        split = session.run(feeds)["r_d"]

    devices = {node.node: node.device for node in placement.nodes}
    assert devices["pool_node"] == "CPUExecutionProvider"
    assert devices["r_node"] == "fpga:no-pool"
    np.testing.assert_array_equal(split, fpga)  # CPU -> accelerator hand-over keeps the int8 values


def test_options_validate_cost_dims() -> None:
    assert FpgaOptions(cost_dims=["batch=2", "sequence=128"]).dims == {"batch": 2, "sequence": 128}
    with pytest.raises(ValueError, match="not name=positive integer"):
        FpgaOptions(cost_dims=["batch"])


def test_availability_says_how_it_runs() -> None:
    availability = FpgaBackend().availability()

    assert availability.ok
    if "VitisAIExecutionProvider" not in ort.get_available_providers():
        assert "emulated" in availability.detail
        assert FpgaBackend().execution_providers == ("CPUExecutionProvider",)
