"""Quantize stage: streaming calibration, the QDQ rewrite, and mixed precision to meet the policy."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

from pipeline.artifacts import Artifact
from pipeline.calibration import cache
from pipeline.calibration.collector import CalibrationStats, collect_statistics, select_tensors
from pipeline.calibration.ranges import compute_range
from pipeline.errors import JobError, StageError, first_line
from pipeline.job import ConversionJob, Int8Policy
from pipeline.onnx_io import PROTOBUF_LIMIT_BYTES, load_graph_only, model_artifact, save_model
from pipeline.parity.metrics import OutputComparator, OutputMetrics
from pipeline.parity.policy import task_checks
from pipeline.quantization.cpu import needs_reduce_range
from pipeline.quantization.fusions import contrib_ops
from pipeline.quantization.mixed_precision import rank_by_damage, rank_candidates, search
from pipeline.quantization.qdq import QdqSettings, quantize_qdq
from pipeline.quantization.recipe import Recipe, choose_recipe, irregular_tensor_nodes
from pipeline.stage_cache import content_key
from pipeline.stages.base import StageContext, Target
from pipeline.threads import session_options

logger = logging.getLogger(__name__)

INT8_MODEL = "model.int8.onnx"
# Calibration batches the mixed-precision search judges each candidate on.
_JUDGE_BATCHES = 4


class QuantizeStage:
    """Quantize weights and activations to int8 (QDQ), ranges from streamed calibration data."""

    name = "quantize"

    def enabled(self, job: ConversionJob) -> bool:
        """Runs unless the job turns it off."""
        return job.quantize.enabled

    def key(self, ctx: StageContext) -> str | None:
        """The parent model, the calibration data, the settings (targets' and the CPU's included)
        and the int8 policy mixed precision aims at."""
        assert ctx.calibration is not None
        job = ctx.job
        settings, _ = quantization_settings(job, ctx.targets)
        return content_key(
            self.name,
            {
                "parent": ctx.latest_model().sha256,
                "calibration": ctx.calibration.digest(),
                "quantize": job.quantize.model_dump(mode="json"),
                "settings": asdict(settings),
                "policy": job.parity.int8.model_dump(mode="json"),
                "rtol": job.parity.fp32.rtol,
                "threshold_mb": job.export.external_data_threshold_mb,
            },
        )

    def run(self, ctx: StageContext) -> Artifact:
        """Calibrate, quantize, search mixed precision if needed, write model.int8.onnx."""
        job = ctx.job
        options = job.quantize
        assert ctx.calibration is not None  # the job model requires calibration data when enabled
        parent = ctx.latest_model()
        source = ctx.workdir / parent.path
        settings, reduce_range_reason = quantization_settings(job, ctx.targets)
        try:
            model = load_model_with_shape_infer(source)
        except Exception as e:  # shape inference raises many types
            raise StageError(self.name, job.name, f"shape inference failed: {first_line(e)}") from e
        recipe = choose_recipe(model, options.op_types, options.exclude_nodes)
        op_types = set(recipe.op_types) if recipe.op_types else None
        tensors = select_tensors(model, op_types, recipe.quantize_outputs)
        clock = time.perf_counter()
        stats, cache_hit = self._statistics(ctx, model, parent.sha256, tensors)
        calibration_seconds = time.perf_counter() - clock
        ranges = {
            name: compute_range(h, options.calibration_method, percentile=options.percentile)
            for name, h in stats.tensors.items()
        }
        kept = {**recipe.kept_float, **irregular_tensor_nodes(model, stats)}
        probes: list[dict[str, object]] = []
        if options.mixed_precision and _has_checks(job.parity.int8):
            kept, probes = self._mixed_precision(ctx, source, model, stats, ranges, settings, recipe, kept)
        quantized = self._quantize(job, model, ranges, settings, recipe, kept)
        target = ctx.workdir / INT8_MODEL
        save_model(ir.from_proto(quantized), target, job.export.external_data_threshold_bytes)
        graph = load_graph_only(target).graph
        return model_artifact(
            self.name,
            target,
            parent,
            {
                "format": "QDQ",
                "recipe": recipe.family,
                "quantize_outputs": recipe.quantize_outputs,
                "op_types": list(recipe.op_types) if recipe.op_types else "all ONNX Runtime quantizes",
                "calibration": {
                    "method": options.calibration_method,
                    "batches": stats.batches,
                    "samples": stats.samples,
                    "tensors": len(stats.tensors),
                    "seconds": round(calibration_seconds, 3),
                    "cache_hit": cache_hit,
                    "irregular_tensors": {
                        name: {"nonfinite": h.nonfinite, "huge": h.huge}
                        for name, h in stats.tensors.items()
                        if h.nonfinite or h.huge
                    },
                },
                "activation_type": "int8" if settings.power_of_two else settings.activation_type,
                "activation_symmetric": settings.activation_symmetric or settings.power_of_two,
                "weight_type": settings.weight_type,
                "per_channel": settings.per_channel,
                "reduce_range": settings.reduce_range,
                "reduce_range_reason": reduce_range_reason,
                "power_of_two_scales": settings.power_of_two,
                "fused_ops": dict(sorted(contrib_ops(graph).items())),
                "kept_float": kept,
                "mixed_precision_probes": probes,
                "nodes": len(graph.node),
                "quantize_linear": sum(node.op_type == "QuantizeLinear" for node in graph.node),
                "dequantize_linear": sum(node.op_type == "DequantizeLinear" for node in graph.node),
            },
        )

    def _mixed_precision(
        self,
        ctx: StageContext,
        source: Path,
        model: onnx.ModelProto,
        stats: CalibrationStats,
        ranges: dict[str, tuple[float, float]],
        settings: QdqSettings,
        recipe: Recipe,
        kept: dict[str, str],
    ) -> tuple[dict[str, str], list[dict[str, object]]]:
        """The float nodes the int8 policy needs (on calibration data), and every probe made."""
        job = ctx.job
        judge = _PolicyJudge(ctx, source, job.parity.int8)
        estimated = rank_candidates(model, stats.tensors, ranges, recipe.op_types, set(kept))

        def alone(node: str) -> float:
            return judge.damage(self._quantize(job, model, ranges, settings, recipe, kept, only=[node]))

        def evaluate(extra_float: list[str]) -> tuple[bool, str]:
            candidate_kept = {**kept, **dict.fromkeys(extra_float, "")}
            return judge(self._quantize(job, model, ranges, settings, recipe, candidate_kept))

        result = search(lambda: rank_by_damage(estimated, alone), evaluate, job.quantize.max_float_share)
        if not result.met:
            share = 100 * job.quantize.max_float_share
            logger.warning("%s: int8 policy not met with up to %.0f%% of nodes float", job.name, share)
        probes = [{"kept_float": p.kept_float, "passed": p.passed, "summary": p.summary} for p in result.probes]
        return {**kept, **result.kept_float}, probes

    def _statistics(
        self, ctx: StageContext, model: onnx.ModelProto, model_sha256: str, tensors: list[str]
    ) -> tuple[CalibrationStats, bool]:
        """Calibration statistics from the cache, or streamed from the calibration data."""
        assert ctx.calibration is not None
        use_cache = ctx.job.quantize.calibration_cache
        folder = cache.default_cache_dir()
        key = cache.cache_key(model_sha256, ctx.calibration.digest(), tensors) if use_cache else ""
        cached = cache.load(folder, key) if use_cache else None
        if cached is not None:
            return cached, True
        try:
            stats = collect_statistics(
                model, ctx.workdir, tensors, (batch.feeds for batch in ctx.calibration), histograms=True
            )
        except JobError:
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

    def _quantize(
        self,
        job: ConversionJob,
        model: onnx.ModelProto,
        ranges: dict[str, tuple[float, float]],
        settings: QdqSettings,
        recipe: Recipe,
        kept: dict[str, str],
        only: list[str] | None = None,
    ) -> onnx.ModelProto:
        try:
            return quantize_qdq(model, ranges, settings, recipe.op_types, list(kept), only, recipe.quantize_outputs)
        except Exception as e:  # ORT's quantizer raises many types
            detail = f"ONNX Runtime's QDQ quantizer failed: {type(e).__name__}: {first_line(e)}"
            raise StageError(self.name, job.name, detail) from e


def quantization_settings(job: ConversionJob, targets: list[Target]) -> tuple[QdqSettings, str]:
    """The job's options merged with every target's constraints; and why reduce_range is what it is."""
    options = job.quantize
    constraints = [target.backend.capabilities.quantization for target in targets]
    if options.reduce_range is not None:
        reduce_range, reason = options.reduce_range, "set in the job"
    elif any(target.name == "cpu" for target in targets):
        reduce_range, reason = needs_reduce_range()
    else:
        reduce_range, reason = False, "no CPU target"
    settings = QdqSettings(
        per_channel=options.per_channel and all(c.per_channel_weights for c in constraints),
        activation_type=resolve_activation_type(job, targets),
        weight_type=options.weight_type,
        activation_symmetric=options.activation_symmetric or any(c.symmetric_activations for c in constraints),
        reduce_range=reduce_range,
        power_of_two=(
            options.power_of_two_scales
            if options.power_of_two_scales is not None
            else any(c.power_of_two_scales for c in constraints)
        ),
        fuse_gelu=options.fuse_gelu and all(target.backend.capabilities.contrib_ops for target in targets),
    )
    return settings, reason


def resolve_activation_type(job: ConversionJob, targets: list[Target]) -> str:
    """The job's activation type, checked against (or, when unset, chosen for) every target.

    Raises:
        JobError: A target cannot run the activation type the job asks for.
    """
    accepted = [(t.name, t.backend.capabilities.quantization.activation_types) for t in targets]
    requested = job.quantize.activation_type
    if requested is None:
        return "uint8" if all("uint8" in types for _, types in accepted) else "int8"
    for name, types in accepted:
        if requested not in types:
            raise JobError(
                job.origin,
                "quantize.activation_type",
                f"target {name!r} runs int8 activations as {list(types)}, not {requested}",
            )
    return requested


def _has_checks(policy: Int8Policy) -> bool:
    return any(
        value is not None
        for value in (policy.min_cosine, policy.min_snr_db, policy.min_top1_agreement, policy.max_accuracy_drop)
    )


class _PolicyJudge:
    """Judges a candidate int8 model against the float model on a few calibration batches."""

    def __init__(self, ctx: StageContext, float_model: Path, policy: Int8Policy) -> None:
        assert ctx.calibration is not None
        self._policy = policy
        self._batches = [batch.feeds for batch in islice(ctx.calibration, _JUDGE_BATCHES)]
        session = _session(float_model)
        self._names = [output.name for output in session.get_outputs()]
        self._references = [session.run(self._names, feeds) for feeds in self._batches]
        self._rtol = ctx.job.parity.fp32.rtol

    def damage(self, model: onnx.ModelProto) -> float:
        """1 - cosine of the worst output on the first batch: a continuous harm score."""
        metrics = self._metrics(model, batches=1)
        return max(1.0 - m.cosine_mean for m in metrics)

    def __call__(self, model: onnx.ModelProto) -> tuple[bool, str]:
        metrics = self._metrics(model, batches=len(self._batches))
        checks = [check for m in metrics for check in task_checks(m, self._policy)]
        agreement = [m.top1_agreement for m in metrics]
        if self._policy.max_accuracy_drop is not None:
            # Without labels, top-1 disagreement bounds the accuracy drop from above.
            limit = 1.0 - self._policy.max_accuracy_drop / 100.0
            passed_agreement = all(a is None or a >= limit for a in agreement)
        else:
            passed_agreement = True
        summary = ", ".join(f"{c.metric} {c.value:.4f}" for c in checks if c.metric != "nan_inf_count")
        return all(check.passed for check in checks) and passed_agreement, summary

    def _metrics(self, model: onnx.ModelProto, batches: int) -> list[OutputMetrics]:
        session = _session(model)
        comparators = [OutputComparator(self._rtol) for _ in self._names]
        for feeds, reference in zip(self._batches[:batches], self._references[:batches], strict=True):
            for comparator, ref, cand in zip(comparators, reference, session.run(self._names, feeds), strict=True):
                comparator.update(ref, cand)
        return [comparator.result() for comparator in comparators]


def _session(model: Path | onnx.ModelProto) -> ort.InferenceSession:
    options = session_options()
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= PROTOBUF_LIMIT_BYTES:
            raise StageError("quantize", "", "mixed precision cannot judge a model over 2 GiB in memory")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
