"""What a deployment decision needs besides the parity checks: the per-target summary, model files,
what quantize kept float, stage timings, tool versions and input hashes (report schema 5).

The validate stage gathers the run's facts (`RunFacts`); `summarise` turns the report's comparisons,
speed checks and placements into one `TargetSummary` per target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from backends.base import PlacementReport
from pipeline.parity.generation import GenerationParity
from pipeline.parity.hls import HlsSummary
from pipeline.parity.target import PlacementLimits, TargetParity, fallback_failures, short_share_note
from pipeline.quantization.decision import SearchDecision
from pipeline.quantization.performance import PerformanceCheck

if TYPE_CHECKING:
    from pipeline.parity.report import Comparison

PYTORCH = "pytorch"


class _Fact(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")


class ModelFile(_Fact):
    """One model of the chain on disk.

    Attributes:
        stage: The stage that wrote it.
        file: Its file name in the output folder.
        bytes: Its size, external data files included.
    """

    stage: str
    file: str
    bytes: int


class StageTiming(_Fact):
    """How long one stage took (validate: up to writing the report).

    Attributes:
        stage: The stage.
        seconds: Wall-clock seconds (0 when skipped or restored).
        status: "ran", "restored" (from the stage cache) or "skipped" (the job does not ask for it).
        peak_rss_bytes: The process's peak resident memory during the stage (None: not measured).
    """

    stage: str
    seconds: float
    status: Literal["ran", "restored", "skipped"]
    peak_rss_bytes: int | None = None


class KeptFloat(_Fact):
    """A node quantize left in float.

    Attributes:
        node: The node name.
        reason: Why it stays float.
        damage: Cosine the node costs alone in int8 (from the mixed-precision ranking; None: not measured).
    """

    node: str
    reason: str
    damage: float | None = None


class Probe(_Fact):
    """One candidate model the mixed-precision search judged.

    Attributes:
        kept_float: How many ranked nodes were float.
        passed: Whether it met the int8 policy.
        summary: What was measured.
    """

    kept_float: int
    passed: bool
    summary: str


class QuantizationSummary(_Fact):
    """What quantize did, as a reader of the report needs it.

    Attributes:
        model: The int8 model's file.
        targets: The targets it was quantized for (empty: every target).
        recipe: The model family's recipe.
        probes: Every candidate of the mixed-precision search, in order.
        kept_float: The nodes left in float, with why.
        dynamic_nodes: The nodes quantized dynamically.
        decision: Every recipe the per-target search tried, and why this model shipped.
        shipped_precision: "int8", or "fp32" when the search shipped the float model (then `model`
            is that float model).
    """

    model: str
    targets: list[str] = []
    recipe: str
    probes: list[Probe]
    kept_float: list[KeptFloat]
    dynamic_nodes: list[str] = []
    decision: SearchDecision | None = None
    shipped_precision: Literal["int8", "fp32"] = "int8"


class RunFacts(_Fact):
    """What the validate stage gathers of the run besides parity.

    Attributes:
        models: The chain's models on disk, in chain order.
        quantization: What quantize did, per int8 model (empty: the job does not quantize).
        stage_timings: Every stage, in run order.
        hls: The hls4ml projects of fpga targets with ``hls = true``, with their C simulation's comparisons.
        generation: Generation parity of a causal LM (None: not measured).
        tool_versions: Versions of onnxforge and the libraries in the conversion path.
        input_hashes: sha256 of every input the conversion read (model files, weights, data).
    """

    models: list[ModelFile] = []
    quantization: list[QuantizationSummary] = []
    stage_timings: list[StageTiming] = []
    hls: list[HlsSummary] = []
    generation: GenerationParity | None = None
    tool_versions: dict[str, str] = {}
    input_hashes: dict[str, str] = {}


class TargetSummary(_Fact):
    """The decision summary of one target.

    Attributes:
        target: The backend.
        verdict: "pass" when every check on this target passed (chain, on-target, placement).
        precision: What ships: "int8"; a decoder quantized weight-only "int4" or "int8"; "fp32"
            when the job does not quantize or the search shipped the float model.
        fp32_model: The exported float model.
        fp32_bytes: Its size (external data included; None: not measured).
        shipped_model: The last model of the chain.
        shipped_bytes: Its size.
        latency_ratio: int8 / float latency (None: not timed on this target).
        fp32_ms: Latency of the model quantize started from.
        shipped_ms: Latency of the int8 model.
        metric: "top-1 accuracy" when measured, else "cosine to reference" (of `metric_output`).
        metric_output: The output the metric is of.
        pytorch_metric: The metric of PyTorch (None: no PyTorch model, or a cosine).
        fp32_metric: The metric of the exported float model.
        shipped_metric: The metric of the shipped model.
        fallback_share: Share of compute nodes off the target's preferred device (None: not placed).
        accelerator_share: Share of the work on the target's accelerator (None: a CPU target, or
            not placed), counted in `share_basis` ("MACs" or "compute nodes").
        share_basis: What `accelerator_share` counts.
        share_note: Beside the verdict when the share is below the target's
            ``min_accelerator_share``: "all on CPU fallback", "12% of MACs on the accelerator".
    """

    target: str
    verdict: Literal["pass", "fail"]
    precision: Literal["int8", "int4", "fp32"]
    fp32_model: str
    fp32_bytes: int | None
    shipped_model: str
    shipped_bytes: int | None
    latency_ratio: float | None
    fp32_ms: float | None
    shipped_ms: float | None
    metric: str
    metric_output: str
    pytorch_metric: float | None
    fp32_metric: float | None
    shipped_metric: float | None
    fallback_share: float | None
    accelerator_share: float | None = None
    share_basis: str = ""
    share_note: str = ""


def summarise(
    comparisons: list[Comparison],
    performance: list[PerformanceCheck],
    placements: list[PlacementReport],
    on_target: list[TargetParity],
    limits: dict[str, PlacementLimits],
    facts: RunFacts,
) -> list[TargetSummary]:
    """One summary per target that the chain ran on, in the comparisons' order."""
    targets = list(dict.fromkeys(c.target for c in comparisons))
    sizes = {model.file: model.bytes for model in facts.models}
    return [
        _summary(target, [c for c in comparisons if c.target == target], performance, placements, on_target,
                 limits.get(target, PlacementLimits()), sizes, _shipped_precision(target, facts), _weight_only(facts))
        for target in targets
    ]  # fmt: skip


