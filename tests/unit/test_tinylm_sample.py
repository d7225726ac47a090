"""The tinylm sample: its committed weights load offline, beat the unigram baseline on held-out text,
decode greedily without degenerating, and its data factories give the pipeline what it expects."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.feeds import FeedSource
from pipeline.imports import resolve_import
from pipeline.job import DataSource, InputSpec

pytest.importorskip("transformers", reason="the samples extra (transformers) is not installed")
pytest.importorskip("tokenizers", reason="the samples extra (tokenizers) is not installed")

# After the skips: these modules import transformers and tokenizers.
from samples.tinylm import data
from samples.tinylm.corpus import CALIBRATION_FILES, EVALUATION_FILES, training_files
from samples.tinylm.metrics import greedy_continuation, perplexity, unigram_perplexity
from samples.tinylm.model import load_pretrained

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "samples" / "tinylm"

#: Held-out tokens scored by the perplexity test (the start of argparse.py).
PERPLEXITY_TOKENS = 8192

#: Perplexity of the committed weights on those tokens: 65.0 (Python 3.11.7's argparse.py); the
#: bound leaves room for another Python's slightly different file.
MAX_HELDOUT_PERPLEXITY = 80.0

INPUTS = [
    InputSpec(name="input_ids", shape=["batch", "sequence"], dtype="int64"),
    InputSpec(name="attention_mask", shape=["batch", "sequence"], dtype="int64"),
]


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs no faster on more, and the machine is shared
    try:
        yield load_pretrained()
    finally:
        torch.set_num_threads(threads)


def test_the_committed_model_is_a_small_grouped_query_llama_in_eval_mode(model: Any) -> None:
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert config.use_cache
    assert model.config._attn_implementation == "eager"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert not config.tie_word_embeddings
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    assert (SAMPLE_DIR / "weights" / "model.safetensors").stat().st_size < 10 * 2**20


def test_heldout_perplexity_is_far_below_the_best_unigram_model(model: Any) -> None:
    ids = data.heldout_text_ids(PERPLEXITY_TOKENS)
    measured = perplexity(model, ids)
    unigram = unigram_perplexity(ids, model.config.vocab_size)
    assert measured < MAX_HELDOUT_PERPLEXITY
    assert measured < 0.5 * unigram, (measured, unigram)


def test_greedy_decoding_is_deterministic_varied_and_matches_decoding_without_the_cache(model: Any) -> None:
    prompt = data.prompts()[3]
    first = greedy_continuation(model, prompt, 16)
    assert np.array_equal(first, greedy_continuation(model, prompt, 16))
    assert len(set(first.tolist())) >= 4, first  # not one token repeated
    # The same tokens when every step re-reads the whole sequence (no KV cache).
    sequence = torch.from_numpy(prompt).unsqueeze(0)
    with torch.no_grad():
        for _ in range(16):
            next_id = model(input_ids=sequence, use_cache=False).logits[0, -1].argmax()
            sequence = torch.cat([sequence, next_id.view(1, 1)], dim=1)
    assert np.array_equal(sequence[0, len(prompt) :].numpy(), first)


def test_held_out_files_are_never_trained_on() -> None:
    trained = {path.name for path in training_files()}
    assert trained.isdisjoint(EVALUATION_FILES)
    assert trained.isdisjoint(CALIBRATION_FILES)
    assert set(EVALUATION_FILES).isdisjoint(CALIBRATION_FILES)
    assert len(trained) > 100


@pytest.mark.parametrize(("factory", "batches"), [("calibration_feeds", 8), ("evaluation_feeds", 4)])
def test_the_data_factories_import_through_the_job_python_path_and_pass_the_feed_checks(
    factory: str, batches: int
) -> None:
    # A job beside the sample says python_path = ["../.."], as the other samples' jobs do.
    python_path = [(SAMPLE_DIR / "../..").resolve()]
    spec = f"samples.tinylm.data:{factory}"
    source = FeedSource(DataSource(factory=spec), INPUTS, origin="t", key=factory, python_path=python_path)
    produced = list(source)
    assert len(produced) == batches
    for batch in produced:
        assert batch.feeds["input_ids"].shape == (8, 128)
        assert batch.feeds["input_ids"].dtype == np.int64
        assert np.all(batch.feeds["attention_mask"] == 1)
    model_factory = resolve_import("samples.tinylm.model:load_pretrained", python_path, origin="t", key="model")
    assert callable(model_factory)


def test_prompts_and_heldout_text_are_held_out_token_arrays() -> None:
    prompts = data.prompts()
    assert len(prompts) == 16
    assert all(prompt.shape == (32,) and prompt.dtype == np.int64 for prompt in prompts)
    assert len({prompt.tobytes() for prompt in prompts}) == 16
    ids = data.heldout_text_ids()
    assert ids.dtype == np.int64 and ids.ndim == 1 and len(ids) > 40_000
    assert int(ids.max()) < 4096
