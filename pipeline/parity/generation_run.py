"""Running generation parity: PyTorch and every (model, target) decoder on the same held-out prompts
and text, into one `GenerationParity`.

Per prompt, PyTorch decodes first; each candidate then decodes greedily and once more
teacher-forced on PyTorch's tokens, and only that prompt's figures are kept (memory stays one
prompt's logits per model, whatever the vocabulary). Perplexity and speed follow per model.

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
    PromptAgreement,
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


def _agreements(
    reference: Decoder, candidates: Sequence[GenerationCandidate], prompts: Sequence[np.ndarray], new_tokens: int
) -> list[list[PromptAgreement]]:
    """Per candidate, each prompt's agreement with the reference."""
    found: list[list[PromptAgreement]] = [[] for _ in candidates]
    for index, prompt in enumerate(prompts):
        expected = greedy(reference, prompt, new_tokens)
        for candidate, kept in zip(candidates, found, strict=True):
            generated = greedy(candidate.decoder, prompt, new_tokens)
            forced = forced_logits(candidate.decoder, prompt, expected.tokens)
            kept.append(prompt_agreement(index, expected, generated, forced))
    return found


def _speed(
    decoder: Decoder, prompt: np.ndarray, policy: GenerationPolicy, timing: TimingSettings
) -> DecodeSpeed | None:
    return decode_speed(decoder, prompt, policy.new_tokens, timing) if policy.measure_speed else None


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
    if not prompts:
        raise GenerationError("generation parity needs at least one held-out prompt")
    agreements = _agreements(reference, candidates, prompts, policy.new_tokens)
    reference_ppl = perplexity(reference, heldout) if heldout else None
    models = [
        ModelGeneration(
            target=PYTORCH,
            model=PYTORCH,
            precision=PYTORCH,
            perplexity=reference_ppl,
            speed=_speed(reference, prompts[0], policy, timing),
        )
    ]
    for candidate, prompt_figures in zip(candidates, agreements, strict=True):
        models.append(
            candidate_generation(
                candidate.target,
                candidate.model,
                candidate.precision,
                prompt_figures,
                perplexity(candidate.decoder, heldout) if heldout else None,
                reference_ppl,
                _speed(candidate.decoder, prompts[0], policy, timing),
                policy,
            )
        )
        logger.info("%s", models[-1].summary_line())
    notes = [] if heldout else ["No held-out text: perplexity not measured."]
    return GenerationParity(
        prompts=len(prompts),
        new_tokens=policy.new_tokens,
        heldout_rows=len(heldout),
        heldout_tokens=sum(max(len(row) - 1, 0) for row in heldout),
        models=models,
        notes=notes,
    )