def _weight_only(facts: RunFacts) -> dict[str, Literal["int4", "int8"]]:
    """The weight-only models by file, with their bits (from the generation figures)."""
    found: dict[str, Literal["int4", "int8"]] = {}
    for model in facts.generation.models if facts.generation is not None else []:
        if model.precision == "int4":
            found[model.model] = "int4"
        elif model.precision == "int8":
            found[model.model] = "int8"
    return found


def _summary(
    target: str,
    comparisons: list[Comparison],
    performance: list[PerformanceCheck],
    placements: list[PlacementReport],
    on_target: list[TargetParity],
    limits: PlacementLimits,
    sizes: dict[str, int],
    precision: Literal["int8", "fp32"],
    weight_only: dict[str, Literal["int4", "int8"]],
) -> TargetSummary:
    chain = [c for c in comparisons if c.shape is None]
    placement = next((p for p in placements if p.backend == target), None)
    speed = next((p for p in performance if p.target == target), None)
    passed = all(c.passed for c in comparisons) and all(p.passed for p in on_target if p.target == target)
    if placement is not None and fallback_failures(placement, limits):
        passed = False
    share = placement.accelerator_share() if placement is not None else None
    export = next((c for c in chain if c.stage == "export"), None)  # None: the job gave an ONNX file, the root
    fp32_model = export.candidate if export is not None else (chain[0].reference if chain else "")
    shipped = chain[-1].candidate if chain else fp32_model
    metric, output, values = _metrics(chain, fp32_model, shipped)
    return TargetSummary(
        target=target,
        verdict="pass" if passed else "fail",
        precision=weight_only.get(shipped, precision),
        fp32_model=fp32_model,
        fp32_bytes=sizes.get(fp32_model),
        shipped_model=shipped,
        shipped_bytes=sizes.get(shipped),
        latency_ratio=speed.ratio if speed is not None else None,
        fp32_ms=speed.fp32_ms if speed is not None else None,
        shipped_ms=speed.int8_ms if speed is not None else None,
        metric=metric,
        metric_output=output,
        pytorch_metric=values.get(PYTORCH),
        fp32_metric=values.get(fp32_model),
        shipped_metric=values.get(shipped),
        fallback_share=placement.fallback_share if placement is not None else None,
        accelerator_share=share[0] if share is not None else None,
        share_basis=share[1] if share is not None else "",
        share_note=short_share_note(placement, limits) if placement is not None else "",
    )


def _shipped_precision(target: str, facts: RunFacts) -> Literal["int8", "fp32"]:
    """What the target ships: its int8 model's precision, or fp32 when the job does not quantize."""
    mine = [q for q in facts.quantization if not q.targets or target in q.targets]
    return mine[0].shipped_precision if mine else "fp32"


def _metrics(chain: list[Comparison], fp32_model: str, shipped: str) -> tuple[str, str, dict[str, float]]:
    """The task metric by model name: top-1 accuracy when measured, else each model's cosine to its reference."""
    measured = [c for c in chain if c.accuracy is not None]
    if measured:
        values: dict[str, float] = {}
        for comparison in measured:
            accuracy = comparison.accuracy
            assert accuracy is not None
            values.setdefault(measured[0].reference, accuracy.reference)
            values[comparison.candidate] = accuracy.candidate
        return "top-1 accuracy", measured[0].accuracy.output if measured[0].accuracy else "", values
    if not chain or not chain[-1].outputs:
        return "cosine to reference", "", {}
    output = chain[-1].outputs[0].name
    values = {
        c.candidate: o.metrics.cosine_mean
        for c in chain
        if c.candidate in (fp32_model, shipped)
        for o in c.outputs
        if o.name == output
    }
    return "cosine to reference", output, values
