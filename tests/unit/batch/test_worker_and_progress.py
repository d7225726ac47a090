"""The worker's typed result and the batch's JSON-lines event log."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.batch.base import JobOutcome, WorkerResult
from pipeline.batch.progress import EventLog, outcome_table
from pipeline.batch.worker import convert_one
from pipeline.runner import StageEvent


def test_a_job_that_does_not_validate_is_a_failed_result_not_an_exception() -> None:
    events: list[StageEvent] = []
    result = convert_one(json.dumps({"name": "broken"}), None, False, events.append, None)
    assert isinstance(result, WorkerResult)
    assert result.status == "failed" and result.message.startswith("JobError: ")
    assert events == []


def test_a_worker_result_survives_its_json_round_trip() -> None:
    result = WorkerResult(status="parity_failed", message="gate", verdicts={"quantize@cpu": "FAIL"})
    assert WorkerResult.model_validate_json(result.model_dump_json()) == result


def test_the_event_log_appends_stage_events_and_outcomes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.stage(StageEvent(job="a", stage="export", status="started"))
    log.outcome(JobOutcome(job="a", status="passed", seconds=1.5, output_dir="out/a"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
        {"job": "a", "stage": "export", "status": "started"},
        {"job": "a", "outcome": "passed", "seconds": 1.5, "message": ""},
    ]
    assert all(isinstance(line["time"], float) for line in lines)
    EventLog(None).stage(StageEvent(job="a", stage="export", status="started"))  # no path: nothing written


def test_the_outcome_table_has_a_row_per_job() -> None:
    outcomes = [JobOutcome(job="a", status="failed", seconds=2.0, message="JobError: x\nmore", output_dir="out/a")]
    table = outcome_table(outcomes)
    assert table.row_count == 1 and table.title == "batch: 1 jobs"
