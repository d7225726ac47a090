"""report.html: the parity report as one self-contained page with inline SVG plots.

No scripts, fonts or files from elsewhere: the page opens offline and can be attached to a ticket.
Plots: the absolute-error histogram of every output of every comparison, and for each
localisation the SQNR of every compared tensor in graph order.
"""

from __future__ import annotations

import math
from html import escape

from pipeline.parity.localize import EXACT_DB, Localisation
from pipeline.parity.metrics import ErrorHistogram
from pipeline.parity.report import ParityReport, comparison_table
from pipeline.parity.sections import render_distillation, render_pruning
from pipeline.parity.target import render_placement, render_target_parity

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.pass { color: #127a12; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.note { background: #fff8e1; padding: 0.4em 0.8em; border-left: 4px solid #f0b400; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; } figcaption { font-size: 0.85em; color: #555; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(report: ParityReport) -> str:
    """The whole page."""
    verdict = "pass" if report.verdict == "pass" else "fail"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Parity report: {escape(report.job)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Parity report: {escape(report.job)}</h1>",
        f'<p>Verdict: <span class="{verdict}">{report.verdict.upper()}</span> on {escape(report.data)} '
        f"({report.samples} samples).</p>",
        *(f'<p class="note">{escape(note)}</p>' for note in report.notes),
        _comparisons(report),
        _histograms(report),
        *(_localisation(localisation) for localisation in report.localisations),
    ]
    if report.distillation is not None:
        parts.append(_preformatted(render_distillation(report.distillation)))
    if report.pruning is not None:
        parts.append(_preformatted(render_pruning(report.pruning)))
    parts += [_preformatted(render_placement(placement)) for placement in report.placements]
    if report.on_target:
        parts.append(_preformatted(render_target_parity(report.on_target)))
    if report.failures:
        parts.append("<h2>Failed checks</h2><ul>" + "".join(f"<li>{escape(f)}</li>" for f in report.failures) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _preformatted(section: list[str]) -> str:
    """A Markdown section (a "## title" line, a blank line, then text and tables) as a heading and a <pre>."""
    title = section[0].removeprefix("## ")
    return f"<h2>{escape(title)}</h2><pre>" + escape("\n".join(section[2:])) + "</pre>"


def _comparisons(report: ParityReport) -> str:
    header, rows = comparison_table(report)
    styled = {"pass": '<span class="pass">pass</span>', "FAIL": '<span class="fail">FAIL</span>'}
    cells = [[*(escape(cell) for cell in row[:-1]), styled.get(row[-1], row[-1])] for row in rows]
    return "<h2>Comparisons</h2>" + _table(header, cells)


def _histograms(report: ParityReport) -> str:
    figures = []
    for comparison in report.comparisons:
        for output in comparison.outputs:
            histogram = output.metrics.error_histogram
            if histogram is not None:
                caption = f"{comparison.label} on {comparison.target}: |error| of {output.name}"
                figures.append(
                    f"<figure>{_histogram_svg(histogram)}<figcaption>{escape(caption)}</figcaption></figure>"
                )
    if not figures:
        return ""
    return (
        "<h2>Error histograms</h2><p>Elements per absolute-error bin (log scale; exact matches not shown).</p>"
        + "".join(figures)
    )


def _histogram_svg(histogram: ErrorHistogram, width: int = 320, height: int = 150) -> str:
    counts = histogram.counts
    used = [i for i, count in enumerate(counts) if count]
    if not used:
        return _svg(width, height, f'<text x="10" y="{height // 2}">no error: every element matches</text>')
    first, last = max(0, used[0] - 2), min(len(counts) - 1, used[-1] + 2)
    shown = counts[first : last + 1]
    peak = max(shown)
    bar = (width - 40) / len(shown)
    bars = []
    for index, count in enumerate(shown):
        h = 0 if count == 0 else max(1.0, (height - 40) * math.log10(1 + count) / math.log10(1 + peak))
        x = 30 + index * bar
        bars.append(
            f'<rect x="{x:.1f}" y="{height - 25 - h:.1f}" width="{max(bar - 0.5, 0.5):.1f}" '
            f'height="{h:.1f}" fill="#3b6fb6"/>'
        )
    edges = histogram.edges()
    labels = "".join(
        f'<text x="{30 + i * bar:.1f}" y="{height - 8}" font-size="10">{edges[first + i]:.0e}</text>'
        for i in range(0, len(shown), max(1, len(shown) // 4))
    )
    axis = f'<line x1="30" y1="{height - 25}" x2="{width - 10}" y2="{height - 25}" stroke="#444"/>'
    return _svg(width, height, "".join(bars) + axis + labels)


def _localisation(localisation: Localisation) -> str:
    title = f"Where the error enters: {localisation.candidate} vs {localisation.reference}"
    first = localisation.first_diverging
    lead = (
        f"First tensor below {localisation.threshold_db:g} dB SQNR: <code>{escape(first.tensor)}</code> "
        f"({escape(first.op_type)} node <code>{escape(first.node)}</code>), {first.sqnr_db:.1f} dB."
        if first
        else f"No tensor falls below {localisation.threshold_db:g} dB SQNR."
    )
    steps = [t for t in localisation.ranked[:10] if t.local_sqnr_db < EXACT_DB]
    rows = [
        [
            f"<code>{escape(t.tensor)}</code>",
            t.kind,
            escape(t.op_type),
            f"{t.sqnr_db:.1f}",
            f"{t.local_sqnr_db:.1f}",
            ", ".join(f"<code>{escape(c)}</code>" for c in t.culprits),
        ]
        for t in steps
    ]
    table = _table(["tensor", "step", "op", "SQNR dB", "local SQNR dB", "exclude to remove"], rows) if rows else ""
    caption = "SQNR of every compared tensor in graph order (dB; red: below the threshold)"
    plot = f"<figure>{_sqnr_svg(localisation)}<figcaption>{caption}</figcaption></figure>"
    return f"<h2>{escape(title)}</h2><p>{lead}</p>{plot}{table}"


def _sqnr_svg(localisation: Localisation, width: int = 1000, height: int = 220) -> str:
    values = [t.sqnr_db for t in localisation.tensors]
    if not values:
        return _svg(width, height, '<text x="10" y="20">no shared tensors</text>')
    top, bottom = EXACT_DB, min(0.0, min(values))
    step = (width - 50) / max(len(values), 1)

    def y(value: float) -> float:
        return 10 + (height - 40) * (top - value) / (top - bottom)

    def colour(value: float) -> str:
        return "#b00020" if value < localisation.threshold_db else "#3b6fb6"

    bars = "".join(
        f'<rect x="{40 + i * step:.1f}" y="{y(v):.1f}" width="{max(step - 0.3, 0.4):.2f}" '
        f'height="{max(y(bottom) - y(v), 0.5):.1f}" fill="{colour(v)}"/>'
        for i, v in enumerate(values)
    )
    threshold = y(localisation.threshold_db)
    guide = (
        f'<line x1="40" y1="{threshold:.1f}" x2="{width - 10}" y2="{threshold:.1f}" '
        'stroke="#f0b400" stroke-dasharray="4"/>'
        f'<text x="2" y="{threshold + 4:.1f}" font-size="10">{localisation.threshold_db:g}</text>'
        f'<text x="2" y="{y(top) + 10:.1f}" font-size="10">{top:g}</text>'
        f'<text x="2" y="{y(bottom):.1f}" font-size="10">{bottom:.0f}</text>'
    )
    return _svg(width, height, bars + guide)


def _svg(width: int, height: int, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">{body}</svg>'
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
