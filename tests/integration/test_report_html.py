"""report.html: self-contained, with its plots, and it renders in headless Chromium (when installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import pipeline
from tests.conftest import DIGITS_DIR

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "out"
    job = pipeline.load_job(DIGITS_DIR / "job_pruned.toml", output_dir=str(out), parity={"localize": "always"})
    pipeline.convert(job)
    return out / "report.html"


def test_report_html_is_self_contained_with_plots(report_html: Path) -> None:
    html = report_html.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html and "<link" not in html and "src=" not in html  # nothing fetched
    assert re.findall(r"https?://[^\"]+", html) == ["http://www.w3.org/2000/svg"] * html.count("<svg")
    assert html.count("<svg") == 4 + 3  # one histogram per output of 4 comparisons, one SQNR plot per pair
    assert "Where the error enters: model.int8.onnx vs model.pruned.onnx" in html
    assert '<span class="pass">PASS</span>' in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(report_html: Path, tmp_path: Path) -> None:
    dom = subprocess.run(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", report_html.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count("<svg") == 7 and "Parity report: digits_cnn_pruned" in dom
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2400",
            f"--screenshot={screenshot}",
            report_html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert screenshot.stat().st_size > 50_000  # a blank page is a few kB; the plots and tables are not
