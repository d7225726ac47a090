"""The report's Markdown section of generation parity: one row per model and target, where each
diverges from PyTorch, and the policy's checks."""

from __future__ import annotations

from pipeline.parity.generation import PYTORCH, GenerationParity, ModelGeneration
from pipeline.parity.sections import format_value, markdown_table

GENERATION_COLUMNS = [
    "target",
    "model",
    "precision",
    "token agreement",
    "first divergence (min)",
    "diverged",
    "forced top-1",
    "logit cosine (mean/min)",
    "KL (mean/max)",
    "perplexity (vs PyTorch)",
    "decode tok/s",
    "TTFT ms",
    "result",
]


def _row(model: ModelGeneration) -> list[str]:
    agreement = model.agreement
    ppl = "-" if model.perplexity is None else f"{model.perplexity.value:.4g}"
    if model.perplexity_ratio is not None:
        ppl += f" ({model.perplexity_ratio:.4f}x)"
    cells = ["-"] * 5
    if agreement is not None:
        cells = [
            f"{agreement.token_agreement:.1%}",
            "none" if agreement.first_divergence_min is None else str(agreement.first_divergence_min),
            f"{agreement.diverged} of {len(model.prompts)}",
            f"{agreement.forced_agreement:.1%}",
            f"{format_value(agreement.cosine_mean)} / {format_value(agreement.cosine_min)}",
        ]
    kl = "-" if agreement is None else f"{format_value(agreement.kl_mean)} / {format_value(agreement.kl_max)}"
    result = "reference" if model.target == PYTORCH else "measured" if not model.checks else "pass"
    result = "FAIL" if model.failures() else result
    speed = model.speed
    return [
        model.target,
        model.model,
        model.precision,
        *cells,
        kl,
        ppl,
        "-" if speed is None else f"{speed.tokens_per_s:.4g}",
        "-" if speed is None else f"{speed.ttft_ms:.3g}",
        result,
    ]


def render_generation(parity: GenerationParity) -> list[str]:
    """The report's Markdown section: one row per model and target, the divergences, the checks."""
    speed = next((m.speed for m in parity.models if m.speed is not None), None)
    timed = (
        f" Speed at batch 1 on a {speed.prompt_tokens}-token prompt: time to first token (its prefill) and "
        f"{speed.new_tokens} decode steps with the cache (medians of timed runs; informational)."
        if speed is not None
        else ""
    )
    lines = [
        "## Generation parity",
        "",
        f"{parity.prompts} held-out prompts decoded greedily for {parity.new_tokens} new tokens by PyTorch and "
        "each model. Token agreement: the share of new tokens before the first divergence from PyTorch's; "
        "forced top-1, logit cosine and KL (PyTorch || model, nats) are per step on PyTorch's tokens "
        f"(teacher-forced). Perplexity on {parity.heldout_rows} held-out rows ({parity.heldout_tokens:,} "
        f"predicted tokens).{timed}",
        "",
        *markdown_table(GENERATION_COLUMNS, [_row(model) for model in parity.models]),
    ]
    lines += [f"> {note}" for note in parity.notes]
    for model in parity.models:
        diverging = [p for p in model.prompts if p.first_divergence is not None]
        if diverging:
            where = ", ".join(f"prompt {p.prompt} at token {p.first_divergence}" for p in diverging)
            lines += ["", f"{model.label} diverges from PyTorch: {where}."]
    checks = [(model, check) for model in parity.models for check in model.checks]
    if checks:
        rows = [
            [m.target, m.model, c.metric, f"{c.value:.6g}", c.rule, "pass" if c.passed else "FAIL"] for m, c in checks
        ]
        lines += ["", *markdown_table(["target", "model", "metric", "value", "rule", "result"], rows)]
    return lines


def generation_section(parity: GenerationParity | None) -> list[str]:
    """The section preceded by a blank line, for the report's Markdown; empty when not measured."""
    return [] if parity is None else ["", *render_generation(parity)]
