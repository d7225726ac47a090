"""Decoder export with a KV cache (issue 20): tiny random-init Llama (grouped-query attention),
GPT-2 and Qwen2 models exported with `pipeline.llm.export`, then ONNX Runtime against PyTorch at
(batch, sequence, past) sizes including the first step and single-token steps, a greedy generation
loop against `generate`, and the graph's names and dynamic dims."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import pytest
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.errors import JobError
from pipeline.job.defaults import DECODER_OPSET
from pipeline.llm.decoder_fusions import fuse_decoder
from pipeline.llm.export import ExportResult, export_decoder, input_shapes
from pipeline.llm.export_parity import check_decoder_parity, decoder_references
from pipeline.llm.export_records import SizeParity
from pipeline.llm.signature import DecoderSignature
from pipeline.onnx_io import save_model

SIZES = [(1, 1, 0), (2, 7, 0), (1, 1, 9), (3, 4, 5), (2, 1, 6)]
ATOL = 1e-4
JOB = "decoder-test"
# Larger than transformers' 0.02, so logits spread and greedy choices are not near ties.
INIT = 0.1


def llama() -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=INIT,
    )
    return LlamaForCausalLM(config)


def gpt2() -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=INIT,
    )
    return GPT2LMHeadModel(config)


def qwen2() -> PreTrainedModel:
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=INIT,
    )
    return Qwen2ForCausalLM(config)


FAMILIES: dict[str, Callable[[], PreTrainedModel]] = {"llama": llama, "gpt2": gpt2, "qwen2": qwen2}
EXPECTED_GEOMETRY = {"llama": (2, 2, 16), "gpt2": (2, 4, 16), "qwen2": (2, 2, 16)}


@dataclass
class Exported:
    model: PreTrainedModel
    signature: DecoderSignature
    result: ExportResult


def build(family: str) -> PreTrainedModel:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    model.generation_config.eos_token_id = None  # greedy runs the full length, as the ONNX loop does
    return model


@pytest.fixture(
    scope="module",
    # Each export traces for 15-35 s: the default run keeps the refusals, --run-slow the exports.
    params=[pytest.param(family, marks=pytest.mark.slow) for family in ("llama", "gpt2", "qwen2")],
)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    family = request.param
    model = build(family)
    signature = DecoderSignature.from_config(model.config)
    # GPT-2 also writes its weights as external data (threshold 0), as a big model's would be.
    threshold = 0 if family == "gpt2" else 2**30
    path = tmp_path_factory.mktemp(family) / "model.fp32.onnx"
    result = export_decoder(model, signature, 2, 3, path, threshold, job=JOB)
    return Exported(model=model, signature=signature, result=result)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_signature_from_config(family: str) -> None:
    signature = DecoderSignature.from_config(build(family).config)
    assert (signature.layers, signature.kv_heads, signature.head_dim) == EXPECTED_GEOMETRY[family]
    assert signature.vocab == 256 and signature.position_ids


def test_graph_names_and_dynamic_dims(exported: Exported) -> None:
    signature, result = exported.signature, exported.result
    proto = onnx.load(str(result.path), load_external_data=False)
    dims = {
        value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in [*proto.graph.input, *proto.graph.output]
    }
    assert [value.name for value in proto.graph.input] == signature.input_names() == result.inputs
    assert [value.name for value in proto.graph.output] == signature.output_names() == result.outputs
    for name, shape in input_shapes(signature).items():
        assert dims[name] == shape
    assert dims["logits"] == ["batch", "sequence", 256]
    for name in signature.present_names():
        assert dims[name] == ["batch", signature.kv_heads, "total_sequence", signature.head_dim]
    onnx.checker.check_model(str(result.path), full_check=True)
    assert result.opset == DECODER_OPSET
    assert result.external_data == (result.path.parent / f"{result.path.name}.data").exists()


def test_parity_at_sizes(exported: Exported) -> None:
    references = decoder_references(exported.model, exported.signature, SIZES)
    parity = check_decoder_parity(references, exported.result.path, exported.signature, job=JOB)
    assert [(p.batch, p.sequence, p.past) for p in parity] == SIZES
    for entry in parity:
        assert entry.passed(atol=ATOL), entry
        assert entry.logits.elements > 0 and len(entry.presents) == 2 * exported.signature.layers
        assert SizeParity.model_validate_json(entry.model_dump_json()) == entry  # the stage records them
    # The last row of a batch is left-padded; the padding must have been honoured, not just survived.
    assert any(entry.left_padding > 0 for entry in parity)


def test_parity_sees_a_different_model(exported: Exported) -> None:
    other = copy.deepcopy(exported.model)
    with torch.no_grad():
        layer = other.get_output_embeddings()
        layer.weight.add_(1e-2 * torch.randn_like(layer.weight))
    references = decoder_references(other, exported.signature, [(2, 3, 4)])
    parity = check_decoder_parity(references, exported.result.path, exported.signature, job=JOB)
    assert not parity[0].passed(atol=ATOL)
    assert parity[0].logits.max_abs_error > ATOL


def test_greedy_generation_matches_pytorch(exported: Exported) -> None:
    model, signature = exported.model, exported.signature
    rng = np.random.default_rng(1)
    prompt = rng.integers(1, 256, (2, 5))
    mask = np.ones_like(prompt)
    mask[1, :2] = 0  # the second prompt is 3 tokens, left-padded
    with torch.inference_mode():
        expected = model.generate(
            input_ids=torch.from_numpy(prompt),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )[:, prompt.shape[1] :].numpy()
    session = ort.InferenceSession(str(exported.result.path), providers=["CPUExecutionProvider"])
    tokens = greedy(session, signature, prompt, mask, 8)
    assert np.array_equal(tokens, expected)
    # The padded prompt decodes as it does alone: the mask, not the padding, decides.
    alone = greedy(session, signature, prompt[1:, 2:], np.ones((1, 3), dtype=np.int64), 8)
    assert np.array_equal(alone, tokens[1:])


def greedy(
    session: ort.InferenceSession, signature: DecoderSignature, prompt: np.ndarray, mask: np.ndarray, steps: int
) -> np.ndarray:
    """Greedy decoding with the exported graph: the prompt first (no past), then one token a step."""
    feeds = signature.step_feeds(prompt, mask)
    tokens = []
    for _ in range(steps):
        outputs = dict(zip(signature.output_names(), session.run(None, feeds), strict=True))
        chosen = outputs["logits"][:, -1].argmax(axis=-1)
        tokens.append(chosen)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        feeds = signature.step_feeds(chosen[:, None], mask, signature.next_past(outputs))
    return np.stack(tokens, axis=1)


def test_refuses_sliding_window_layers(tmp_path: Path) -> None:
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    with pytest.raises(JobError, match="sliding-window"):
        export_decoder(model, DecoderSignature.from_config(config), 2, 3, tmp_path / "m.onnx", 2**30, job=JOB)
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_a_signature_that_does_not_fit(tmp_path: Path) -> None:
    model = build("llama")
    wrong = DecoderSignature(layers=2, kv_heads=4, head_dim=16, vocab=256)
    with pytest.raises(JobError, match="from_config"):
        export_decoder(model, wrong, 2, 3, tmp_path / "m.onnx", 2**30, job=JOB)


def test_refuses_half_precision(tmp_path: Path) -> None:
    model = build("gpt2").to(torch.bfloat16)
    with pytest.raises(JobError, match="float32"):
        export_decoder(model, DecoderSignature.from_config(model.config), 2, 3, tmp_path / "m.onnx", 2**30, job=JOB)


def test_fused_layers_match_pytorch(exported: Exported, tmp_path: Path) -> None:
    """The simplify stage's decoder fusions: each layer's attention (and, with rotary positions, its
    RotaryEmbedding pair) in a few ops, residual + RMS norm as one, and the same outputs as PyTorch."""
    signature, layers = exported.signature, exported.signature.layers
    assert exported.result.opset == DECODER_OPSET
    assert exported.result.kernels.attention, exported.result.kernels
    model = ir.load(exported.result.path)
    onnxscript.optimizer.optimize(model)
    counts = fuse_decoder(model, signature.max_positions)
    RemoveUnusedNodesPass()(model)
    path = tmp_path / "model.fused.onnx"
    save_model(model, path, 0)
    ops = Counter(node.op_type for node in model.graph)
    rotary = exported.model.config.model_type != "gpt2"
    assert counts.attention == layers and ops["Attention"] == layers
    assert ops["RotaryEmbedding"] == (2 * layers if rotary else 0)
    assert ops["Cos"] == ops["Sin"] == 0  # constant tables of max_position_embeddings rows, by position_ids
    heads_first = [
        n for n in model.graph if n.op_type == "Transpose" and tuple(n.attributes.get_ints("perm")) == (0, 2, 1, 3)
    ]
    assert ops["Softmax"] == 0 and not heads_first, ops
    # Llama and Qwen2: every norm after the embedding's follows a residual Add; GPT-2's are LayerNorms.
    assert counts.skip_norm == (2 * layers if rotary else 0)
    references = decoder_references(exported.model, signature, SIZES)
    for entry in check_decoder_parity(references, path, signature, job=JOB):
        assert entry.passed(atol=ATOL), entry
