"""A causal-lm job end to end: the decoder exported with its KV cache (parity at several sizes in the
export record), the chain on first-step feeds, generation parity against PyTorch in the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.records import ExportRecord

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
    generation = result.report.generation
    assert generation is not None and generation.prompts == 4
    onnx_models = [m for m in generation.models if m.model != "pytorch"]
    assert onnx_models and all(m.agreement is not None and m.agreement.token_agreement == 1.0 for m in onnx_models)
    assert "generation" in (result.output_dir / "report.md").read_text().lower()


def test_a_causal_lm_job_needs_the_datas_two_inputs(write_job: Callable[[dict[str, Any]], Path]) -> None:
    job = decoder_job(inputs=[{"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"}])

    with pytest.raises(pipeline.JobError, match="input_ids and attention_mask"):
        pipeline.convert(pipeline.load_job(write_job(job)))
