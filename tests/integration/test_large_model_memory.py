"""Large models through the chain without holding every copy at once: the PyTorch model released
after export and built again for validation, validation holding one model at a time, and the
stages' peak memory in the manifest. The limits are lowered so that the tiny decoder takes the
large-model paths; the figures must be the ones the all-in-memory paths give."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.runner import preflight
from pipeline.stages import source_weights, validate
from pipeline.stages.base import StageContext
from tests.integration.test_causal_lm_job import decoder_job

INT4 = {"weight_only": {"bits": 4, "block_size": 32}, "mixed_precision": False}


def _as_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model counts as large: released after export, validated one at a time."""
    monkeypatch.setattr(source_weights, "RELEASE_ABOVE_BYTES", 0)
    monkeypatch.setattr(validate, "HOLD_ONE_ABOVE_BYTES", 0)


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """What parity measured: every comparison's metrics and the generation figures (no timings)."""
    comparisons = [
        (c["reference"], c["candidate"], c["target"], json.dumps(c["outputs"], sort_keys=True))
        for c in report["comparisons"]
    ]
    generation = [
        (m["model"], m["target"], m["perplexity"], json.dumps(m["agreement"], sort_keys=True))
        for m in report["generation"]["models"]
    ]
    return {"comparisons": comparisons, "generation": generation}


@pytest.mark.slow
def test_a_large_model_is_validated_one_model_at_a_time_with_the_same_figures(
    write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    generation = {**decoder_job()["parity"]["generation"], "min_token_agreement": 0.0}
    raw = decoder_job(quantize=INT4, parity={"generation": generation, "int8": {"min_cosine": 0.9}})
    in_memory = pipeline.convert(pipeline.load_job(write_job({**raw, "output_dir": "small"}, "small.toml")))
    built: list[bool] = []
    load_model, record = source_weights.load_model, validate.record_one_at_a_time
    monkeypatch.setattr(source_weights, "load_model", lambda *a, **k: built.append(True) or load_model(*a, **k))
    monkeypatch.setattr(validate, "record_one_at_a_time", lambda *a: built.append(False) or record(*a))
    _as_large(monkeypatch)

    large = pipeline.convert(pipeline.load_job(write_job({**raw, "output_dir": "large"}, "large.toml")))

    assert built == [False, True]  # one model at a time; released after export, built again once
    small_report = json.loads((in_memory.output_dir / "report.json").read_text())
    large_report = json.loads((large.output_dir / "report.json").read_text())
    assert _figures(large_report) == _figures(small_report)
    assert large_report["input_hashes"] == small_report["input_hashes"]
    assert not list(large.output_dir.glob(".validate-runs-*"))  # the scratch outputs are gone
    if sys.platform.startswith("linux"):  # peak memory is read from /proc
        stages = json.loads(large.manifest_path.read_text())["stages"]
        assert all(stage["peak_rss_bytes"] > 2**20 for stage in stages if stage["artifact"] is not None)
        assert "peak memory (GiB)" in (large.output_dir / "report.md").read_text()


def test_a_released_model_whose_factory_gives_other_weights_is_refused(
    write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Validation builds a released model again; new weights would make its proof about another
    model, so the job stops (bad input: exit 2) and names the factory."""
    model = {"factory": "tests.integration.tiny_decoder:build", "task": "causal-lm", "kwargs": {"seeded": False}}
    job, inputs = preflight(pipeline.load_job(write_job(decoder_job(model=model))))
    ctx = StageContext.prepared(job, tmp_path, inputs)
    monkeypatch.setattr(source_weights, "RELEASE_ABOVE_BYTES", 0)

    assert source_weights.release_source_module(ctx) and ctx.source.module is None
    with pytest.raises(pipeline.JobError, match="model.factory.*different weights") as refused:
        source_weights.source_module(ctx)
    assert refused.value.exit_code == 2


def test_a_released_model_comes_back_with_the_same_weights(
    write_job: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Built again from the job as preflight completed it: with 4 layers its inputs (the caches
    included) outnumber the forward's arguments, which the rebuild must not check again."""
    model = {"factory": "tests.integration.tiny_decoder:build", "task": "causal-lm", "kwargs": {"layers": 4}}
    job, inputs = preflight(pipeline.load_job(write_job(decoder_job(model=model))))
    ctx = StageContext.prepared(job, tmp_path, inputs)
    del inputs
    before = source_weights.job_input_hashes(ctx)
    monkeypatch.setattr(source_weights, "RELEASE_ABOVE_BYTES", 0)

    assert source_weights.release_source_module(ctx)
    module = source_weights.source_module(ctx)

    assert module is not None and ctx.source.module is module and not ctx.source_released
    assert source_weights.state_dict_sha256(module) == before["model_state_dict"]


def test_a_small_model_is_kept(write_job: Callable[..., Path], tmp_path: Path) -> None:
    job, inputs = preflight(pipeline.load_job(write_job(decoder_job())))
    ctx = StageContext.prepared(job, tmp_path, inputs)

    assert not source_weights.release_source_module(ctx)
    assert ctx.source.module is not None
