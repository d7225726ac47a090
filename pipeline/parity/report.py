"""The parity report: its schema, and the report.json / report.md writers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict

from backends.base import PlacementReport
from pipeline.distillation.summary import DistillationSummary
from pipeline.parity.generation import GenerationParity
from pipeline.parity.generation_section import generation_section
from pipeline.parity.hls import HlsSummary, render_hls
from pipeline.parity.localize import Localisation
from pipeline.parity.metrics import OutputMetrics
from pipeline.parity.policy import Check, Precision
from pipeline.parity.sections import (
    format_value,
    markdown_table,
    render_distillation,
    render_localisation,
    render_provenance,
    render_pruning,
    render_quantization,
    render_summary,
)
from pipeline.parity.summary import ModelFile, QuantizationSummary, RunFacts, StageTiming, TargetSummary, summarise
from pipeline.parity.target import (
    PlacementLimits,
    TargetParity,
    fallback_failures,
    render_placement,
    render_target_parity,
)
from pipeline.pruning.summary import PruningSummary
from pipeline.quantization.performance import PerformanceCheck

# 2: the pruned precision, per-model accuracy references and the pruning summary.
# 3: placements per target (with the accelerator estimate) and three-way on-target parity.
# 4: the distilled precision (student vs teacher) and the distillation summary.
# 5: the decision summary per target, model files with sizes, what quantize kept float (with the
#    mixed-precision probes), stage timings, tool versions and input hashes.
# 7: the hls4ml projects of fpga targets (C simulation against the emulator and CPU QDQ).
# 8: generation parity of a causal LM (greedy and teacher-forced agreement, logit cosine, KL,
#    perplexity, decode speed per model and target).
# 9: each stage's peak resident memory in the stage timings.
REPORT_SCHEMA_VERSION = 9


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

    def output_result(self, output: OutputParity) -> str:
        """An output's row result: "FAIL" when one of its checks failed, or when it is the
        classifier output and the accuracy-drop check failed; "measured" when no rule applies."""
        accuracy_check = self.accuracy.check if self.accuracy and self.accuracy.output == output.name else None
        checks = [*output.checks, *([accuracy_check] if accuracy_check else [])]
        if not checks:
            return "measured"
        return "pass" if all(check.passed for check in checks) else "FAIL"


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
        summary: The decision summary per target (verdict, precision, sizes, latency, task metric, fallback).
        models: The chain's models on disk with their sizes.
        quantization: Per int8 model (one per group of targets whose constraints agree): the
            mixed-precision probes and the nodes kept float (empty: no quantize stage).
        stage_timings: Every stage's wall-clock time, in run order.
        hls: The hls4ml projects of fpga targets with ``hls = true`` (their C simulation's comparisons).
        generation: Generation parity of a causal LM against PyTorch (None: not measured).
        tool_versions: Versions of onnxforge and the libraries in the conversion path.
        input_hashes: sha256 of every input the conversion read.
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
    summary: list[TargetSummary] = []
    models: list[ModelFile] = []
    quantization: list[QuantizationSummary] = []
    stage_timings: list[StageTiming] = []
    hls: list[HlsSummary] = []
    generation: GenerationParity | None = None
    tool_versions: dict[str, str] = {}
    input_hashes: dict[str, str] = {}
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
        limits: dict[str, PlacementLimits] | None = None,
        facts: RunFacts | None = None,
    ) -> ParityReport:
        """Assemble a report; its verdict fails on any failed comparison, on-target check or
        placement its target's `limits` reject. `facts`: what the run recorded besides parity."""
        failures = [line for comparison in comparisons for line in comparison.failures()]
        failures += [line for parity in on_target or [] for line in parity.failures()]
        limits, run = limits or {}, facts or RunFacts()
        failures += [
            line for p in placements or [] for line in fallback_failures(p, limits.get(p.backend, PlacementLimits()))
        ]
        failures += [line for check in performance or [] for line in check.failures()]
        failures += run.generation.failures() if run.generation is not None else []
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
            summary=summarise(comparisons, performance or [], placements or [], on_target or [], limits, run),
            models=run.models,
            quantization=run.quantization,
            stage_timings=run.stage_timings,
            hls=run.hls,
            generation=run.generation,
            tool_versions=run.tool_versions,
            input_hashes=run.input_hashes,
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


def _top1_accuracy(comparison: Comparison, output: OutputParity) -> str:
    accuracy = comparison.accuracy
    if accuracy is None or accuracy.output != output.name:
        return "-"
    return f"{100 * accuracy.candidate:.2f}%"


