"""Write a parity report's three files: report.json (the data), report.md and report.html."""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import write_atomic
from pipeline.parity.html import render_html
from pipeline.parity.report import ParityReport, render_markdown


def write_reports(report: ParityReport, folder: Path) -> Path:
    """Write report.json, report.md and report.html atomically into `folder`; return report.json's path."""
    json_path = folder / "report.json"
    write_atomic(json_path, report.model_dump_json(indent=2))
    write_atomic(folder / "report.md", render_markdown(report))
    write_atomic(folder / "report.html", render_html(report))
    return json_path
