"""A causal-lm job end to end: the decoder exported with its KV cache (parity at several sizes in the
export record), the chain on first-step feeds, generation parity against PyTorch in the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest

import pipeline
from pipeline.artifacts import Manifest
from pipeline.records import ExportRecord, SimplifyRecord, WeightOnlyRecord

REPO = Path(__file__).resolve().parents[2]


def decoder_job(**sections: Any) -> dict[str, Any]:
    """The tiny decoder's job (cpu target), `sections` replacing its tables."""
    job: dict[str, Any] = {
        "name": "tiny_decoder",
        "python_path": [str(REPO)],
        "model": {"factory": "tests.integration.tiny_decoder:build", "task": "causal-lm"},
        "inputs": [
            {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"},
            {"name": "attention_mask", "shape": ["batch", "sequence"], "dtype": "int64"},
        ],
        "calibration": {"factory": "tests.integration.tiny_decoder:tokens"},
        "evaluation": {"factory": "tests.integration.tiny_decoder:evaluation_tokens"},
        "quantize": {"enabled": False},
        "parity": {"generation": {"prompts": 4, "prompt_tokens": 8, "new_tokens": 8, "measure_speed": False}},
        "targets": [{"backend": "cpu"}],
    }
    job.update(sections)
    return job


@pytest.mark.slow
def test_a_decoder_converts_with_its_cache_and_generation_parity(
    write_job: Callable[[dict[str, Any]], Path],
) -> None:
    result = pipeline.convert(pipeline.load_job(write_job(decoder_job())))

    export = result.artifact("export").record_as(ExportRecord)
    assert export.inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert export.outputs[:2] == ["logits", "present.0.key"]
    sizes = {(p.batch, p.sequence, p.past) for p in export.decoder_parity}
    assert {(1, 1, 0), (1, 1, 9)} <= sizes and all(p.passed() for p in export.decoder_parity)
    assert export.opset == 23 and export.decoder_kernels.startswith("attention as one Attention op")
    # simplify folds each layer's rotary, cache Concat and attention into RotaryEmbedding x 2 + Attention
    simplify = result.artifact("simplify").record_as(SimplifyRecord)
    graph = onnx.load(result.output_dir / "model.simplified.onnx", load_external_data=False).graph
    ops = [node.op_type for node in graph.node]
    assert simplify.fusions["rotary_attention"] == ops.count("Attention") >= 2 and "Softmax" not in ops
    assert ops.count("RotaryEmbedding") == 2 * ops.count("Attention")
    # the cos / sin caches: one pair of constant tables by position (max_position_embeddings rows)
    assert simplify.fusions["constant_rotary_tables"] == 1 and "Cos" not in ops
    generation = result.report.generation
    assert generation is not None and generation.prompts == 4
    onnx_models = [m for m in generation.models if m.model != "pytorch"]
    assert onnx_models and all(m.agreement is not None and m.agreement.token_agreement == 1.0 for m in onnx_models)
    assert "generation" in (result.output_dir / "report.md").read_text().lower()


def test_a_causal_lm_job_needs_the_datas_two_inputs(write_job: Callable[[dict[str, Any]], Path]) -> None:
    job = decoder_job(inputs=[{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"}])

    with pytest.raises(pipeline.JobError, match="input_ids and attention_mask"):
        pipeline.convert(pipeline.load_job(write_job(job)))


@pytest.mark.slow
def test_a_decoder_quantized_weight_only_to_int4(write_job: Callable[[dict[str, Any]], Path]) -> None:
    """int4 MatMulNBits (round to nearest, no search): every MatMul but the LM head, read back from
    the manifest as a WeightOnlyRecord, its generation measured against PyTorch."""
    quantize = {"weight_only": {"bits": 4, "block_size": 32}, "mixed_precision": False}
    # A random-init decoder's next-token distributions are nearly flat: greedy agreement means
    # nothing for it (the trained tinylm sample is judged on it); perplexity still must hold.
    generation = {**decoder_job()["parity"]["generation"], "min_token_agreement": 0.0}
    job = decoder_job(quantize=quantize, parity={"generation": generation, "int8": {"min_cosine": 0.9}})

    result = pipeline.convert(pipeline.load_job(write_job(job)))

    artifact = result.artifact("quantize")
    assert artifact.path == "model.int4.onnx"
    record = artifact.record_as(WeightOnlyRecord)
    assert record.format == "MatMulNBits" and set(record.quantized.values()) == {4}
    assert record.lm_head is not None and record.lm_head in record.kept_float
    assert record.bytes_after < record.bytes_before
    graph = onnx.load(str(result.output_dir / "model.int4.onnx"), load_external_data=False).graph
    # one MatMulNBits per activation: q / k / v and gate / up joined, named after their MatMuls
    joined = [node.name.removesuffix("_Q4").split("+") for node in graph.node if node.op_type == "MatMulNBits"]
    assert sorted(name for names in joined for name in names) == sorted(record.quantized)
    assert max(len(names) for names in joined) == 3 and len(joined) < len(record.quantized)
    manifest = Manifest.model_validate_json(result.manifest_path.read_text())
    (stage,) = [run for run in manifest.stages if run.name == "quantize"]
    assert stage.artifact is not None and isinstance(stage.artifact.record, WeightOnlyRecord)
    generation = result.report.generation
    assert generation is not None
    assert [m.precision for m in generation.models if m.model == "model.int4.onnx"] == ["int4"]
    (summary,) = result.report.summary  # the decision table says what ships: int4, not fp32
    assert summary.shipped_model == "model.int4.onnx" and summary.precision == "int4"


@pytest.mark.slow
def test_the_tinylm_sample_meets_its_generation_policy(tmp_path: Path) -> None:
    """The trained sample, as `onnxforge convert samples/tinylm/job.toml` runs it: int4 GPTQ with
    mixed precision on the logits' KL; >= 90% of 32 greedy tokens agree, perplexity within 5%."""
    job = pipeline.load_job(REPO / "samples" / "tinylm" / "job.toml", output_dir=tmp_path / "out")

    result = pipeline.convert(job)

    generation = result.report.generation
    assert generation is not None
    (int4,) = [m for m in generation.models if m.model == "model.int4.onnx"]
    assert int4.agreement is not None and int4.agreement.token_agreement >= 0.9
    assert int4.perplexity_ratio is not None and int4.perplexity_ratio <= 1.05
    record = result.artifact("quantize").record_as(WeightOnlyRecord)
    assert record.method == "gptq" and 4 in record.quantized.values()
