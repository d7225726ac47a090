"""report.html: self-contained, with its plots, and it renders in headless Chromium (when installed).

CI (``.ci/run``) installs Debian's chromium when it is missing; the browser tests skip only where
that install failed, saying so. What the page renders at 1200 px is measured by a copy of it with a
measuring script added (the report itself holds none): no horizontal scroll, a sane height, the
summary above the fold, and marks of non-zero size in every plot.
"""

from __future__ import annotations

import json
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
    job = pipeline.load_job(
        DIGITS_DIR / "job_pruned.toml",
        output_dir=str(out),
        parity={"localize": "always"},
        quantize={"recipes": ["static"]},
    )
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


NO_CHROMIUM = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Chromium is not installed and could not be installed here (.ci/run tries: apt-get install -y chromium)",
)
WIDTH, FOLD = 1200, 900

# Run in the test's copy only: what the page measures at the window's width, written into the DOM.
MEASURE = """<script>
const plots = [...document.querySelectorAll("svg")].map(svg =>
  [...svg.querySelectorAll("rect, path")].filter(e => {
    const box = e.getBoundingClientRect(); return box.width > 0 && box.height > 0; }).length);
const summary = [...document.querySelectorAll("h2")].find(h => h.textContent === "Summary");
const table = summary && summary.nextElementSibling;
document.body.insertAdjacentHTML("beforeend", "<pre id='measured'>" + JSON.stringify({
  viewport: window.innerWidth,
  scrollWidth: document.documentElement.scrollWidth,
  scrollHeight: document.documentElement.scrollHeight,
  summaryBottom: table ? table.getBoundingClientRect().bottom : null,
  summaryRows: table ? table.querySelectorAll("tbody tr").length : 0,
  plots: plots}) + "</pre>");
</script>"""


def measure(report_html: Path, tmp_path: Path) -> dict[str, object]:
    """What headless Chromium renders of the page at `WIDTH` px."""
    copy = tmp_path / "measured.html"
    copy.write_text(report_html.read_text().replace("</body>", MEASURE + "</body>"))
    dom = subprocess.run(
        [
            "chromium",
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'measure-profile'}",
            f"--window-size={WIDTH},{FOLD}",
            "--dump-dom",
            copy.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.search(r"<pre id=\"measured\">(.*?)</pre>", dom)
    assert found is not None, dom[-2000:]
    return json.loads(found.group(1))


def check_rendering(report_html: Path, tmp_path: Path, targets: int) -> None:
    """The summary above the fold, no sideways scroll at 1200 px, every plot drawn."""
    seen = measure(report_html, tmp_path)
    assert seen["viewport"] == WIDTH
    assert seen["scrollWidth"] <= WIDTH, seen
    assert 2 * FOLD < seen["scrollHeight"] < 40 * FOLD, seen  # sections and plots, not one endless column
    assert seen["summaryRows"] == targets
    assert seen["summaryBottom"] is not None and seen["summaryBottom"] < FOLD, seen
    plots = seen["plots"]
    assert isinstance(plots, list) and plots and all(marks > 0 for marks in plots), plots


def test_report_html_leads_with_the_decision(report_html: Path) -> None:
    html = report_html.read_text()
    headings = re.findall(r"<h2>([^<]*)</h2>", html)
    assert headings[:4] == [
        "Summary",
        "Quantization (model.int8.onnx, recipe generic)",
        "Parity chain: comparisons",
        "Parity chain: every check",
    ]
    for later in ("Top-1 accuracy", "int8 speed", "Error histograms", "Placement on cpu (model.int8.onnx)",
                  "Stage timings", "Model files", "Tool versions", "Input hashes (sha256)"):  # fmt: skip
        assert later in headings
    assert "<pre>" not in html and "<p>&gt;" not in html  # placement and notes as HTML, no leaked Markdown
    assert "atol 0.0001" in html  # the fp32 links' tolerance marked on their histograms
    summary = html.split("<h2>Summary</h2>", 1)[1].split("</table>", 1)[0]
    assert "int8" in summary and " kB -&gt; " in summary and "top-1 accuracy" in summary and "%" in summary


@NO_CHROMIUM
def test_report_html_renders_at_1200px_without_scrolling_sideways(report_html: Path, tmp_path: Path) -> None:
    check_rendering(report_html, tmp_path, targets=1)


@pytest.mark.slow
@NO_CHROMIUM
def test_minilm_report_html_renders_at_1200px(
    minilm_conversion: tuple[Path, object, list[str]], tmp_path: Path
) -> None:
    out, _, _ = minilm_conversion  # the session's one MiniLM conversion (the int8 gate may fail; the page renders)
    check_rendering(out / "report.html", tmp_path, targets=1)


@NO_CHROMIUM
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
