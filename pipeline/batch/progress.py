"""What a batch shows while it runs and after: the rich progress display, a JSON-lines event log, the outcome table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TaskID
from rich.table import Table

from pipeline.batch.base import JobOutcome
from pipeline.runner import StageEvent


class BatchProgress:
    """The batch's rich display: jobs done and failed, and one line per running job with its stage.

    A context manager: the display shows while the batch runs and is gone afterwards.

    Args:
        console: Where the display goes (the CLI's stderr).
        jobs: How many jobs the batch has.
        disable: Show nothing (``--quiet``).
    """

    def __init__(self, console: Console, jobs: int, *, disable: bool = False) -> None:
        self._progress = Progress(console=console, disable=disable, transient=True)
        self._overall = self._progress.add_task("jobs: 0 done, 0 failed", total=jobs)
        self._lines: dict[str, TaskID] = {}
        self._done = self._failed = 0

    def __enter__(self) -> BatchProgress:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._progress.stop()

    def stage(self, event: StageEvent) -> None:
        """A running job reached a stage."""
        line = self._lines.get(event.job)
        if line is None:
            line = self._lines[event.job] = self._progress.add_task("", total=None)
        if event.status == "progress":
            description = f"  {escape(event.job)}: {event.stage} {event.done}/{event.total} {escape(event.detail)}"
            self._progress.update(line, description=description, total=event.total, completed=event.done)
        else:
            description = f"  {escape(event.job)}: {event.stage} {event.status}"
            self._progress.update(line, description=description, total=None, completed=0)

    def done(self, outcome: JobOutcome) -> None:
        """A job finished (whatever its outcome)."""
        if outcome.status == "passed":
            self._done += 1
        else:
            self._failed += 1
        line = self._lines.pop(outcome.job, None)
        if line is not None:
            self._progress.remove_task(line)
        self._progress.update(self._overall, advance=1, description=f"jobs: {self._done} done, {self._failed} failed")


class EventLog:
    """JSON-lines events for CI logs: stage events and job outcomes, each with a timestamp (a no-op without a path)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path

    def stage(self, event: StageEvent) -> None:
        """Append a stage event: job, stage, status."""
        self._write({"job": event.job, "stage": event.stage, "status": event.status})

    def outcome(self, outcome: JobOutcome) -> None:
        """Append a job's outcome: job, outcome (its status), seconds, message."""
        self._write(
            {"job": outcome.job, "outcome": outcome.status, "seconds": outcome.seconds, "message": outcome.message}
        )

    def _write(self, record: dict[str, object]) -> None:
        if self._path is None:
            return
        with self._path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def outcome_table(outcomes: list[JobOutcome]) -> Table:
    """One row per job: status (green when passed), seconds, the message's first line."""
    table = Table(title=f"batch: {len(outcomes)} jobs")
    for column in ("job", "status", "seconds", "message"):
        table.add_column(column, overflow="fold")
    for outcome in outcomes:
        style = "green" if outcome.status == "passed" else "red"
        message = outcome.message.splitlines()[0] if outcome.message else ""
        table.add_row(escape(outcome.job), f"[{style}]{outcome.status}[/]", f"{outcome.seconds:.1f}", escape(message))
    return table
