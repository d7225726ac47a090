"""Generation parity of a causal LM against PyTorch: the records, the metrics, the policy's checks
and the report's section.

What is compared, per held-out prompt, between PyTorch (the reference) and each ONNX model:

- **Greedy token agreement**: both decode the prompt greedily for N new tokens, each with its own
  cache; the tokens the model generates before its first divergence from PyTorch's, as a share of
  N (`PromptAgreement.agreement`), and where it first diverges. This is what a user sees: the same
  text up to there. After a divergence the two continuations have different contexts, so no
  position after it is compared.
- **Teacher-forced figures**, on PyTorch's token path (the model is fed PyTorch's tokens, so steps
  after a divergence stay comparable): the share of steps whose most likely token is PyTorch's
  (forced agreement), the cosine of each step's logits to PyTorch's, and the KL divergence
  KL(PyTorch || model) of each step's next-token distribution, in nats.
- Per model: perplexity on held-out text (and its ratio to PyTorch's), decode tokens / s and time
  to first token at batch 1 (informational: timings are noisy and never gated).

`GenerationPolicy` (``[parity.generation]``) gates the mean greedy agreement, the mean forced
agreement, the mean logit cosine, the mean KL and the perplexity ratio, where it sets them.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.job.policies import GenerationPolicy
from pipeline.llm.generate import DecodeSpeed, Generation, Perplexity
from pipeline.parity.policy import Check

PYTORCH = "pytorch"


class _Record(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")


class PromptAgreement(_Record):
    """One prompt, one model against PyTorch.

    Attributes:
        prompt: The prompt's index among the held-out prompts.
        prompt_tokens: The prompt's length.
        new_tokens: Tokens generated (N).
        agreeing: New tokens equal to PyTorch's before the first divergence.
        first_divergence: Index (0-based, among the new tokens) of the first token that differs
            from PyTorch's; None when all N agree.
        forced_agreement: Share of the N steps on PyTorch's path whose argmax is PyTorch's token.
        cosine_mean: Mean cosine of a step's logits to PyTorch's, on PyTorch's path.
        cosine_min: The lowest step's.
        kl_mean: Mean KL(PyTorch || model) of a step's next-token distribution (nats).
        kl_max: The highest step's.
    """

    prompt: int
    prompt_tokens: int
    new_tokens: int
    agreeing: int
    first_divergence: int | None
    forced_agreement: float
    cosine_mean: float
    cosine_min: float
    kl_mean: float
    kl_max: float

    @property
    def agreement(self) -> float:
        """Share of the N new tokens generated before the first divergence."""
        return self.agreeing / self.new_tokens


class AgreementSummary(_Record):
    """One model's agreement with PyTorch over every prompt.

    Attributes:
        token_agreement: Mean share of the new tokens before the first divergence.
        forced_agreement: Mean share of steps on PyTorch's path whose argmax is PyTorch's token.
        diverged: Prompts whose greedy tokens diverge from PyTorch's within N.
        first_divergence_min: The earliest first divergence (None: no prompt diverged).
        cosine_mean: Mean logit cosine over every step of every prompt.
        cosine_min: The lowest step's.
        kl_mean: Mean KL(PyTorch || model) over every step of every prompt (nats).
        kl_max: The highest step's.
    """

    token_agreement: float
    forced_agreement: float
    diverged: int
    first_divergence_min: int | None
    cosine_mean: float
    cosine_min: float
    kl_mean: float
    kl_max: float


class ModelGeneration(_Record):
    """One model on one target (PyTorch: target ``pytorch``, the reference).

    Attributes:
        target: The backend the model ran on (``pytorch`` for the reference).
        model: The model file (``pytorch`` for the reference).
        precision: What it is: ``pytorch``, ``fp32``, or the quantized model's precision.
        prompts: Per prompt, its agreement with PyTorch (empty for the reference).
        agreement: Over every prompt (None for the reference).
        perplexity: On the held-out text (None: not measured).
        perplexity_ratio: This model's perplexity over PyTorch's (None for the reference).
        speed: Decode speed at batch 1 (None: not measured).
        checks: The policy's checks (empty for the reference).
    """

    target: str
    model: str
    precision: str
    prompts: list[PromptAgreement] = []
    agreement: AgreementSummary | None = None
    perplexity: Perplexity | None = None
    perplexity_ratio: float | None = None
    speed: DecodeSpeed | None = None
    checks: list[Check] = []

    @property
    def label(self) -> str:
        """``model@target`` (``pytorch`` for the reference)."""
        return PYTORCH if self.target == PYTORCH else f"{self.model}@{self.target}"

    def failures(self) -> list[str]:
        """One line per failed check, naming the model, target and metric."""
        return [
            f"generation of {self.model} on {self.target}: {check.metric} = {check.value:.6g}, policy {check.rule}"
            for check in self.checks
            if not check.passed
        ]

    def summary_line(self) -> str:
        """One line for the terminal, e.g. ``generation model.onnx@cpu: 97.5% of 32 tokens agree ...``."""
        parts = []
        if self.agreement is not None:
            new_tokens = self.prompts[0].new_tokens if self.prompts else 0
            parts.append(
                f"{self.agreement.token_agreement:.1%} of {new_tokens} tokens agree on {len(self.prompts)} prompts"
                f" ({self.agreement.diverged} diverge), logit cosine {self.agreement.cosine_mean:.4g},"
                f" KL {self.agreement.kl_mean:.4g}"
            )
        if self.perplexity is not None:
            ratio = f" ({self.perplexity_ratio:.4f}x PyTorch)" if self.perplexity_ratio is not None else ""
            parts.append(f"perplexity {self.perplexity.value:.4g}{ratio}")
        if self.speed is not None:
            parts.append(f"{self.speed.tokens_per_s:.4g} tokens/s, TTFT {self.speed.ttft_ms:.3g} ms")
        verdict = "" if not self.checks else (" PASS" if not self.failures() else " FAIL")
        return f"generation {self.label}:{verdict} " + "; ".join(parts)


class GenerationParity(_Record):
    """Generation parity of a causal LM: every model against PyTorch.

    Attributes:
        prompts: Held-out prompts decoded.
        new_tokens: Tokens generated per prompt (N).
        heldout_rows: Rows of held-out text scored for perplexity.
        heldout_tokens: Tokens predicted in them.
        models: PyTorch first, then each (model, target).
        notes: Caveats about the measurement.
    """

    prompts: int
    new_tokens: int
    heldout_rows: int
    heldout_tokens: int
    models: list[ModelGeneration]
    notes: list[str] = []

    def failures(self) -> list[str]:
        """Every failed check of every model."""
        return [line for model in self.models for line in model.failures()]

    @property
    def passed(self) -> bool:
        """No check failed."""
        return not self.failures()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    scores = logits.astype(np.float64)
    top = scores.max(axis=-1, keepdims=True)
    return scores - top - np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))


def step_metrics(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the cosine of the candidate's logits to the reference's, and KL(reference ||
    candidate) of their softmax distributions (nats, float64).

    Args:
        reference: Logits [steps, vocab].
        candidate: Logits [steps, vocab], on the same path.
    """
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    dots = (ref * cand).sum(axis=1)
    # Two all-zero rows are the same; one all-zero row is orthogonal to anything.
    both_zero = (norms == 0) & (np.abs(ref).sum(axis=1) == np.abs(cand).sum(axis=1))
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    log_ref, log_cand = _log_softmax(ref), _log_softmax(cand)
    kl = np.maximum((np.exp(log_ref) * (log_ref - log_cand)).sum(axis=1), 0.0)
    return cosine, kl


