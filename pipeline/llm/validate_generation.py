"""The validate stage's part for a causal LM: PyTorch as the chain's reference through the same flat
signature as the ONNX graph, and generation parity of every model on every target."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from backends.base import Session
from pipeline.errors import JobError, StageError
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob
from pipeline.llm.generate import GenerationError, OnnxDecoder, TorchDecoder
from pipeline.llm.signature import DecoderSignature
from pipeline.parity.generation import GenerationParity
from pipeline.parity.generation_run import GenerationCandidate, cut_prompts, run_generation_parity, token_rows
from pipeline.records import ModelRecord, StageName


def chain_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM as the exported graph runs it: flat inputs (the signature's, its caches
    included) and flat outputs (logits, then the present caches)."""
    from pipeline.llm.export import DecoderWithCache

    return DecoderWithCache(model, DecoderSignature.from_config(model.config)).eval()


def generation_parity(
    job: ConversionJob,
    model: torch.nn.Module,
    evaluation: FeedSource,
    sessions: Mapping[tuple[str, str], Session],
    precisions: Mapping[str, ModelRecord | None],
) -> GenerationParity:
    """Greedy decoding, logits along PyTorch's path, perplexity and decode speed of every
    (target, model) session against PyTorch, on prompts and rows of the evaluation data.

    Args:
        job: The job (its generation policy).
        model: The PyTorch causal LM.
        evaluation: The evaluation data (rows of ``input_ids``; padding is dropped).
        sessions: Open sessions by (target, model file).
        precisions: Each model file's record (its precision names the candidate).

    Raises:
        StageError: A model's outputs do not fit the decoder signature, or decoding failed.
        JobError: The evaluation data has no row long enough for a prompt.
    """
    signature = DecoderSignature.from_config(model.config)
    policy = job.parity.generation
    rows = token_rows(batch.feeds for batch in evaluation)
    prompts = cut_prompts(rows, policy)
    candidates = [
        GenerationCandidate(target, path, _precision(precisions.get(path)), OnnxDecoder(session, signature))
        for (target, path), session in sessions.items()
    ]
    if not prompts:
        raise JobError(
            job.origin, "evaluation", "generation parity needs rows of input_ids; the evaluation data has none"
        )
    try:
        return run_generation_parity(TorchDecoder(model), candidates, prompts, rows, policy)
    except GenerationError as e:  # the models are onnxforge's own export of the job's decoder
        raise StageError(StageName.VALIDATE, job.name, f"generation parity: {e}") from e


def _precision(record: ModelRecord | None) -> str:
    """``fp32`` for float models; a weight-only model's bits (``int4``) or ``int8``."""
    if record is None or record.precision in (None, "fp32", "distill", "prune"):
        return "fp32"
    bits = getattr(record, "weight_bits", None)
    return f"int{bits}" if bits else str(record.precision)
