"""A causal LM exported with its KV cache by the TorchScript exporter, for tests: a few seconds,
where the dynamo export (`pipeline.llm.export.export_decoder`) takes about 30 s. The model runs
through the pipeline's own `DecoderWithCache` (the signature's flat inputs and outputs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from pipeline.llm.export import DecoderWithCache
from pipeline.llm.signature import DecoderSignature


def export_with_torchscript(model: torch.nn.Module, signature: DecoderSignature, path: Path) -> Path:
    """Write `model` (a transformers causal LM with position ids) to `path`, batch, sequence and
    past dynamic, traced at batch 2, sequence 3, past 4."""
    batch, sequence, past = 2, 3, 4
    example = (
        torch.randint(0, signature.vocab, (batch, sequence)),
        torch.ones(batch, past + sequence, dtype=torch.int64),
        torch.arange(past, past + sequence).expand(batch, sequence),
        *(torch.randn(batch, signature.kv_heads, past, signature.head_dim) for _ in signature.past_names()),
    )
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "position_ids", "logits")}
    axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in signature.past_names()})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in signature.present_names()})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DecoderWithCache(model, signature).eval(),
            example,
            str(path),
            input_names=signature.input_names(),
            output_names=signature.output_names(),
            dynamic_axes=axes,
            opset_version=18,
            dynamo=False,
        )
    return path
