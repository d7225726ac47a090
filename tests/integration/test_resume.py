"""Resume: after an interruption, a re-run restores unchanged stages and redoes only the rest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.stages.quantize import QuantizeStage


def _counting(events: list[pipeline.StageEvent]) -> Counter[tuple[str, str]]:
    return Counter((event.stage, event.status) for event in events)


@pytest.mark.slow
def test_interrupted_run_resumes_with_byte_identical_artifacts(
    digits_job: dict[str, Any], write_job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_file = write_job(digits_job)
    original_run = QuantizeStage.run

    def interrupted(self: QuantizeStage, ctx: Any) -> Any:
        raise KeyboardInterrupt  # as if the batch were killed during quantization

    monkeypatch.setattr(QuantizeStage, "run", interrupted)
    first: list[pipeline.StageEvent] = []
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(job_file, on_event=first.append, resume=True)
    assert not (tmp_path / "out").exists()  # nothing published, nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(QuantizeStage, "run", original_run)
    second: list[pipeline.StageEvent] = []
    resumed = pipeline.convert(job_file, on_event=second.append, resume=True)
    counts = _counting(second)
    assert counts[("export", "restored")] == 1 and counts[("export", "started")] == 0
    assert counts[("simplify", "restored")] == 1 and counts[("simplify", "started")] == 0
    assert counts[("quantize", "started")] == 1  # the unfinished work, and only it
    assert counts[("validate", "started")] == 1

    # A clean run without the cache produces the very same bytes.
    fresh = pipeline.convert(job_file, output_dir=tmp_path / "fresh")
    for stage in ("export", "simplify", "quantize"):
        assert resumed.artifacts[stage].sha256 == fresh.artifacts[stage].sha256, stage
        assert resumed.path(stage).read_bytes() == fresh.path(stage).read_bytes(), stage

    third: list[pipeline.StageEvent] = []
    pipeline.convert(job_file, on_event=third.append, resume=True)
    assert _counting(third)[("quantize", "restored")] == 1  # a finished run is restored whole


def test_a_changed_setting_reruns_its_stage_and_those_after(digits_job: dict[str, Any], write_job) -> None:
    pipeline.convert(write_job(digits_job), resume=True)
    digits_job["quantize"]["calibration_method"] = "minmax"
    events: list[pipeline.StageEvent] = []
    pipeline.convert(write_job(digits_job), on_event=events.append, resume=True)
    counts = _counting(events)
    assert counts[("export", "restored")] == 1 and counts[("simplify", "restored")] == 1
    assert counts[("quantize", "started")] == 1
