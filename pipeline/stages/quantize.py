"""Quantize stage: once per group of targets, streaming calibration on the batches not held out, the
recipe search (`pipeline.quantization.search`), and the shipped model with its record."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import onnx
import onnx_ir as ir

from pipeline.artifacts import Artifact
from pipeline.calibration import cache
from pipeline.calibration.collector import CalibrationStats, collect_statistics, select_tensors
from pipeline.calibration.ranges import compute_range
from pipeline.errors import JobError, OnnxforgeError, StageError, first_line
from pipeline.job import ConversionJob
from pipeline.onnx_io import load_graph_only, model_artifact, save_model
from pipeline.quantization.candidates import Built, Calibrated, CandidateBuilder
from pipeline.quantization.cpu import int8_dot_product_flags
from pipeline.quantization.decision import SearchDecision
from pipeline.quantization.fusions import contrib_ops, fuse_gelu
from pipeline.quantization.judge import HOLDOUT_EVERY, PolicyJudge, calibration_part, describe_held_out, held_out_part
from pipeline.quantization.performance import float_compute_nodes, slow_reasons
from pipeline.quantization.recipe import Recipe, choose_recipe, irregular_tensor_nodes
from pipeline.quantization.search import LatencyTimer, candidate_specs, run_search
from pipeline.quantization.shapes import load_with_shapes
from pipeline.quantization.targets import (
    branch_targets,
    quantization_settings,
    resolve_activation_type,
    shared_precisions,
    target_groups,
)
from pipeline.quantization.weight_only_stage import quantize_weights, weight_only_file
from pipeline.quantization.wide import describe_int16, int16_candidates
from pipeline.records import QuantizeRecord, StageName
from pipeline.stage_cache import content_key
from pipeline.stages.base import TRUNK, Branch, PreparedInputs, StageContext

logger = logging.getLogger(__name__)

INT8_STEM = "model.int8"
INT8_MODEL = f"{INT8_STEM}.onnx"


class QuantizeStage:
    """Ship each group of targets the fastest int8 model (or fp32, where allowed) that meets the policy."""

    name = StageName.QUANTIZE

    def enabled(self, job: ConversionJob) -> bool:
        """Runs unless the job turns it off."""
        return job.quantize.enabled

    def check(self, job: ConversionJob, inputs: PreparedInputs) -> None:
        """Every target runs the activation type the job asks for.

        Raises:
            JobError: A target cannot run it.
        """
        for target in inputs.targets:
            resolve_activation_type(job, [target])

    def branches(self, ctx: StageContext) -> list[Branch]:
        """One int8 model per group of targets whose constraints agree (one for all when they do);
        weight-only quantization writes one model for every target."""
        if ctx.job.quantize.weight_only is not None:
            return [TRUNK]
        return target_groups(ctx.job, ctx.targets)

    def key(self, ctx: StageContext) -> str | None:
        """The parent model, the calibration data, the branch, its settings (its targets' and the
        CPU's included) and precisions, and the parity policy the search judges with."""
        assert ctx.calibration is not None
        job = ctx.job
        targets = branch_targets(ctx.targets, ctx.branch)
        settings, _ = quantization_settings(job, targets)
        return content_key(
            self.name,
            {
                "branch": [ctx.branch.name, list(ctx.branch.targets)],
                "parent": ctx.current_model().sha256,
                "calibration": ctx.calibration.digest(),
                "quantize": job.quantize.model_dump(mode="json"),
                "settings": asdict(settings),
                "accelerator_ops": list(targets[0].capabilities.quantization.accelerator_op_types),
                "precisions": shared_precisions(targets),
                "policy": job.parity.model_dump(mode="json"),
                "threshold_mb": job.export.external_data_threshold_mb,
            },
        )

    def run(self, ctx: StageContext) -> Artifact:
        """Calibrate on most of the calibration data, search the branch's candidates (judged on the
        rest, timed on its targets), write the one shipped (``model.int8.onnx``, or
        ``model.int8.<targets>.onnx`` when targets need different ones)."""
        job = ctx.job
        parent = ctx.current_model()
        source = ctx.workdir / parent.path
        if job.quantize.weight_only is not None:
            target = ctx.workdir / weight_only_file(job.quantize.weight_only)
            weights = quantize_weights(job, source, target, ctx.calibration)
            return model_artifact(self.name, target, parent, weights)
        assert ctx.calibration is not None
        targets = branch_targets(ctx.targets, ctx.branch)
        settings, reduce_range_reason = quantization_settings(job, targets)
        calibrated = self._calibrate(ctx, source, parent.sha256)
        kept = {**calibrated.recipe.kept_float, **irregular_tensor_nodes(calibrated.model, calibrated.stats)}
        held_out, batches = held_out_part(ctx.calibration)
        judge = PolicyJudge(job, source, held_out)
        builder = CandidateBuilder(job, calibrated, kept, judge)
        specs = candidate_specs(builder, settings, targets[0].capabilities.quantization, shared_precisions(targets))
        threshold = job.export.external_data_threshold_bytes
        timer = LatencyTimer(targets, source, judge.first_feeds, ctx.workdir / ".search", threshold)
        try:
            decision, built = run_search(
                specs, judge, timer, job.quantize.search_budget_s, describe_held_out(batches, held_out)
            )
        finally:
            timer.close()
        if built.precision == "fp32":  # the float model ships: the branch's chain ends at it
            target = source
        else:
            _check_quantized(job, built.model, calibrated.recipe, built.kept_float)
            target = ctx.workdir / ctx.branch.file_name(INT8_STEM)
            save_model(ir.from_proto(built.model), target, threshold)
        decision = decision.model_copy(
            update={"targets": list(ctx.branch.targets), "slow_reasons": _slow_reasons(decision, built, target)}
        )
        record = _record(job, ctx, calibrated, built, reduce_range_reason, decision, target)
        return model_artifact(self.name, target, parent, record, ctx.branch.targets)

    def _calibrate(self, ctx: StageContext, source: Path, model_sha256: str) -> Calibrated:
        """Load the float model with shapes, choose its recipe, measure the activation ranges on the
        calibration batches not held out for judging."""
        options = ctx.job.quantize
        try:
            model = load_with_shapes(source)
        except OnnxforgeError:
            raise
        except Exception as e:  # shape inference raises many types
            raise StageError(self.name, ctx.job.name, f"shape inference failed: {first_line(e)}") from e
        targets = branch_targets(ctx.targets, ctx.branch)
        constraints = targets[0].capabilities.quantization
        recipe = choose_recipe(
            model,
            options.op_types,
            options.exclude_nodes,
            constraints.accelerator_op_types,
            constraints.int16_activations,
        )
        if recipe.op_types and "Gelu" in recipe.op_types:
            fuse_gelu(model, with_bias=False)  # one node for the accelerator's GELU unit
        op_types = set(recipe.op_types) if recipe.op_types else None
        tensors = select_tensors(model, op_types, recipe.quantize_outputs)
        clock = time.perf_counter()
        stats, cache_hit = self._statistics(ctx, model, model_sha256, tensors)
        seconds = time.perf_counter() - clock
        ranges = {
            name: compute_range(h, options.calibration_method, percentile=options.percentile)
            for name, h in stats.tensors.items()
        }
        return Calibrated(model, recipe, stats, ranges, cache_hit, seconds)

    def _statistics(
        self, ctx: StageContext, model: onnx.ModelProto, model_sha256: str, tensors: list[str]
    ) -> tuple[CalibrationStats, bool]:
        """Calibration statistics from the cache, or streamed from the calibration part of the data."""
        assert ctx.calibration is not None
        use_cache = ctx.job.quantize.calibration_cache
        folder = cache.default_cache_dir()
        data = f"{ctx.calibration.digest()};held out 1 in {HOLDOUT_EVERY}"
        key = cache.cache_key(model_sha256, data, tensors) if use_cache else ""
        cached = cache.load(folder, key) if use_cache else None
        if cached is not None:
            return cached, True
        try:
            stats = collect_statistics(model, ctx.workdir, tensors, calibration_part(ctx.calibration), histograms=True)
        except OnnxforgeError:  # bad data (JobError), a full disk (StorageError)
            raise
        except Exception as e:  # ONNX Runtime raises several types
            detail = f"calibration failed: {type(e).__name__}: {first_line(e)}"
            raise StageError(self.name, ctx.job.name, detail) from e
        if use_cache:
            try:
                cache.store(folder, key, stats)
            except OSError as e:
                logger.warning("could not write the calibration cache in %s: %s", folder, e)
        return stats, False


def _check_quantized(job: ConversionJob, quantized: onnx.ModelProto, recipe: Recipe, kept: dict[str, str]) -> None:
    """An int8 model must have at least one quantized node (fed through a DequantizeLinear, or
    quantized dynamically).

    A model where every node stayed float would pass any int8 policy while being the float model
    under another name; a few float nodes (mixed precision, exclusions) are fine.

    Raises:
        JobError: Nothing was quantized; the message says why every candidate stayed float.
    """
    if any(node.op_type in QUANTIZED_OPS for node in quantized.graph.node):
        return
    ops = sorted({node.op_type for node in quantized.graph.node})
    if kept:
        shown = "; ".join(f"{name or '<unnamed>'}: {why}" for name, why in list(kept.items())[:3])
        more = f" (and {len(kept) - 3} more)" if len(kept) > 3 else ""
        why = f"{len(kept)} node(s) were kept float: {shown}{more}"
    elif recipe.op_types is not None:
        why = f"no node of the op types quantized ({list(recipe.op_types)}) could be quantized; the model has {ops}"
    else:
        why = f"ONNX Runtime's quantizer found nothing to quantize among the model's op types {ops}"
    raise JobError(
        job.origin,
        "quantize",
        f"no node was quantized, so the int8 model would be the float model: {why}. Fix the cause (the calibration "
        "data, quantize.op_types, quantize.exclude_nodes), or set quantize.enabled = false to convert without int8",
    )


# Ops that mark a node quantized: a static node's DequantizeLinear, a dynamic node's quantizer.
QUANTIZED_OPS = ("DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul")


def _record(
    job: ConversionJob,
    ctx: StageContext,
    calibrated: Calibrated,
    built: Built,
    reduce_range_reason: str,
    decision: SearchDecision,
    path: Path,
) -> QuantizeRecord:
    """What the manifest records of the shipped candidate."""
    graph = load_graph_only(path).graph
    settings = built.settings
    return QuantizeRecord(
        recipe=calibrated.recipe.family,
        quantize_outputs=calibrated.recipe.quantize_outputs,
        op_types=list(calibrated.recipe.op_types) if calibrated.recipe.op_types else "all ONNX Runtime quantizes",
        calibration=calibrated.record(job.quantize.calibration_method, ctx.calibration),
        activation_type="int8" if settings.power_of_two else settings.activation_type,
        activation_symmetric=settings.activation_symmetric or settings.power_of_two,
        weight_type=settings.weight_type,
        per_channel=settings.per_channel,
        reduce_range=settings.reduce_range,
        reduce_range_reason=reduce_range_reason,
        power_of_two_scales=settings.power_of_two,
        shipped_precision="fp32" if built.precision == "fp32" else "int8",
        fused_ops=dict(sorted(contrib_ops(graph).items())),
        kept_float=built.kept_float,
        kept_float_damage=built.damage,
        dynamic_nodes=built.dynamic,
        int16_activations=describe_int16(built.int16, int16_candidates(calibrated.stats.tensors, calibrated.ranges)),
        mixed_precision_probes=built.probes,
        decision=decision,
        nodes=len(graph.node),
        quantize_linear=sum(node.op_type == "QuantizeLinear" for node in graph.node),
        dequantize_linear=sum(node.op_type == "DequantizeLinear" for node in graph.node),
    )


def _slow_reasons(decision: SearchDecision, built: Built, path: Path) -> list[str]:
    """Why the shipped model is not faster than float, when the search measured that it is not."""
    if built.precision == "fp32" or decision.speedup is True:
        return []
    shipped = next(c for c in decision.candidates if c.shipped)
    if shipped.worst_ratio() is None:
        return []
    return slow_reasons(None, float_compute_nodes(path), int8_dot_product_flags())
