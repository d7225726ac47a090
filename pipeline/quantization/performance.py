"""The performance guard: is the int8 model faster than fp32 on the target, and if not, why."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from pydantic import BaseModel

from backends.base import Session
from pipeline.quantization.cpu import int8_dot_product_flags


class PerformanceCheck(BaseModel):
    """int8 against fp32 latency on one target, with what explains a slow int8 model.

    Attributes:
        target: The backend.
        batch_shape: Shape of the first input of the timed batch.
        fp32_ms: Best latency of the float model (the one before quantize).
        int8_ms: Best latency of the int8 model.
        ratio: int8 / fp32.
        faster: Whether int8 is faster.
        unfused_qdq: QuantizeLinear / DequantizeLinear left after ONNX Runtime's optimisations
            (each is a float<->int8 conversion done as a separate op); None if not inspected.
        float_compute_nodes: Compute nodes (Conv, MatMul, Gemm) left in float.
        int8_dot_product: The CPU's int8 dot-product flags (None: unknown).
        reasons: Why int8 is not faster, when it is not.
    """

    target: str
    batch_shape: list[int]
    fp32_ms: float
    int8_ms: float
    ratio: float
    faster: bool
    unfused_qdq: int | None
    float_compute_nodes: int
    int8_dot_product: list[str] | None
    reasons: list[str]


def best_latency_ms(session: Session, feeds: Mapping[str, np.ndarray], repeats: int = 5) -> float:
    """The best of `repeats` timed runs after one warm-up, in milliseconds."""
    session.run(feeds)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(feeds)
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best


def float_compute_nodes(model: Path) -> int:
    """Conv / MatMul / Gemm nodes of the QDQ model that run in float: their data and weight
    inputs (the first two) are not both dequantized int8."""
    graph = onnx.load(str(model), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(
        node.op_type in ("Conv", "MatMul", "Gemm") and not all(name in dequantized for name in node.input[:2])
        for node in graph.node
    )


def performance_check(
    target: str,
    fp32: Session,
    int8: Session,
    int8_model: Path,
    feeds: Mapping[str, np.ndarray],
    unfused_qdq: int | None,
) -> PerformanceCheck:
    """Time both models on the same batch and explain a slow int8 model.

    Args:
        target: The backend name.
        fp32: The float model's session on the target.
        int8: The int8 model's session on the target.
        int8_model: The int8 model file.
        feeds: The batch both are timed on.
        unfused_qdq: Q/DQ nodes left after ONNX Runtime's optimisations (None: not inspected).
    """
    fp32_ms = best_latency_ms(fp32, feeds)
    int8_ms = best_latency_ms(int8, feeds)
    ratio = int8_ms / fp32_ms if fp32_ms > 0 else float("inf")
    floats = float_compute_nodes(int8_model)
    flags = int8_dot_product_flags()
    reasons = []
    if ratio >= 1.0:
        if unfused_qdq:
            reasons.append(f"{unfused_qdq} Q/DQ nodes stay unfused after ONNX Runtime's optimisations")
        if floats:
            reasons.append(f"{floats} Conv/MatMul/Gemm nodes run in float")
        if flags is not None and not flags:
            reasons.append("this CPU has no int8 dot-product instructions (VNNI)")
        if not reasons:
            reasons.append("the model is too small for int8 kernels to pay for the conversions")
    first = next(iter(feeds.values()))
    return PerformanceCheck(
        target=target,
        batch_shape=list(first.shape),
        fp32_ms=round(fp32_ms, 3),
        int8_ms=round(int8_ms, 3),
        ratio=round(ratio, 3),
        faster=ratio < 1.0,
        unfused_qdq=unfused_qdq,
        float_compute_nodes=floats,
        int8_dot_product=list(flags) if flags is not None else None,
        reasons=reasons,
    )
