"""Publishing survives kills and races: real `onnxforge convert` processes on the digits sample,
killed or paused at each step of the publish, and two runs on one output folder.

After every kill either the old or the new complete output is findable (its manifest is there
and every artifact's sha256 matches), and the next run restores or removes what was left, says
so, and succeeds with nothing hidden left beside the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.artifacts import sha256_file
from pipeline.publish import PAUSE_ENV, PAUSE_FILE_ENV, remove_leftovers
from tests.conftest import DIGITS_DIR, REPO_ROOT, sample_job

# `onnxforge convert` with two test-only interventions, so that the same test runs on any version
# of the runner: argv[1] the output folder; argv[2] "two-step" forces the two-rename publish
# (no atomic exchange); argv[3] "kill" SIGKILLs the process just before the staging folder is
# renamed onto the (missing) output, "pause" stops it just after the output was moved aside until
# argv[4] + ".go" exists; argv[4] the marker file written at that point; the rest: convert's args.
_CONVERT = r"""
import os, signal, sys, time
from pathlib import Path

out, mode, action, marker = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
if mode == "two-step":
    try:
        import pipeline.publish
        pipeline.publish._exchange = lambda first, second: False
    except ImportError:  # a runner without the publish module always renames twice
        pass

def wrap(real):
    def rename(src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        if action == "kill" and dst == out and ".staging-" in src.name and not os.path.lexists(out):
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(src, dst, *args, **kwargs)
        if action == "pause" and src == out:
            marker.write_text(str(os.getpid()))
            while not Path(str(marker) + ".go").exists():
                time.sleep(0.05)
        return result
    return rename

os.rename, os.replace = wrap(os.rename), wrap(os.replace)
from pipeline.cli import main
sys.argv = ["onnxforge", "convert", *sys.argv[5:]]
main()
"""
_WAIT_S = 240.0


@pytest.fixture(scope="module", autouse=True)
def stage_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A stage cache of this module's own (the runs here restore their stages from it; other
    modules must not find the digits stages already cached)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setenv("ONNXFORGE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def old_output(tmp_path_factory: pytest.TempPathFactory, stage_cache: Path) -> Path:
    """One complete digits output (its stages kept in `stage_cache`, so the runs here restore them)."""
    out = tmp_path_factory.mktemp("old") / "out"
    raw = {**sample_job(DIGITS_DIR), "output_dir": str(out)}
    pipeline.convert(pipeline.validate_job(raw, origin="old"), resume=True)
    return out


@pytest.fixture
def job_file(tmp_path: Path, digits_job: dict[str, Any], write_job: Any, old_output: Path) -> Path:
    """The digits job, its output folder tmp_path/out already holding a copy of `old_output`."""
    shutil.copytree(old_output, tmp_path / "out")
    return write_job(digits_job)


def _convert(
    job_file: Path, mode: str = "default", action: str = "none", env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    out = job_file.parent / "out"
    marker = job_file.parent / "marker"
    args = [str(out), mode, action, str(marker), str(job_file), "-o", str(out), "--resume", "-v"]
    return subprocess.Popen(
        [sys.executable, "-c", _CONVERT, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(marker: Path, process: subprocess.Popen[str]) -> int:
    """The pid the process wrote into `marker` once it reached the point; fails if it never does."""
    deadline = time.monotonic() + _WAIT_S
    while not (marker.is_file() and marker.read_text()):
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) without reaching the point:\n{err[-3000:]}")
        assert time.monotonic() < deadline, "the run never reached the point"
        time.sleep(0.05)
    return int(marker.read_text())


def _complete(folder: Path) -> str:
    """The manifest of a complete output folder, after checking every artifact's sha256."""
    manifest = (folder / "manifest.json").read_text()
    for stage in json.loads(manifest)["stages"]:
        artifact = stage["artifact"]
        if artifact is not None:
            assert sha256_file(folder / artifact["path"]) == artifact["sha256"], (folder, artifact["path"])
            for name, digest in artifact["external_data"].items():
                assert sha256_file(folder / name) == digest, (folder, name)
    return manifest


def _findable(out: Path, old_manifest: str) -> str:
    """'old' or 'new': the complete output in `out`, or else the one complete ``.previous-*`` copy."""
    if (out / "manifest.json").is_file():
        return "old" if _complete(out) == old_manifest else "new"
    previous = [p for p in out.parent.glob(f".{out.name}.previous-*") if (p / "manifest.json").is_file()]
    assert len(previous) == 1, f"no complete output findable: {sorted(p.name for p in out.parent.iterdir())}"
    assert _complete(previous[0]) == old_manifest, "a moved-aside output is the old one"
    return "old"


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _rerun_succeeds(job_file: Path) -> str:
    """Run the job again: it exits 0, the output is complete and new, nothing is left beside it."""
    out = job_file.parent / "out"
    old = (out / "manifest.json").read_text() if (out / "manifest.json").is_file() else None
    rerun = _convert(job_file)
    _, err = rerun.communicate(timeout=_WAIT_S)
    assert rerun.returncode == 0, err[-3000:]
    assert _complete(out) != old
    assert _leftovers(out) == [], "leftovers beside the output after the next run"
    return err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["two-step", "default"])
