"""Products with a constant matrix for the emulator's MAC kernels: ONNX Runtime's MatMul (MLAS GEMM).

Why not numpy's ``@``: as fast here (conv 2 of the digits CNN, [23040, 288] x [288, 64] float32:
1.00x [0.95, 1.07]), but numpy's OpenBLAS takes every core whatever the job's thread budget, and
its idle worker spins for about 100 ms after each call, taking a core from whatever runs next (the
session's CPU segments, other jobs, the other side of an interleaved timing). An ONNX Runtime
session takes the job's threads (`backends.threads.session_options`) and its idle threads sleep.

Exactness is the GEMM's: each output is a sum of the exact products, in whatever order and
blocking MLAS chooses, so the bound in `backends.fpga.exact` holds as for any BLAS.

Non-negative int8 activations (after a ReLU or a max pool of one: most of a CNN's) can go through
the integer GEMM instead, ``MatMulInteger`` on uint8 x int8 with int32 sums, twice as fast as
float32 on the digits CNN's largest layer (and a quarter of the im2col bytes). On x86 without VNNI
MLAS adds the u8 x s8 products in pairs into saturating int16 (``vpmaddubsw``), which is what
makes ONNX Runtime's own QDQ convolution inexact for activations shifted to 0..255 (see
tests/backends/test_fpga.py); with values in 0..127 a pair stays within [-32512, 32258], so nothing
saturates and the int32 sums are exact below 2**31 (the bound keeps them within 2**24). VNNI,
AVX-512 and ARM kernels sum into int32 directly. `unsigned_products_exact` checks it once per
process on extreme operands; where it fails, everything stays on float.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from backends.threads import session_options

logger = logging.getLogger(__name__)

_OPSET = 13
_IR_VERSION = 8
_UNSIGNED_MAX = 127  # the largest uint8 fed to the integer GEMM: a non-negative int8


class MatrixProduct:
    """``x @ matrix`` for one matrix: a constant float32 / float64 matrix on ONNX Runtime (a session
    built once), else on numpy (an activation, new each run, is not worth a session; int64 because
    ONNX Runtime's MatMul has no int64 kernel, and numpy's integer matmul is exact).

    Args:
        matrix: [K, N], or [G, K, N] for grouped products (x is then [G, M, K]).
        threads: ONNX Runtime intra-op threads (0: the job's budget).
        constant: Whether `matrix` stays the same over runs (a weight).
        int8: The same matrix as int8, where uint8 activations (0..127) may take the integer GEMM
            (2-D, float32 `matrix`, sums within 2**24: the caller's bound); None otherwise.

    Attributes:
        matrix: The matrix, in its exact type.
        unsigned: Whether uint8 activations go through the integer GEMM (see the module docstring).
    """

    def __init__(
        self, matrix: np.ndarray, threads: int = 0, constant: bool = True, int8: np.ndarray | None = None
    ) -> None:
        self.matrix = matrix
        self._session = _session(matrix, threads) if constant and matrix.dtype != np.int64 else None
        self._integer: ort.InferenceSession | None = None
        if int8 is not None and constant and matrix.ndim == 2 and matrix.dtype == np.float32:
            self._integer = _session(int8, threads) if unsigned_products_exact() else None
        self.unsigned = self._integer is not None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The product in the matrix's type (int32 sums of the integer GEMM converted: exact below 2**24)."""
        if x.dtype == np.uint8 and self._integer is not None:
            sums: np.ndarray = self._integer.run(None, {"x": x})[0]
            return sums.astype(self.matrix.dtype)
        if self._session is None:
            return np.matmul(x, self.matrix)
        product: np.ndarray = self._session.run(None, {"x": x})[0]
        return product


@functools.cache
def unsigned_products_exact() -> bool:
    """Whether ONNX Runtime's uint8 x int8 MatMulInteger gives the exact sums on this CPU for
    activations up to 127: checked on the operands that would saturate a narrower sum (every
    product at its extreme, in pairs of one sign and of alternating signs) and on random ones."""
    rng = np.random.default_rng(0)
    depth = 512
    weights = rng.integers(-128, 128, size=(depth, 64), dtype=np.int8)
    weights[:, 0], weights[:, 1], weights[:, 2] = -128, 127, np.resize([127, -128], depth)
    x = rng.integers(0, _UNSIGNED_MAX + 1, size=(64, depth), dtype=np.uint8)
    x[0], x[1] = _UNSIGNED_MAX, np.resize([_UNSIGNED_MAX, 0], depth)
    sums = _session(weights, 1).run(None, {"x": x})[0]
    exact = bool(np.array_equal(sums, x.astype(np.int64) @ weights.astype(np.int64)))
    if not exact:
        logger.info("uint8 x int8 MatMulInteger is not exact on this CPU: the emulator multiplies in float32")
    return exact


def _session(matrix: np.ndarray, threads: int) -> ort.InferenceSession:
    """x @ matrix on ONNX Runtime: MatMul for a float matrix, MatMulInteger (x uint8, int32 sums) for int8."""
    if matrix.dtype == np.int8:
        node = helper.make_node("MatMulInteger", ["x", "matrix"], ["product"])
        x_type, product_type = onnx.TensorProto.UINT8, onnx.TensorProto.INT32
    else:
        node = helper.make_node("MatMul", ["x", "matrix"], ["product"])
        x_type = product_type = helper.np_dtype_to_tensor_dtype(matrix.dtype)
    graph = helper.make_graph(
        [node],
        "exact_product",
        [helper.make_tensor_value_info("x", x_type, None)],
        [helper.make_tensor_value_info("product", product_type, None)],
        initializer=[numpy_helper.from_array(matrix, "matrix")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION)
    options = session_options(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
