"""The accelerator's multiply-accumulate kernels (Conv, Gemm, MatMul) and its int8 pass-through
kernels (Relu, MaxPool), fast and bit-exact.

They read the stored integers as they are (int8 activations, int8 weights, int32 biases: no int64
copy per run) and sum products in floating point, exact by the bound in `backends.fpga.exact`: per
node, once, the weights' ``max|x| * sum|w| + |bias|`` picks float32 (the usual case: any int8
layer of up to 1024 inputs per output), float64, or numpy's exact int64 matmul. The weight
matrices, in that type and in the layout the product wants, are prepared on the first run and
kept, with an ONNX Runtime session that multiplies by them (`backends.fpga.gemm`); int8 weights
whose sums stay within 2**24 also get the integer GEMM, which takes the activations of a run
that has no negative value (after a ReLU) as uint8.

A convolution works channels-last: the input is padded into a channels-last buffer of the chosen
type, its windows read as one strided view copied once into an im2col matrix, and one product
gives channels-last outputs, returned as a channels-first view. The next kernels keep that memory
order (numpy's elementwise functions do), so the next convolution's channels-last read is a plain
copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from backends.fpga.exact import ExactType, exact_type, magnitude, sum_bound
from backends.fpga.gemm import MatrixProduct
from backends.fpga.profile import FpgaProfile, Rounding

Wide = tuple[np.ndarray, int]
KernelT = TypeVar("KernelT", bound=Callable[..., Any])
ShiftRound = Callable[[np.ndarray, int, Rounding], np.ndarray]
Accumulate = Callable[[onnx.NodeProto, np.ndarray], np.ndarray]

NARROW_INPUTS = "narrow_inputs"
"""Attribute marking a kernel that takes its inputs in their stored integer types (see `narrow_inputs`)."""


def narrow_inputs(kernel: KernelT) -> KernelT:
    """Mark a kernel as taking its integer inputs as stored (int8, int32; read-only, shared with
    later runs) rather than as fresh int64 copies; it must widen before arithmetic that could overflow."""
    setattr(kernel, NARROW_INPUTS, True)
    return kernel


@dataclass(frozen=True)
class _Weights:
    """A node's constant operand, prepared once: reused while the same arrays come in.

    Attributes:
        source: The integer weight array it was built from.
        bias_source: The integer bias array it was built from, or None.
        activation: The activation's integer type the bound assumed.
        matrix: The weights in the exact type, [K, outputs] (or [groups, K, outputs per group]).
        product: x @ matrix (on ONNX Runtime for a constant: `backends.fpga.gemm`).
        bias: The bias aligned to the products' fraction bits, in the exact type, or None.
        may_saturate: Whether the bound exceeds the accumulator (then sums are checked and clipped).
    """

    source: np.ndarray
    bias_source: np.ndarray | None
    activation: np.dtype
    matrix: np.ndarray
    product: MatrixProduct
    bias: np.ndarray | None
    may_saturate: bool

    def fits(self, weights: np.ndarray, bias: np.ndarray | None, activation: np.dtype) -> bool:
        return self.source is weights and self.bias_source is bias and self.activation == activation


class MacKernels:
    """Conv, Gemm, MatMul, Relu and MaxPool kernels for the emulator's table (all `narrow_inputs`).

    Args:
        profile: The device profile (rounding of the bias alignment, accumulator width).
        shift_round: The accelerator's shifter (aligns biases).
        accumulate: Saturates sums to the accumulator, counting overflows.
        constants: The model's constants: a MatMul operand among them is prepared as a weight
            (an operand that is not, an activation, is multiplied on numpy each run).
        threads: Threads of the products with constant weights (0: the job's budget).
    """

    def __init__(
        self,
        profile: FpgaProfile,
        shift_round: ShiftRound,
        accumulate: Accumulate,
        constants: Mapping[str, np.ndarray] | None = None,
        threads: int = 0,
    ) -> None:
        self._constant_ids = {id(value) for value in (constants or {}).values()}
        self._threads = threads
        self._rounding = profile.arithmetic.rounding
        self._limit = (1 << (profile.arithmetic.accumulator_bits - 1)) - 1
        self._shift_round = shift_round
        self._accumulate = accumulate
        self._prepared: dict[str, _Weights] = {}
        self._attribute_cache: dict[str, dict[str, Any]] = {}

    def kernels(self) -> dict[str, Callable[[onnx.NodeProto, list[Wide | None]], Wide]]:
        """The kernels by op type."""
        return {
            "Conv": self.conv,
            "Gemm": self.gemm,
            "MatMul": self.matmul,
            "Relu": self.relu,
            "MaxPool": self.max_pool,
        }

    @narrow_inputs
    def conv(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        """2-D convolution (groups, strides, dilations, explicit pads) as one im2col product per group."""
        (x, x_frac), (w, w_frac) = _present(inputs[0]), _present(inputs[1])
        attrs = self._attributes(node)
        group = int(attrs.get("group", 1))
        frac_bits = x_frac + w_frac
        prepared = self._prepare(node, x.dtype, (w, _optional(inputs, 2)), frac_bits, lambda: _conv_matrix(w, group))
        kernel = tuple(int(k) for k in w.shape[2:])
        unsigned = _unsigned(x, prepared.product)  # the integer GEMM: uint8 columns, a quarter of the bytes
        if unsigned is not None:
            cols, (ho, wo) = _im2col(unsigned, kernel, attrs, np.dtype(np.uint8))
        else:
            cols, (ho, wo) = _im2col(x, kernel, attrs, prepared.matrix.dtype)
        if group == 1:
            total = prepared.product(cols)
        else:  # columns are (kernel row, kernel column, channel): split the channels into groups
            grouped = cols.reshape(len(cols), -1, group, x.shape[1] // group).transpose(2, 0, 1, 3)
            products = prepared.product(np.ascontiguousarray(grouped).reshape(group, len(cols), -1))  # [G, M, Cout/G]
            total = products.transpose(1, 0, 2).reshape(len(cols), -1)
        total = self._finish(node, total, prepared)
        return total.reshape(x.shape[0], ho, wo, -1).transpose(0, 3, 1, 2), frac_bits

    @narrow_inputs
    def gemm(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        """A fully connected layer: x @ w (w transposed when transB) + bias."""
        (x, x_frac), (w, w_frac) = _present(inputs[0]), _present(inputs[1])
        transposed = bool(self._attributes(node).get("transB", 0))
        frac_bits = x_frac + w_frac
        prepared = self._prepare(node, x.dtype, (w, _optional(inputs, 2)), frac_bits, lambda: w.T if transposed else w)
        return self._finish(node, prepared.product(_operand(x, prepared)), prepared), frac_bits

    @narrow_inputs
    def matmul(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        """a @ b; b prepared once where it is a constant (an activation b is prepared each run)."""
        (a, a_frac), (b, b_frac) = _present(inputs[0]), _present(inputs[1])
        prepared = self._prepare(node, a.dtype, (b, None), a_frac + b_frac, lambda: b, id(b) in self._constant_ids)
        return self._finish(node, prepared.product(_operand(a, prepared)), prepared), a_frac + b_frac

    @narrow_inputs
    def relu(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        x, frac_bits = _present(inputs[0])
        # Against an array of zeros, not the scalar 0: numpy's int8 maximum is vectorised only for
        # two arrays of one layout (6x faster here, zeros included).
        return np.maximum(x, np.zeros_like(x)), frac_bits

    @narrow_inputs
    def max_pool(self, node: onnx.NodeProto, inputs: list[Wide | None]) -> Wide:
        """The maximum of the kernel's strided shifts of the padded input (kernel_shape, strides, pads)."""
        x, frac_bits = _present(inputs[0])
        attrs = self._attributes(node)
        kernel = [int(k) for k in attrs["kernel_shape"]]
        strides = [int(s) for s in attrs.get("strides", [1, 1])]
        shifts = _shifted_windows(_pad_below(x, kernel, attrs), kernel, strides)
        result = np.array(next(shifts), order="K")  # keeps the input's memory order
        for shifted in shifts:
            np.maximum(result, shifted, out=result)
        return result, frac_bits

    def _attributes(self, node: onnx.NodeProto) -> dict[str, Any]:
        """The node's attributes, parsed on its first run (they do not change)."""
        key = node.output[0]
        if key not in self._attribute_cache:
            self._attribute_cache[key] = _attributes(node)
        return self._attribute_cache[key]

    def _prepare(
        self,
        node: onnx.NodeProto,
        activation: np.dtype,
        operands: tuple[np.ndarray, Wide | None],
        frac_bits: int,
        matrix: Callable[[], np.ndarray],
        constant: bool = True,
    ) -> _Weights:
        """The node's prepared weights (and bias): kept from an earlier run while the same arrays come in.

        Args:
            node: The node (its first output names the entry).
            activation: The other operand's integer type (its largest magnitude enters the bound).
            operands: The integer weights and the bias with its fraction bits (or None).
            frac_bits: Fraction bits of the products (the bias is aligned to them).
            matrix: The weights as the product's matrix, [K, outputs] or [groups, K, outputs].
            constant: Whether the weights are a constant of the model (then their product runs on
                ONNX Runtime, prepared once), not an activation.
        """
        weights, bias = operands
        key = node.output[0]
        bias_values = None if bias is None else bias[0]
        found = self._prepared.get(key)
        if found is not None and found.fits(weights, bias_values, activation):
            return found
        integer_matrix = matrix()
        aligned = None
        if bias is not None:
            aligned = self._shift_round(bias[0], bias[1] - frac_bits, self._rounding).reshape(-1)
        bound = sum_bound(integer_matrix, magnitude(activation), aligned)
        exact: ExactType = exact_type(bound)
        exact_matrix = np.ascontiguousarray(integer_matrix, dtype=exact)
        int8 = None  # the integer GEMM's weights, where they are int8 and every sum is float32-exact
        if exact is np.float32 and activation == np.int8 and _fits_int8(integer_matrix):
            int8 = np.ascontiguousarray(integer_matrix, dtype=np.int8)
        prepared = _Weights(
            source=weights,
            bias_source=bias_values,
            activation=activation,
            matrix=exact_matrix,
            product=MatrixProduct(exact_matrix, self._threads, constant, int8),
            bias=None if aligned is None else aligned.astype(exact),
            may_saturate=bound > self._limit,
        )
        self._prepared[key] = prepared
        return prepared

    def _finish(self, node: onnx.NodeProto, total: np.ndarray, prepared: _Weights) -> np.ndarray:
        """Add the bias; saturate to the accumulator only where the bound says a sum could overflow."""
        if prepared.bias is not None:
            total += prepared.bias
        return self._accumulate(node, total) if prepared.may_saturate else total


def _fits_int8(values: np.ndarray) -> bool:
    return values.size > 0 and int(values.min()) >= -128 and int(values.max()) <= 127


def _unsigned(x: np.ndarray, product: MatrixProduct) -> np.ndarray | None:
    """`x` as uint8 when the product takes the integer GEMM and every value is in 0..127 (else None)."""
    if not product.unsigned or x.size == 0 or int(x.min()) < 0:
        return None
    if x.dtype == np.int8:
        return x.view(np.uint8)  # the same bits: non-negative int8 is its uint8
    return x.astype(np.uint8) if x.dtype.kind in "iu" and int(x.max()) <= 127 else None


def _operand(x: np.ndarray, prepared: _Weights) -> np.ndarray:
    """The activation as the product takes it: uint8 for the integer GEMM, else in the matrix's type."""
    unsigned = _unsigned(x, prepared.product)
    return unsigned if unsigned is not None else x.astype(prepared.matrix.dtype)


def _conv_matrix(w: np.ndarray, group: int) -> np.ndarray:
    """Conv weights [Cout, C / G, kh, kw] as matrices matching the im2col columns (kernel row,
    kernel column, channel): [K, Cout] for one group, [G, K, Cout / G] for more."""
    out_channels, per_group, kh, kw = w.shape
    grouped = w.reshape(group, out_channels // group, per_group, kh, kw).transpose(0, 3, 4, 2, 1)
    matrices = grouped.reshape(group, kh * kw * per_group, out_channels // group)
    return matrices[0] if group == 1 else matrices


def _im2col(
    x: np.ndarray, kernel: tuple[int, ...], attrs: dict[str, Any], dtype: np.dtype
) -> tuple[np.ndarray, tuple[int, int]]:
    """The convolution's windows of `x` [N, C, H, W] as rows of (kernel row, kernel column, channel)
    in `dtype`, [N * Ho * Wo, kh * kw * C], and (Ho, Wo)."""
    n, channels, height, width = x.shape
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in attrs.get("dilations", [1, 1])]
    top, left, bottom, right = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    # Padded in the input's own (narrow) type; the one copy into the matrix converts to `dtype`.
    padded = np.zeros((n, height + top + bottom, width + left + right, channels), x.dtype)
    padded[:, top : top + height, left : left + width, :] = x.transpose(0, 2, 3, 1)
    span = ((kernel[0] - 1) * dilations[0] + 1, (kernel[1] - 1) * dilations[1] + 1)
    windows = sliding_window_view(padded, span, axis=(1, 2))[
        :, :: strides[0], :: strides[1], :, :: dilations[0], :: dilations[1]
    ].transpose(0, 1, 2, 4, 5, 3)  # [N, Ho, Wo, kh, kw, C], a view
    cols = np.empty(windows.shape, dtype)
    np.copyto(cols, windows)
    ho, wo = windows.shape[1:3]
    return cols.reshape(n * ho * wo, -1), (ho, wo)


def _pad_below(x: np.ndarray, kernel: list[int], attrs: dict[str, Any]) -> np.ndarray:
    """`x` [N, C, H, W] padded with a value below every one it holds (for max pooling)."""
    top, left, bottom, right = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    if not (top or left or bottom or right):
        return x
    if max(top, bottom) >= kernel[0] or max(left, right) >= kernel[1]:
        x = x.astype(np.int64)  # a window of padding only: its value must stay below every int8 after it
    low = -(1 << 20) if x.dtype == np.int64 else np.iinfo(x.dtype).min
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=low)


def _shifted_windows(x: np.ndarray, kernel: list[int], strides: list[int]) -> Iterator[np.ndarray]:
    """Per kernel position: the strided view of `x` [N, C, H, W] that position reads, [N, C, Ho, Wo]."""
    rows = (x.shape[2] - kernel[0]) // strides[0] + 1
    columns = (x.shape[3] - kernel[1]) // strides[1] + 1
    row_span, column_span = strides[0] * (rows - 1) + 1, strides[1] * (columns - 1) + 1
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield x[:, :, i : i + row_span : strides[0], j : j + column_span : strides[1]]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _present(item: Wide | None) -> Wide:
    assert item is not None
    return item


def _optional(inputs: list[Wide | None], index: int) -> Wide | None:
    return inputs[index] if index < len(inputs) else None
