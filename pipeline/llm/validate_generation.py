"""The validate stage's part for a causal LM: PyTorch as the chain's reference through the same flat
signature as the ONNX graph, and generation parity of every model on every target."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from backends.base import Session
from pipeline.errors import JobError, StageError
from pipeline.feeds import FeedSource
from pipeline.job import ConversionJob
from pipeline.llm.generate import GenerationError, OnnxDecoder, TorchDecoder
from pipeline.llm.signature import DecoderSignature
from pipeline.parity.generation import GenerationParity, ModelGeneration
from pipeline.parity.generation_run import (
    GenerationCandidate,
    ReferenceGeneration,
    candidate_parity,
    cut_prompts,
    generation_parity_of,
    reference_generation,
    token_rows,
)
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
    reference = pytorch_generation(job, model, evaluation)
    found = [candidate_generation_of(job, reference, key, session, precisions) for key, session in sessions.items()]
    return generation_parity_of(reference.generation, found)


@dataclass(frozen=True)
class DecoderReference:
    """PyTorch's generation figures, and the decoder signature the ONNX models are driven by."""

    generation: ReferenceGeneration
    signature: DecoderSignature


def pytorch_generation(job: ConversionJob, model: torch.nn.Module, evaluation: FeedSource) -> DecoderReference:
    """PyTorch's part of generation parity (run it before any ONNX model, alone if need be).

    Raises:
        JobError: The evaluation data has no row long enough for a prompt.
        StageError: Decoding failed.
    """
    policy = job.parity.generation
    rows = token_rows(batch.feeds for batch in evaluation)
    prompts = cut_prompts(rows, policy)
    if not prompts:
        raise JobError(
            job.origin, "evaluation", "generation parity needs rows of input_ids; the evaluation data has none"
        )
    try:
        generation = reference_generation(TorchDecoder(model), prompts, rows, policy)
    except GenerationError as e:
        raise StageError(StageName.VALIDATE, job.name, f"generation parity (PyTorch): {e}") from e
    return DecoderReference(generation, DecoderSignature.from_config(model.config))


def candidate_generation_of(
    job: ConversionJob,
    reference: DecoderReference,
    key: tuple[str, str],
    session: Session,
    precisions: Mapping[str, ModelRecord | None],
) -> ModelGeneration:
    """One (target, model file) session against PyTorch's run.

    Raises:
        StageError: The model's outputs do not fit the decoder signature, or decoding failed.
    """
    target, path = key
    signature = reference.signature
    candidate = GenerationCandidate(target, path, _precision(precisions.get(path)), OnnxDecoder(session, signature))
    try:
        return candidate_parity(reference.generation, candidate, job.parity.generation)
    except GenerationError as e:  # the models are onnxforge's own export of the job's decoder
        raise StageError(StageName.VALIDATE, job.name, f"generation parity of {path} on {target}: {e}") from e


def _precision(record: ModelRecord | None) -> str:
    """``fp32`` for float models; a weight-only model's bits (``int4``) or ``int8``."""
    if record is None or record.precision in (None, "fp32", "distill", "prune"):
        return "fp32"
    bits = getattr(record, "weight_bits", None)
    return f"int{bits}" if bits else str(record.precision)
