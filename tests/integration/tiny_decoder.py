"""A tiny random-init Llama (grouped-query attention) and token data, as a causal-lm job's factories."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


def build(seeded: bool = True, layers: int = 2) -> LlamaForCausalLM:
    """`layers` layers, hidden 64, 4 heads over 2 key / value heads; seed 0 (`seeded`, else new
    weights on every call); eval mode."""
    if seeded:
        torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config).eval()


def tokens(batches: int = 2, batch: int = 4, sequence: int = 24, seed: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Random token rows, the last row of each batch left-padded by 5."""
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        ids = rng.integers(0, VOCAB, size=(batch, sequence), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[-1, :5] = 0
        yield {"input_ids": ids, "attention_mask": mask}


def evaluation_tokens() -> Iterator[dict[str, np.ndarray]]:
    """Held-out rows: the same shapes as the calibration data, another seed."""
    yield from tokens(seed=2)
