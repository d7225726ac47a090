"""The speed guard: is the int8 model faster than fp32 on the target (an interleaved comparison with
its confidence interval), and if not, why."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from pydantic import BaseModel

from backends.base import Session
from pipeline.quantization.cpu import int8_dot_product_flags
from pipeline.timing import RatioMeasurement, compare_latency


class PerformanceCheck(BaseModel):
    """int8 against fp32 latency on one target, with what explains a slow int8 model.

    Attributes:
        target: The backend.
        batch_shape: Shape of the first input of the timed batch.
        fp32_ms: Median latency of the float model (the one before quantize).
        int8_ms: Median latency of the int8 model.
        ratio: int8 / fp32 (point estimate of the interleaved comparison).
        interval: The ratio with its confidence interval and rounds (`pipeline.timing`).
        faster: True when the whole interval is below 1, False when above, None when the
            interval contains 1 (too close, or too noisy, to say).
        required: The job's ``quantize.require_speedup``: a model not shown faster fails the job.
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
    interval: RatioMeasurement | None = None
    faster: bool | None
    required: bool = False
    unfused_qdq: int | None
    float_compute_nodes: int
    int8_dot_product: list[str] | None
    reasons: list[str]

    def failures(self) -> list[str]:
        """The failed speed gate, when the job requires a speedup and none was shown."""
        if not self.required or self.faster is True:
            return []
        measured = self.interval.describe() if self.interval is not None else f"{self.ratio:.2f}x"
        verdict = "is not faster than" if self.faster is False else "was not shown faster than"
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return [
            f"speed on {self.target}: the int8 model {verdict} float ({measured} of float){why}; "
            "quantize.require_speedup = true"
        ]


def float_compute_nodes(model: Path) -> int:
    """Conv / MatMul / Gemm nodes of the QDQ model that run in float: their data and weight
    inputs (the first two) are not both dequantized int8."""
    graph = onnx.load(str(model), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(
        node.op_type in ("Conv", "MatMul", "Gemm") and not all(name in dequantized for name in node.input[:2])
        for node in graph.node
    )


def slow_reasons(unfused_qdq: int | None, float_nodes: int, flags: tuple[str, ...] | None) -> list[str]:
    """What explains an int8 model that is not faster than float.

    Args:
        unfused_qdq: Q/DQ nodes left after ONNX Runtime's optimisations (None: not inspected).
        float_nodes: Conv / MatMul / Gemm nodes left in float.
        flags: The CPU's int8 dot-product flags (None: unknown).
    """
    reasons = []
    if unfused_qdq:
        reasons.append(f"{unfused_qdq} Q/DQ nodes stay unfused after ONNX Runtime's optimisations")
    if float_nodes:
        reasons.append(f"{float_nodes} Conv/MatMul/Gemm nodes run in float")
    if flags is not None and not flags:
        reasons.append("this CPU has no int8 dot-product instructions (VNNI)")
    if not reasons:
        reasons.append("the model is too small for int8 kernels to pay for the conversions")
    return reasons


def performance_check(
    target: str,
    fp32: Session,
    int8: Session,
    int8_model: Path,
    feeds: Mapping[str, np.ndarray],
    unfused_qdq: int | None,
    required: bool = False,
) -> PerformanceCheck:
    """Time both models on the same batch, interleaved (`pipeline.timing`), and explain a slow int8 model.

    Args:
        target: The backend name.
        fp32: The float model's session on the target.
        int8: The int8 model's session on the target.
        int8_model: The int8 model file.
        feeds: The batch both are timed on.
        unfused_qdq: Q/DQ nodes left after ONNX Runtime's optimisations (None: not inspected).
        required: The job requires a speedup (a model not shown faster fails).
    """
    measured = compare_latency(lambda: fp32.run(feeds), lambda: int8.run(feeds))
    faster = measured.faster()
    floats = float_compute_nodes(int8_model)
    flags = int8_dot_product_flags()
    reasons = [] if faster else slow_reasons(unfused_qdq, floats, flags)
    if faster is None:
        reasons.insert(0, f"the interval {measured.describe()} contains 1: too close or too noisy to tell")
    first = next(iter(feeds.values()))
    return PerformanceCheck(
        target=target,
        batch_shape=list(first.shape),
        fp32_ms=measured.baseline_ms,
        int8_ms=measured.candidate_ms,
        ratio=measured.ratio,
        interval=measured,
        faster=faster,
        required=required,
        unfused_qdq=unfused_qdq,
        float_compute_nodes=floats,
        int8_dot_product=list(flags) if flags is not None else None,
        reasons=reasons,
    )
