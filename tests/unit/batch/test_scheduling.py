"""The shared scheduling loop (`run_jobs`), driven by a scripted launcher: no processes, no models."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.batch.base import JobOutcome, WorkerResult, run_jobs
from pipeline.job import ConversionJob
from pipeline.runner import StageEvent
from tests.unit.batch.conftest import FakeLauncher, Script

FAST = 0.001  # seconds between polls


def test_outcomes_come_back_in_job_order_whatever_order_jobs_finish(
    make_job: Callable[[str], ConversionJob],
) -> None:
    jobs = [make_job("slow"), make_job("fast"), make_job("middle")]
    launcher = FakeLauncher({"slow": Script(polls=6), "fast": Script(polls=1), "middle": Script(polls=3)})
    finished: list[str] = []
    outcomes = run_jobs(
        launcher, jobs, workers=3, timeout_s=60, poll_seconds=FAST, on_outcome=lambda o: finished.append(o.job)
    )
    assert [outcome.job for outcome in outcomes] == ["slow", "fast", "middle"]
    assert finished == ["fast", "middle", "slow"]  # on_outcome: once per job, as each finishes
    assert all(outcome.status == "passed" for outcome in outcomes)
    assert outcomes[0].output_dir == str(jobs[0].output_dir)


def test_at_most_workers_jobs_run_at_once(make_job: Callable[[str], ConversionJob]) -> None:
    names = [f"job{index}" for index in range(5)]
    launcher = FakeLauncher({name: Script(polls=2) for name in names})
    outcomes = run_jobs(launcher, [make_job(name) for name in names], workers=2, timeout_s=60, poll_seconds=FAST)
    assert launcher.most_running == 2
    assert [outcome.job for outcome in outcomes] == names
    assert [entry for entry in launcher.log if entry[0] == "start"] == [("start", name) for name in names]


def test_a_job_past_its_timeout_is_killed_and_reported_timeout(make_job: Callable[[str], ConversionJob]) -> None:
    launcher = FakeLauncher({"hangs": Script(polls=None), "quick": Script(polls=1)})
    outcomes = run_jobs(launcher, [make_job("hangs"), make_job("quick")], workers=2, timeout_s=0.05, poll_seconds=FAST)
    hangs, quick = outcomes
    assert (hangs.status, hangs.message) == ("timeout", "killed after 0.05 s")
    assert hangs.seconds >= 0.05
    assert launcher.killed == ["hangs"]
    assert quick.status == "passed"


def test_a_jobs_events_reach_on_event_before_its_outcome(make_job: Callable[[str], ConversionJob]) -> None:
    launcher = FakeLauncher({"a": Script(polls=1), "b": Script(polls=4)})
    seen: list[str] = []

    def on_event(event: StageEvent) -> None:
        seen.append(f"{event.job} {event.status}")

    def on_outcome(outcome: JobOutcome) -> None:
        seen.append(f"{outcome.job} outcome")

    run_jobs(
        launcher,
        [make_job("a"), make_job("b")],
        workers=2,
        timeout_s=60,
        poll_seconds=FAST,
        on_event=on_event,
        on_outcome=on_outcome,
    )
    for job in ("a", "b"):
        assert seen.index(f"{job} started") < seen.index(f"{job} finished") < seen.index(f"{job} outcome"), seen


def test_results_pass_through_and_unfinished_jobs_lose_their_staging_folder(
    make_job: Callable[[str], ConversionJob],
) -> None:
    crashed = WorkerResult(status="crashed", message="the job's process died of SIGSEGV")
    gate = WorkerResult(status="parity_failed", message="gate", verdicts={"quantize@cpu": "FAIL"})
    jobs = [make_job("crashes"), make_job("gate")]
    for job in jobs:
        (job.output_dir.parent / f".{job.output_dir.name}.staging-1").mkdir(parents=True)
    launcher = FakeLauncher({"crashes": Script(result=crashed), "gate": Script(result=gate)})
    outcomes = run_jobs(launcher, jobs, workers=1, timeout_s=60, poll_seconds=FAST)
    assert [(o.status, o.message, o.verdicts) for o in outcomes] == [
        ("crashed", crashed.message, {}),
        ("parity_failed", "gate", {"quantize@cpu": "FAIL"}),
    ]
    leftovers = sorted(path.name for path in jobs[0].output_dir.parent.iterdir())
    assert leftovers == [".gate.staging-1"]  # only the crashed job's staging folder is cleared
