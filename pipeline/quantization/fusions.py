"""Transformer fusions from `onnxruntime.transformers` for the float parts of a QDQ model.

Only the GELU fusions are applied. ONNX Runtime's own session optimiser already fuses
SkipLayerNormalization (12 on MiniLM) but does not recognise the erf-GELU that torch's dynamo
exporter writes (Div, Erf, Add, Mul, Mul); `onnxruntime.transformers` does, and turns it and the
bias Add before it into one BiasGelu kernel (MiniLM: fp32 and int8 both 2-4% faster). The
Attention fusion is left out on purpose: it folds the Q/K/V MatMuls into one float contrib op
that the QDQ model cannot run in int8.

The fused ops live in ONNX Runtime's ``com.microsoft`` domain, so this runs only when every target
executes them (`Capabilities.contrib_ops`), and on the int8 model only: the float model stays
standard ONNX (ONNX shape inference, which calibration and the QDQ quantizer need, does not know
contrib ops).
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx

logger = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"


def fuse_gelu(model: onnx.ModelProto, with_bias: bool = True) -> dict[str, int]:
    """Fuse erf-GELU subgraphs into Gelu, and a bias Add before one into BiasGelu, in place.

    The GELU's output keeps its tensor name, so the rest of the graph (and layer-wise parity,
    which compares tensors by name) is unchanged.

    Args:
        model: A model (float or QDQ) whose GELUs run in float, or a float model about to be
            quantized for an accelerator with a GELU unit (``with_bias=False``: one Gelu node
            whose input and output the quantizer can put Q / DQ on).
        with_bias: Also fold the bias Add before each GELU (BiasGelu).

    Returns:
        The nodes the fusions added, by op type (empty when nothing matched).
    """
    # Imported here: onnxruntime.transformers pulls in sympy and more, needed only for this step.
    from onnxruntime.transformers.fusion_biasgelu import FusionBiasGelu
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    before = contrib_ops(model.graph)
    wrapped = OnnxModel(model)
    # Each apply() removes the nodes it fused (never a graph input, unlike OnnxModel.prune_graph).
    FusionGelu(wrapped).apply()
    # FusionBiasGelu takes every node named Gelu into the exact (erf) BiasGelu: an ONNX Gelu with
    # the tanh approximation (opset 20 and later) would change its function, so then it is skipped.
    if with_bias and not any(_is_tanh_gelu(node) for node in model.graph.node):
        FusionBiasGelu(wrapped, is_fastgelu=False).apply()
    wrapped.topological_sort()
    fused = contrib_ops(model.graph) - before
    if fused and not any(entry.domain == CONTRIB_DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    if fused:
        logger.info("fused %s", ", ".join(f"{count} {op}" for op, count in sorted(fused.items())))
    return dict(sorted(fused.items()))


def contrib_ops(graph: onnx.GraphProto) -> Counter[str]:
    """The graph's ONNX Runtime contrib nodes, by op type."""
    return Counter(node.op_type for node in graph.node if node.domain == CONTRIB_DOMAIN)


def _is_tanh_gelu(node: onnx.NodeProto) -> bool:
    approximate = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "approximate"), b"none")
    return node.op_type == "Gelu" and node.domain in ("", "ai.onnx") and approximate == b"tanh"
