"""Simplify stage: constant folding and dead-code removal with the onnxscript optimizer."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedNodesPass

from pipeline.artifacts import Artifact, sha256_file, write_with
from pipeline.errors import StageError
from pipeline.job import ConversionJob
from pipeline.stages.base import StageContext

logger = logging.getLogger(__name__)

SIMPLIFIED_MODEL = "model.simplified.onnx"


class SimplifyStage:
    """Fold constants, drop dead nodes and unused initializers; report the counts before and after."""

    name = "simplify"

    def enabled(self, job: ConversionJob) -> bool:
        """Runs unless the job turns it off."""
        return job.simplify.enabled

    def run(self, ctx: StageContext) -> Artifact:
        """Optimize the newest model and write it as model.simplified.onnx."""
        parent = ctx.latest_model()
        model = ir.load(ctx.workdir / parent.path)
        before = graph_counts(model)
        try:
            onnxscript.optimizer.optimize(model)
            RemoveUnusedNodesPass()(model)
            onnx.checker.check_model(ir.to_proto(model), full_check=True)
        except Exception as e:  # noqa: BLE001 - optimizer and checker raise many types
            raise StageError(self.name, ctx.job.name, f"{type(e).__name__}: {e}") from e
        after = graph_counts(model)
        target = ctx.workdir / SIMPLIFIED_MODEL
        write_with(target, lambda path: ir.save(model, path))
        logger.info("simplify %s: nodes %d -> %d", ctx.job.name, before["nodes"], after["nodes"])
        return Artifact(
            stage=self.name,
            path=SIMPLIFIED_MODEL,
            sha256=sha256_file(target),
            parent_sha256=parent.sha256,
            metadata={"before": before, "after": after},
        )


def graph_counts(model: ir.Model) -> dict[str, int]:
    """Node, initializer and parameter (initializer element) counts of a model's main graph."""
    initializers = model.graph.initializers.values()
    return {
        "nodes": sum(1 for _ in model.graph),
        "initializers": len(model.graph.initializers),
        "parameters": int(sum(np.prod(v.shape.numpy()) for v in initializers if v.shape is not None)),
    }
