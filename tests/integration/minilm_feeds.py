"""The MiniLM sample's calibration data with each batch padded only to its own longest sentence.

The sample pads calibration to a fixed 128 tokens (the length its memory figures are quoted at);
the 160 sentences are 22 to 50 tokens long, so a stage that leaves padding out (structured pruning
reads only the tokens the attention mask marks) sees the same tokens here for about a third of the
compute. A job names it as ``factory = "tests.integration.minilm_feeds:calibration_feeds"``.
"""

from __future__ import annotations

from collections.abc import Iterator

from samples.minilm.data import CALIBRATION_SIZE, Feed, _feeds, load_sentences


def calibration_feeds() -> Iterator[Feed]:
    """The sample's 10 calibration batches of 16 sentences, each padded to its longest sentence."""
    yield from _feeds(load_sentences()[:CALIBRATION_SIZE], pad_to=None)
