"""Zoo models built from tiny ``transformers`` configs with random weights (nothing downloaded).

Each builder seeds torch, builds the Hugging Face model from a config (eager attention, so the
exported graph has explicit MatMul / Softmax), wraps it in a module whose ``forward`` takes plain
tensors and returns plain tensors, and returns it in eval mode.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Vocabulary of the tiny text models (token ids are drawn from ``[1, VOCAB)``; 0 is padding).
VOCAB: int = 512

#: Mel bins and frames of the tiny Whisper encoder (frames = 2 * max_source_positions).
WHISPER_MELS: int = 16
WHISPER_FRAMES: int = 64

#: Side of the (upsampled digits) images the ViT takes, and its patch size.
VIT_IMAGE: int = 16
VIT_PATCH: int = 4

ATTN = "eager"


def _eager(config: object) -> object:
    """Sets eager attention on a config (transformers 5 reads ``_attn_implementation``)."""
    config._attn_implementation = ATTN  # type: ignore[attr-defined]
    return config


class VitClassifier(nn.Module):
    """A tiny ViT classifying 1-channel 16x16 images into 10 classes (random weights)."""

    def __init__(self, hidden: int = 64, layers: int = 2) -> None:
        """Builds ``ViTForImageClassification`` from a tiny config.

        Args:
            hidden: Hidden width.
            layers: Encoder layers.
        """
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            image_size=VIT_IMAGE,
            patch_size=VIT_PATCH,
            num_channels=1,
            num_labels=10,
        )
        self.vit = ViTForImageClassification(_eager(config))

    def forward(self, image: Tensor) -> Tensor:
        """Returns logits ``[batch, 10]`` for ``image`` ``[batch, 1, 16, 16]``."""
        return self.vit(pixel_values=image).logits


class Gpt2LM(nn.Module):
    """A tiny GPT-2 language model without a KV cache: token ids to next-token logits."""

    def __init__(self, hidden: int = 64, layers: int = 2) -> None:
        """Builds ``GPT2LMHeadModel`` from a tiny config with ``use_cache=False``.

        Args:
            hidden: Embedding width.
            layers: Transformer blocks.
        """
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=128,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            use_cache=False,
            bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1,
            pad_token_id=0,
        )
        self.gpt2 = GPT2LMHeadModel(_eager(config))

    def forward(self, input_ids: Tensor) -> Tensor:
        """Returns logits ``[batch, sequence, VOCAB]`` for ``input_ids`` ``[batch, sequence]``."""
        return self.gpt2(input_ids=input_ids, use_cache=False).logits


class BertPairClassifier(nn.Module):
    """A tiny BERT sequence-pair classifier: ids, mask and token types to 3 logits."""

    def __init__(self, hidden: int = 64, layers: int = 2) -> None:
        """Builds ``BertForSequenceClassification`` from a tiny config (2 token types).

        Args:
            hidden: Hidden width.
            layers: Encoder layers.
        """
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
            type_vocab_size=2,
            num_labels=3,
        )
        self.bert = BertForSequenceClassification(_eager(config))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        """Returns logits ``[batch, 3]``; all inputs int64 ``[batch, sequence]``."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


class T5Encoder(nn.Module):
    """A tiny T5 encoder: ids and mask to per-token hidden states (relative position bias)."""

    def __init__(self, hidden: int = 64, layers: int = 2) -> None:
        """Builds ``T5EncoderModel`` from a tiny config.

        Args:
            hidden: Model width (``d_model``).
            layers: Encoder layers.
        """
        super().__init__()
        from transformers import T5Config, T5EncoderModel

        config = T5Config(
            vocab_size=VOCAB, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers, num_heads=4
        )
        self.t5 = T5EncoderModel(_eager(config))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Returns hidden states ``[batch, sequence, hidden]``."""
        return self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class WhisperAudioEncoder(nn.Module):
    """A tiny Whisper encoder: log-mel features (conv front end + transformer) to hidden states."""

    def __init__(self, hidden: int = 64, layers: int = 2) -> None:
        """Builds the encoder of ``WhisperModel`` from a tiny config.

        Args:
            hidden: Model width (``d_model``).
            layers: Encoder layers.
        """
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        config = WhisperConfig(
            num_mel_bins=WHISPER_MELS,
            d_model=hidden,
            encoder_layers=layers,
            encoder_attention_heads=4,
            encoder_ffn_dim=2 * hidden,
            decoder_layers=1,
            decoder_attention_heads=4,
            decoder_ffn_dim=2 * hidden,
            max_source_positions=WHISPER_FRAMES // 2,
            vocab_size=VOCAB,
            pad_token_id=0,
            bos_token_id=VOCAB - 1,
            eos_token_id=VOCAB - 1,
            decoder_start_token_id=VOCAB - 1,
        )
        self.encoder = WhisperEncoder(_eager(config))

    def forward(self, input_features: Tensor) -> Tensor:
        """Returns hidden states ``[batch, 32, hidden]`` for features ``[batch, 16, 64]``."""
        return self.encoder(input_features=input_features).last_hidden_state


def _seeded(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    """Builds ``cls()`` under a fixed seed, in eval mode."""
    torch.manual_seed(seed)
    return cls().eval()


def build_vit() -> nn.Module:
    """The tiny ViT classifier, random weights (seed 0)."""
    return _seeded(VitClassifier)


def build_gpt2() -> nn.Module:
    """The tiny GPT-2 LM, random weights (seed 0)."""
    return _seeded(Gpt2LM)


def build_bert_pair() -> nn.Module:
    """The tiny BERT pair classifier with token types, random weights (seed 0)."""
    return _seeded(BertPairClassifier)


def build_t5_encoder() -> nn.Module:
    """The tiny T5 encoder, random weights (seed 0)."""
    return _seeded(T5Encoder)


def build_whisper_encoder() -> nn.Module:
    """The tiny Whisper encoder, random weights (seed 0)."""
    return _seeded(WhisperAudioEncoder)
