"""On-target parity, three ways: float on CPU, QDQ on CPU, QDQ on the target; and the placement gate.

The target passes when its error against the float model is within the CPU QDQ error plus one int8
step of the output's range: quantization itself is judged by the int8 policy; this gate catches what
the target adds (its kernels, its rounding, its fallbacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from backends.base import PlacementReport
from backends.estimate import AcceleratorPlan
from pipeline.job.defaults import DEFAULT_MIN_ACCELERATOR_SHARE

INT8_STEPS = 255  # an int8 step of a range is range / 255


class OutputOnTarget(BaseModel):
    """One output's three-way comparison.

    Attributes:
        name: The output.
        elements: Elements compared.
        cpu_error: max |QDQ on CPU - float on CPU|.
        target_error: max |QDQ on the target - float on CPU|.
        target_vs_cpu: max |QDQ on the target - QDQ on CPU|.
        differing: Elements where the target's QDQ output differs from the CPU's.
        output_range: max - min of the float output.
        int8_step: output_range / 255.
        limit: cpu_error + int8_step: the most target_error may be.
        passed: target_error <= limit.
    """

    name: str
    elements: int
    cpu_error: float
    target_error: float
    target_vs_cpu: float
    differing: int
    output_range: float
    int8_step: float
    limit: float
    passed: bool


class TargetParity(BaseModel):
    """QDQ on a target against QDQ on the CPU, both against the float model on the CPU."""

    target: str
    float_model: str
    int8_model: str
    outputs: list[OutputOnTarget]

    @property
    def passed(self) -> bool:
        """Every output is within its limit."""
        return all(output.passed for output in self.outputs)

    def failures(self) -> list[str]:
        """One line per output beyond its limit."""
        return [
            f"on-target@{self.target}, output {output.name!r}: error {output.target_error:.4g} vs float exceeds the "
            f"CPU QDQ error {output.cpu_error:.4g} + one int8 step {output.int8_step:.4g}"
            for output in self.outputs
            if not output.passed
        ]


@dataclass
class _Extremes:
    """Running maxima of one output's errors, and its float range."""

    elements: int = 0
    cpu_error: float = 0.0
    target_error: float = 0.0
    target_vs_cpu: float = 0.0
    differing: int = 0
    low: float = math.inf
    high: float = -math.inf


class ThreeWay:
    """Streams batches of (float on CPU, QDQ on CPU, QDQ on target) outputs into a `TargetParity`.

    Attributes:
        target: The target backend.
        float_model: The model quantize started from (run on the CPU).
        int8_model: The QDQ model (run on the CPU and on the target).
    """

    def __init__(self, target: str, float_model: str, int8_model: str, names: list[str]) -> None:
        self.target, self.float_model, self.int8_model = target, float_model, int8_model
        self._names = names
        self._extremes = [_Extremes() for _ in names]

    def update(self, reference: list[np.ndarray], cpu_int8: list[np.ndarray], target_int8: list[np.ndarray]) -> None:
        """Add one batch (outputs in `names` order)."""
        for seen, ref, cpu, target in zip(self._extremes, reference, cpu_int8, target_int8, strict=True):
            ref, cpu, target = (np.asarray(a, dtype=np.float64) for a in (ref, cpu, target))
            seen.elements += ref.size
            seen.cpu_error = max(seen.cpu_error, float(np.abs(cpu - ref).max(initial=0.0)))
            seen.target_error = max(seen.target_error, float(np.abs(target - ref).max(initial=0.0)))
            seen.target_vs_cpu = max(seen.target_vs_cpu, float(np.abs(target - cpu).max(initial=0.0)))
            seen.differing += int(np.count_nonzero(target != cpu))
            seen.low = min(seen.low, float(ref.min(initial=np.inf)))
            seen.high = max(seen.high, float(ref.max(initial=-np.inf)))

    def result(self) -> TargetParity:
        """The comparison over every batch seen."""
        outputs = []
        for name, seen in zip(self._names, self._extremes, strict=True):
            span = max(seen.high - seen.low, 0.0) if seen.elements else 0.0
            step = span / INT8_STEPS
            outputs.append(
                OutputOnTarget(
                    name=name,
                    elements=seen.elements,
                    cpu_error=seen.cpu_error,
                    target_error=seen.target_error,
                    target_vs_cpu=seen.target_vs_cpu,
                    differing=seen.differing,
                    output_range=span,
                    int8_step=step,
                    limit=seen.cpu_error + step,
                    passed=seen.target_error <= seen.cpu_error + step,
                )
            )
        return TargetParity(
            target=self.target, float_model=self.float_model, int8_model=self.int8_model, outputs=outputs
        )


@dataclass(frozen=True)
class PlacementLimits:
    """What a target's job entry asks of its placement (`TargetSpec`).

    Attributes:
        max_fallback: The most compute nodes that may fall back (None: report only).
        min_accelerator_share: Below this share of the work on the accelerator, say so.
        require_accelerator_share: Fail below `min_accelerator_share` instead of warning.
    """

    max_fallback: float | None = None
    min_accelerator_share: float = DEFAULT_MIN_ACCELERATOR_SHARE
    require_accelerator_share: bool = False


