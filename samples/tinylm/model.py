"""tinylm: a 2 M-parameter Llama decoder trained here on the Python standard library's source.

The architecture is ``transformers``' Llama (RMSNorm, rotary positions, SwiGLU, grouped-query
attention with 4 query heads sharing 2 key / value heads); :func:`tiny_llama_config` defines it.
``train.py`` trains it and writes ``weights/model.safetensors`` and ``weights/config.json``;
:func:`load_pretrained` rebuilds the model from those two files, offline.

Attention is ``"eager"`` (:data:`ATTN_IMPLEMENTATION`): see the README for the export check.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file

from .tokenizer import VOCAB_SIZE

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

#: The committed weights and config.
WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
WEIGHTS_PATH: Path = WEIGHTS_DIR / "model.safetensors"
CONFIG_PATH: Path = WEIGHTS_DIR / "config.json"

#: Context length: positions the model is trained and evaluated at.
MAX_POSITIONS: int = 256

#: Explicit MatMul + Softmax attention. torch 2.13's dynamo exporter exports both "eager" and
#: "sdpa" for this model, KV cache included, and both match PyTorch in ONNX Runtime; eager keeps
#: the graph plain (no SDPA decomposition), as the MiniLM sample does.
ATTN_IMPLEMENTATION: str = "eager"

#: The id of ``<|endoftext|>``: beginning, end and padding token alike.
END_OF_TEXT_ID: int = 0


def tiny_llama_config() -> LlamaConfig:
    """The sample's architecture as a ``transformers.LlamaConfig``.

    Width 128 and intermediate 512 keep every MatMul's inner dimension a multiple of 128, the
    largest usual block size of weight-only quantization. Embeddings are not tied: the LM head is
    a MatMul with its own weight, so quantizing the head and quantizing the embedding table are
    independent options, as in Llama 2 / 3 8B (the cost is 0.5 M more parameters).

    Returns:
        The config (use_cache on; :func:`build_model` sets the attention).
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=END_OF_TEXT_ID,
        eos_token_id=END_OF_TEXT_ID,
        pad_token_id=END_OF_TEXT_ID,
        use_cache=True,
    )


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` for ``config`` (float32, CPU).

    Args:
        config: A ``transformers.LlamaConfig``.

    Returns:
        The model with ``transformers``' initialisation (seed torch first for a fixed one).
    """
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def load_pretrained() -> LlamaForCausalLM:
    """Load the trained tinylm from ``weights/``, offline, in eval mode.

    Returns:
        A ``transformers.LlamaForCausalLM`` on CPU, float32, eval mode, ``use_cache`` on, eager
        attention.
    """
    from transformers import LlamaConfig

    config = LlamaConfig.from_json_file(str(CONFIG_PATH))
    config.use_cache = True
    model = build_model(config)
    model.load_state_dict(load_file(str(WEIGHTS_PATH)), strict=True)
    model.eval()
    return model
