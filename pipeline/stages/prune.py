"""Prune stage: structured channel removal with least-squares recovery, then weight sparsity."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass, ShapeInferencePass

from pipeline.artifacts import Artifact
from pipeline.errors import OnnxforgeError, StageError, first_line
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob, SparsityOptions, StructuredPruning
from pipeline.onnx_io import check_model, model_artifact, parameter_count, save_model
from pipeline.pruning.channels import ChannelGroup, analyse_channels, layer_name
from pipeline.pruning.cost import LayerCost, layer_costs
from pipeline.pruning.importance import activation_scores, weight_scores
from pipeline.pruning.recovery import recover
from pipeline.pruning.sparsity import compressed_weight_bytes, sparsify
from pipeline.pruning.structured import choose_channels, global_kept_counts, kept_count, remove_channels
from pipeline.pruning.summary import LayerChange, PruningSummary, RecoveryRecord, SparsityRecord
from pipeline.records import PruneRecord, StageName
from pipeline.stage_cache import content_key
from pipeline.stages.base import NoPreconditions, StageContext

logger = logging.getLogger(__name__)

PRUNED_MODEL = "model.pruned.onnx"


class _FeedDicts:
    """Calibration batches as plain feed dicts, re-iterable (recovery reads them once per layer)."""

    def __init__(self, source: FeedSource) -> None:
        self._source = source

    def __iter__(self) -> Iterator[Mapping[str, np.ndarray]]:
        return (batch.feeds for batch in self._source)


class PruneStage(NoPreconditions):
    """Remove channels (the graph shrinks), re-fit what follows, zero small weights."""

    name = StageName.PRUNE

    def enabled(self, job: ConversionJob) -> bool:
        """Runs when the job asks for channel pruning or sparsity."""
        return job.prune.active

    def key(self, ctx: StageContext) -> str | None:
        """The parent model, the prune options, and the calibration data when they read it."""
        return content_key(
            self.name,
            {
                "parent": ctx.current_model().sha256,
                "prune": ctx.job.prune.model_dump(mode="json"),
                "calibration": ctx.calibration.digest() if ctx.calibration is not None else None,
                "example": _example_shapes(ctx),
                "threshold_mb": ctx.job.export.external_data_threshold_mb,
            },
        )

    def run(self, ctx: StageContext) -> Artifact:
        """Prune the newest model and write it as model.pruned.onnx."""
        job, options = ctx.job, ctx.job.prune
        parent = ctx.current_model()
        target = ctx.workdir / PRUNED_MODEL
        try:
            # Weights in memory: pruning rewrites them, and probes run the model from bytes.
            model = ir.external_data.load_to_model(ir.load(ctx.workdir / parent.path))
            LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            ShapeInferencePass()(model)
            example = ctx.example_batch().feeds
            before = layer_costs(model, example)
            parameters_before = parameter_count(model)
            summary: dict[str, object] = {}
            layer_sparsity: dict[str, float] = {}
            if options.structured is not None:
                summary.update(self._structured(ctx, model, options.structured))
            if options.sparsity is not None:
                summary["sparsity"], layer_sparsity = self._sparsity(model, options.sparsity)
            RemoveUnusedNodesPass()(model)
            after = layer_costs(model, example)
            record = PruningSummary(
                input_shape={name: list(array[:1].shape) for name, array in example.items()},
                parameters=(parameters_before, parameter_count(model)),
                macs=(sum(c.macs for c in before.values()), sum(c.macs for c in after.values())),
                layers=_changes(before, after, layer_sparsity),
                note=_note(options.structured is not None, options.sparsity),
                **summary,  # type: ignore[arg-type]
            )
            save_model(model, target, job.export.external_data_threshold_bytes, verify=check_model)
        except OnnxforgeError:
            raise  # a StageError of its own, or e.g. a StorageError from a full disk
        except Exception as e:  # onnx-ir, ORT and numpy raise many types
            raise StageError(self.name, job.name, f"{type(e).__name__}: {first_line(e)}") from e
        logger.info(
            "prune %s: parameters %d -> %d, MACs %d -> %d",
            job.name,
            *record.parameters,
            *record.macs,
        )
        return model_artifact(self.name, target, parent, PruneRecord(summary=record))

    def _structured(self, ctx: StageContext, model: ir.Model, spec: StructuredPruning) -> dict[str, object]:
        """Remove channels group by group; re-fit the layers after them."""
        analysis = analyse_channels(model)
        blocked = {group.name: group.blocked for group in analysis.groups if group.blocked}
        skipped = [group.name for group in analysis.groups if not group.blocked and _matches(group.names(), spec.skip)]
        ratios = {
            group.space: ratio
            for group in analysis.groups
            if not group.blocked and group.name not in skipped and (ratio := _ratio(group, spec)) > 0
        }
        candidates = [group for group in analysis.groups if group.space in ratios]
        data = _FeedDicts(ctx.calibration) if ctx.calibration is not None else None
        mask = spec.mask_input if spec.mask_input in {spec.name for spec in ctx.job.inputs} else None
        if spec.criterion == "activation" and candidates:
            assert data is not None  # the job model requires calibration data for this criterion
            scores = activation_scores(model, analysis, candidates, data, mask)
        else:
            norm: Literal["l1", "l2"] = "l2" if spec.criterion == "l2" else "l1"
            scores = {group.space: weight_scores(group, norm) for group in candidates}
        # Kept counts are multiples of round_to and of any grouped convolution's group count.
        multiples = {group.space: math.lcm(spec.round_to, group.partitions) for group in candidates}
        counts = {
            group.space: kept_count(group.channels, ratios[group.space], multiples[group.space]) for group in candidates
        }
        if spec.scope == "global":
            # Groups without a per-layer ratio share one ranking across layers.
            shared = [g.space for g in candidates if not _matches(g.names(), list(spec.layers))]
            counts.update(global_kept_counts({space: scores[space] for space in shared}, spec.ratio, multiples))
        kept = {
            group.space: choose_channels(scores[group.space], counts[group.space], group.partitions)
            for group in candidates
            if counts[group.space] < group.channels
        }
        original = ir.from_proto(ir.to_proto(model)) if spec.recovery and kept else None
        remove_channels(model, analysis, kept)
        pruned = [group for group in candidates if group.space in kept]
        for group in pruned:
            logger.info(
                "prune %s: %s %d -> %d channels", ctx.job.name, group.name, group.channels, len(kept[group.space])
            )
        recovery: list[RecoveryRecord] = []
        if original is not None and data is not None:
            sinks = {sink.node.name: sink for group in pruned for sink in group.sinks}
            kept_outputs = {node.name or "": kept[g.space] for g in pruned for node in g.producers}
            names = {node.name: layer_name(node) for node in model.graph}
            recovery = [
                RecoveryRecord(
                    layer=names.get(result.node, result.node),
                    error_without=result.error_before,
                    error_with=result.error_after,
                    rows=result.rows,
                    skipped=result.skipped,
                )
                for result in recover(original, model, list(sinks.values()), data, kept_outputs, mask)
            ]
        return {"blocked": blocked, "skipped": skipped, "recovery": recovery}

    def _sparsity(self, model: ir.Model, spec: SparsityOptions) -> tuple[SparsityRecord, dict[str, float]]:
        """Zero weights by magnitude; the record and each sparsified node's zero share."""
        raw, compressed_before = compressed_weight_bytes(model)

        def skip(node: ir.Node) -> bool:
            return _matches({layer_name(node), node.name or ""}, spec.skip)

        layers = sparsify(model, spec.pattern, spec.ratio, spec.n, spec.m, spec.scope, skip)
        _, compressed_after = compressed_weight_bytes(model)
        done = [layer for layer in layers if layer.skipped is None]
        parameters = sum(layer.parameters for layer in done)
        record = SparsityRecord(
            pattern=f"{spec.n}:{spec.m}" if spec.pattern == "n:m" else "unstructured",
            sparsity=sum(layer.zeros for layer in done) / parameters if parameters else 0.0,
            layers=len(done),
            weight_bytes=raw,
            compressed_before=compressed_before,
            compressed_after=compressed_after,
            skipped={layer.layer: layer.skipped for layer in layers if layer.skipped is not None},
        )
        return record, {layer.node: layer.sparsity for layer in done}


