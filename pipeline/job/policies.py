"""Parity policies: the pass/fail rule of each precision, per output overrides, and which applies where."""

from __future__ import annotations

import math
from typing import Literal, Self, TypeVar

from pydantic import Field

from pipeline.job.base import Identifier, Section
from pipeline.job.defaults import DEFAULT_ATOL, DEFAULT_MIN_COSINE, DEFAULT_RTOL

# What a link in the chain compares. fp32: export and simplify, element-wise; distilled: the student
# against the teacher; pruned: the pruned model; int8: the quantized model; task: two models compared
# by hand with `onnxforge parity`.
Precision = Literal["fp32", "distilled", "pruned", "int8", "task"]
# A section of a job file's [parity] table (and of each [parity.outputs.<name>] table).
SectionName = Literal["fp32", "distill", "prune", "int8"]
# The job-file section that judges each precision; "task" comparisons take the int8 section's
# rule shape (task-level checks, no element-wise bound).
_SECTION_ORDER: tuple[SectionName, ...] = ("fp32", "distill", "prune", "int8")
POLICY_SECTIONS: dict[Precision, SectionName] = {
    "fp32": "fp32",
    "distilled": "distill",
    "pruned": "prune",
    "int8": "int8",
    "task": "int8",
}


Rule = TypeVar("Rule")


def _section_rule(precision: Precision, rules: tuple[Rule, ...]) -> Rule:
    """The rule of `precision`'s section among the (fp32, distill, prune, int8) rules of a policy table."""
    return rules[_SECTION_ORDER.index(POLICY_SECTIONS[precision])]


class Fp32Policy(Section):
    """Element-wise gate for float stages (export, simplify): ``|c - r| <= atol + rtol * |r|``."""

    atol: float = Field(default=DEFAULT_ATOL, ge=0)
    rtol: float = Field(default=DEFAULT_RTOL, ge=0)


class TaskPolicy(Section):
    """Task-level gate for a model that is not expected to match element-wise; unset checks are
    not applied.

    Attributes:
        min_cosine: Lowest cosine similarity per output (flattened per sample, averaged).
        min_snr_db: Lowest signal-to-noise ratio in dB.
        min_top1_agreement: Lowest share of samples whose argmax matches the reference.
        max_accuracy_drop: Largest top-1 accuracy drop in points vs the model before the stage
            (needs labels).
    """

    min_cosine: float | None = Field(default=DEFAULT_MIN_COSINE, ge=-1, le=1)
    min_snr_db: float | None = None
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(default=None, ge=0)

    def tightened(self, share: float) -> Self:
        """This rule with every limit moved `share` of the way from itself toward perfect: the
        distance to a perfect cosine or agreement, the accuracy drop allowed and the noise power
        allowed (SNR) each shrink by that share."""
        keep = 1.0 - share
        return self.model_copy(
            update={
                "min_cosine": None if self.min_cosine is None else 1.0 - (1.0 - self.min_cosine) * keep,
                "min_snr_db": None if self.min_snr_db is None else self.min_snr_db - 10.0 * math.log10(keep),
                "min_top1_agreement": (
                    None if self.min_top1_agreement is None else 1.0 - (1.0 - self.min_top1_agreement) * keep
                ),
                "max_accuracy_drop": None if self.max_accuracy_drop is None else self.max_accuracy_drop * keep,
            }
        )


class Int8Policy(TaskPolicy):
    """The int8 model's gate (cosine >= 0.99 unless set)."""


class PrunePolicy(TaskPolicy):
    """The pruned model's gate: judged on the task, since pruning changes outputs by design.

    By default a classifier may lose at most 1 point of top-1 accuracy, and every output keeps a
    mean cosine of at least 0.9 to the unpruned model's (embeddings: set a tighter bound).
    """

    min_cosine: float | None = Field(default=0.9, ge=-1, le=1)
    max_accuracy_drop: float | None = Field(default=1.0, ge=0)


class DistillPolicy(TaskPolicy):
    """The distilled student's gate against the teacher (PyTorch both): judged on the task.

    By default a classifier student may lose at most 1 point of top-1 accuracy; its outputs are
    not held to a cosine, since a student's logits need not be the teacher's (set one for
    embedding students).
    """

    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    max_accuracy_drop: float | None = Field(default=1.0, ge=0)