def fallback_failures(placement: PlacementReport, limits: PlacementLimits) -> list[str]:
    """The placement gates: a failure line when more of the model falls back than the target
    allows, and when too little runs on its accelerator where the target requires a share."""
    failures = []
    if limits.max_fallback is not None and placement.fallback_share > limits.max_fallback:
        failures.append(
            f"placement@{placement.backend}: {placement.fallback_nodes} of {placement.compute_nodes} compute nodes "
            f"of {placement.model} fall back ({placement.fallback_share:.1%}), above targets.max_fallback "
            f"{limits.max_fallback:.1%}"
        )
    note = share_note(placement, limits)
    if note and limits.require_accelerator_share:
        failures.append(f"placement@{placement.backend}: {note}, and targets.require_accelerator_share is set")
    return failures


def share_note(placement: PlacementReport, limits: PlacementLimits) -> str:
    """What to say beside the verdict when little of the model runs on the target's accelerator
    ("" when the share is at or above the target's `min_accelerator_share`, or it has none)."""
    found = _low_share(placement, limits)
    if found is None:
        return ""
    share, basis = found
    ran = f"nothing of {placement.model} runs" if share == 0 else f"{share:.0%} of the {basis} of {placement.model} run"
    return f"{ran} on {placement.preferred}, below targets.min_accelerator_share {limits.min_accelerator_share:.0%}"


def short_share_note(placement: PlacementReport, limits: PlacementLimits) -> str:
    """The verdict's aside: "all on CPU fallback", or "12% of MACs on the accelerator" ("" when
    the share meets the target's `min_accelerator_share` or the target has no accelerator)."""
    found = _low_share(placement, limits)
    if found is None:
        return ""
    share, basis = found
    return "all on CPU fallback" if share == 0 else f"{share:.0%} of {basis} on the accelerator"


def _low_share(placement: PlacementReport, limits: PlacementLimits) -> tuple[float, str] | None:
    """The target's accelerator share and its basis when below `min_accelerator_share` (else None)."""
    found = placement.accelerator_share()
    return found if found is not None and found[0] < limits.min_accelerator_share else None


def render_placement(placement: PlacementReport, rows: int = 20) -> list[str]:
    """The placement section: the share that falls back, why, and the accelerator estimate."""
    lines = [
        f"## Placement on {placement.backend} ({placement.model})",
        "",
        f"{placement.compute_nodes - placement.fallback_nodes} of {placement.compute_nodes} compute nodes on "
        f"{placement.preferred}; {placement.fallback_nodes} fall back ({placement.fallback_share:.1%})"
        + (
            ""
            if placement.unfused_qdq is None
            else f"; {placement.unfused_qdq} Q/DQ nodes left as separate conversions"
        )
        + ".",
    ]
    lines += [f"> {note}" for note in placement.notes]
    fallback = [node for node in placement.nodes if node.device != placement.preferred and node.reason]
    reasons: dict[str, list[str]] = {}
    for node in fallback:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            reasons.setdefault(f"{node.op_type} on {node.device}: {node.reason}", []).append(node.node)
    if reasons:
        lines += ["", "| falls back | nodes | e.g. |", "|---|---|---|"]
        for reason, nodes in sorted(reasons.items(), key=lambda item: -len(item[1]))[:rows]:
            lines.append(f"| {reason} | {len(nodes)} | {nodes[0]} |")
    if placement.accelerator:
        lines += ["", *_render_accelerator(placement.accelerator)]
    return lines


def _render_accelerator(plan: AcceleratorPlan) -> list[str]:
    fits = "fits" if plan.fits else "DOES NOT FIT"
    weights = "stay on chip" if plan.weights_fit else "stream from external memory"
    lines = [
        f"Accelerator estimate ({plan.profile}): {plan.cycles} cycles, {plan.latency_us} us per inference, "
        f"{plan.macs} MACs at {plan.utilization:.0%} utilisation (CPU parts and transfers not counted)"
        + (
            ""
            if plan.mac_share is None
            else f"; {plan.mac_share:.1%} of the model's {plan.model_macs} MACs run on the accelerator"
        )
        + ".",
        f"Activation memory plan: peak {plan.peak_activation_bytes} bytes of {plan.activation_buffer_bytes} "
        f"({fits}); weights {plan.weight_bytes} bytes ({weights}).",
        "",
        "| partition | nodes | MACs | cycles | latency us | peak bytes (pooled) | bytes without reuse | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for segment in plan.segments:
        lines.append(
            f"| {segment.index} | {len(segment.nodes)} | {segment.macs} | {segment.cycles} | {segment.latency_us} | "
            f"{segment.peak_activation_bytes} | {segment.unshared_activation_bytes} | "
            f"{'yes' if segment.fits else 'no'} |"
        )
    if plan.unknown_shapes:
        lines.append(f"\nNo estimate for {len(plan.unknown_shapes)} nodes whose shapes inference could not tell.")
    return lines


def render_target_parity(parities: list[TargetParity]) -> list[str]:
    """The three-way table: float on CPU vs QDQ on CPU vs QDQ on each target."""
    lines = [
        "## On-target parity",
        "",
        "| target | output | CPU QDQ error | target error | limit (CPU + 1 int8 step) | target vs CPU QDQ | "
        "elements differing | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for parity in parities:
        for output in parity.outputs:
            lines.append(
                f"| {parity.target} | {output.name} | {output.cpu_error:.4g} | {output.target_error:.4g} | "
                f"{output.limit:.4g} | {output.target_vs_cpu:.4g} | {output.differing} of {output.elements} | "
                f"{'pass' if output.passed else 'FAIL'} |"
            )
    return lines
