"""The tinylm sample's tokenizer: a byte-level BPE trained on the training files.

The committed ``tokenizer.json`` beside this file is what every other module loads; ``train.py``
rebuilds it with :func:`train_tokenizer` (the ``tokenizers`` BPE trainer, deterministic for the
same text) before training the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .corpus import END_OF_TEXT, read_text

#: The committed tokenizer.
TOKENIZER_PATH: Path = Path(__file__).resolve().parent / "tokenizer.json"

#: Vocabulary size, the end-of-text token and the 256 byte tokens included.
VOCAB_SIZE: int = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on ``texts``.

    Args:
        texts: The training text, one string per file.
        vocab_size: The vocabulary size to learn.

    Returns:
        The trained tokenizer; id 0 is :data:`~samples.tinylm.corpus.END_OF_TEXT`.
    """
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: source files start at column 0, and a prompt is a plain slice of tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer() -> Tokenizer:
    """Load the committed tokenizer.

    Returns:
        The tokenizer from ``tokenizer.json``.
    """
    return Tokenizer.from_file(str(TOKENIZER_PATH))


def end_of_text_id(tokenizer: Tokenizer) -> int:
    """Return the id of the end-of-text token.

    Args:
        tokenizer: A tokenizer made by :func:`train_tokenizer`.

    Returns:
        The id (0 for this sample's tokenizer).

    Raises:
        ValueError: The tokenizer has no such token.
    """
    token_id = tokenizer.token_to_id(END_OF_TEXT)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT!r} token")
    return int(token_id)


def encode_files(tokenizer: Tokenizer, paths: Sequence[Path]) -> np.ndarray:
    """Tokenise files into one stream, each file followed by the end-of-text token.

    Args:
        tokenizer: The tokenizer.
        paths: Source files, in order.

    Returns:
        Token ids, int64, shape ``[tokens]``.
    """
    separator = end_of_text_id(tokenizer)
    encodings = tokenizer.encode_batch([read_text(path) for path in paths])
    pieces = [np.array([*encoding.ids, separator], dtype=np.int64) for encoding in encodings]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
