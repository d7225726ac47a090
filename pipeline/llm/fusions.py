"""ONNX Runtime's fused decoder operators, by onnxscript's ``ort_fusions`` rewrite rules.

An exported causal LM's RMSNorm is seven elementwise ops a layer (Pow, ReduceMean, Add, Sqrt,
Reciprocal, Mul, Mul) that ONNX Runtime's own graph optimizer does not fuse. onnxscript's rules put
ONNX Runtime's ``SimplifiedLayerNormalization`` in their place, and ``com.microsoft``
``SkipSimplifiedLayerNormalization`` where the residual Add feeds one.

Only the fusions that keep the decoder's parity (logits and presents at the export's sizes, a
left-padded row and a past included) and that made a decode step faster are applied:

- rms_normalization, skip_rms_normalization: applied.
- rotary embedding: not applied. onnxscript 0.7.2 matches a RotaryEmbedding only with its cos /
  sin cache, whose pattern is ``MatMul(inv_freq, position_ids)``; the exporter writes that product
  as a broadcast Mul, so the cache never matches and the rotary is inlined back.
- SDPA -> MultiHeadAttention: not applied. It keeps parity (left padding included), but it adds
  Reshapes and Transposes around each MultiHeadAttention (798 -> 672 nodes on a 125 M Llama
  against 624 with the norms alone) and decoded no faster than the norms alone.
- GroupQueryAttention (and its packed q/k/v): never matches without the fused rotary.

The fusions run only where every target executes ``com.microsoft`` operators
(`backends.base.Capabilities.contrib_ops`): the CPU and CUDA providers, not the FPGA.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from pipeline.errors import StageError, first_line

logger = logging.getLogger(__name__)

# The operators the fusions write: ONNX Runtime registers SimplifiedLayerNormalization in the default
# domain (it is not an ONNX operator), SkipSimplifiedLayerNormalization in com.microsoft.
FUSED_OPS = frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"})
# (name, rule set) in the order they are applied: the skip fusion consumes the plain one's nodes.
DECODER_FUSIONS: tuple[tuple[str, Callable[[ir.Model], int]], ...] = (
    ("rms_normalization", fuse_rms_normalization),
    ("skip_rms_normalization", fuse_skip_rms_normalization),
)
# Bumped when the fusions applied change, so that cached simplified models are not reused.
FUSIONS_VERSION = 1


def fusions_apply(causal_lm: bool, contrib_ops: Sequence[bool]) -> bool:
    """Whether a job's decoder gets the fused operators.

    Args:
        causal_lm: The job converts a decoder (`pipeline.llm.job.is_causal_lm`).
        contrib_ops: For each target, whether it runs ``com.microsoft`` operators.

    Returns:
        True for a causal LM whose targets (at least one) all run them.
    """
    return causal_lm and bool(contrib_ops) and all(contrib_ops)


def fuse_decoder(model: ir.Model, job: str, stage: str = "simplify") -> dict[str, int]:
    """Apply `DECODER_FUSIONS` to `model` in place.

    Args:
        model: An optimized decoder (after onnxscript's optimizer).
        job: The job's name, for errors.
        stage: The stage that fuses, for errors.

    Returns:
        The fused operators in the graph afterwards (`FUSED_OPS`), by op type.

    Raises:
        StageError: A rewrite rule failed on the graph.
    """
    for name, fuse in DECODER_FUSIONS:
        try:
            count = fuse(model)
        except Exception as e:  # the rewriter raises many types
            raise StageError(stage, job, f"the {name} fusion failed: {type(e).__name__}: {first_line(e)}") from e
        logger.info("simplify %s: %s fused %d times", job, name, count)
    return dict(sorted(fused_ops(model).items()))


def fused_ops(model: ir.Model) -> Counter[str]:
    """The nodes of a model's main graph that are `FUSED_OPS`, by op type."""
    return Counter(node.op_type for node in model.graph if node.op_type in FUSED_OPS)


def check_fused_model(path: Path) -> None:
    """Check a fused decoder by loading it in ONNX Runtime (CPU, no graph optimizations).

    The ONNX checker refuses SimplifiedLayerNormalization (ONNX Runtime registers it in the default
    domain, where the checker knows only ONNX's operators), so the runtime that runs it checks it.

    Raises:
        onnxruntime's errors: The model does not load.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