# Every column a comparison table can show: the cell of one (comparison, output) row.
_CELLS: dict[str, Callable[[Comparison, OutputParity], str]] = {
    "stage": lambda c, o: c.label,
    "target": lambda c, o: c.target,
    "candidate vs reference": lambda c, o: f"{c.candidate} vs {c.reference}",
    "output": lambda c, o: o.name,
    "max abs": lambda c, o: format_value(o.metrics.max_abs),
    "p99 abs": lambda c, o: format_value(o.metrics.p99_abs),
    "cosine (mean/min)": lambda c, o: f"{format_value(o.metrics.cosine_mean)} / {format_value(o.metrics.cosine_min)}",
    "cosine mean": lambda c, o: format_value(o.metrics.cosine_mean),
    "SNR dB": lambda c, o: format_value(o.metrics.snr_db),
    "top-1 agree": lambda c, o: format_value(o.metrics.top1_agreement),
    "top-1 acc": _top1_accuracy,
    "result": lambda c, o: c.output_result(o),
}
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
# The terminal's narrower table (the CLI).
CONSOLE_COLUMNS = [
    "stage",
    "target",
    "output",
    "max abs",
    "cosine mean",
    "SNR dB",
    "top-1 agree",
    "top-1 acc",
    "result",
]


def comparison_table(
    report: ParityReport, columns: Sequence[str] = COMPARISON_COLUMNS
) -> tuple[list[str], list[list[str]]]:
    """The comparisons as a table of plain text: one row per (comparison, output); last cell the result.

    The result cell counts the accuracy-drop check on the classifier output's row, so a row never
    shows "pass" for a comparison whose accuracy gate failed.
    """
    cells = [_CELLS[column] for column in columns]
    rows = [
        [cell(comparison, output) for cell in cells]
        for comparison in report.comparisons
        for output in comparison.outputs
    ]
    return list(columns), rows


def render_markdown(report: ParityReport) -> str:
    """The report as Markdown: a summary, one table row per (comparison, output), the failures."""
    lines = [
        f"# Parity report: {report.job}",
        "",
        f"**Verdict: {report.verdict.upper()}** on {report.data} ({report.samples} samples).",
        "",
    ]
    lines += [f"> {note}" for note in report.notes] + ([""] if report.notes else [])
    if report.summary:
        lines += [*render_summary(report.summary), ""]
    lines += markdown_table(*comparison_table(report))
    lines += accuracy_section(report) + speed_section(report)
    for quantization in report.quantization:
        lines += ["", *render_quantization(quantization)]
    lines += ["", "## Parity chain: every check", "", *markdown_table(*check_table(report))]
    if report.distillation is not None:
        lines += ["", *render_distillation(report.distillation)]
    if report.pruning is not None:
        lines += ["", *render_pruning(report.pruning)]
    for placement in report.placements:
        lines += ["", *render_placement(placement)]
    if report.on_target:
        lines += ["", *render_target_parity(report.on_target)]
    for hls in report.hls:
        lines += ["", *render_hls(hls)]
    lines += generation_section(report.generation)
    for localisation in report.localisations:
        lines += ["", *render_localisation(localisation)]
    lines += render_provenance(report.stage_timings, report.models, report.tool_versions, report.input_hashes)
    if report.failures:
        lines += ["", "## Failed checks", ""] + [f"- {line}" for line in report.failures]
    return "\n".join(lines) + "\n"


def check_table(report: ParityReport) -> tuple[list[str], list[list[str]]]:
    """Every check of the parity chain: one row per (comparison, output, check), accuracy gates included."""
    rows = []
    for comparison in report.comparisons:
        checks = [(output.name, check) for output in comparison.outputs for check in output.checks]
        if comparison.accuracy is not None and comparison.accuracy.check is not None:
            checks.append((comparison.accuracy.output, comparison.accuracy.check))
        rows += [
            [
                comparison.label,
                comparison.target,
                f"{comparison.candidate} vs {comparison.reference}",
                output,
                check.metric,
                f"{check.value:.6g}",
                check.rule,
                "pass" if check.passed else "FAIL",
            ]
            for output, check in checks
        ]
    return ["stage", "target", "candidate vs reference", "output", "check", "value", "limit", "result"], rows


def accuracy_section(report: ParityReport) -> list[str]:
    """Top-1 accuracy of reference and candidate per comparison, when measured."""
    rows = [
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
    if not rows:
        return []
    header = ["stage", "target", "output", "reference top-1", "candidate top-1", "drop (points)"]
    return ["", "## Top-1 accuracy", "", *markdown_table(header, rows)]


def speed_section(report: ParityReport) -> list[str]:
    """int8 vs float latency per target, and why int8 is not faster where it is not."""
    if not report.performance:
        return []
    lines = ["", "## int8 speed", ""]
    lines += markdown_table(
        ["target", "batch", "float ms", "int8 ms", "int8 / float", "unfused Q/DQ", "float Conv/MatMul/Gemm"],
        [
            [
                check.target,
                "x".join(map(str, check.batch_shape)),
                f"{check.fp32_ms:.2f}",
                f"{check.int8_ms:.2f}",
                check.interval.describe() if check.interval is not None else f"{check.ratio:.2f}",
                "-" if check.unfused_qdq is None else str(check.unfused_qdq),
                str(check.float_compute_nodes),
            ]
            for check in report.performance
        ],
    )
    lines += [
        line
        for c in report.performance
        if c.faster is not True
        for line in ("", f"int8 is not shown faster on {c.target}: {'; '.join(c.reasons)}.")
    ]
    return lines


def report_json_schema() -> str:
    """The JSON Schema of report.json (``docs/report-schema.json`` holds it; a test keeps it current)."""
    return json.dumps(ParityReport.model_json_schema(), indent=2) + "\n"
