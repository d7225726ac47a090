"""Simplify stage: the onnxscript optimizer (constant and shape-op folding, BatchNorm folded into
Conv / Gemm, Identity elimination), then the constant subgraphs it left folded by a size rule
(`pipeline.constant_folding`), and onnx-ir's dead-node and unused-initializer removal."""

from __future__ import annotations

import logging
from collections import Counter

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedNodesPass

from pipeline.artifacts import Artifact
from pipeline.constant_folding import (
    FOLD_GROWTH_CAP_BYTES,
    constant_nodes_left,
    fold_constant_subgraphs,
    several_outputs_warning_dropped,
)
from pipeline.errors import OnnxforgeError, StageError, first_line
from pipeline.job import ConversionJob
from pipeline.llm.decoder_fusions import FusionCounts, fuse_decoder
from pipeline.llm.job import is_causal_lm
from pipeline.onnx_io import check_model, discard_weights, model_artifact, parameter_count, save_model
from pipeline.records import ExportRecord, GraphCounts, SimplifyRecord, StageName
from pipeline.stage_cache import content_key
from pipeline.stages.base import NoPreconditions, StageContext

logger = logging.getLogger(__name__)

SIMPLIFIED_MODEL = "model.simplified.onnx"


class SimplifyStage(NoPreconditions):
    """Fold constants, drop dead nodes and unused initializers; report the counts before and after."""

    name = StageName.SIMPLIFY

    def enabled(self, job: ConversionJob) -> bool:
        """Runs unless the job turns it off."""
        return job.simplify.enabled

    def key(self, ctx: StageContext) -> str | None:
        """The parent model, the saving threshold, the folding size rule and a decoder's rotary table length."""
        return content_key(
            self.name,
            {
                "parent": ctx.current_model().sha256,
                "threshold_mb": ctx.job.export.external_data_threshold_mb,
                "fold_growth_cap_bytes": FOLD_GROWTH_CAP_BYTES,
                "rotary_positions": _rotary_positions(ctx),
            },
        )

    def run(self, ctx: StageContext) -> Artifact:
        """Optimize the newest model and write it as model.simplified.onnx."""
        parent = ctx.current_model()
        source = ctx.workdir / parent.path
        model = ir.load(source)
        before = graph_counts(model)
        ops_before = Counter(node.op_type for node in model.graph)
        target = ctx.workdir / SIMPLIFIED_MODEL
        optimizer_error = ""
        try:
            with several_outputs_warning_dropped():
                onnxscript.optimizer.optimize(model)
            # What onnxscript's size limits left (a GRU's 192 x 64 weight chain): folded by the size rule.
            for subgraph in fold_constant_subgraphs(model):
                logger.info("simplify %s: kept constant subgraph %s", ctx.job.name, subgraph.describe())
        except Exception as e:  # noqa: BLE001 - the optimizer fails on some valid graphs: simplify less, say why
            optimizer_error = f"{type(e).__name__}: {first_line(e)}"
            logger.warning("simplify %s: the optimizer failed (%s); only dead nodes are removed", ctx.job.name, e)
            discard_weights(model)
            model = ir.load(source)  # it may have changed the graph half-way
        try:
            # Only a decoder's graph: the norm fusion writes a contrib op a plain ONNX target may lack.
            fused = fuse_decoder(model, _rotary_positions(ctx)) if is_causal_lm(ctx.job) else FusionCounts()
            RemoveUnusedNodesPass()(model)
            after = graph_counts(model)
            removed = ops_before - Counter(node.op_type for node in model.graph)
            # Checked by path (works past the 2 GiB protobuf limit) before it is moved into place.
            save_model(model, target, ctx.job.export.external_data_threshold_bytes, verify=check_model)
        except OnnxforgeError:
            raise  # e.g. a StorageError from a full disk: already says what is wrong
        except Exception as e:  # onnx-ir and the checker raise many types
            raise StageError(self.name, ctx.job.name, f"{type(e).__name__}: {first_line(e)}") from e
        logger.info("simplify %s: nodes %d -> %d", ctx.job.name, before.nodes, after.nodes)
        # What went, by op type: folded BatchNorms, Identities, constant subgraphs, dead nodes.
        record = SimplifyRecord(
            before=before,
            after=after,
            removed_ops=dict(sorted(removed.items())),
            optimizer_error=optimizer_error,
            constant_nodes_kept=constant_nodes_left(model.graph),
            fusions={name: count for name, count in fused.as_dict().items() if count},
        )
        # onnxscript's rewrite rules keep the last graph they matched: its weights (views into the
        # parent's memory maps) must not stay resident through the later stages.
        discard_weights(model)
        return model_artifact(self.name, target, parent, record)


def _rotary_positions(ctx: StageContext) -> int | None:
    """The exported decoder's ``max_position_embeddings`` (its rotary tables' length), if known."""
    export = ctx.record(ExportRecord)
    return export.decoder_max_positions if export is not None else None


def graph_counts(model: ir.Model) -> GraphCounts:
    """Node, initializer and parameter (initializer element) counts of a model's main graph."""
    return GraphCounts(
        nodes=sum(1 for _ in model.graph), initializers=len(model.graph.initializers), parameters=parameter_count(model)
    )
