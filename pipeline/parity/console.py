"""The parity report as a terminal shows it: plain-text lines under the comparison table.

The comparison table itself is `pipeline.parity.report.comparison_table` with `CONSOLE_COLUMNS`;
here are the one-line summaries of the other sections. The CLI only adds colour.
"""

from __future__ import annotations

from backends.base import PlacementReport
from pipeline.distillation.summary import DistillationSummary
from pipeline.parity.report import ParityReport
from pipeline.pruning.summary import PruningSummary
from pipeline.quantization.performance import PerformanceCheck


def summary_lines(report: ParityReport) -> list[str]:
    """One line per distillation, pruning, speed check, placement and on-target output, in that order."""
    lines = []
    if report.distillation is not None:
        lines.append(distillation_line(report.distillation))
    if report.pruning is not None:
        lines.append(pruning_line(report.pruning))
    lines += [speed_line(check) for check in report.performance]
    lines += [placement_line(placement) for placement in report.placements]
    lines += [
        f"on {parity.target}, {item.name}: error {item.target_error:.4g} vs CPU QDQ {item.cpu_error:.4g} "
        f"(limit {item.limit:.4g}; {item.differing} of {item.elements} values differ from CPU QDQ)"
        for parity in report.on_target
        for item in parity.outputs
    ]
    return lines


def distillation_line(distillation: DistillationSummary) -> str:
    """Teacher -> student: parameters, held-out score, PyTorch latency, the epoch kept."""
    teacher, student = distillation.teacher, distillation.student_model
    scores = " -> ".join(distillation.format_score(model.score) for model in (teacher, student))
    return (
        f"distilled: parameters {teacher.parameters:,} -> {student.parameters:,} "
        f"({student.parameters / teacher.parameters:.2f}x), held-out {distillation.metric} {scores}, "
        f"PyTorch {teacher.latency_ms:.2f} -> {student.latency_ms:.2f} ms; "
        f"epoch {distillation.best_epoch} of {len(distillation.history)} kept"
    )


def pruning_line(pruning: PruningSummary) -> str:
    """Parameters and MACs before -> after."""
    return (
        f"pruned: parameters {pruning.parameters[0]:,} -> {pruning.parameters[1]:,}, "
        f"MACs per sample {pruning.macs[0]:,} -> {pruning.macs[1]:,} "
        f"({len(pruning.layers)} layers changed; per layer in report.md)"
    )


def speed_line(check: PerformanceCheck) -> str:
    """int8 vs float latency on one target, and why int8 is not faster where it is not."""
    speed = f"int8 {check.int8_ms:.1f} ms vs float {check.fp32_ms:.1f} ms ({check.ratio:.2f}x)"
    why = "" if check.faster else f": not faster ({'; '.join(check.reasons)})"
    return f"speed on {check.target}, batch {'x'.join(map(str, check.batch_shape))}: {speed}{why}"


def placement_line(placement: PlacementReport) -> str:
    """The share of compute nodes that falls back and, for an accelerator, its estimate."""
    line = (
        f"placement on {placement.backend}: {placement.compute_nodes - placement.fallback_nodes} of "
        f"{placement.compute_nodes} compute nodes on {placement.preferred}, {placement.fallback_share:.0%} fall back"
    )
    if (estimate := placement.accelerator) is not None:
        fits = "fits" if estimate.fits else "does NOT fit"
        line += (
            f"; estimate {estimate.latency_us} us, {estimate.cycles} cycles; activation memory peak "
            f"{estimate.peak_activation_bytes:,} of {estimate.activation_buffer_bytes:,} bytes ({fits})"
        )
    return line
