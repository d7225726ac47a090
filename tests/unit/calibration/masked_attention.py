"""A tiny masked-attention model built with onnx.helper, and calibration data for it.

``y = Softmax(x @ W + mask) @ W2``, where ``mask`` is a graph input holding 0 (attend) and -inf
(masked out), as in a transformer's attention mask. Shared by the calibration and quantization
tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 8
OUTPUTS = 4
# Tensor and node names of the graph.
X, MASK, SCORES, MASKED, PROBS, Y = "x", "mask", "scores", "masked", "probs", "y"
QK, MASK_ADD, SOFTMAX, OUT_PROJ = "qk", "mask_add", "softmax", "out_proj"


def masked_attention_model() -> onnx.ModelProto:
    """The float model, shape-inferred (it carries value_info for every intermediate)."""
    rng = np.random.default_rng(0)
    w = rng.normal(scale=0.5, size=(FEATURES, FEATURES)).astype(np.float32)
    w2 = rng.normal(scale=0.5, size=(FEATURES, OUTPUTS)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [X, "w"], [SCORES], name=QK),
            helper.make_node("Add", [SCORES, MASK], [MASKED], name=MASK_ADD),
            helper.make_node("Softmax", [MASKED], [PROBS], axis=-1, name=SOFTMAX),
            helper.make_node("MatMul", [PROBS, "w2"], [Y], name=OUT_PROJ),
        ],
        "masked_attention",
        [
            helper.make_tensor_value_info(X, TensorProto.FLOAT, ["batch", FEATURES]),
            helper.make_tensor_value_info(MASK, TensorProto.FLOAT, ["batch", FEATURES]),
        ],
        [helper.make_tensor_value_info(Y, TensorProto.FLOAT, ["batch", OUTPUTS])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model)


def save_masked_attention_model(path: Path) -> Path:
    """Write the model to `path` and return it."""
    onnx.save(masked_attention_model(), str(path))
    return path


def masked_attention_data(samples: int, seed: int = 1) -> dict[str, np.ndarray]:
    """`samples` rows of x (normal) and mask (0 or -inf; every row keeps at least one 0), float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, FEATURES)).astype(np.float32)
    masked_out = rng.random(size=(samples, FEATURES)) < 0.4
    masked_out[:, 0] = False  # a row masked everywhere would give NaN out of Softmax
    mask = np.where(masked_out, -np.inf, 0.0).astype(np.float32)
    return {X: x, MASK: mask}


def batches(data: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts of `batch_size` rows (the last may be shorter), one at a time."""
    total = next(iter(data.values())).shape[0]
    for start in range(0, total, batch_size):
        yield {name: array[start : start + batch_size] for name, array in data.items()}
