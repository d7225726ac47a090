"""Perplexity, a unigram baseline and greedy decoding for the tinylm sample, in PyTorch.

``train.py`` prints these figures, the README quotes them and the sample's test checks them; the
pipeline's generation parity measures the same quantities on ONNX models.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

#: Tokens per perplexity window (the model's context: ``max_position_embeddings``).
PERPLEXITY_WINDOW: int = 256


@torch.no_grad()
def perplexity(model: nn.Module, ids: np.ndarray, window: int = PERPLEXITY_WINDOW, batch_size: int = 8) -> float:
    """Perplexity of a token stream, in non-overlapping windows.

    Each window is scored on its own (no context carried over), so the first token of each
    window is not predicted; the stream's tail shorter than two tokens is dropped.

    Args:
        model: A causal LM taking ``input_ids`` and returning ``.logits`` [batch, sequence, vocab].
        ids: Token ids, int64, shape ``[tokens]``.
        window: Tokens per window.
        batch_size: Windows per forward pass.

    Returns:
        ``exp`` of the mean negative log-likelihood of every predicted token.
    """
    windows = [ids[start : start + window] for start in range(0, len(ids), window)]
    windows = [chunk for chunk in windows if len(chunk) >= 2]
    total_nll = 0.0
    predicted = 0
    for start in range(0, len(windows), batch_size):
        for chunk in _same_length_groups(windows[start : start + batch_size]):
            batch = torch.from_numpy(np.stack(chunk))
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            flat_logits = logits.reshape(-1, logits.shape[-1])
            total_nll += float(nn.functional.cross_entropy(flat_logits, targets.reshape(-1), reduction="sum"))
            predicted += int(targets.numel())
    return math.exp(total_nll / predicted)


def _same_length_groups(chunks: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Split windows into groups of one length (only the stream's last window is shorter)."""
    groups: dict[int, list[np.ndarray]] = {}
    for chunk in chunks:
        groups.setdefault(len(chunk), []).append(chunk)
    return list(groups.values())


def unigram_perplexity(ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity of the best unigram model of a token stream: its own token frequencies.

    No unigram model does better on this text, so it is the strictest unigram baseline.

    Args:
        ids: Token ids, int64, shape ``[tokens]``.
        vocab_size: The vocabulary size.

    Returns:
        ``exp`` of the stream's unigram entropy (in nats).
    """
    counts = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    probabilities = counts[counts > 0] / counts.sum()
    return math.exp(float(-(probabilities * np.log(probabilities)).sum()))


@torch.no_grad()
def greedy_continuation(model: nn.Module, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Greedy decoding with the model's KV cache: the prompt in one step, then one token a step.

    Args:
        model: A ``transformers`` causal LM.
        prompt: Token ids, int64, shape ``[prompt_tokens]``.
        new_tokens: How many tokens to generate (end-of-text does not stop it).

    Returns:
        The generated ids, int64, shape ``[new_tokens]``.
    """
    input_ids = torch.from_numpy(np.asarray(prompt, dtype=np.int64)).unsqueeze(0)
    cache = None
    generated: list[int] = []
    for _ in range(new_tokens):
        # transformers 5.24 names the KV cache ``cache`` (``past_key_values`` is deprecated).
        output = model(input_ids=input_ids, cache=cache, use_cache=True)
        cache = output.cache
        next_id = int(output.logits[0, -1].argmax())
        generated.append(next_id)
        input_ids = torch.tensor([[next_id]], dtype=torch.int64)
    return np.array(generated, dtype=np.int64)
