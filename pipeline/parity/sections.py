"""Markdown sections of the parity report that stand on their own: distillation, pruning, localisation."""

from __future__ import annotations

import json
import math

from pipeline.distillation.summary import DistillationSummary
from pipeline.parity.localize import EXACT_DB, Localisation
from pipeline.pruning.summary import PruningSummary


def format_value(value: float | None) -> str:
    """A metric for tables: 4 significant digits, small and huge values in exponent form."""
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"


def render_distillation(summary: DistillationSummary) -> list[str]:
    """The distillation section: teacher vs student, how training went, every epoch."""
    batch = ", ".join(f"{name} {'x'.join(map(str, dims))}" for name, dims in summary.batch_shape.items())
    loss = summary.loss
    if summary.loss == "kd":
        labels = "teacher only" if summary.alpha is None else f"alpha {summary.alpha:g}"
        loss = f"kd (T {summary.temperature:g}, {labels})"
    ending = "stopped early" if summary.stopped_early else "ran every epoch"
    lines = [
        "## Distillation",
        "",
        f"Student `{summary.student}` trained with {loss}; held-out {summary.metric} on {summary.validation}.",
        "",
        *_sizes_table(summary, batch),
        "",
        f"{len(summary.history)} of {summary.epochs_planned} epochs ({ending}); the student keeps epoch "
        f"{summary.best_epoch}"
        + (f"; resumed after epoch {summary.resumed_from}" if summary.resumed_from else "")
        + f". Checkpoints: `{summary.checkpoints}`.",
    ]
    lines += [""] + [f"> {note}" for note in summary.notes] if summary.notes else []
    lines += [
        "",
        *markdown_table(
            ["epoch", "learning rate", "train loss", f"held-out {summary.metric}", "seconds"],
            [
                [
                    str(r.epoch),
                    f"{r.learning_rate:.3g}",
                    f"{r.train_loss:.4f}",
                    summary.format_score(r.score),
                    f"{r.seconds:.2f}",
                ]
                for r in summary.history
            ],
        ),
    ]
    return lines


def _sizes_table(summary: DistillationSummary, batch: str) -> list[str]:
    """Teacher and student side by side: parameters, state bytes, PyTorch latency, held-out score."""
    teacher, student = summary.teacher, summary.student_model
    rows = [
        [
            name,
            f"{model.parameters:,}",
            f"{model.state_bytes:,}",
            f"{model.latency_ms:.3f}",
            summary.format_score(model.score),
        ]
        for name, model in (("teacher", teacher), ("student", student))
    ]
    rows.append(
        [
            "student / teacher",
            _ratio((teacher.parameters, student.parameters)),
            _ratio((teacher.state_bytes, student.state_bytes)),
            f"{student.latency_ms / teacher.latency_ms:.2f}x" if teacher.latency_ms else "-",
            "",
        ]
    )
    header = ["model", "parameters", "state bytes", f"PyTorch ms ({batch})", f"held-out {summary.metric}"]
    return markdown_table(header, rows)


def render_pruning(summary: PruningSummary) -> list[str]:
    """The pruning section: totals, per-layer changes, recovery errors, sparsity, what is blocked."""
    shape = ", ".join(f"{name} {'x'.join(map(str, dims))}" for name, dims in summary.input_shape.items())
    lines = [
        "## Pruning",
        "",
        f"Parameters {summary.parameters[0]:,} -> {summary.parameters[1]:,} "
        f"({_ratio(summary.parameters)}); MACs per sample ({shape}) {summary.macs[0]:,} -> {summary.macs[1]:,} "
        f"({_ratio(summary.macs)}).",
    ]
    if summary.note:
        lines += ["", summary.note]
    if summary.layers:
        lines += [""] + markdown_table(
            ["layer", "in channels", "out channels", "params", "MACs", "sparsity"],
            [
                [
                    change.layer,
                    f"{change.inputs[0]} -> {change.inputs[1]}",
                    f"{change.outputs[0]} -> {change.outputs[1]}",
                    f"{change.parameters[0]:,} -> {change.parameters[1]:,}",
                    f"{change.macs[0]:,} -> {change.macs[1]:,}",
                    "-" if change.sparsity is None else f"{100 * change.sparsity:.1f}%",
                ]
                for change in summary.layers
            ],
        )
    if summary.recovery:
        lines += ["", "Recovery (relative output error vs the unpruned layer, calibration data):", ""]
        lines += markdown_table(
            ["layer", "without recovery", "with recovery", "rows", "note"],
            [
                [r.layer, format_value(r.error_without), format_value(r.error_with), str(r.rows), r.skipped or ""]
                for r in summary.recovery
            ],
        )
    if (sparsity := summary.sparsity) is not None:
        lines += [
            "",
            f"Sparsity {sparsity.pattern}: {100 * sparsity.sparsity:.1f}% zeros in {sparsity.layers} layers; "
            f"weights {sparsity.weight_bytes:,} bytes stored, compressed (zlib) "
            f"{sparsity.compressed_before:,} -> {sparsity.compressed_after:,} bytes.",
        ]
        lines += [f"- {layer} left dense: {why}" for layer, why in sparsity.skipped.items()]
    if summary.blocked:
        lines += ["", f"{len(summary.blocked)} channel groups cannot be pruned:", ""]
        lines += [f"- {layer}: {why}" for layer, why in summary.blocked.items()]
    if summary.skipped:
        lines += ["", "Skipped by the job: " + ", ".join(summary.skipped)]
    return lines


def render_localisation(localisation: Localisation, rows: int = 10) -> list[str]:
    """Where the error enters: the first diverging tensor and the worst steps with their culprits."""
    lines = [
        f"## Where the error enters: {localisation.candidate} vs {localisation.reference}",
        "",
        f"{localisation.compared} intermediate tensors compared on {localisation.samples} samples"
        + (f" ({localisation.skipped} shared tensors of another shape skipped)" if localisation.skipped else "")
        + ".",
    ]
    first = localisation.first_diverging
    if first is None:
        lines.append(f"No tensor falls below {localisation.threshold_db:g} dB SQNR.")
    else:
        lines.append(
            f"First below {localisation.threshold_db:g} dB SQNR: `{first.tensor}` ({first.op_type} node "
            f"`{first.node}`, {first.kind}), {first.sqnr_db:.1f} dB."
        )
    steps = [t for t in localisation.ranked[:rows] if t.local_sqnr_db < EXACT_DB]
    if not steps:
        lines += ["", "Every compared tensor matches exactly (within float rounding)."]
        return lines
    lines += ["", "Steps adding the most error (lowest local SQNR first):", ""]
    lines += markdown_table(
        ["tensor", "step", "op", "SQNR dB", "local SQNR dB", "cosine", "exclude to remove"],
        [
            [
                f"`{t.tensor}`",
                t.kind,
                t.op_type,
                f"{t.sqnr_db:.1f}",
                f"{t.local_sqnr_db:.1f}",
                format_value(t.cosine),
                ", ".join(f"`{node}`" for node in t.culprits),
            ]
            for t in steps
        ],
    )
    culprits = localisation.responsible_nodes(rows)
    if culprits:
        lines += ["", "To keep them in float: `quantize.exclude_nodes = " + json.dumps(culprits) + "`"]
    return lines


def _ratio(pair: tuple[int, int]) -> str:
    return f"{pair[1] / pair[0]:.2f}x" if pair[0] else "-"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
