"""The CLI's finish (issue 21): --version, a fast --help, digits enough to judge by, a speed line that
reads as a sentence, the report named last, quiet third-party libraries, missing extras named.

One test converts the digits sample through the CLI (a few seconds), one through the Python API in
a subprocess; the rest are fast.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from pipeline.parity.console import checked_value, milliseconds, speed_line
from pipeline.parity.policy import Check
from pipeline.quantization.performance import PerformanceCheck
from tests.conftest import MINILM_DIR, REPO_ROOT, sample_job
from tests.unit.test_cli import flat, invoke, plain

Raw = dict[str, Any]
WriteJob = Callable[..., Path]
HEAVY = ("torch", "onnxruntime", "onnx", "transformers")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``onnxforge ARGS`` in a fresh interpreter (the console-script entry point, `pipeline.cli:main`)."""
    code = "from pipeline.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


def test_version_prints_the_installed_version() -> None:
    result = run_cli("--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"onnxforge {version('onnxforge')}\n"


def test_help_imports_neither_torch_nor_onnx() -> None:
    code = (
        "import sys\nfrom pipeline.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )

    assert "convert" in result.stdout
    assert result.stderr.strip() == "[]"


@pytest.mark.parametrize(
    ("value", "limit", "shown"),
    [
        (0.99997, 0.99999, "0.999970"),  # 4 digits would print 1.0000, on the wrong side of the limit
        (0.99998999, 0.99999, "0.99998999"),  # 6 digits would print the limit itself
        (0.999951, 0.995, "0.999951"),
        (1.0, 0.99, "1.00000"),
        (39.32141, 20.0, "39.3214"),
        (0.99999, 0.99999, "0.999990"),  # on the limit: passes, and reads as the limit
        (float("inf"), 20.0, "inf"),
    ],
)
def test_a_checked_value_stays_on_its_side_of_the_limit(value: float, limit: float, shown: str) -> None:
    check = Check(metric="cosine_mean", value=value, limit=limit, passed=value >= limit, rule=f">= {limit}")

    assert checked_value(check) == shown


def test_speed_line_is_a_sentence_with_two_decimals_below_10_ms() -> None:
    check = PerformanceCheck(
        target="cpu",
        batch_shape=[64, 1, 8, 8],
        fp32_ms=1.104,
        int8_ms=1.021,
        ratio=1.021 / 1.104,
        faster=True,
        unfused_qdq=0,
        float_compute_nodes=0,
        int8_dot_product=None,
        reasons=[],
    )

    assert speed_line(check) == "int8 is 0.92x the float latency on cpu (1.02 ms vs 1.10 ms, batch 64x1x8x8)"
    slow = check.model_copy(update={"ratio": 1.2, "faster": False, "reasons": ["3 unfused Q/DQ"]})
    assert speed_line(slow).endswith(": not faster (3 unfused Q/DQ)")
    assert [milliseconds(v) for v in (9.994, 12.34, 123.4)] == ["9.99 ms", "12.3 ms", "123 ms"]


def test_convert_prints_checked_digits_and_names_the_report_last(
    digits_job: Raw, write_job: WriteJob, tmp_path: Path
) -> None:
    job_file = write_job(digits_job)

    result = invoke("convert", str(job_file))

    assert result.exit_code == 0, result.output
    out = plain(result.stdout)
    quantize = next(line for line in out.splitlines() if "quantize" in line)
    cosine = quantize.split("│")[5].strip()  # stage, target, output, max abs, cosine mean
    assert len(cosine.replace("0.", "", 1)) >= 6, quantize  # checked (min_cosine): 6 significant digits
    assert "int8 is " in out and "x the float latency on cpu (" in out
    last = f"wrote {tmp_path / 'out'}: report.html (open in a browser), report.md, manifest.json"
    assert flat(out).endswith(flat(last))  # the last line (rich may wrap it)
    # Stage lines only: no third-party warnings, no timestamps.
    assert all(line.strip().split()[1:3] == ["done", "in"] for line in plain(result.stderr).strip().splitlines())


def test_the_python_api_prints_nothing_on_stderr(digits_job: Raw, write_job: WriteJob, tmp_path: Path) -> None:
    job_file = write_job(digits_job)
    code = "import sys, pipeline; pipeline.convert(pipeline.load_job(sys.argv[1]))"

    result = subprocess.run(
        [sys.executable, "-c", code, str(job_file)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "report.html").is_file()
    assert result.stderr == ""


def test_a_missing_samples_extra_is_named_with_its_install_command(
    write_job: WriteJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    job_file = write_job(sample_job(MINILM_DIR))

    result = invoke("convert", str(job_file))

    assert result.exit_code == 2, result.output
    expected = "No module named 'transformers': install the samples extra: pip install -e \".[samples]\""
    assert flat(f"{job_file}: model.factory:") in flat(result.stderr)
    assert flat(expected) in flat(result.stderr)
