"""What the decoder export swaps in while tracing (pipeline.llm.export_kernels), checked in PyTorch:
the causal + padding mask is transformers' own, an RMS norm is swapped only if it computes
F.rms_norm's output, and the swap is undone after the block (the exported families' parity is in
tests/integration/test_decoder_export.py, slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from pipeline.llm.export_kernels import (
    ATTENTION_NAME,
    UnsupportedAttention,
    _cached_sdpa,
    _causal_padding_mask,
    _computes_rms_norm,
    export_kernels,
)


@pytest.mark.parametrize(("q_length", "kv_length", "q_offset"), [(1, 1, 0), (4, 4, 0), (1, 9, 8), (3, 8, 5)])
def test_the_causal_padding_mask_is_transformers_sdpa_mask(q_length: int, kv_length: int, q_offset: int) -> None:
    padding = torch.ones(3, kv_length, dtype=torch.bool)
    padding[1, : kv_length // 2] = False  # a left-padded row
    padding[2, 0] = False
    expected = sdpa_mask(3, q_length, kv_length, q_offset, 0, attention_mask=padding, allow_is_causal_skip=False)

    ours = _causal_padding_mask(3, q_length, kv_length, q_offset, 0, causal_mask_function, padding)

    assert ours is not None and expected is not None
    assert torch.equal(ours.expand_as(expected), expected)


def test_another_mask_pattern_is_left_to_sdpa_mask() -> None:
    window = sliding_window_causal_mask_function(2)
    expected = sdpa_mask(1, 5, 5, mask_function=window, allow_is_causal_skip=False)

    ours = _causal_padding_mask(1, 5, 5, mask_function=window, allow_is_causal_skip=False)

    assert ours is not None and expected is not None and torch.equal(ours, expected)


def test_only_norms_that_compute_rms_norm_are_swapped() -> None:
    llama = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        llama.weight.uniform_(0.5, 1.5)
    gemma = GemmaRMSNorm(16, eps=1e-6)  # scales by (1 + weight): not F.rms_norm's output

    assert _computes_rms_norm(llama)
    assert not _computes_rms_norm(gemma)


def tiny_llama() -> LlamaForCausalLM:
    """A one-layer Llama in transformers' default attention (SDPA)."""
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config).eval()


def test_the_swap_is_undone_after_the_block() -> None:
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3]])
    own = model.config._attn_implementation

    with export_kernels(model, 23, probe=lambda: model(ids)) as swapped:
        assert model.config._attn_implementation == ATTENTION_NAME
        norms = [m for m in model.modules() if "forward" in vars(m)]

    assert swapped.attention and swapped.norms == len(norms) == 3  # input, post-attention, final
    assert model.config._attn_implementation == own
    assert not [m for m in model.modules() if "forward" in vars(m)]
    with export_kernels(model, 18, probe=lambda: model(ids)) as kept:
        assert model.config._attn_implementation == own
    assert not kept.attention and kept.kept_because.startswith("opset 18")


def test_a_model_that_will_not_take_sdpa_keeps_its_own_attention() -> None:
    """Gemma 2 (soft caps, sliding windows) refuses the SDPA implementation: traced as it is, and said why."""
    config = Gemma2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        attn_logit_softcapping=50.0,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()

    with export_kernels(model, 23, probe=lambda: model(torch.tensor([[1, 2, 3]]))) as swapped:
        assert model.config._attn_implementation == "eager"

    assert not swapped.attention and swapped.kept_because.startswith("SDPA failed on it: Gemma2ForCausalLM")
    assert swapped.norms == 0  # Gemma's norms scale by (1 + weight)


@pytest.mark.parametrize("feature", ["softcap", "s_aux", "position_bias", "sliding_window"])
def test_attention_features_sdpa_does_not_carry_are_refused(feature: str) -> None:
    query, key = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)

    with pytest.raises(UnsupportedAttention, match=feature):
        _cached_sdpa(torch.nn.Identity(), query, key, key, None, **{feature: 1.0})


def test_an_attention_that_fails_on_sdpa_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", broken)
    model.set_attn_implementation("eager")  # the model's own path does not call SDPA
    with export_kernels(model, 23, probe=lambda: model(torch.tensor([[1, 2, 3]]))) as swapped:
        assert model.config._attn_implementation == "eager"

    assert not swapped.attention and swapped.kept_because == "SDPA failed on it: no kernel for this"
