"""Markdown sections of the parity report that stand on their own: the decision summary, quantization,
provenance (timings, models, versions, hashes), distillation, pruning, localisation."""

from __future__ import annotations

import json
import math

from pipeline.distillation.summary import DistillationSummary
from pipeline.parity.localize import EXACT_DB, Localisation
from pipeline.parity.summary import ModelFile, QuantizationSummary, StageTiming, TargetSummary
from pipeline.pruning.summary import PruningSummary
from pipeline.quantization.decision import SearchDecision


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


SUMMARY_COLUMNS = [
    "target",
    "verdict",
    "ships",
    "size fp32 -> shipped",
    "latency vs float",
    "metric",
    "PyTorch",
    "fp32",
    "shipped",
    "fallback",
    "on accelerator",
]


def format_bytes(size: int | None) -> str:
    """A file size for people: 1.23 MB, 456.7 kB, 89 B."""
    if size is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def _metric(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if metric == "top-1 accuracy" else f"{value:.6f}"


def summary_row(summary: TargetSummary) -> list[str]:
    """One target's cells of the decision summary (`SUMMARY_COLUMNS`)."""
    latency = "-" if summary.latency_ratio is None else f"{summary.latency_ratio:.2f}x"
    if summary.fp32_ms is not None and summary.shipped_ms is not None:
        latency += f" ({summary.shipped_ms:.3g} vs {summary.fp32_ms:.3g} ms)"
    ratio = (
        f" ({summary.shipped_bytes / summary.fp32_bytes:.2f}x)" if summary.fp32_bytes and summary.shipped_bytes else ""
    )
    metric = summary.metric + (f" ({summary.metric_output})" if summary.metric_output else "")
    return [
        summary.target,
        summary.verdict.upper() + (f" ({summary.share_note})" if summary.share_note else ""),
        summary.precision,
        f"{format_bytes(summary.fp32_bytes)} -> {format_bytes(summary.shipped_bytes)}{ratio}",
        latency,
        metric,
        *(_metric(v, summary.metric) for v in (summary.pytorch_metric, summary.fp32_metric, summary.shipped_metric)),
        "-" if summary.fallback_share is None else f"{summary.fallback_share:.1%}",
        "-" if summary.accelerator_share is None else f"{summary.accelerator_share:.1%} of {summary.share_basis}",
    ]


def render_summary(summaries: list[TargetSummary]) -> list[str]:
    """The decision summary: one row per target."""
    return ["## Summary", "", *markdown_table(SUMMARY_COLUMNS, [summary_row(s) for s in summaries])]


DECISION_COLUMNS = ["candidate", "precision", "float / dynamic nodes", "latency / float", "policy metric", "result"]


def render_decision(decision: SearchDecision) -> list[str]:
    """Every candidate the per-target search tried: its latency interval, its policy figures, the
    one shipped and why."""
    rows = []
    for candidate in decision.candidates:
        latency = "; ".join(
            f"{t.target} {t.note or t.measurement.describe()}" if t.measurement is not None else f"{t.target}: {t.note}"
            for t in candidate.latency
        )
        result = "-" if candidate.passed is None else "pass" if candidate.passed else "fail"
        result = f"**shipped** ({result})" if candidate.shipped else result
        rows.append(
            [
                candidate.name,
                candidate.precision,
                f"{candidate.float_nodes} / {candidate.dynamic_nodes}",
                latency or "-",
                candidate.metric or candidate.note,
                result,
            ]
        )
    lines = [
        f"Search ({decision.seconds:.1f} s of a {decision.budget_s:.0f} s budget), judged on {decision.judged_on}:",
        "",
    ]
    lines += markdown_table(DECISION_COLUMNS, rows)
    lines += ["", f"Shipped: {decision.shipped}, {decision.reason}."]
    if decision.speedup is False:
        lines.append(f"It is not faster than float: {'; '.join(decision.slow_reasons)}.")
    return lines


def render_quantization(quantization: QuantizationSummary) -> list[str]:
    """The mixed-precision probes and the nodes kept float, with why."""
    serves = f", for {', '.join(quantization.targets)}" if quantization.targets else ""
    lines = [f"## Quantization ({quantization.model}{serves}, recipe {quantization.recipe})", ""]
    if quantization.decision is not None:
        lines += [*render_decision(quantization.decision), ""]
    if len(quantization.probes) > 1:
        lines += ["Mixed-precision candidates the search judged:", ""]
        lines += markdown_table(
            ["probe", "ranked nodes float", "result", "measured"],
            [
                [str(i + 1), str(p.kept_float), "pass" if p.passed else "fail", p.summary]
                for i, p in enumerate(quantization.probes)
            ],
        )
        lines.append("")
    if not quantization.kept_float:
        return [*lines, "Every quantizable node runs in int8."]
    lines += [f"{len(quantization.kept_float)} nodes kept float:", ""]
    lines += markdown_table(
        ["node", "damage alone in int8 (cosine)", "why"],
        [[f"`{k.node}`", format_value(k.damage), k.reason] for k in quantization.kept_float],
    )
    return lines


def _gib(size: int | None) -> str:
    """Bytes in GiB for a table cell; "-" when not measured."""
    return "-" if size is None else f"{size / 2**30:.2f}"


def render_provenance(
    timings: list[StageTiming], models: list[ModelFile], versions: dict[str, str], hashes: dict[str, str]
) -> list[str]:
    """Stage timings, model files, tool versions and input hashes (empty when none was recorded)."""
    lines: list[str] = []
    if timings:
        rows = [[t.stage, t.status, f"{t.seconds:.2f}", _gib(t.peak_rss_bytes)] for t in timings]
        header = ["stage", "status", "seconds", "peak memory (GiB)"]
        lines += ["", "## Stage timings", "", *markdown_table(header, rows)]
    if models:
        rows = [[m.stage, m.file, f"{m.bytes:,}"] for m in models]
        lines += ["", "## Model files", "", *markdown_table(["stage", "file", "bytes"], rows)]
    if versions:
        rows = [[name, version] for name, version in versions.items()]
        lines += ["", "## Tool versions", "", *markdown_table(["tool", "version"], rows)]
    if hashes:
        rows = [[name, f"`{digest}`"] for name, digest in hashes.items()]
        lines += ["", "## Input hashes (sha256)", "", *markdown_table(["input", "sha256"], rows)]
    return lines
