"""The parity report: its schema, and the report.json / report.md writers."""

from __future__ import annotations

import json
import math

from pydantic import BaseModel, ConfigDict

from backends.base import PlacementReport
from pipeline.distillation.summary import DistillationSummary
from pipeline.parity.localize import EXACT_DB, Localisation
from pipeline.parity.metrics import OutputMetrics
from pipeline.parity.policy import Check, Precision
from pipeline.parity.target import TargetParity, fallback_failures, render_placement, render_target_parity
from pipeline.pruning.summary import PruningSummary
from pipeline.quantization.performance import PerformanceCheck

# 2: the pruned precision, per-model accuracy references and the pruning summary.
# 3: placements per target (with the accelerator estimate) and three-way on-target parity.
# 4: the distilled precision (student vs teacher) and the distillation summary.
REPORT_SCHEMA_VERSION = 4


class _Record(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")


class OutputParity(_Record):
    """Metrics and checks of one output in one comparison."""

    name: str
    metrics: OutputMetrics
    checks: list[Check]

    @property
    def passed(self) -> bool:
        """Every check passed."""
        return all(check.passed for check in self.checks)

    @property
    def result(self) -> str:
        """For tables: "pass", "FAIL", or "measured" when no rule applies (not gated)."""
        if not self.checks:
            return "measured"
        return "pass" if self.passed else "FAIL"


class AccuracyParity(_Record):
    """Top-1 accuracy on labelled evaluation data, reference and candidate.

    Attributes:
        output: The classifier output used.
        reference: Accuracy of the chain's root (PyTorch, or the given ONNX file) (0..1).
        candidate: Candidate accuracy (0..1).
        check: The accuracy-drop check, when the policy sets one.
    """

    output: str
    reference: float
    candidate: float
    check: Check | None = None


class Comparison(_Record):
    """One step of the parity chain on one target.

    Attributes:
        stage: The stage whose output is the candidate (export, simplify, quantize).
        shape: The dynamic dim sizes of an extra shape check (None: the evaluation data).
        target: The backend the candidate ran on.
        reference: What the candidate is compared to ("pytorch" or a model file).
        candidate: The candidate model file.
        precision: Which policy applies.
        outputs: Per-output metrics and checks.
        accuracy: Task accuracy, when the data has labels.
    """

    stage: str
    shape: dict[str, int] | None = None
    target: str
    reference: str
    candidate: str
    precision: Precision
    outputs: list[OutputParity]
    accuracy: AccuracyParity | None = None

    @property
    def label(self) -> str:
        """The stage, with the shape for an extra shape check: ``export[batch=1,sequence=8]``."""
        if self.shape is None:
            return self.stage
        return f"{self.stage}[{','.join(f'{dim}={size}' for dim, size in self.shape.items())}]"

    def failures(self) -> list[str]:
        """One line per failed check, naming the stage, target, output and metric."""
        where = f"stage {self.label} on {self.target}"
        lines = [
            f"{where}, output {output.name!r}: {_describe(check)}{_worst(check, output.metrics)}"
            for output in self.outputs
            for check in output.checks
            if not check.passed
        ]
        if self.accuracy and self.accuracy.check and not self.accuracy.check.passed:
            lines.append(f"{where}, output {self.accuracy.output!r}: {_describe(self.accuracy.check)}")
        return lines

    @property
    def passed(self) -> bool:
        """No check failed."""
        return not self.failures()


class ParityReport(_Record):
    """Everything parity measured for a job.

    Attributes:
        schema_version: Version of this schema.
        job: The job name.
        data: What the comparisons ran on.
        samples: Evaluation samples compared.
        notes: Caveats about the measurement (e.g. no evaluation data given).
        comparisons: Each comparison, in chain order per target.
        performance: int8 vs float latency per target (informational, not a gate).
        pruning: What the prune stage removed (None: the job does not prune).
        distillation: Teacher vs student and the student's training (None: the job does not distil).
        localisations: Where the error enters, per localised pair of models.
        placements: Which node of the final model runs where, per target.
        on_target: QDQ on each non-CPU target against QDQ on the CPU and float on the CPU.
        verdict: "pass" when every check passed, else "fail".
        failures: One line per failed check.
    """

    schema_version: int = REPORT_SCHEMA_VERSION
    job: str
    data: str
    samples: int
    notes: list[str]
    comparisons: list[Comparison]
    performance: list[PerformanceCheck] = []
    pruning: PruningSummary | None = None
    distillation: DistillationSummary | None = None
    localisations: list[Localisation] = []
    placements: list[PlacementReport] = []
    on_target: list[TargetParity] = []
    verdict: str
    failures: list[str]

    def verdicts(self) -> dict[str, str]:
        """ "pass" / "fail" per comparison, keyed ``label@target`` (e.g. ``quantize@cpu``)."""
        return {f"{c.label}@{c.target}": "pass" if c.passed else "fail" for c in self.comparisons}

    @classmethod
    def build(
        cls,
        job: str,
        data: str,
        samples: int,
        notes: list[str],
        comparisons: list[Comparison],
        performance: list[PerformanceCheck] | None = None,
        pruning: PruningSummary | None = None,
        distillation: DistillationSummary | None = None,
        localisations: list[Localisation] | None = None,
        placements: list[PlacementReport] | None = None,
        on_target: list[TargetParity] | None = None,
        max_fallback: dict[str, float | None] | None = None,
    ) -> ParityReport:
        """Assemble a report; its verdict fails on any failed comparison, on-target check or
        placement over its target's `max_fallback`."""
        failures = [line for comparison in comparisons for line in comparison.failures()]
        failures += [line for parity in on_target or [] for line in parity.failures()]
        limits = max_fallback or {}
        failures += [line for p in placements or [] for line in fallback_failures(p, limits.get(p.backend))]
        return cls(
            job=job,
            data=data,
            samples=samples,
            notes=notes,
            comparisons=comparisons,
            performance=performance or [],
            pruning=pruning,
            distillation=distillation,
            localisations=localisations or [],
            placements=placements or [],
            on_target=on_target or [],
            verdict="fail" if failures else "pass",
            failures=failures,
        )


def _describe(check: Check) -> str:
    # Full precision: a table's 4 digits can round a failing 0.99996 up to a passing-looking 1.0000.
    return f"{check.metric} = {check.value:.6g}, policy {check.rule}"


def _worst(check: Check, metrics: OutputMetrics) -> str:
    if check.metric != "min_atol" or metrics.worst is None:
        return ""
    worst = metrics.worst
    return (
        f" (worst element {worst.index}: reference {worst.reference:.6g}, candidate {worst.candidate:.6g},"
        f" rtol {metrics.rtol:g})"
    )


def format_value(value: float | None) -> str:
    """A metric for tables: 4 significant digits, small and huge values in exponent form."""
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"


COMPARISON_COLUMNS = [
    "stage",
    "target",
    "candidate vs reference",
    "output",
    "max abs",
    "p99 abs",
    "cosine (mean/min)",
    "SNR dB",
    "top-1 agree",
    "result",
]


def comparison_table(report: ParityReport) -> tuple[list[str], list[list[str]]]:
    """The comparisons as a table of plain text: one row per (comparison, output); last cell the result."""
    rows = [
        [
            comparison.label,
            comparison.target,
            f"{comparison.candidate} vs {comparison.reference}",
            output.name,
            format_value(output.metrics.max_abs),
            format_value(output.metrics.p99_abs),
            f"{format_value(output.metrics.cosine_mean)} / {format_value(output.metrics.cosine_min)}",
            format_value(output.metrics.snr_db),
            format_value(output.metrics.top1_agreement),
            output.result,
        ]
        for comparison in report.comparisons
        for output in comparison.outputs
    ]
    return COMPARISON_COLUMNS, rows


def render_markdown(report: ParityReport) -> str:
    """The report as Markdown: a summary, one table row per (comparison, output), the failures."""
    lines = [
        f"# Parity report: {report.job}",
        "",
        f"**Verdict: {report.verdict.upper()}** on {report.data} ({report.samples} samples).",
        "",
    ]
    lines += [f"> {note}" for note in report.notes] + ([""] if report.notes else [])
    lines += _markdown_table(*comparison_table(report))
    accuracy_rows = [
        [
            comparison.label,
            comparison.target,
            accuracy.output,
            f"{100 * accuracy.reference:.2f}%",
            f"{100 * accuracy.candidate:.2f}%",
            f"{100 * (accuracy.reference - accuracy.candidate):.2f}",
        ]
        for comparison in report.comparisons
        if (accuracy := comparison.accuracy) is not None
    ]
    if accuracy_rows:
        accuracy_header = ["stage", "target", "output", "reference top-1", "candidate top-1", "drop (points)"]
        lines += ["", *_markdown_table(accuracy_header, accuracy_rows)]
    if report.performance:
        lines += ["", "## int8 speed", ""]
        lines += _markdown_table(
            ["target", "batch", "float ms", "int8 ms", "int8 / float", "unfused Q/DQ", "float Conv/MatMul/Gemm"],
            [
                [
                    check.target,
                    "x".join(map(str, check.batch_shape)),
                    f"{check.fp32_ms:.2f}",
                    f"{check.int8_ms:.2f}",
                    f"{check.ratio:.2f}",
                    "-" if check.unfused_qdq is None else str(check.unfused_qdq),
                    str(check.float_compute_nodes),
                ]
                for check in report.performance
            ],
        )
        for check in report.performance:
            if not check.faster:
                lines.append(f"\nint8 is not faster on {check.target}: {'; '.join(check.reasons)}.")
    if report.distillation is not None:
        lines += ["", *render_distillation(report.distillation)]
    if report.pruning is not None:
        lines += ["", *render_pruning(report.pruning)]
    for placement in report.placements:
        lines += ["", *render_placement(placement)]
    if report.on_target:
        lines += ["", *render_target_parity(report.on_target)]
    for localisation in report.localisations:
        lines += ["", *render_localisation(localisation)]
    if report.failures:
        lines += ["", "## Failed checks", ""] + [f"- {line}" for line in report.failures]
    return "\n".join(lines) + "\n"


def render_distillation(summary: DistillationSummary) -> list[str]:
    """The distillation section: teacher vs student, how training went, every epoch."""
    teacher, student = summary.teacher, summary.student_model
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
        *_markdown_table(
            ["model", "parameters", "state bytes", f"PyTorch ms ({batch})", f"held-out {summary.metric}"],
            [
                [
                    "teacher",
                    f"{teacher.parameters:,}",
                    f"{teacher.state_bytes:,}",
                    f"{teacher.latency_ms:.3f}",
                    summary.format_score(teacher.score),
                ],
                [
                    "student",
                    f"{student.parameters:,}",
                    f"{student.state_bytes:,}",
                    f"{student.latency_ms:.3f}",
                    summary.format_score(student.score),
                ],
                [
                    "student / teacher",
                    _ratio((teacher.parameters, student.parameters)),
                    _ratio((teacher.state_bytes, student.state_bytes)),
                    f"{student.latency_ms / teacher.latency_ms:.2f}x" if teacher.latency_ms else "-",
                    "",
                ],
            ],
        ),
        "",
        f"{len(summary.history)} of {summary.epochs_planned} epochs ({ending}); the student keeps epoch "
        f"{summary.best_epoch}"
        + (f"; resumed after epoch {summary.resumed_from}" if summary.resumed_from else "")
        + f". Checkpoints: `{summary.checkpoints}`.",
    ]
    lines += [""] + [f"> {note}" for note in summary.notes] if summary.notes else []
    lines += [
        "",
        *_markdown_table(
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
        lines += [""] + _markdown_table(
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
        lines += _markdown_table(
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
    lines += _markdown_table(
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


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