def _ratio(group: ChannelGroup, spec: StructuredPruning) -> float:
    """The job's ratio for a group: the first matching `layers` pattern, else the global ratio."""
    for pattern, ratio in spec.layers.items():
        if _matches(group.names(), [pattern]):
            return ratio
    return spec.ratio


def _matches(names: set[str], patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for name in names for pattern in patterns)


def _changes(
    before: dict[str, LayerCost], after: dict[str, LayerCost], sparsity: Mapping[str, float]
) -> list[LayerChange]:
    changes = []
    for node, old in before.items():
        new = after.get(node)
        if new is None:
            continue
        shape_changed = (old.inputs, old.outputs, old.parameters) != (new.inputs, new.outputs, new.parameters)
        if shape_changed or node in sparsity:
            changes.append(
                LayerChange(
                    layer=old.layer,
                    node=node,
                    inputs=(old.inputs, new.inputs),
                    outputs=(old.outputs, new.outputs),
                    parameters=(old.parameters, new.parameters),
                    macs=(old.macs, new.macs),
                    sparsity=sparsity.get(node),
                )
            )
    return changes


def _note(structured: bool, sparsity: SparsityOptions | None) -> str:
    parts = []
    if structured:
        parts.append("Removed channels shrink the weights and the compute on every backend.")
    if sparsity is not None:
        parts.append(
            "Sparse weights are stored as dense zeros: the file shrinks only when compressed, and "
            "ONNX Runtime's CPU and CUDA providers run them at dense speed."
        )
        if sparsity.pattern == "n:m" and (sparsity.n, sparsity.m) == (2, 4):
            parts.append("The 2:4 pattern is the one sparse tensor cores accept (TensorRT with sparsity enabled).")
    return " ".join(parts)


def _example_shapes(ctx: StageContext) -> dict[str, list[int]]:
    return {name: list(array.shape) for name, array in ctx.example_batch().feeds.items()}
