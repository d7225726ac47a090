"""The executor table, `BatchSettings` as the one home of every batch default, `convert_batch`'s files."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import tomli_w

import pipeline.api as api
from pipeline.batch.base import (
    BatchOverrides,
    BatchResult,
    BatchSettings,
    IsolatingExecutor,
    JobOutcome,
    JobStatus,
    OutcomeCallback,
)
from pipeline.batch.local import LocalExecutor
from pipeline.batch.manifest import BatchManifest, load_manifest
from pipeline.batch.registry import EXECUTORS, make_executor
from pipeline.errors import BackendError, ExitCode, JobError
from pipeline.job import ConversionJob
from pipeline.runner import ProgressCallback


class RecordingExecutor:
    """An `Executor` that runs nothing: each job gets its scripted status (default passed)."""

    def __init__(self, statuses: dict[str, JobStatus] | None = None) -> None:
        self.statuses = statuses or {}

    def run(
        self,
        jobs: list[ConversionJob],
        on_event: ProgressCallback | None = None,
        on_outcome: OutcomeCallback | None = None,
    ) -> list[JobOutcome]:
        outcomes = [
            JobOutcome(
                job=job.name,
                status=self.statuses.get(job.name, "passed"),
                seconds=0.5,
                output_dir=str(job.output_dir),
                verdicts={"export@cpu": "pass"},
            )
            for job in jobs
        ]
        for outcome in outcomes:
            if on_outcome is not None:
                on_outcome(outcome)
        return outcomes


def test_an_unknown_executor_is_a_backend_error_naming_the_known_ones() -> None:
    with pytest.raises(BackendError, match="unknown executor; available: local, ray") as caught:
        make_executor(BatchSettings(executor="dask"))
    assert caught.value.backend == "dask"
    assert caught.value.hint == "use --executor local or --executor ray"


def test_every_executor_in_the_table_is_an_isolating_executor() -> None:
    for name, target in EXECUTORS.items():
        module_name, _, class_name = target.partition(":")
        assert issubclass(getattr(importlib.import_module(module_name), class_name), IsolatingExecutor), name


def test_make_executor_builds_the_named_executor_with_the_settings() -> None:
    settings = BatchSettings(workers=3, timeout_s=5.0)
    executor = make_executor(settings)
    assert isinstance(executor, LocalExecutor)
    assert executor.settings is settings


def test_convert_many_takes_its_defaults_from_batch_settings(
    monkeypatch: pytest.MonkeyPatch, make_job: Callable[[str], ConversionJob]
) -> None:
    seen: list[BatchSettings] = []

    def recording_make_executor(settings: BatchSettings) -> RecordingExecutor:
        seen.append(settings)
        return RecordingExecutor()

    monkeypatch.setattr(api, "make_executor", recording_make_executor)
    job = make_job("a")
    assert [outcome.status for outcome in api.convert_many([job])] == ["passed"]
    api.convert_many([job], workers=3, resume=True, timeout_s=60)
    api.convert_many([job], executor="ray", ray_address="auto")
    assert seen == [
        BatchSettings(),
        BatchSettings(workers=3, resume=True, timeout_s=60.0),
        BatchSettings(executor="ray", ray_address="auto"),
    ]


def test_executors_default_to_batch_settings() -> None:
    assert LocalExecutor().settings == BatchSettings()
    assert LocalExecutor(workers=2, threads=1).settings.threads_per_job() == 1
    assert LocalExecutor(workers=10**6).settings.threads_per_job() == 1  # never below one thread


def test_a_bad_override_is_a_job_error_naming_the_setting(make_job: Callable[[str], ConversionJob]) -> None:
    with pytest.raises(JobError, match=r"batch\.workers") as caught:
        api.convert_many([make_job("a")], workers=0)
    assert caught.value.exit_code == ExitCode.BAD_INPUT


def test_overrides_are_batch_settings_fields() -> None:
    assert set(get_type_hints(BatchOverrides)) <= set(BatchSettings.model_fields)


def test_a_manifest_without_a_batch_table_has_the_default_settings(tmp_path: Path, digits_job: dict[str, Any]) -> None:
    path = tmp_path / "batch.toml"
    path.write_text(tomli_w.dumps({"defaults": digits_job, "jobs": [{"name": "a", "output_dir": "out/a"}]}))
    loaded = load_manifest(path)
    assert loaded.settings == BatchSettings(summary_dir=tmp_path / "batch-summary")
    assert [job.name for job in loaded.jobs] == ["a"]
    assert loaded.source == path


def test_convert_batch_returns_the_outcomes_and_writes_the_three_summary_files(
    tmp_path: Path, make_job: Callable[[str], ConversionJob]
) -> None:
    manifest = BatchManifest(jobs=[make_job("a"), make_job("b")], settings=BatchSettings(summary_dir=tmp_path / "s"))
    reported: list[JobOutcome] = []
    executor = RecordingExecutor({"b": "parity_failed"})
    result = api.convert_batch(manifest, executor=executor, on_outcome=reported.append)
    assert result.summary_path == tmp_path / "s" / "summary.json"
    assert sorted(path.name for path in (tmp_path / "s").iterdir()) == ["junit.xml", "summary.json", "summary.md"]
    assert json.loads(result.summary_path.read_text())["counts"] == {"parity_failed": 1, "passed": 1}
    assert [outcome.job for outcome in result.outcomes] == ["a", "b"]
    assert reported == result.outcomes
    assert result.exit_code == ExitCode.PARITY_FAILED


def test_convert_batch_summary_dir_replaces_the_manifests(
    tmp_path: Path, make_job: Callable[[str], ConversionJob], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = api.convert_batch(BatchManifest(jobs=[make_job("a")]), executor=RecordingExecutor(), summary_dir="here")
    assert result.summary_path == (tmp_path / "here" / "summary.json").resolve()


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        (["passed", "passed"], ExitCode.OK),
        (["passed", "parity_failed"], ExitCode.PARITY_FAILED),
        (["parity_failed", "timeout"], ExitCode.INTERNAL_ERROR),
        (["crashed"], ExitCode.INTERNAL_ERROR),
        (["failed", "passed"], ExitCode.INTERNAL_ERROR),
    ],
)
def test_batch_result_exit_code(statuses: list[JobStatus], code: ExitCode) -> None:
    outcomes = [
        JobOutcome(job=str(index), status=status, seconds=0.0, output_dir="out")
        for index, status in enumerate(statuses)
    ]
    assert BatchResult(outcomes=outcomes, summary_path=Path("summary.json")).exit_code == code
