"""Generation parity (`pipeline.llm.generate`, `pipeline.parity.generation*`) on a tiny decoder.

The model: a random-init `transformers` LlamaForCausalLM (2 layers, hidden 64, vocab 256,
grouped-query attention: 4 heads, 2 key / value heads) exported here with a KV cache in the
`DecoderSignature` layout by the TorchScript exporter (about 2 s; the project's dynamo export
takes about 30 s on this machine, too slow for a unit test). Its weights are drawn with a wide
initializer (std 0.1), so a step's top two logits are far apart against float rounding and
PyTorch's and ONNX Runtime's greedy tokens cannot flip on a near tie.

Checked: fp32 ONNX decodes exactly PyTorch's greedy tokens (agreement 1, no divergence, through
an onnxforge backend session and a raw ONNX Runtime session alike) and its perplexity is within
1e-3 of PyTorch's; noise in one weight makes it diverge, and the first divergence is reported;
the policy's checks at and past their limits; the report section in report.md / .html / .json.
Timings are measured but never asserted.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from backends.feeds import SessionInput
from backends.registry import get_backend
from pipeline.job.policies import GenerationPolicy, ParityPolicy
from pipeline.llm.generate import (
    DecodeSpeed,
    GenerationError,
    OnnxDecoder,
    Perplexity,
    TorchDecoder,
    decode_speed,
    forced_logits,
    greedy,
    perplexity,
)
from pipeline.llm.signature import DecoderSignature
from pipeline.parity.generation import (
    AgreementSummary,
    GenerationParity,
    ModelGeneration,
    PromptAgreement,
    candidate_generation,
    generation_checks,
    step_metrics,
)
from pipeline.parity.generation_run import GenerationCandidate, cut_prompts, run_generation_parity, token_rows
from pipeline.parity.html import render_html
from pipeline.parity.report import ParityReport, render_markdown
from pipeline.parity.summary import RunFacts
from pipeline.timing import TimingSettings
from tests.decoder_export import export_with_torchscript

transformers = pytest.importorskip("transformers")

VOCAB = 256
NEW_TOKENS = 12
QUICK = TimingSettings(warmup=1, min_rounds=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, DecoderSignature, Path]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    signature = DecoderSignature.from_config(config)
    path = tmp_path_factory.mktemp("tiny_llama") / "decoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values in the graph
        export_with_torchscript(model, signature, path)
    return model, signature, path


def _ort(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Prompts of 1 to 9 tokens and held-out rows of 40 tokens (random ids: the model is random too)."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, length) for length in (1, 5, 9, 7)]
    heldout = [rng.integers(0, VOCAB, 40) for _ in range(3)]
    return prompts, heldout


def _perturbed(path: Path, out: Path, scale: float = 1.0) -> Path:
    """The model with noise (std `scale` times the weight's) added to its largest MLP weight."""
    model = onnx.load(str(path))
    weights = [w for w in model.graph.initializer if len(w.dims) == 2 and "mlp" in w.name]
    weights = weights or [w for w in model.graph.initializer if len(w.dims) == 2]
    weight = max(weights, key=lambda w: math.prod(w.dims))
    values = numpy_helper.to_array(weight)
    noisy = values + np.random.default_rng(3).normal(0.0, scale * values.std(), values.shape).astype(values.dtype)
    weight.CopyFrom(numpy_helper.from_array(noisy, weight.name))
    onnx.save(model, str(out))
    return out


def test_fp32_onnx_decodes_pytorch_greedy_tokens(tiny: tuple[Any, DecoderSignature, Path], data: Any) -> None:
    model, signature, path = tiny
    prompts, heldout = data
    policy = GenerationPolicy(new_tokens=NEW_TOKENS, measure_speed=False)
    with get_backend("cpu").open(path) as session:  # an onnxforge backend session: run(feeds) -> dict
        candidate = GenerationCandidate("cpu", path.name, "fp32", OnnxDecoder(session, signature))
        parity = run_generation_parity(TorchDecoder(model), [candidate], prompts, heldout, policy)
    reference, fp32 = parity.models
    assert (reference.target, reference.checks, reference.agreement) == ("pytorch", [], None)
    assert fp32.agreement is not None and fp32.agreement.token_agreement == 1.0
    assert fp32.agreement.diverged == 0 and fp32.agreement.first_divergence_min is None
    assert all(p.first_divergence is None and p.agreeing == NEW_TOKENS for p in fp32.prompts)
    assert [p.prompt_tokens for p in fp32.prompts] == [1, 5, 9, 7]  # a 1-token prompt: sequence 1, past 0
    assert fp32.agreement.forced_agreement == 1.0
    assert fp32.agreement.cosine_min > 1 - 1e-6 and fp32.agreement.kl_max < 1e-8
    assert fp32.perplexity is not None and reference.perplexity is not None
    assert fp32.perplexity_ratio is not None and abs(fp32.perplexity_ratio - 1.0) < 1e-3
    assert abs(fp32.perplexity.value - reference.perplexity.value) <= 1e-3 * reference.perplexity.value
    assert fp32.perplexity.tokens == 3 * 39 == parity.heldout_tokens
    assert {c.metric for c in fp32.checks} == {"token_agreement", "perplexity_ratio"} and parity.passed


def test_perturbed_model_diverges_and_reports_where(
    tiny: tuple[Any, DecoderSignature, Path], data: Any, tmp_path: Path
) -> None:
    model, signature, path = tiny
    prompts, heldout = data
    noisy = OnnxDecoder(_ort(_perturbed(path, tmp_path / "noisy.onnx")), signature)
    policy = GenerationPolicy(new_tokens=NEW_TOKENS, min_token_agreement=1.0, max_kl=1e-6, measure_speed=False)
    parity = run_generation_parity(
        TorchDecoder(model), [GenerationCandidate("cpu", "noisy.onnx", "int4", noisy)], prompts, heldout, policy
    )
    result = parity.models[1]
    assert result.agreement is not None and result.agreement.token_agreement < 1.0
    diverged = [p for p in result.prompts if p.first_divergence is not None]
    assert diverged and result.agreement.diverged == len(diverged)
    assert result.agreement.first_divergence_min == min(p.first_divergence for p in diverged)  # type: ignore[type-var]
    for p in diverged:  # the tokens before the divergence agree, the one at it does not
        assert p.agreeing == p.first_divergence and p.agreement < 1.0
    assert result.agreement.kl_mean > 1e-6 and result.agreement.cosine_mean < 1.0
    assert not parity.passed
    assert any("token_agreement" in line and "noisy.onnx on cpu" in line for line in parity.failures())
    assert result.perplexity_ratio is not None and result.perplexity_ratio != 1.0


def test_greedy_and_forced_logits_agree_with_the_cache(tiny: tuple[Any, DecoderSignature, Path]) -> None:
    model, signature, path = tiny
    onnx_decoder, torch_decoder = OnnxDecoder(_ort(path), signature), TorchDecoder(model)
    prompt = np.array([3, 1, 4, 1, 5])
    expected = greedy(torch_decoder, prompt, NEW_TOKENS)
    generated = greedy(onnx_decoder, prompt, NEW_TOKENS)
    assert generated.tokens.tolist() == expected.tokens.tolist()
    assert generated.logits.shape == (NEW_TOKENS, VOCAB)
    np.testing.assert_allclose(generated.logits, expected.logits, atol=1e-4)
    # Teacher-forced without a cache gives the same logits as the cached steps on the same path.
    for decoder in (onnx_decoder, torch_decoder):
        np.testing.assert_allclose(forced_logits(decoder, prompt, expected.tokens), expected.logits, atol=1e-4)
    # Rewinding to the prompt and stepping again repeats the first step.
    onnx_decoder.rewind(len(prompt))
    np.testing.assert_allclose(onnx_decoder.step(int(expected.tokens[0])), expected.logits[1], atol=1e-4)


def test_decode_speed_is_measured(tiny: tuple[Any, DecoderSignature, Path]) -> None:
    model, signature, path = tiny
    for decoder in (OnnxDecoder(_ort(path), signature), TorchDecoder(model)):
        speed = decode_speed(decoder, np.arange(6), 4, QUICK)
        assert (speed.prompt_tokens, speed.new_tokens) == (6, 4)
        assert speed.ttft_ms > 0 and speed.tokens_per_s > 0  # values are noisy: never asserted
        assert math.isclose(speed.tokens_per_s * speed.decode_ms_per_token, 1000.0, rel_tol=1e-3)


def test_decoder_refusals(tiny: tuple[Any, DecoderSignature, Path]) -> None:
    model, signature, path = tiny
    decoder = OnnxDecoder(_ort(path), signature)
    with pytest.raises(GenerationError, match="step before prefill"):
        decoder.step(1)
    with pytest.raises(GenerationError, match="at least one token"):
        decoder.prefill(np.array([], dtype=np.int64))
    with pytest.raises(GenerationError, match="at least 2"):
        perplexity(decoder, [np.array([1])])
    decoder.prefill(np.array([1, 2]))
    with pytest.raises(GenerationError, match="cannot rewind"):
        decoder.rewind(3)
    wrong = OnnxDecoder(_ort(path), DecoderSignature(layers=2, kv_heads=2, head_dim=16, vocab=VOCAB + 1))
    with pytest.raises(GenerationError, match="logits"):
        wrong.prefill(np.array([1, 2]))
    with pytest.raises(GenerationError, match="new_tokens"):
        greedy(TorchDecoder(model), np.array([1]), 0)


class _FakeHalfDecoder:
    """Any object with run(feeds) -> dict serves; this one declares float16 caches and echoes them."""

    def __init__(self, signature: DecoderSignature) -> None:
        self.signature = signature
        self.inputs = [SessionInput(name, np.dtype(np.float16), 4) for name in signature.past_names()]
        self.seen: list[np.dtype] = []

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        past = feeds[self.signature.past_names()[0]]
        self.seen.append(past.dtype)
        batch, sequence = feeds["input_ids"].shape
        grown = np.zeros((batch, 1, past.shape[2] + sequence, 2), dtype=np.float16)
        logits = np.zeros((batch, sequence, self.signature.vocab), dtype=np.float16)
        logits[..., past.shape[2] % self.signature.vocab] = 1.0  # the next token counts the cache
        return {"logits": logits, **{name: grown for name in self.signature.present_names()}}


def test_any_runner_serves_and_its_cache_type_is_kept() -> None:
    signature = DecoderSignature(layers=1, kv_heads=1, head_dim=2, vocab=8)
    runner = _FakeHalfDecoder(signature)
    generation = greedy(OnnxDecoder(runner, signature), np.array([5, 6]), 3)
    assert generation.tokens.tolist() == [0, 2, 3]  # past 0, then 2 and 3 cached tokens
    assert generation.logits.dtype == np.float32 and set(runner.seen) == {np.dtype(np.float16)}


def test_step_metrics() -> None:
    reference = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    cosine, kl = step_metrics(reference, reference.copy())
    np.testing.assert_allclose(cosine, [1.0, 1.0])
    np.testing.assert_allclose(kl, [0.0, 0.0], atol=1e-15)
    cosine, kl = step_metrics(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    assert cosine[0] == 0.0 and math.isclose(kl[0], float((p * np.log(p / p[::-1])).sum()))


def test_token_rows_drop_padding_and_prompts_are_cut() -> None:
    batches = [
        {"input_ids": np.array([[5, 6, 7, 0], [8, 9, 0, 0]]), "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]])},
        {"input_ids": np.array([[1, 2, 3, 4]])},
    ]
    rows = token_rows(batches)
    assert [row.tolist() for row in rows] == [[5, 6, 7], [8, 9], [1, 2, 3, 4]]
    prompts = cut_prompts(rows, GenerationPolicy(prompts=2, prompt_tokens=2))
    assert [p.tolist() for p in prompts] == [[5, 6], [8, 9]]
    with pytest.raises(GenerationError, match="no 'input_ids'"):
        token_rows([{"tokens": np.zeros((1, 2))}])


def _summary(**overrides: Any) -> AgreementSummary:
    values: dict[str, Any] = {
        "token_agreement": 0.9,
        "forced_agreement": 0.95,
        "diverged": 3,
        "first_divergence_min": 4,
        "cosine_mean": 0.99,
        "cosine_min": 0.9,
        "kl_mean": 0.05,
        "kl_max": 0.4,
    }
    values.update(overrides)
    return AgreementSummary(**values)


def test_policy_checks_at_and_past_their_limits() -> None:
    policy = GenerationPolicy(min_forced_agreement=0.95, min_logit_cosine=0.99, max_kl=0.05)
    checks = {c.metric: c for c in generation_checks(_summary(), 1.05, policy)}
    assert set(checks) == {"token_agreement", "forced_agreement", "logit_cosine_mean", "kl_mean", "perplexity_ratio"}
    assert all(c.passed for c in checks.values())  # every limit is inclusive
    assert checks["token_agreement"].rule == "token_agreement >= 0.9"
    assert checks["perplexity_ratio"].rule == "perplexity_ratio <= 1.05"
    past = _summary(token_agreement=0.8999, forced_agreement=0.9499, cosine_mean=0.9899, kl_mean=0.0501)
    failed = {c.metric for c in generation_checks(past, 1.0501, policy) if not c.passed}
    assert failed == set(checks)
    # Defaults: greedy agreement and perplexity only; unset limits add no check; NaN fails.
    defaults = generation_checks(_summary(token_agreement=math.nan), None, GenerationPolicy())
    assert [(c.metric, c.passed) for c in defaults] == [("token_agreement", False)]
    assert ParityPolicy().generation == GenerationPolicy()
    assert ParityPolicy.model_validate({"generation": {"new_tokens": 8}}).generation.new_tokens == 8


def _prompt(index: int, first_divergence: int | None) -> PromptAgreement:
    agreeing = 32 if first_divergence is None else first_divergence
    return PromptAgreement(
        prompt=index,
        prompt_tokens=32,
        new_tokens=32,
        agreeing=agreeing,
        first_divergence=first_divergence,
        forced_agreement=0.97,
        cosine_mean=0.995,
        cosine_min=0.98,
        kl_mean=0.01,
        kl_max=0.2,
    )


def _parity(*first_divergences: int | None) -> GenerationParity:
    speed = DecodeSpeed(prompt_tokens=32, new_tokens=32, ttft_ms=1.5, decode_ms_per_token=2.0, tokens_per_s=500.0)
    reference = Perplexity(value=10.0, nll=math.log(10.0), rows=4, tokens=400)
    model = candidate_generation(
        "cpu",
        "model.int4.onnx",
        "int4",
        [_prompt(index, first) for index, first in enumerate(first_divergences)],
        Perplexity(value=10.2, nll=math.log(10.2), rows=4, tokens=400),
        reference,
        speed,
        GenerationPolicy(),
    )
    pytorch = ModelGeneration(target="pytorch", model="pytorch", precision="pytorch", perplexity=reference, speed=speed)
    prompts = len(first_divergences)
    return GenerationParity(prompts=prompts, new_tokens=32, heldout_rows=4, heldout_tokens=400, models=[pytorch, model])


def test_report_section_renders_and_gates_the_verdict() -> None:
    # Mean agreement (1 + 1 + 1 + 24/32) / 4 = 0.9375, one divergence at token 24.
    passing = ParityReport.build("tinylm", "text", 4, [], [], facts=RunFacts(generation=_parity(None, None, None, 24)))
    assert passing.verdict == "pass"
    markdown = render_markdown(passing)
    assert "## Generation parity" in markdown
    assert "| cpu | model.int4.onnx | int4 | 93.8% | 24 | 1 of 4 | 97.0% | 0.9950 / 0.9800 |" in markdown
    assert "10.2 (1.0200x) | 500 | 1.5 | pass |" in markdown
    assert "model.int4.onnx@cpu diverges from PyTorch: prompt 3 at token 24." in markdown
    assert "token_agreement >= 0.9" in markdown and "perplexity_ratio <= 1.05" in markdown
    assert "Generation parity" in render_html(passing)
    failing = ParityReport.build("tinylm", "text", 4, [], [], facts=RunFacts(generation=_parity(None, 0, 8)))
    assert failing.verdict == "fail"  # (32 + 0 + 8) / 96 = 0.4167
    assert failing.failures == [
        "generation of model.int4.onnx on cpu: token_agreement = 0.416667, policy token_agreement >= 0.9"
    ]
    assert "| FAIL |" in render_markdown(failing)
    assert ParityReport.model_validate_json(failing.model_dump_json()) == failing
    assert "Generation parity" not in render_markdown(ParityReport.build("x", "d", 1, [], []))
    assert failing.generation is not None
    line = failing.generation.models[1].summary_line()
    assert line.startswith("generation model.int4.onnx@cpu: FAIL 41.7% of 32 tokens agree on 3 prompts (2 diverge)")