def prompt_agreement(index: int, reference: Generation, greedy: Generation, forced: np.ndarray) -> PromptAgreement:
    """One prompt's figures: the candidate's greedy tokens against PyTorch's, and its teacher-forced
    logits (on PyTorch's path) against PyTorch's logits.

    Args:
        index: The prompt's index.
        reference: PyTorch's greedy generation.
        greedy: The candidate's greedy generation of the same prompt.
        forced: The candidate's logits on PyTorch's path ([N, vocab], `forced_logits`).
    """
    new_tokens = len(reference.tokens)
    differing = np.flatnonzero(greedy.tokens[:new_tokens] != reference.tokens)
    first = int(differing[0]) if differing.size else None
    cosine, kl = step_metrics(reference.logits, forced)
    return PromptAgreement(
        prompt=index,
        prompt_tokens=len(reference.prompt),
        new_tokens=new_tokens,
        agreeing=new_tokens if first is None else first,
        first_divergence=first,
        forced_agreement=float(np.mean(np.argmax(forced, axis=1) == reference.tokens)),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
    )


def summarise_agreement(prompts: list[PromptAgreement]) -> AgreementSummary:
    """Means over prompts (every prompt has N steps, so a mean of prompt means is a mean of steps)."""
    firsts = [p.first_divergence for p in prompts if p.first_divergence is not None]
    return AgreementSummary(
        token_agreement=float(np.mean([p.agreement for p in prompts])),
        forced_agreement=float(np.mean([p.forced_agreement for p in prompts])),
        diverged=len(firsts),
        first_divergence_min=min(firsts) if firsts else None,
        cosine_mean=float(np.mean([p.cosine_mean for p in prompts])),
        cosine_min=min(p.cosine_min for p in prompts),
        kl_mean=float(np.mean([p.kl_mean for p in prompts])),
        kl_max=max(p.kl_max for p in prompts),
    )


