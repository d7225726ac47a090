"""The emulator's fast integer arithmetic: float sums are used only where a bound proves them exact,
float requantization equals the integer shifter, and the multiply-accumulate kernels equal plain
int64 arithmetic (also where float32 would not be exact, and where the accumulator saturates)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from backends.fpga import gemm
from backends.fpga.emulator import Emulator, requantize, shift_round
from backends.fpga.exact import FLOAT32_EXACT, FLOAT64_EXACT, exact_type, requantize_exact, sum_bound
from backends.fpga.mac_kernels import MacKernels, narrow_inputs
from backends.fpga.partition import AcceleratorNode, Fixed
from backends.fpga.profile import FpgaProfile, load_profile

ROUNDINGS = ["half_even", "half_up", "floor"]


def profile_with(accumulator_bits: int = 32, rounding: str = "half_even") -> FpgaProfile:
    profile = load_profile("dpu-int8")
    arithmetic = profile.arithmetic.model_copy(update={"accumulator_bits": accumulator_bits, "rounding": rounding})
    return profile.model_copy(update={"arithmetic": arithmetic})


def kernels(profile: FpgaProfile) -> tuple[MacKernels, dict[str, int]]:
    """The MAC kernels with an accumulator that clips and counts as the emulator's does."""
    saturated: dict[str, int] = {}
    limit = (1 << (profile.arithmetic.accumulator_bits - 1)) - 1

    def accumulate(node: onnx.NodeProto, total: np.ndarray) -> np.ndarray:
        saturated[node.name] = int(np.count_nonzero(np.abs(total) > limit))
        return np.clip(total, -limit - 1, limit)

    return MacKernels(profile, shift_round, accumulate), saturated