class GenerationPolicy(Section):
    """Generation parity of a causal LM: every ONNX model's greedy decoding and perplexity against
    PyTorch's, on held-out prompts and text (``[parity.generation]``); unset checks are not applied.

    Attributes:
        prompts: Held-out prompts decoded (cut from the evaluation data's first rows).
        prompt_tokens: Tokens of each prompt (the start of an evaluation row).
        new_tokens: Tokens each model generates greedily after each prompt.
        min_token_agreement: Lowest mean share of the new tokens a model generates before its
            first divergence from PyTorch's greedy tokens.
        min_forced_agreement: Lowest mean share of steps on PyTorch's token path (teacher-forced)
            at which the model's most likely token is PyTorch's.
        min_logit_cosine: Lowest mean cosine of a step's logits to PyTorch's, on PyTorch's path.
        max_kl: Largest mean KL divergence KL(PyTorch || model), in nats, of a step's next-token
            distribution, on PyTorch's path.
        max_perplexity_ratio: Largest perplexity on the held-out text relative to PyTorch's.
        measure_speed: Time decode throughput and time to first token at batch 1 on each target.
    """

    prompts: int = Field(default=16, ge=1)
    prompt_tokens: int = Field(default=32, ge=1)
    new_tokens: int = Field(default=32, ge=1)
    min_token_agreement: float | None = Field(default=0.9, ge=0, le=1)
    min_forced_agreement: float | None = Field(default=None, ge=0, le=1)
    min_logit_cosine: float | None = Field(default=None, ge=-1, le=1)
    max_kl: float | None = Field(default=None, ge=0)
    max_perplexity_ratio: float | None = Field(default=1.05, ge=1)
    measure_speed: bool = True


class OutputPolicy(Section):
    """Rules for one output that replace the job-wide ones (unset: the job-wide rule).

    Attributes:
        fp32: Export and simplify.
        distill: The distilled student against the teacher.
        prune: The pruned model.
        int8: The quantized model.
    """

    fp32: Fp32Policy | None = None
    distill: DistillPolicy | None = None
    prune: PrunePolicy | None = None
    int8: Int8Policy | None = None

    def section(self, precision: Precision) -> Fp32Policy | TaskPolicy | None:
        """The rule this output sets for a precision (None: it takes the job-wide rule).

        Args:
            precision: What the link compares.
        """
        rules: tuple[Fp32Policy | TaskPolicy | None, ...] = (self.fp32, self.distill, self.prune, self.int8)
        return _section_rule(precision, rules)


class ParityPolicy(Section):
    """Pass/fail rules per precision, and when to localise the error.

    Attributes:
        fp32: Export and simplify.
        distill: The distilled student against the teacher.
        prune: The pruned model.
        int8: The quantized model.
        outputs: Per-output rules by output name, e.g. ``[parity.outputs.logits.int8]``.
        localize: Compare intermediate tensors to find where the error enters: ``on_failure``
            (for each failed comparison between two ONNX models), ``always``, or ``never``.
        localize_batches: Evaluation batches the localisation runs on.
        generation: Generation parity of a causal LM (greedy tokens, logits, perplexity, speed).
    """

    fp32: Fp32Policy = Field(default_factory=Fp32Policy)
    distill: DistillPolicy = Field(default_factory=DistillPolicy)
    prune: PrunePolicy = Field(default_factory=PrunePolicy)
    int8: Int8Policy = Field(default_factory=Int8Policy)
    outputs: dict[Identifier, OutputPolicy] = Field(default_factory=dict)
    localize: Literal["on_failure", "always", "never"] = "on_failure"
    localize_batches: int = Field(default=1, ge=1)
    generation: GenerationPolicy = Field(default_factory=GenerationPolicy)

    def with_int8_margin(self, share: float) -> ParityPolicy:
        """This policy with the int8 rules (job-wide and per output) tightened by `share`
        (`TaskPolicy.tightened`): what the quantize search aims at on held-out data."""
        outputs = {
            name: override.model_copy(update={"int8": override.int8.tightened(share) if override.int8 else None})
            for name, override in self.outputs.items()
        }
        return self.model_copy(update={"int8": self.int8.tightened(share), "outputs": outputs})

    def section(self, precision: Precision) -> Fp32Policy | TaskPolicy:
        """The job-wide rule of a precision.

        Args:
            precision: What the link compares.
        """
        rules: tuple[Fp32Policy | TaskPolicy, ...] = (self.fp32, self.distill, self.prune, self.int8)
        return _section_rule(precision, rules)

    def for_link(self, precision: Precision, output: str) -> Fp32Policy | TaskPolicy:
        """The rule judging one output on a link of a precision: that output's override of the
        precision's section when it sets one, else the job-wide rule.

        Args:
            precision: What the link compares.
            output: The output's name.
        """
        override = self.outputs.get(output)
        rule = override.section(precision) if override is not None else None
        return rule if rule is not None else self.section(precision)
