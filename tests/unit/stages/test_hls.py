"""Unit tests of `HlsStage`'s switch and preconditions (the export itself: tests/backends/test_fpga_hls.py,
the digits CNN end to end: tests/integration/test_fpga_hls.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pipeline
from backends.fpga.hls import toolchain
from backends.fpga.profile import PROFILES
from pipeline.errors import BackendError, JobError
from pipeline.job import ConversionJob
from pipeline.stages import STAGES
from pipeline.stages.hls import HlsStage
from tests.conftest import DIGITS_DIR

STAGE = HlsStage()


def job(*targets: dict[str, Any], **overrides: Any) -> ConversionJob:
    return pipeline.load_job(DIGITS_DIR / "job.toml", targets=list(targets), **overrides)


def test_runs_after_quantize_only_for_an_fpga_target_that_asks() -> None:
    names = [stage.name for stage in STAGES]

    assert names.index("hls") == names.index("quantize") + 1 and names[-1] == "validate"
    assert not STAGE.enabled(job({"backend": "fpga"}))
    assert not STAGE.enabled(job({"backend": "cpu"}, {"backend": "fpga", "options": {"hls": False}}))
    assert STAGE.enabled(job({"backend": "cpu"}, {"backend": "fpga", "options": {"hls": True}}))


def test_a_job_without_quantize_is_refused_at_the_option() -> None:
    without = job({"backend": "cpu"}, {"backend": "fpga", "options": {"hls": True}}, quantize={"enabled": False})

    with pytest.raises(JobError, match="targets\\[1\\].options.hls: the hls4ml export takes the fpga target's int8"):
        STAGE.check(without, None)  # type: ignore[arg-type]  # the check reads the job only


def test_a_missing_compiler_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toolchain, "COMPILER", "g++-not-here")

    with pytest.raises(BackendError, match="needs g\\+\\+-not-here") as error:
        STAGE.check(job({"backend": "fpga", "options": {"hls": True}}), None)  # type: ignore[arg-type]
    assert error.value.exit_code == 2


@pytest.mark.skipif(bool(toolchain.missing_tools()), reason="the rounding is checked after the toolchain")
def test_a_profile_rounding_hls4ml_cannot_express_is_refused(tmp_path: Path) -> None:
    text = (PROFILES / "dpu-int8.toml").read_text()
    profile = tmp_path / "up.toml"
    profile.write_text(text.replace('rounding = "half_even"', 'rounding = "half_up"'))

    with pytest.raises(BackendError, match="rounds requantization half_up"):
        STAGE.check(job({"backend": "fpga", "options": {"hls": True, "profile": str(profile)}}), None)  # type: ignore[arg-type]
