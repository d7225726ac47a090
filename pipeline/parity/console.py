"""The parity report as a terminal shows it: plain-text lines under the comparison table.

The comparison table is `pipeline.parity.report.comparison_table` with `CONSOLE_COLUMNS`, its
checked values printed with the digits their limits need (`console_table`); then the one-line
summaries of the other sections. The CLI only adds colour.
"""

from __future__ import annotations

import math

from backends.base import PlacementReport
from pipeline.distillation.summary import DistillationSummary
from pipeline.parity.policy import Check
from pipeline.parity.report import CONSOLE_COLUMNS, ParityReport, comparison_table
from pipeline.parity.summary import QuantizationSummary
from pipeline.pruning.summary import PruningSummary
from pipeline.quantization.performance import PerformanceCheck

# Console columns that show a checked metric: column -> the metric's name in `Check.metric`.
_CHECKED_COLUMNS = {"cosine mean": "cosine_mean", "SNR dB": "snr_db", "top-1 agree": "top1_agreement"}
# Fewest and most significant digits of a checked value.
_CHECKED_DIGITS = (6, 12)


def console_table(report: ParityReport) -> tuple[list[str], list[list[str]]]:
    """The comparison table with `CONSOLE_COLUMNS`; a value a check judges has at least 6 significant
    digits, more where fewer would round it onto the limit or past it (0.99997 against 0.99999)."""
    header, rows = comparison_table(report, CONSOLE_COLUMNS)
    pairs = [(comparison, output) for comparison in report.comparisons for output in comparison.outputs]
    for row, (_, output) in zip(rows, pairs, strict=True):
        checks = {check.metric: check for check in output.checks}
        for index, column in enumerate(header):
            check = checks.get(_CHECKED_COLUMNS.get(column, ""))
            if check is not None:
                row[index] = checked_value(check)
    return header, rows


def checked_value(check: Check) -> str:
    """`check.value` with enough significant digits that it stays on its side of `check.limit`."""
    value, limit = check.value, check.limit
    if math.isinf(value) or math.isnan(value):
        return str(value)
    low, high = _CHECKED_DIGITS
    for digits in range(low, high):
        text = f"{value:#.{digits}g}"
        if _side(float(text), limit) == _side(value, limit):
            return text
    return f"{value:#.{high}g}"


def _side(value: float, limit: float) -> int:
    """-1 below the limit, 0 on it, 1 above."""
    return (value > limit) - (value < limit)


def summary_lines(report: ParityReport) -> list[str]:
    """One line per distillation, pruning, int8 model's search, speed check, placement, hls4ml
    project, generation-parity model and on-target output, in that order."""
    lines = []
    if report.distillation is not None:
        lines.append(distillation_line(report.distillation))
    if report.pruning is not None:
        lines.append(pruning_line(report.pruning))
    lines += [search_line(q) for q in report.quantization if q.decision is not None]
    lines += [speed_line(check) for check in report.performance]
    lines += [placement_line(placement) for placement in report.placements]
    lines += [hls.verdict() for hls in report.hls]
    if report.generation is not None:
        lines += [model.summary_line() for model in report.generation.models]
    lines += [
        f"warning: {s.target}: {s.share_note}, below its min_accelerator_share" for s in report.summary if s.share_note
    ]
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


def search_line(quantization: QuantizationSummary) -> str:
    """What the search shipped for a group of targets, e.g. "search for cpu: shipped int8 static
    (model.int8.cpu.onnx), the fastest of 3 candidates meeting the int8 policy (...); 4 tried"."""
    decision = quantization.decision
    assert decision is not None
    serves = ", ".join(quantization.targets) or "every target"
    tried = sum(c.passed is not None for c in decision.candidates)
    return f"search for {serves}: shipped {decision.shipped} ({quantization.model}), {decision.reason}; {tried} judged"


def speed_line(check: PerformanceCheck) -> str:
    """int8 vs float latency on one target with its interval, and why int8 is not faster where it is
    not, e.g. "int8 is 0.93x the float latency on cpu (95% interval 0.90-0.96, 24 rounds; 1.02 ms vs
    1.10 ms, batch 64x1x8x8)"."""
    batch = "x".join(map(str, check.batch_shape))
    times = f"{milliseconds(check.int8_ms)} vs {milliseconds(check.fp32_ms)}"
    measured = check.interval
    if measured is not None:
        interval = f"{measured.confidence:.0%} interval {measured.low:.2f}-{measured.high:.2f}"
        times = f"{interval}, {measured.rounds} rounds; {times}"
    why = "" if check.faster else f": not {'shown ' if check.faster is None else ''}faster ({'; '.join(check.reasons)})"
    return f"int8 is {check.ratio:.2f}x the float latency on {check.target} ({times}, batch {batch}){why}"


def milliseconds(value: float) -> str:
    """A latency with the digits its ratio needs: two decimals below 10 ms, one below 100, none above."""
    decimals = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{decimals}f} ms"


def placement_line(placement: PlacementReport) -> str:
    """The share of compute nodes that falls back and, for an accelerator, its estimate."""
    line = (
        f"placement on {placement.backend}: {placement.compute_nodes - placement.fallback_nodes} of "
        f"{placement.compute_nodes} compute nodes on {placement.preferred}, {placement.fallback_share:.0%} fall back"
    )
    if (estimate := placement.accelerator) is not None:
        fits = "fits" if estimate.fits else "does NOT fit"
        if estimate.mac_share is not None:
            line += f"; {estimate.mac_share:.0%} of the MACs on the accelerator"
        line += (
            f"; estimate {estimate.latency_us} us, {estimate.cycles} cycles; activation memory peak "
            f"{estimate.peak_activation_bytes:,} of {estimate.activation_buffer_bytes:,} bytes ({fits})"
        )
    return line
