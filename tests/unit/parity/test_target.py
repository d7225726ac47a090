"""The on-target gate (target error within CPU QDQ error + one int8 step) and the fallback gate."""

from __future__ import annotations

import numpy as np
import pytest

from backends.base import NodePlacement, PlacementReport
from backends.estimate import AcceleratorPlan
from pipeline.parity.target import PlacementLimits, ThreeWay, fallback_failures, render_target_parity, short_share_note

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
    assert fallback_failures(report, PlacementLimits()) == []
    assert fallback_failures(report, PlacementLimits(max_fallback=0.5)) == []
    (line,) = fallback_failures(report, PlacementLimits(max_fallback=0.25))
    assert line == (
        "placement@fpga: 1 of 2 compute nodes of m.onnx fall back (50.0%), above targets.max_fallback 25.0%"
    )


def test_accelerator_share_warns_and_fails_only_when_required() -> None:
    def report(devices: list[str], mac_share: float | None = None) -> PlacementReport:
        nodes = [NodePlacement(node=f"n{i}", op_type="MatMul", device=d) for i, d in enumerate(devices)]
        placed = PlacementReport.from_nodes("fpga", "m.onnx", "fpga:x", nodes)
        if mac_share is not None:
            plan = AcceleratorPlan.model_construct(mac_share=mac_share)
            placed = placed.model_copy(update={"accelerator": plan})
        return placed

    cpu = "CPUExecutionProvider"
    nothing = report([cpu, cpu])
    some = report(["fpga:x", cpu, cpu], mac_share=0.12)
    most = report(["fpga:x", cpu], mac_share=0.95)
    required = PlacementLimits(require_accelerator_share=True)

    assert short_share_note(nothing, PlacementLimits()) == "all on CPU fallback"
    assert short_share_note(some, PlacementLimits()) == "12% of MACs on the accelerator"
    assert short_share_note(most, PlacementLimits()) == ""  # MACs count, not the 1 of 2 nodes
    assert short_share_note(some, PlacementLimits(min_accelerator_share=0.1)) == ""
    assert fallback_failures(some, PlacementLimits()) == []
    (line,) = fallback_failures(some, required)
    assert line == (
        "placement@fpga: 12% of the MACs of m.onnx run on fpga:x, below targets.min_accelerator_share 50%, "
        "and targets.require_accelerator_share is set"
    )
    cpu_target = PlacementReport.from_nodes(
        "cpu", "m.onnx", cpu, [NodePlacement(node="a", op_type="MatMul", device=cpu)]
    )
    assert cpu_target.accelerator_share() is None and fallback_failures(cpu_target, required) == []
