"""What the report shows of a run besides parity: model files, quantize's choices, stage times
and peak memory, tool versions and input hashes."""

from __future__ import annotations

from pipeline.artifacts import Artifact
from pipeline.job import POLICY_SECTIONS, ConversionJob, Precision, TaskPolicy
from pipeline.parity.chain import ParityChain
from pipeline.parity.summary import KeptFloat, ModelFile, Probe, QuantizationSummary, RunFacts, StageTiming
from pipeline.processes import peak_rss_bytes
from pipeline.records import QuantizeRecord, StageName
from pipeline.stages.base import StageContext
from pipeline.stages.hls import hls_summaries
from pipeline.stages.source_weights import job_input_hashes
from pipeline.versions import tool_versions


def run_facts(ctx: StageContext, validate_seconds: float) -> RunFacts:
    """What the report shows of the run besides parity: model files, quantize's choices, stage times
    (validate's own up to now), tool versions and input hashes."""
    timings = [
        StageTiming(
            stage=run.name,
            seconds=run.seconds,
            status="restored" if run.restored else "skipped" if run.artifact is None else "ran",
            peak_rss_bytes=run.peak_rss_bytes,
        )
        for run in ctx.stage_runs
    ]
    timings.append(
        StageTiming(
            stage=StageName.VALIDATE,
            seconds=round(validate_seconds, 4),
            status="ran",
            peak_rss_bytes=peak_rss_bytes(),  # the runner reset the peak as validate started
        )
    )
    models = [ModelFile(stage=a.stage, file=a.path, bytes=artifact_bytes(ctx, a)) for a in ctx.all_models()]
    return RunFacts(
        models=models,
        quantization=_quantization(ctx),
        stage_timings=timings,
        hls=hls_summaries(ctx),
        tool_versions=tool_versions(),
        input_hashes=job_input_hashes(ctx),
    )


def artifact_bytes(ctx: StageContext, artifact: Artifact) -> int:
    """A model artifact's size on disk: its file and its external data files."""
    return sum((ctx.workdir / name).stat().st_size for name in [artifact.path, *artifact.external_data])


def _quantization(ctx: StageContext) -> list[QuantizationSummary]:
    """Per int8 model: the mixed-precision probes and the nodes kept float (empty: the job does not quantize)."""
    return [
        _quantization_summary(artifact) for artifact in ctx.all_models() if isinstance(artifact.record, QuantizeRecord)
    ]


def _quantization_summary(artifact: Artifact) -> QuantizationSummary:
    record = artifact.record_as(QuantizeRecord)
    return QuantizationSummary(
        model=artifact.path,
        targets=artifact.targets,
        recipe=record.recipe,
        probes=[
            Probe(kept_float=p.kept_float, passed=p.passed, summary=p.summary) for p in record.mixed_precision_probes
        ],
        kept_float=[
            KeptFloat(node=node, reason=why, damage=record.kept_float_damage.get(node))
            for node, why in record.kept_float.items()
        ],
        dynamic_nodes=record.dynamic_nodes,
        decision=record.decision,
        shipped_precision=record.shipped_precision,
    )


def report_notes(ctx: StageContext, chain: ParityChain) -> list[str]:
    """The report's notes: what the data lacked, what could not be checked, and why."""
    job = ctx.job
    notes = []
    if job.evaluation is None:
        notes.append("The job has no [evaluation] data: parity was measured on the calibration data.")
    if ctx.source.onnx_file is not None:
        notes.append("The model came as an ONNX file: the chain starts at it; there is no PyTorch reference.")
    task_level = {link.precision for link in chain.links} - {"fp32"}
    if job.export.check_shapes and task_level - {"distilled"}:
        notes.append(
            "At the export.check_shapes sizes, pruned and int8 models are measured but not gated: their inputs are "
            "cut or tiled copies of one evaluation batch, not the data the task-level policy is about."
        )
    if ctx.artifact_with(QuantizeRecord) is not None:
        for target in ctx.targets:
            if not target.capabilities.measured_latency:
                notes.append(
                    f"{target.name} runs on an emulator: its int8 latency is the cost model's estimate in the "
                    "Placement section, not a timing."
                )
    return notes + _dropped_notes(ctx) + _unchecked_accuracy_notes(job, chain, task_level)


def _dropped_notes(ctx: StageContext) -> list[str]:
    """Samples the parity data lost to NaN or infinity (``nonfinite = "drop"``)."""
    dropped = ctx.evaluation.dropped_samples
    if not dropped:
        return []
    section = "evaluation" if ctx.job.evaluation is not None else "calibration"
    return [f"{dropped} samples holding NaN or infinity were left out of the parity data ({section}.nonfinite = drop)."]


def _unchecked_accuracy_notes(job: ConversionJob, chain: ParityChain, precisions: set[Precision]) -> list[str]:
    """Which accuracy-drop limits could not be checked, and why."""
    if chain.accuracy_measured:
        return []
    classifier = chain.roles.classifier if chain.roles is not None else None
    reason = "no [samples, classes] classifier output" if classifier is None else "no labels in the data"
    notes = []
    for precision in ("distilled", "pruned", "int8"):
        rule = job.parity.section(precision)
        if precision in precisions and isinstance(rule, TaskPolicy) and rule.max_accuracy_drop is not None:
            notes.append(f"parity.{POLICY_SECTIONS[precision]}.max_accuracy_drop was not checked: {reason}.")
    return notes