def test_a_kill_between_the_renames_is_restored_by_the_next_run(job_file: Path, mode: str) -> None:
    """Defect 4a: killed after the old output was moved aside, before the new one moved in."""
    out = job_file.parent / "out"
    old_manifest = (out / "manifest.json").read_text()
    killed = _convert(job_file, mode, "kill")
    killed.communicate(timeout=_WAIT_S)
    if mode == "default" and killed.returncode == 0:  # an atomic exchange: there is no "between"
        assert _findable(out, old_manifest) == "new"
    else:
        assert killed.returncode == -signal.SIGKILL
        assert _findable(out, old_manifest) == "old"
    err = _rerun_succeeds(job_file)
    if killed.returncode != 0:
        assert "took over the lock" in err and "restored" in err, err[-3000:]


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_publishes(job_file: Path) -> None:
    """Defect 4b: a second run mid-publish of the first is refused (exit 2, naming it); the first succeeds."""
    out = job_file.parent / "out"
    marker = job_file.parent / "marker"
    first = _convert(job_file, "two-step", "pause")
    try:
        pid = _wait_for(marker, first)
        second = _convert(job_file)
        _, second_err = second.communicate(timeout=_WAIT_S)
    finally:
        Path(f"{marker}.go").touch()
    _, first_err = first.communicate(timeout=_WAIT_S)
    assert second.returncode == 2, second_err[-3000:]
    message = " ".join(second_err.split())
    assert f"another onnxforge run (pid {pid} on host " in message and str(out) in message, message
    assert first.returncode == 0, first_err[-3000:]
    _complete(out)
    assert _leftovers(out) == []


# Where a kill at a named step leaves the complete output: the old one, or already the new one; and
# whether the case is slow-only. tests/unit/test_publish.py kills a real process at every step of
# both modes; here a real conversion is killed at the step each mode's swap turns on.
_STEPS = [
    ("default", "swapped", "new", True),
    ("two-step", "moved-aside", "old", True),
]


@pytest.mark.parametrize(
    ("mode", "step", "expected"),
    [pytest.param(*case[:3], marks=[pytest.mark.slow] if case[3] else []) for case in _STEPS],
)
def test_a_run_killed_at_a_step_leaves_a_complete_output(job_file: Path, mode: str, step: str, expected: str) -> None:
    out = job_file.parent / "out"
    marker = job_file.parent / "marker"
    old_manifest = (out / "manifest.json").read_text()
    run = _convert(job_file, mode, env={PAUSE_ENV: step, PAUSE_FILE_ENV: str(marker)})
    try:
        _wait_for(marker, run)
    finally:
        run.kill()
        run.communicate()
    assert _findable(out, old_manifest) == expected
    if mode == "default":  # the atomic exchange: the output folder itself is never missing
        assert (out / "manifest.json").is_file()
    err = _rerun_succeeds(job_file)
    assert "took over the lock" in err, err[-3000:]


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_without_a_rerun(job_file: Path) -> None:
    """What a batch does after killing a job: the old output is back in place at once."""
    out = job_file.parent / "out"
    old_manifest = (out / "manifest.json").read_text()
    killed = _convert(job_file, "two-step", "kill")
    killed.communicate(timeout=_WAIT_S)
    assert killed.returncode == -signal.SIGKILL
    actions = remove_leftovers(out, "test")
    assert any(action.startswith(f"restored {out}") for action in actions), actions
    assert _complete(out) == old_manifest
    assert _leftovers(out) == []


def test_the_lock_is_released_when_a_parity_gate_fails(tmp_path: Path, digits_job: dict[str, Any]) -> None:
    raw = {**digits_job, "output_dir": str(tmp_path / "out"), "parity": {"int8": {"min_cosine": 1.0}}}
    with pytest.raises(pipeline.ParityError):
        pipeline.convert(pipeline.validate_job(raw, origin="gate"), resume=True)
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a lock or staging folder left behind"
