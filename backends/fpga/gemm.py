"""Products with a constant matrix for the emulator's MAC kernels: ONNX Runtime's MatMul (MLAS GEMM).

Why not numpy's ``@``: as fast here (conv 2 of the digits CNN, [23040, 288] x [288, 64] float32:
1.00x [0.95, 1.07]), but numpy's OpenBLAS takes every core whatever the job's thread budget, and
its idle worker spins for about 100 ms after each call, taking a core from whatever runs next (the
session's CPU segments, other jobs, the other side of an interleaved timing). An ONNX Runtime
session takes the job's threads (`backends.threads.session_options`) and its idle threads sleep.

Exactness is the GEMM's: each output is a sum of the exact products, in whatever order and
blocking MLAS chooses, so the bound in `backends.fpga.exact` holds as for any BLAS.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

from backends.threads import session_options

_OPSET = 13
_IR_VERSION = 8


class MatrixProduct:
    """``x @ matrix`` for one matrix: a constant float32 / float64 matrix on ONNX Runtime (a session
    built once), else on numpy (an activation, new each run, is not worth a session; int64 because
    ONNX Runtime's MatMul has no int64 kernel, and numpy's integer matmul is exact).

    Args:
        matrix: [K, N], or [G, K, N] for grouped products (x is then [G, M, K]).
        threads: ONNX Runtime intra-op threads (0: the job's budget).
        constant: Whether `matrix` stays the same over runs (a weight).
    """

    def __init__(self, matrix: np.ndarray, threads: int = 0, constant: bool = True) -> None:
        self.matrix = matrix
        self._session = _session(matrix, threads) if constant and matrix.dtype != np.int64 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._session is None:
            return np.matmul(x, self.matrix)
        product: np.ndarray = self._session.run(None, {"x": x})[0]
        return product


def _session(matrix: np.ndarray, threads: int) -> ort.InferenceSession:
    element = helper.np_dtype_to_tensor_dtype(matrix.dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "matrix"], ["product"])],
        "exact_product",
        [helper.make_tensor_value_info("x", element, None)],
        [helper.make_tensor_value_info("product", element, None)],
        initializer=[numpy_helper.from_array(matrix, "matrix")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION)
    options = session_options(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
