"""The ONNX signature of an exported decoder with a KV cache, shared by export, quantization and
generation parity (the names Optimum and onnxruntime-genai use).

Inputs: ``input_ids`` and ``attention_mask`` [batch, sequence] and [batch, past_sequence + sequence]
(int64), ``position_ids`` [batch, sequence] (int64) for families that take it, then per layer
``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past_sequence, head_dim]. Outputs:
``logits`` [batch, sequence, vocab], then per layer ``present.{i}.key`` / ``.value``
[batch, kv_heads, past_sequence + sequence, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

CACHE_KINDS = ("key", "value")


@dataclass(frozen=True)
class DecoderSignature:
    """A decoder's cache geometry and the names of its ONNX inputs and outputs.

    Attributes:
        layers: Decoder layers (one key and one value cache each).
        kv_heads: Key / value heads (fewer than attention heads with grouped-query attention).
        head_dim: Size of one head.
        vocab: Vocabulary size (the logits' last dimension).
        position_ids: The family takes ``position_ids`` as an input (Llama, Qwen2, GPT-2).
        max_positions: The config's ``max_position_embeddings`` (GPT-2's ``n_positions``), if it has one.
    """

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    position_ids: bool = True
    max_positions: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> DecoderSignature:
        """The signature of a `transformers` causal LM config (Llama, Qwen2, GPT-2 and their kin)."""
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        heads = getattr(config, "num_attention_heads", None) or config.n_head
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return cls(
            layers=int(layers),
            kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            vocab=int(config.vocab_size),
            max_positions=positions if isinstance(positions, int) else None,
        )

    def past_names(self) -> list[str]:
        """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in order."""
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in CACHE_KINDS]

    def present_names(self) -> list[str]:
        """``present.{i}.key``, ``present.{i}.value`` for every layer, in order."""
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in CACHE_KINDS]

    def input_names(self) -> list[str]:
        """Every ONNX input, in order."""
        ids = ["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else [])
        return ids + self.past_names()

    def output_names(self) -> list[str]:
        """Every ONNX output, in order."""
        return ["logits", *self.present_names()]

    def empty_past(self, batch: int, dtype: type[np.floating] = np.float32) -> dict[str, np.ndarray]:
        """Past caches of length 0: the first step (the prompt) of a generation."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=dtype) for name in self.past_names()}

    def step_feeds(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The feeds of one step: `input_ids` [batch, sequence] (the new tokens), `attention_mask`
        [batch, past + sequence] (the whole sequence so far), and the past caches (None: empty).

        Position ids count the attended tokens before each new one (left padding gets position 0).
        """
        batch, sequence = input_ids.shape
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        if self.position_ids:
            positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
            feeds["position_ids"] = positions[:, -sequence:].astype(np.int64)
        feeds.update(past if past is not None else self.empty_past(batch))
        return feeds

    def next_past(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The present caches of a step's outputs, renamed as the next step's past."""
        return {past: outputs[present] for past, present in zip(self.past_names(), self.present_names(), strict=True)}