def _check(metric: str, value: float, limit: float, at_least: bool) -> Check:
    passed = value >= limit if at_least else value <= limit
    return Check(
        metric=metric, value=value, limit=limit, passed=passed, rule=f"{metric} {'>=' if at_least else '<='} {limit:g}"
    )


def generation_checks(
    agreement: AgreementSummary | None, perplexity_ratio: float | None, policy: GenerationPolicy
) -> list[Check]:
    """The policy's checks of one model, where the policy sets a limit and the figure was measured
    (a NaN figure fails its check)."""
    limits: list[tuple[str, float | None, float | None, bool]] = [
        ("perplexity_ratio", perplexity_ratio, policy.max_perplexity_ratio, False),
    ]
    if agreement is not None:
        limits = [
            ("token_agreement", agreement.token_agreement, policy.min_token_agreement, True),
            ("forced_agreement", agreement.forced_agreement, policy.min_forced_agreement, True),
            ("logit_cosine_mean", agreement.cosine_mean, policy.min_logit_cosine, True),
            ("kl_mean", agreement.kl_mean, policy.max_kl, False),
            *limits,
        ]
    return [
        _check(metric, value, limit, at_least)
        for metric, value, limit, at_least in limits
        if value is not None and limit is not None
    ]


def candidate_generation(
    target: str,
    model: str,
    precision: str,
    prompts: list[PromptAgreement],
    perplexity: Perplexity | None,
    reference: Perplexity | None,
    speed: DecodeSpeed | None,
    policy: GenerationPolicy,
) -> ModelGeneration:
    """One ONNX model's record: its prompts summarised, its perplexity against PyTorch's, its checks.

    Args:
        target: The backend it ran on.
        model: Its file.
        precision: ``fp32`` or the quantized precision.
        prompts: Per prompt, its agreement with PyTorch (`prompt_agreement`).
        perplexity: Its perplexity on the held-out text (None: not measured).
        reference: PyTorch's perplexity on the same text (None: not measured).
        speed: Its decode speed (None: not measured).
        policy: The generation policy.
    """
    agreement = summarise_agreement(prompts) if prompts else None
    ratio = None
    if perplexity is not None and reference is not None:
        ratio = perplexity.value / reference.value if reference.value > 0 else math.inf
    return ModelGeneration(
        target=target,
        model=model,
        precision=precision,
        prompts=prompts,
        agreement=agreement,
        perplexity=perplexity,
        perplexity_ratio=ratio,
        speed=speed,
        checks=generation_checks(agreement, ratio, policy),
    )
