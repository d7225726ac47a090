"""The on-target gate (target error within CPU QDQ error + one int8 step) and the fallback gate."""

from __future__ import annotations

import numpy as np
import pytest

from backends.base import NodePlacement, PlacementReport
from pipeline.parity.target import ThreeWay, fallback_failures, render_target_parity

FLOAT = np.linspace(-1.0, 1.55, 256, dtype=np.float32).reshape(2, 128)  # range 2.55: one int8 step is 0.01


def test_target_within_one_step_of_cpu_error_passes_and_beyond_fails() -> None:
    cpu = FLOAT + 0.02
    close = ThreeWay("fpga", "model.onnx", "model.int8.onnx", ["y"])
    far = ThreeWay("fpga", "model.onnx", "model.int8.onnx", ["y"])

    close.update([FLOAT], [cpu], [cpu + 0.009])  # 0.029 <= 0.02 + 0.01
    far.update([FLOAT], [cpu], [cpu + 0.011])  # 0.031 > 0.03

    good, bad = close.result(), far.result()
    assert good.passed and good.outputs[0].int8_step == pytest.approx(0.01)
    assert good.outputs[0].differing == FLOAT.size
    assert not bad.passed
    (line,) = bad.failures()
    assert line.startswith("on-target@fpga, output 'y': error 0.031")
    assert "| fpga | y |" in "\n".join(render_target_parity([good, bad]))


def test_fallback_gate() -> None:
    nodes = [
        NodePlacement(node="conv", op_type="Conv", device="fpga:x"),
        NodePlacement(node="soft", op_type="Softmax", device="CPUExecutionProvider", reason="not supported"),
        NodePlacement(node="q", op_type="QuantizeLinear", device="CPUExecutionProvider"),
    ]
    report = PlacementReport.from_nodes("fpga", "m.onnx", "fpga:x", nodes)

    assert report.compute_nodes == 2 and report.fallback_nodes == 1 and report.fallback_share == 0.5
    assert fallback_failures(report, None) == []
    assert fallback_failures(report, 0.5) == []
    (line,) = fallback_failures(report, 0.25)
    assert line == (
        "placement@fpga: 1 of 2 compute nodes of m.onnx fall back (50.0%), above targets.max_fallback 25.0%"
    )
