"""Fixtures for the batch layer's unit tests: jobs that are never run, and a scripted launcher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.batch.base import WorkerResult
from pipeline.job import ConversionJob
from pipeline.runner import StageEvent


@pytest.fixture
def make_job(tmp_path: Path, digits_job: dict[str, Any]) -> Callable[[str], ConversionJob]:
    """A validated digits job named `name`, writing under tmp_path/out/<name> (the fakes never run it)."""

    def make(name: str) -> ConversionJob:
        raw = {**digits_job, "name": name, "output_dir": str(tmp_path / "out" / name)}
        return pipeline.validate_job(raw, origin=f"test job {name}")

    return make


@dataclass
class Script:
    """How a fake job behaves: polls before it finishes (None: never), and what it reports."""

    polls: int | None = 1
    result: WorkerResult = field(default_factory=lambda: WorkerResult(status="passed"))


class FakeLauncher:
    """A `JobLauncher` without processes: each job finishes after its scripted number of polls,
    sending a "finished" event just before (as a real job's last event arrives with its end)."""

    def __init__(self, scripts: dict[str, Script]) -> None:
        self.scripts = scripts
        self.polls: dict[str, int] = {}
        self.running: set[str] = set()
        self.most_running = 0
        self.killed: list[str] = []
        self.log: list[tuple[str, str]] = []  # ("start" | "event" | "kill", job), in order
        self._events: list[StageEvent] = []

    def start(self, job: ConversionJob) -> str:
        self.running.add(job.name)
        self.most_running = max(self.most_running, len(self.running))
        self.polls[job.name] = 0
        self.log.append(("start", job.name))
        self._events.append(StageEvent(job=job.name, stage="export", status="started"))
        return job.name

    def poll(self, handle: str) -> WorkerResult | None:
        self.polls[handle] += 1
        script = self.scripts[handle]
        if script.polls is None or self.polls[handle] < script.polls:
            return None
        self.running.discard(handle)
        self._events.append(StageEvent(job=handle, stage="export", status="finished"))
        return script.result

    def kill(self, handle: str) -> None:
        self.running.discard(handle)
        self.killed.append(handle)
        self.log.append(("kill", handle))

    def drain(self) -> Iterator[StageEvent]:
        events, self._events = self._events, []
        yield from events