def direct_conv(x: np.ndarray, w: np.ndarray, group: int, stride: int, dilation: int, pads: list[int]) -> np.ndarray:
    """Grouped convolution on int64, one kernel tap at a time (no im2col, no floats)."""
    top, left, bottom, right = pads
    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    out_channels, per_group, kh, kw = w.shape
    ho = (padded.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    wo = (padded.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((x.shape[0], out_channels, ho, wo), dtype=np.int64)
    for o in range(out_channels):
        g = o // (out_channels // group)
        for c in range(per_group):
            for i in range(kh):
                for j in range(kw):
                    rows = slice(i * dilation, i * dilation + stride * (ho - 1) + 1, stride)
                    cols = slice(j * dilation, j * dilation + stride * (wo - 1) + 1, stride)
                    out[:, o] += padded[:, g * per_group + c, rows, cols] * int(w[o, c, i, j])
    return out


def test_the_float_type_is_chosen_by_the_bound() -> None:
    assert exact_type(FLOAT32_EXACT) is np.float32
    assert exact_type(FLOAT32_EXACT + 1) is np.float64
    assert exact_type(FLOAT64_EXACT) is np.float64
    assert exact_type(FLOAT64_EXACT + 1) is np.int64
    weights = np.array([[1, -2], [-3, 4], [5, 0]], dtype=np.int8)  # per output: sum|w| = 9 and 6
    assert sum_bound(weights, 128) == 128 * 9
    assert sum_bound(weights, 128, np.array([0, 1000], dtype=np.int32)) == 128 * 6 + 1000


def test_float32_stops_being_exact_past_the_bound() -> None:
    """Why the bound matters: 2**24 + 1 is the first integer float32 rounds."""
    assert int(np.float32(FLOAT32_EXACT)) == FLOAT32_EXACT
    assert int(np.float32(FLOAT32_EXACT + 1)) != FLOAT32_EXACT + 1


def sums_to_requantize(rng: np.random.Generator, shift: int, limit: int) -> np.ndarray:
    """Sums that land around the int8 range after the shift (exact ties, their neighbours, random
    remainders) and some anywhere up to `limit` (saturating), as int64."""
    quotients = rng.integers(-140, 141, size=2000) << max(shift, 0)
    if shift > 0:
        half = 1 << (shift - 1)
        near = [quotients + rng.integers(0, 1 << shift, size=2000), quotients + half, quotients + half - 1]
        near += [quotients + half + 1, quotients]
    else:
        near = [rng.integers(-300, 301, size=2000)]
    values = np.concatenate([*near, rng.integers(-limit, limit + 1, size=1000)])
    return values[np.abs(values) <= limit]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_float_requantization_equals_the_integer_shifter(rounding: str) -> None:
    rng = np.random.default_rng(3)
    for dtype, limit in ((np.float32, FLOAT32_EXACT), (np.float64, 1 << 45)):
        for shift in [-3, -1, 0, 1, 2, 5, 12, 20, 30]:
            values = sums_to_requantize(rng, shift, limit)
            expected = np.clip(shift_round(values, shift, rounding), -128, 127).astype(np.int8)
            got = requantize_exact(values.astype(dtype), shift, rounding)  # type: ignore[arg-type]
            assert got is not None
            np.testing.assert_array_equal(got, expected, err_msg=f"{dtype.__name__}, shift {shift}")
            assert len(np.unique(expected)) >= 30 or shift > 20  # not all saturated: the rounding is exercised


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_requantize_of_narrow_integers_equals_the_integer_shifter_and_keeps_the_memory_order(rounding: str) -> None:
    """int8 and int16 results (pass-through kernels, sums of few terms): every int8 value and the
    int16 extremes, each shift the integer path takes (1 to 14) and beyond it (the float path)."""
    channels_last = np.arange(-128, 128, dtype=np.int8).reshape(2, 4, 4, 8)
    int16 = np.array([-32768, -32767, -16385, -16384, -8192, -3, 3, 8191, 8192, 16384, 32767], dtype=np.int16)
    for values in (channels_last.transpose(0, 3, 1, 2), int16):  # a channels-first view, as conv kernels return
        for shift in (-1, 0, 1, 2, 3, 7, 8, 13, 14, 15, 20):
            got = requantize(values, 5 + shift, 5, rounding)  # type: ignore[arg-type]
            expected = np.clip(shift_round(values.astype(np.int64), shift, rounding), -128, 127)
            np.testing.assert_array_equal(got, expected, err_msg=f"{values.dtype}, shift {shift}")
            assert got.dtype == np.int8
            assert np.argsort(got.strides).tolist() == np.argsort(values.strides).tolist()


def test_wide_integers_and_huge_shifts_are_left_to_the_integer_shifter() -> None:
    assert requantize_exact(np.array([1 << 40], dtype=np.int64), 3, "half_even") is None
    assert requantize_exact(np.array([5.0]), 80, "half_even") is None
    np.testing.assert_array_equal(requantize(np.array([(1 << 40) + 7], dtype=np.int64), 36, 0, "floor"), [16])


def gemm_node(name: str = "fc") -> onnx.NodeProto:
    return helper.make_node("Gemm", ["x_d", "w_d", "b_d"], ["y"], name=name, transB=1)


def test_gemm_past_the_float32_bound_is_exact_in_float64() -> None:
    """All-positive products of 4096 terms: sums near 2**26, odd, which float32 cannot hold."""
    rng = np.random.default_rng(5)
    x = rng.integers(100, 128, size=(16, 4096), dtype=np.int8)
    w = rng.integers(100, 128, size=(8, 4096), dtype=np.int8)
    b = rng.integers(-1000, 1000, size=(8,), dtype=np.int32)
    exact = x.astype(np.int64) @ w.astype(np.int64).T + b
    float32 = np.rint(x.astype(np.float32) @ w.astype(np.float32).T + b.astype(np.float32)).astype(np.int64)
    assert np.any(float32 != exact)  # the data do break float32
    assert sum_bound(w.T, 128, b) > FLOAT32_EXACT

    mac, saturated = kernels(profile_with())
    values, frac_bits = mac.gemm(gemm_node(), [(x, 3), (w, 4), (b, 7)])

    assert values.dtype == np.float64
    np.testing.assert_array_equal(values.astype(np.int64), exact)
    assert frac_bits == 7
    assert saturated == {}  # the bound is below the 32-bit accumulator: no check needed, none made


def test_gemm_past_the_float64_bound_is_exact_in_int64() -> None:
    """Weights near 2**47 whose products cancel: each product needs 54 bits (float64 rounds it), the
    sums are small; the bound is past 2**53, so the kernel sums on int64, exactly."""
    x = np.array([[127, 127, 1], [-128, -128, -1]], dtype=np.int8)
    w = np.array([[(1 << 47) + 1, -(1 << 47), 1], [-(1 << 47) - 3, 1 << 47, 5]], dtype=np.int64)
    exact = x.astype(np.int64) @ w.T  # [[128, -376], [-129, 379]]
    assert np.any(np.rint(x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.int64) != exact)
    assert np.abs(exact).max() < 1 << 47
    mac, saturated = kernels(profile_with(accumulator_bits=48))

    values, _ = mac.gemm(gemm_node(), [(x, 0), (w, 0), None])

    assert values.dtype == np.int64
    np.testing.assert_array_equal(values, exact)
    assert saturated == {"fc": 0}  # checked (the bound passes the accumulator), nothing over it


def test_gemm_sums_beyond_the_accumulator_saturate_and_are_counted() -> None:
    x = np.full((2, 8), 127, dtype=np.int8)
    w = np.array([[127] * 8, [-127] * 8, [1] * 8], dtype=np.int8)  # sums 129032, -129032, 1016
    mac, saturated = kernels(profile_with(accumulator_bits=16))
    values, _ = mac.gemm(gemm_node(), [(x, 0), (w, 0), None])
    np.testing.assert_array_equal(values, [[32767, -32768, 1016]] * 2)
    assert saturated == {"fc": 4}


@pytest.mark.parametrize(
    ("group", "stride", "dilation", "pads"),
    [(1, 1, 1, [1, 1, 1, 1]), (2, 2, 1, [0, 1, 2, 0]), (4, 1, 2, [2, 2, 2, 2]), (1, 3, 2, [0, 0, 0, 0])],
)
def test_conv_equals_a_direct_int64_convolution(group: int, stride: int, dilation: int, pads: list[int]) -> None:
    rng = np.random.default_rng(group * 10 + stride)
    x = rng.integers(-128, 128, size=(3, 8, 9, 7), dtype=np.int8)
    w = rng.integers(-128, 128, size=(8, 8 // group, 3, 3), dtype=np.int8)
    b = rng.integers(-(1 << 20), 1 << 20, size=(8,), dtype=np.int32)
    node = helper.make_node(
        "Conv",
        ["x", "w", "b"],
        ["y"],
        name="conv",
        group=group,
        strides=[stride] * 2,
        dilations=[dilation] * 2,
        pads=pads,
    )
    mac, _ = kernels(profile_with())

    values, frac_bits = mac.conv(node, [(x, 5), (w, 6), (b, 11)])

    np.testing.assert_array_equal(values, direct_conv(x, w, group, stride, dilation, pads) + b.reshape(-1, 1, 1))
    assert frac_bits == 11


def test_non_negative_activations_take_the_integer_gemm_exactly() -> None:
    """After a ReLU the activations are 0..127: uint8 x int8 sums on ONNX Runtime's integer GEMM,
    at the extremes that would saturate a narrower sum; a signed input to the same node goes
    through float32, and both equal the direct convolution."""
    rng = np.random.default_rng(21)
    w = rng.integers(-128, 128, size=(16, 32, 3, 3), dtype=np.int8)
    w[0], w[1] = -128, 127  # every product of a window at its extreme
    b = rng.integers(-5000, 5000, size=(16,), dtype=np.int32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    mac, _ = kernels(profile_with())
    relu_out = np.maximum(rng.integers(-128, 128, size=(4, 32, 6, 6)), 0).astype(np.int8)
    relu_out[0] = 127
    signed = rng.integers(-128, 128, size=(4, 32, 6, 6), dtype=np.int8)

    for x in (relu_out, signed, relu_out):
        values, _ = mac.conv(node, [(x, 5), (w, 7), (b, 12)])
        np.testing.assert_array_equal(values, direct_conv(x, w, 1, 1, 1, [1, 1, 1, 1]) + b.reshape(-1, 1, 1))

    assert mac._prepared["y"].product.unsigned == gemm.unsigned_products_exact()


def test_the_integer_gemm_is_refused_where_it_is_not_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that sums four u8 x s8 products in saturating int16 (as none should) fails the check."""

    class QuadSaturating:
        def __init__(self, weights: np.ndarray) -> None:
            self.weights = weights.astype(np.int64)

        def run(self, outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            products = feeds["x"].astype(np.int64)[:, :, None] * self.weights[None]  # [M, K, N]
            quads = products.reshape(len(products), -1, 4, products.shape[-1]).sum(axis=2)
            return [np.clip(quads, -(1 << 15), (1 << 15) - 1).sum(axis=1).astype(np.int32)]

    monkeypatch.setattr(gemm, "_session", lambda matrix, threads: QuadSaturating(matrix))
    assert gemm.unsigned_products_exact.__wrapped__() is False


def test_conv_past_the_float32_bound_is_exact() -> None:
    rng = np.random.default_rng(9)
    x = rng.integers(100, 128, size=(2, 256, 4, 4), dtype=np.int8)
    w = rng.integers(100, 128, size=(4, 256, 3, 3), dtype=np.int8)  # 2304 positive terms per sum
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    mac, _ = kernels(profile_with(accumulator_bits=48))

    values, _ = mac.conv(node, [(x, 0), (w, 0)])

    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, direct_conv(x, w, 1, 1, 1, [1, 1, 1, 1]))


def test_prepared_weights_follow_the_operand_that_comes_in() -> None:
    """A constant operand is prepared once; a MatMul operand that changes (an activation) is not reused."""
    rng = np.random.default_rng(11)
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    mac, _ = kernels(profile_with())
    for _ in range(3):
        a = rng.integers(-128, 128, size=(2, 5, 16), dtype=np.int8)
        b = rng.integers(-128, 128, size=(16, 6), dtype=np.int8)
        values, _ = mac.matmul(node, [(a, 1), (b, 2)])
        np.testing.assert_array_equal(values, a.astype(np.int64) @ b.astype(np.int64))


def test_max_pool_with_padding_equals_the_int64_maximum() -> None:
    rng = np.random.default_rng(13)
    x = rng.integers(-128, -120, size=(2, 3, 7, 6), dtype=np.int8)  # near the pad value: padding must not win
    node = helper.make_node(
        "MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 2], strides=[2, 2], pads=[1, 1, 1, 0]
    )
    mac, _ = kernels(profile_with())

    values, _ = mac.max_pool(node, [(x, 4)])

    padded = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 0)), constant_values=-(1 << 20))
    expected = np.stack(
        [[padded[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 2].max(axis=(2, 3)) for j in range(3)] for i in range(4)]
    ).transpose(2, 3, 0, 1)
    np.testing.assert_array_equal(values, expected)


def test_kernels_get_int64_copies_unless_marked_narrow() -> None:
    """Kernels written for int64 inputs (as every kernel was) still get int64; marked ones get the stored int8."""
    seen: dict[str, np.dtype] = {}

    def wide(node: onnx.NodeProto, inputs: list) -> tuple[np.ndarray, int]:  # type: ignore[type-arg]
        seen["wide"] = inputs[0][0].dtype
        return inputs[0][0] * 300, inputs[0][1]  # would overflow int8

    @narrow_inputs
    def narrow(node: onnx.NodeProto, inputs: list) -> tuple[np.ndarray, int]:  # type: ignore[type-arg]
        seen["narrow"] = inputs[0][0].dtype
        return inputs[0][0], inputs[0][1]

    emulator = Emulator(profile_with(), {})
    emulator._kernels.update({"Wide": wide, "Narrow": narrow})
    env = {"x": np.array([1, -1], dtype=np.int8)}
    for op in ("Wide", "Narrow"):
        item = AcceleratorNode(helper.make_node(op, ["x_d"], ["y"], name=op), [Fixed("x", 0)], [Fixed(op, -2)])
        emulator.run(item, env)

    assert seen == {"wide": np.int64, "narrow": np.int8}
    np.testing.assert_array_equal(env["Wide"], [75, -75])  # 300 / 4, not an int8 wrap
    np.testing.assert_array_equal(env["Narrow"], [0, 0])
