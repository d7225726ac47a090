"""Quantize stage: streaming calibration, the QDQ rewrite, and mixed precision to meet the policy."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from pipeline.artifacts import Artifact
from pipeline.calibration import cache
from pipeline.calibration.collector import CalibrationStats, collect_statistics, select_tensors
from pipeline.calibration.ranges import compute_range
from pipeline.errors import JobError, OnnxforgeError, StageError, first_line
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, Int8Policy
from pipeline.onnx_io import PROTOBUF_LIMIT_BYTES, load_graph_only, model_artifact, save_model
from pipeline.parity.chain import Link, ParityChain
from pipeline.parity.report import Comparison
from pipeline.quantization.cpu import needs_reduce_range
from pipeline.quantization.fusions import contrib_ops
from pipeline.quantization.mixed_precision import rank_by_damage, rank_candidates, search
from pipeline.quantization.qdq import QdqSettings, quantize_qdq
from pipeline.quantization.recipe import Recipe, choose_recipe, irregular_tensor_nodes
from pipeline.quantization.shapes import load_with_shapes
from pipeline.records import CalibrationRecord, IrregularTensor, ProbeRecord, QuantizeRecord, StageName
from pipeline.stage_cache import content_key
from pipeline.stages.base import PreparedInputs, StageContext, Target
from pipeline.threads import session_options

logger = logging.getLogger(__name__)

INT8_MODEL = "model.int8.onnx"
# Calibration batches the mixed-precision search judges each candidate on.
_JUDGE_BATCHES = 4
# Run names of the judge's two models (the float model runs once, its outputs kept).
CPU, FLOAT = "cpu", "float"


class QuantizeStage:
    """Quantize weights and activations to int8 (QDQ), ranges from streamed calibration data."""

    name = StageName.QUANTIZE

    def enabled(self, job: ConversionJob) -> bool:
        """Runs unless the job turns it off."""
        return job.quantize.enabled

    def check(self, job: ConversionJob, inputs: PreparedInputs) -> None:
        """Every target runs the activation type the job asks for.

        Raises:
            JobError: A target cannot run it.
        """
        resolve_activation_type(job, inputs.targets)

    def key(self, ctx: StageContext) -> str | None:
        """The parent model, the calibration data, the settings (targets' and the CPU's included)
        and the int8 policy mixed precision aims at."""
        assert ctx.calibration is not None
        job = ctx.job
        settings, _ = quantization_settings(job, ctx.targets)
        return content_key(
            self.name,
            {
                "parent": ctx.current_model().sha256,
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
        parent = ctx.current_model()
        source = ctx.workdir / parent.path
        settings, reduce_range_reason = quantization_settings(job, ctx.targets)
        calibrated = self._calibrate(ctx, source, parent.sha256)
        kept = {**calibrated.recipe.kept_float, **irregular_tensor_nodes(calibrated.model, calibrated.stats)}
        probes: list[ProbeRecord] = []
        damage: dict[str, float] = {}
        if job.quantize.mixed_precision and _has_checks(job.parity.int8):
            kept, probes, damage = self._mixed_precision(ctx, source, calibrated, settings, kept)
        quantized = self._quantize(job, calibrated, settings, kept)
        _check_quantized(job, quantized, calibrated.recipe, kept)
        target = ctx.workdir / INT8_MODEL
        save_model(ir.from_proto(quantized), target, job.export.external_data_threshold_bytes)
        graph = load_graph_only(target).graph
        record = QuantizeRecord(
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
            fused_ops=dict(sorted(contrib_ops(graph).items())),
            kept_float=kept,
            kept_float_damage=damage,
            mixed_precision_probes=probes,
            nodes=len(graph.node),
            quantize_linear=sum(node.op_type == "QuantizeLinear" for node in graph.node),
            dequantize_linear=sum(node.op_type == "DequantizeLinear" for node in graph.node),
        )
        return model_artifact(self.name, target, parent, record)

    def _calibrate(self, ctx: StageContext, source: Path, model_sha256: str) -> _Calibrated:
        """Load the float model with shapes, choose its recipe, measure the activation ranges."""
        options = ctx.job.quantize
        try:
            model = load_with_shapes(source)
        except OnnxforgeError:
            raise
        except Exception as e:  # shape inference raises many types
            raise StageError(self.name, ctx.job.name, f"shape inference failed: {first_line(e)}") from e
        recipe = choose_recipe(model, options.op_types, options.exclude_nodes)
        op_types = set(recipe.op_types) if recipe.op_types else None
        tensors = select_tensors(model, op_types, recipe.quantize_outputs)
        clock = time.perf_counter()
        stats, cache_hit = self._statistics(ctx, model, model_sha256, tensors)
        seconds = time.perf_counter() - clock
        ranges = {
            name: compute_range(h, options.calibration_method, percentile=options.percentile)
            for name, h in stats.tensors.items()
        }
        return _Calibrated(model, recipe, stats, ranges, cache_hit, seconds)

    def _mixed_precision(
        self, ctx: StageContext, source: Path, calibrated: _Calibrated, settings: QdqSettings, kept: dict[str, str]
    ) -> tuple[dict[str, str], list[ProbeRecord], dict[str, float]]:
        """The float nodes the int8 policy needs (on calibration data), every probe made, and the
        measured damage of each node the search kept float."""
        job = ctx.job
        judge = PolicyJudge(ctx, source)
        estimated = rank_candidates(
            calibrated.model, calibrated.stats.tensors, calibrated.ranges, calibrated.recipe.op_types, set(kept)
        )

        def alone(node: str) -> float:
            return judge.damage(self._quantize(job, calibrated, settings, kept, only=[node]))

        def evaluate(extra_float: list[str]) -> tuple[bool, str]:
            candidate_kept = {**kept, **dict.fromkeys(extra_float, "")}
            return judge(self._quantize(job, calibrated, settings, candidate_kept))

        result = search(lambda: rank_by_damage(estimated, alone), evaluate, job.quantize.max_float_share)
        if not result.met:
            share = 100 * job.quantize.max_float_share
            logger.warning("%s: int8 policy not met with up to %.0f%% of nodes float", job.name, share)
        probes = [ProbeRecord(kept_float=p.kept_float, passed=p.passed, summary=p.summary) for p in result.probes]
        return {**kept, **result.kept_float}, probes, result.damage

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

    def _quantize(
        self,
        job: ConversionJob,
        calibrated: _Calibrated,
        settings: QdqSettings,
        kept: dict[str, str],
        only: list[str] | None = None,
    ) -> onnx.ModelProto:
        recipe = calibrated.recipe
        try:
            return quantize_qdq(
                calibrated.model,
                calibrated.ranges,
                settings,
                recipe.op_types,
                list(kept),
                only,
                recipe.quantize_outputs,
            )
        except Exception as e:  # ORT's quantizer raises many types
            detail = f"ONNX Runtime's QDQ quantizer failed: {type(e).__name__}: {first_line(e)}"
            raise StageError(self.name, job.name, detail) from e


@dataclass(frozen=True)
class _Calibrated:
    """The float model with inferred shapes, its recipe, and its measured activation ranges."""

    model: onnx.ModelProto
    recipe: Recipe
    stats: CalibrationStats
    ranges: dict[str, tuple[float, float]]
    cache_hit: bool
    seconds: float

    def record(self, method: str, data: FeedSource | None) -> CalibrationRecord:
        """The calibration as the manifest records it (with the samples `data` dropped for NaN / inf)."""
        return CalibrationRecord(
            method=method,
            batches=self.stats.batches,
            samples=self.stats.samples,
            tensors=len(self.stats.tensors),
            seconds=round(self.seconds, 3),
            cache_hit=self.cache_hit,
            irregular_tensors={
                name: IrregularTensor(nonfinite=h.nonfinite, huge=h.huge)
                for name, h in self.stats.tensors.items()
                if h.nonfinite or h.huge
            },
            dropped_samples=(data.dropped_samples or 0) if data is not None else 0,
        )


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


def _check_quantized(job: ConversionJob, quantized: onnx.ModelProto, recipe: Recipe, kept: dict[str, str]) -> None:
    """An int8 model must have at least one quantized node (one fed through a DequantizeLinear).

    A model where every node stayed float would pass any int8 policy while being the float model
    under another name; a few float nodes (mixed precision, exclusions) are fine.

    Raises:
        JobError: Nothing was quantized; the message says why every candidate stayed float.
    """
    if any(node.op_type == "DequantizeLinear" for node in quantized.graph.node):
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


class PolicyJudge:
    """Judges candidate int8 models against the float model on a few calibration batches.

    The judging is the parity engine's (`pipeline.parity.chain`), with the job's own int8 policy:
    the checks that apply to each output are the ones validation applies. Without labels in the
    calibration data, the classifier output's top-1 agreement bounds the accuracy drop.
    """

    def __init__(self, ctx: StageContext, float_model: Path) -> None:
        assert ctx.calibration is not None
        self._job = ctx.job
        batches = list(islice(ctx.calibration, _JUDGE_BATCHES))
        self._feeds = [batch.feeds for batch in batches]
        self._labels = [batch.labels for batch in batches]
        session = _session(float_model)
        self._names = [output.name for output in session.get_outputs()]
        self._references = [session.run(self._names, feeds) for feeds in self._feeds]

    def damage(self, model: onnx.ModelProto) -> float:
        """1 - cosine of the worst output on the first batch: a continuous harm score."""
        comparison = self._compare(model, batches=1)
        return max(1.0 - output.metrics.cosine_mean for output in comparison.outputs)

    def __call__(self, model: onnx.ModelProto) -> tuple[bool, str]:
        """Whether the candidate meets the int8 policy on the judge's batches, and its figures."""
        comparison = self._compare(model, batches=len(self._feeds))
        checks = [check for output in comparison.outputs for check in output.checks]
        if comparison.accuracy is not None and comparison.accuracy.check is not None:
            checks.append(comparison.accuracy.check)
        summary = ", ".join(f"{c.metric} {c.value:.4f}" for c in checks if c.metric != "nan_inf_count")
        return comparison.passed, summary

    def _compare(self, model: onnx.ModelProto, batches: int) -> Comparison:
        session = _session(model)
        link = Link.on_target(QuantizeStage.name, CPU, FLOAT, INT8_MODEL, "int8")
        chain = ParityChain([link], self._names, rtol=self._job.parity.fp32.rtol, is_classifier=self._job.is_classifier)
        for feeds, labels, reference in zip(
            self._feeds[:batches], self._labels[:batches], self._references[:batches], strict=True
        ):
            runs = {link.reference_run: list(reference), link.candidate_run: session.run(self._names, feeds)}
            chain.update(runs, len(next(iter(feeds.values()))), labels)
        (comparison,) = chain.judge(self._job.parity, agreement_bounds_drop=True)
        return comparison


def _session(model: Path | onnx.ModelProto) -> ort.InferenceSession:
    options = session_options()
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= PROTOBUF_LIMIT_BYTES:
            raise StageError("quantize", "", "mixed precision cannot judge a model over 2 GiB in memory")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
