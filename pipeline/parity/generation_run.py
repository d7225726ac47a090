"""Running generation parity: PyTorch and every (model, target) decoder on the same held-out prompts
and text, into one `GenerationParity`.

PyTorch runs first and alone (`reference_generation`: its greedy tokens and their logits on every
prompt, its perplexity and speed); each candidate then runs on its own (`candidate_parity`):
greedy on each prompt and once more teacher-forced on PyTorch's tokens, only the figures kept, then
perplexity and speed. So a large model's sessions can be opened one at a time, with PyTorch's
weights released before them.

The data: `token_rows` turns evaluation batches (``input_ids`` with an optional
``attention_mask``, padding left out) into rows of token ids; `cut_prompts` takes the first
`GenerationPolicy.prompts` rows cut to `GenerationPolicy.prompt_tokens` tokens; every row is
held-out text for perplexity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.job.policies import GenerationPolicy
from pipeline.llm.generate import (
    Decoder,
    DecodeSpeed,
    Generation,
    GenerationError,
    decode_speed,
    forced_logits,
    greedy,
    perplexity,
)
from pipeline.parity.generation import (
    PYTORCH,
    GenerationParity,
    ModelGeneration,
    candidate_generation,
    prompt_agreement,
)
from pipeline.timing import DEFAULT_TIMING, TimingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationCandidate:
    """An ONNX model on one target, ready to decode.

    Attributes:
        target: The backend it runs on.
        model: Its file name (for the report).
        precision: ``fp32`` or the quantized model's precision (``int8``, ``int4``).
        decoder: Its decoder (`pipeline.llm.generate.OnnxDecoder` on the target's session).
    """

    target: str
    model: str
    precision: str
    decoder: Decoder


def token_rows(batches: Iterable[Mapping[str, np.ndarray]], key: str = "input_ids") -> list[np.ndarray]:
    """Rows of token ids from evaluation batches: each batch's `key` [batch, sequence], a row's
    padding (``attention_mask`` 0) left out; empty rows are dropped.

    Raises:
        GenerationError: A batch has no `key`, or it is not [batch, sequence].
    """
    rows: list[np.ndarray] = []
    for index, batch in enumerate(batches):
        if key not in batch:
            raise GenerationError(f"evaluation batch {index} has no {key!r} (it has {sorted(batch)})")
        ids = np.asarray(batch[key])
        if ids.ndim != 2:
            raise GenerationError(f"evaluation batch {index}: {key!r} is {ids.shape}, expected [batch, sequence]")
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids))).astype(bool)
        rows += [row[keep].astype(np.int64) for row, keep in zip(ids, mask, strict=True) if keep.any()]
    return rows


def cut_prompts(rows: Sequence[np.ndarray], policy: GenerationPolicy) -> list[np.ndarray]:
    """The held-out prompts: the first `policy.prompts` rows, each cut to `policy.prompt_tokens`."""
    return [np.asarray(row[: policy.prompt_tokens], dtype=np.int64) for row in rows[: policy.prompts]]


@dataclass(frozen=True)
class ReferenceGeneration:
    """PyTorch's side of generation parity, measured once before any candidate runs (so that a
    candidate needs no PyTorch model beside it).

    Attributes:
        prompts: The prompts.
        heldout: The held-out rows perplexity is measured on.
        generations: PyTorch's greedy continuation of each prompt, with each step's logits
            (prompts x new tokens x vocabulary floats in memory).
        model: PyTorch's record (perplexity, speed).
    """

    prompts: Sequence[np.ndarray]
    heldout: Sequence[np.ndarray]
    generations: list[Generation]
    model: ModelGeneration


def _speed(
    decoder: Decoder, prompt: np.ndarray, policy: GenerationPolicy, timing: TimingSettings
) -> DecodeSpeed | None:
    return decode_speed(decoder, prompt, policy.new_tokens, timing) if policy.measure_speed else None


def reference_generation(
    reference: Decoder,
    prompts: Sequence[np.ndarray],
    heldout: Sequence[np.ndarray],
    policy: GenerationPolicy,
    timing: TimingSettings = DEFAULT_TIMING,
) -> ReferenceGeneration:
    """PyTorch's greedy tokens, perplexity and speed on the held-out prompts and text.

    Raises:
        GenerationError: No prompt, or a held-out row is too short.
    """
    if not prompts:
        raise GenerationError("generation parity needs at least one held-out prompt")
    generations = [greedy(reference, prompt, policy.new_tokens) for prompt in prompts]
    model = ModelGeneration(
        target=PYTORCH,
        model=PYTORCH,
        precision=PYTORCH,
        perplexity=perplexity(reference, heldout) if heldout else None,
        speed=_speed(reference, prompts[0], policy, timing),
    )
    return ReferenceGeneration(prompts=prompts, heldout=heldout, generations=generations, model=model)


def candidate_parity(
    reference: ReferenceGeneration,
    candidate: GenerationCandidate,
    policy: GenerationPolicy,
    timing: TimingSettings = DEFAULT_TIMING,
) -> ModelGeneration:
    """One candidate against PyTorch's run: per prompt its greedy tokens and its logits along
    PyTorch's tokens, then its perplexity and speed.

    Raises:
        GenerationError: The decoder's outputs do not fit its signature.
    """
    agreements = []
    for index, (prompt, expected) in enumerate(zip(reference.prompts, reference.generations, strict=True)):
        generated = greedy(candidate.decoder, prompt, policy.new_tokens)
        forced = forced_logits(candidate.decoder, prompt, expected.tokens)
        agreements.append(prompt_agreement(index, expected, generated, forced))
    found = candidate_generation(
        candidate.target,
        candidate.model,
        candidate.precision,
        agreements,
        perplexity(candidate.decoder, reference.heldout) if reference.heldout else None,
        reference.model.perplexity,
        _speed(candidate.decoder, reference.prompts[0], policy, timing),
        policy,
    )
    logger.info("%s", found.summary_line())
    return found


def generation_parity_of(reference: ReferenceGeneration, models: Sequence[ModelGeneration]) -> GenerationParity:
    """The section's record: PyTorch's figures, then each candidate's (`candidate_parity`)."""
    heldout = reference.heldout
    return GenerationParity(
        prompts=len(reference.prompts),
        new_tokens=len(reference.generations[0].tokens),
        heldout_rows=len(heldout),
        heldout_tokens=sum(max(len(row) - 1, 0) for row in heldout),
        models=[reference.model, *models],
        notes=[] if heldout else ["No held-out text: perplexity not measured."],
    )


def run_generation_parity(
    reference: Decoder,
    candidates: Sequence[GenerationCandidate],
    prompts: Sequence[np.ndarray],
    heldout: Sequence[np.ndarray],
    policy: GenerationPolicy,
    timing: TimingSettings = DEFAULT_TIMING,
) -> GenerationParity:
    """Every candidate against the reference (PyTorch) on the held-out prompts and text.

    Args:
        reference: PyTorch's decoder (`pipeline.llm.generate.TorchDecoder`).
        candidates: The ONNX models, one per (model, target).
        prompts: The prompts (`cut_prompts`); `policy.new_tokens` tokens are generated after each.
        heldout: Held-out rows for perplexity (None of them shorter than 2 tokens).
        policy: The generation policy (limits; whether to time).
        timing: How to time decode speed (on the first prompt).

    Raises:
        GenerationError: No prompt, a decoder's outputs do not fit its signature, or a held-out row
            is too short.
    """
    found = reference_generation(reference, prompts, heldout, policy, timing)
    return generation_parity_of(found, [candidate_parity(found, candidate, policy, timing) for candidate in candidates])
