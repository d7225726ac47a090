"""What to quantize: op types by model family, and nodes that must stay float (with the reason)."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from pipeline.calibration.collector import CalibrationStats

# Transformers: int8 where the compute is (MatMul / Gemm). LayerNorm, Softmax, GELU and the
# residual Adds stay float: they are cheap, and their outputs (attention probabilities,
# normalised activations with outlier channels) lose the most in 8 bits.
TRANSFORMER_OP_TYPES = ("MatMul", "Gemm")


@dataclass(frozen=True)
class Recipe:
    """The quantization plan before mixed precision.

    Attributes:
        family: "transformer", "transformer-accelerator" (for a target with an integer
            accelerator), "generic", or "job" when the job lists op types itself.
        op_types: Op types to quantize (None: every op type ONNX Runtime quantizes).
        quantize_outputs: Put Q/DQ on the outputs of quantized nodes too. Off for transformers:
            their MatMul outputs feed float ops (bias Add, Softmax), so an output Q/DQ would
            only add error and a conversion; ONNX Runtime then fuses DQ -> MatMul into one
            int8 kernel with a float output.
        kept_float: Nodes kept float, with the reason for each.
    """

    family: str
    op_types: tuple[str, ...] | None
    quantize_outputs: bool = True
    kept_float: dict[str, str] = field(default_factory=dict)


def choose_recipe(
    model: onnx.ModelProto,
    job_op_types: list[str] | None,
    job_excludes: list[str],
    accelerator_op_types: tuple[str, ...] = (),
    int16_activations: bool = False,
) -> Recipe:
    """Pick op types from the model's family (and the target's accelerator) unless the job names them.

    Args:
        model: The model to quantize.
        job_op_types: The job's `quantize.op_types` (None: automatic).
        job_excludes: The job's `quantize.exclude_nodes`.
        accelerator_op_types: The op types the branch's integer accelerator runs (empty: none).
        int16_activations: The accelerator also runs int16 activations. Then a transformer
            quantizes exactly the accelerator's op types, outputs included (family
            ``transformer-accelerator``), and the search moves what 8 bits damage to 16. An
            int8-only accelerator cannot hold a transformer's residual stream (MiniLM with its
            Adds in int8: cosine 0.40); it gets the CPU recipe, whose MatMuls it runs with int32
            outputs.
    """
    kept = {name: "listed in quantize.exclude_nodes" for name in job_excludes}
    if job_op_types is not None:
        return Recipe("job", tuple(job_op_types), kept_float=kept)
    if is_transformer(model):
        if accelerator_op_types and int16_activations:
            return Recipe("transformer-accelerator", tuple(sorted(accelerator_op_types)), kept_float=kept)
        return Recipe("transformer", TRANSFORMER_OP_TYPES, quantize_outputs=False, kept_float=kept)
    return Recipe("generic", None, kept_float=kept)


def is_transformer(model: onnx.ModelProto) -> bool:
    """Attention shape: a Softmax, a MatMul of two activations, and a normalisation layer."""
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    constants = {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    ops = {node.op_type for node in graph.node}
    activation_matmul = any(
        node.op_type == "MatMul" and not any(name in weights or name in constants for name in node.input)
        for node in graph.node
    )
    normalisation = bool(ops & {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"})
    return "Softmax" in ops and activation_matmul and (normalisation or "ReduceMean" in ops)


def irregular_tensor_nodes(model: onnx.ModelProto, stats: CalibrationStats) -> dict[str, str]:
    """Nodes touching a tensor that carried NaN, infinities or huge values during calibration.

    Such tensors (an attention mask filled with -inf or finfo.min) cannot be quantized: the
    mask value would saturate to an ordinary number and stop masking.
    """
    irregular = {
        name: f"tensor {name!r} carried {h.nonfinite} non-finite and {h.huge} huge values in calibration"
        for name, h in stats.tensors.items()
        if h.nonfinite or h.huge
    }
    kept = {}
    for node in model.graph.node:
        for tensor in [*node.input, *node.output]:
            if tensor in irregular:
                kept[node.name] = irregular[tensor]
                break
    return kept
