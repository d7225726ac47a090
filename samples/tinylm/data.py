"""Calibration and evaluation data for the tinylm sample, all from files it was never trained on.

The text is the Python standard library's own source (:mod:`samples.tinylm.corpus`), tokenised
with the committed ``tokenizer.json``, each file followed by ``<|endoftext|>``. Windows are cut
at evenly spaced offsets of a stream, so every call yields the same arrays.

* :func:`calibration_feeds`: 8 batches ``[8, 128]`` from the calibration files.
* :func:`evaluation_feeds`: 4 batches ``[8, 128]`` from the evaluation files.
* :func:`prompts`: 16 prompts of 32 tokens from the evaluation files.
* :func:`heldout_text_ids`: the evaluation files' whole token stream, for perplexity.

Feed dicts are ``{"input_ids": int64[batch, sequence], "attention_mask": int64[batch, sequence]}``
(the mask all ones: every window is real text, nothing is padded).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from .corpus import CALIBRATION_FILES, EVALUATION_FILES, held_out_files
from .tokenizer import encode_files, load_tokenizer

#: Windows per feed dict.
BATCH_SIZE: int = 8

#: Tokens per window of the calibration and evaluation feeds.
SEQUENCE: int = 128

#: Feed dicts yielded by :func:`calibration_feeds` and :func:`evaluation_feeds`.
CALIBRATION_BATCHES: int = 8
EVALUATION_BATCHES: int = 4

#: Prompts returned by :func:`prompts`, and their length in tokens.
PROMPT_COUNT: int = 16
PROMPT_TOKENS: int = 32

Feed = dict[str, np.ndarray]


@lru_cache(maxsize=2)
def _stream(names: tuple[str, ...]) -> np.ndarray:
    """The token stream of held-out files (read-only; tokenised once per process)."""
    stream = encode_files(load_tokenizer(), held_out_files(names))
    stream.setflags(write=False)
    return stream


def evenly_spaced_windows(stream: np.ndarray, count: int, length: int) -> np.ndarray:
    """Cut ``count`` windows of ``length`` tokens at evenly spaced offsets of ``stream``.

    Args:
        stream: Token ids, int64 ``[tokens]``.
        count: Windows to cut.
        length: Tokens per window.

    Returns:
        int64 ``[count, length]``; window ``i`` starts at ``i * ((tokens - length) // (count - 1))``
        (the first at the stream's start, the last near its end).

    Raises:
        ValueError: The stream is shorter than one window.
    """
    if len(stream) < length:
        raise ValueError(f"a stream of {len(stream)} tokens holds no window of {length}")
    stride = (len(stream) - length) // max(1, count - 1)
    return np.stack([stream[i * stride : i * stride + length] for i in range(count)]).astype(np.int64)


def _feeds(stream: np.ndarray, batches: int) -> Iterator[Feed]:
    """Yield ``batches`` feed dicts of :data:`BATCH_SIZE` windows of :data:`SEQUENCE` tokens."""
    windows = evenly_spaced_windows(stream, batches * BATCH_SIZE, SEQUENCE)
    for start in range(0, len(windows), BATCH_SIZE):
        input_ids = np.ascontiguousarray(windows[start : start + BATCH_SIZE])
        yield {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


def calibration_feeds() -> Iterator[Feed]:
    """Yield the calibration batches, from the calibration files (neither trained on nor evaluated).

    Yields:
        8 feed dicts of shape ``[8, 128]`` (64 windows, 8192 tokens).
    """
    yield from _feeds(_stream(CALIBRATION_FILES), CALIBRATION_BATCHES)


def evaluation_feeds() -> Iterator[Feed]:
    """Yield the evaluation batches, from the evaluation files.

    Yields:
        4 feed dicts of shape ``[8, 128]`` (32 windows, 4096 tokens).
    """
    yield from _feeds(_stream(EVALUATION_FILES), EVALUATION_BATCHES)


def prompt_windows(stream: np.ndarray) -> list[np.ndarray]:
    """The prompts of a token stream: :data:`PROMPT_COUNT` evenly spaced windows of :data:`PROMPT_TOKENS`.

    Args:
        stream: Token ids, int64 ``[tokens]``.

    Returns:
        int64 arrays of shape ``[32]``.
    """
    return list(evenly_spaced_windows(stream, PROMPT_COUNT, PROMPT_TOKENS))


def prompts() -> list[np.ndarray]:
    """Held-out prompts for generation parity (greedy decoding from each).

    Returns:
        16 int64 arrays of shape ``[32]`` (token ids; batch one with ``prompt[None, :]``).
    """
    return prompt_windows(_stream(EVALUATION_FILES))


def heldout_text_ids(max_tokens: int | None = None) -> np.ndarray:
    """The evaluation files' token stream, for perplexity.

    Args:
        max_tokens: Keep only the first this many tokens (None: all of them).

    Returns:
        int64 ``[tokens]`` (56,879 with Python 3.11.7's files); a fresh, writable copy.
    """
    stream = _stream(EVALUATION_FILES)
    return np.array(stream if max_tokens is None else stream[:max_tokens], dtype=np.int64)
