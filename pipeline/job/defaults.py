"""Defaults that other parts of the code repeat (the CLI, `onnxforge parity`): defined here once."""

from __future__ import annotations

from typing import Final

# Element-wise gate of float stages: |candidate - reference| <= atol + rtol * |reference|.
DEFAULT_RTOL: Final = 1e-3
DEFAULT_ATOL: Final = 1e-4
# Task-level gate (int8, and comparisons given by hand): mean cosine per output.
DEFAULT_MIN_COSINE: Final = 0.99
# Samples per batch when reading an .npz.
DEFAULT_BATCH_SIZE: Final = 32
# Seconds the per-target quantization search may spend per group of targets.
DEFAULT_SEARCH_BUDGET_S: Final = 120.0

# Below this share of a target's work on its accelerator (MACs where the backend counts them, else
# compute nodes), the verdict says so: "pass (all on CPU fallback)".
DEFAULT_MIN_ACCELERATOR_SHARE: Final = 0.5

# The exported graph's opset: 18 for graphs, 23 for a decoder with a KV cache (opset 23's Attention,
# RotaryEmbedding and RMSNormalization hold each layer in a few nodes: `pipeline.llm.export_kernels`).
GRAPH_OPSET: Final = 18
DECODER_OPSET: Final = 23
