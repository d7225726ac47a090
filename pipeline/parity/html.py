"""report.html: the parity report as one self-contained page, decision first.

No scripts, fonts or files from elsewhere: the page opens offline and can be attached to a ticket.
Order: the summary per target, failed checks, what quantize kept float (with a per-node damage
chart), the parity chain's metrics per comparison and every check with its limit, accuracy, int8 speed, error
histograms, where the error enters, distillation, pruning, placement, on-target parity, the hls4ml
project, stage timings, model files, tool versions and input hashes. Sections shared with report.md are rendered
from the same Markdown lines (`markdown_html`), so the two never disagree.
"""

from __future__ import annotations

import re
from html import escape

from pipeline.parity.generation_section import generation_section
from pipeline.parity.hls import render_hls
from pipeline.parity.localize import EXACT_DB, Localisation
from pipeline.parity.report import ParityReport, accuracy_section, check_table, comparison_table, speed_section
from pipeline.parity.sections import (
    SUMMARY_COLUMNS,
    render_distillation,
    render_provenance,
    render_pruning,
    render_quantization,
    summary_row,
)
from pipeline.parity.svg import damage_svg, histogram_svg, sqnr_svg
from pipeline.parity.target import render_placement, render_target_parity

_STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1.5em; color: #222;
       max-width: 1140px; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.box { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
th { background: #f3f3f3; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.summary td, .summary th { font-size: 1.05em; padding: 0.4em 0.7em; }
.pass { color: #127a12; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.note { background: #fff8e1; padding: 0.4em 0.8em; border-left: 4px solid #f0b400; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; max-width: 100%; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 400px; }
svg { max-width: 100%; height: auto; }
code { background: #f3f3f3; padding: 0 0.2em; overflow-wrap: anywhere; }
@media print { body { max-width: none; margin: 0; } .box { overflow: visible; } h2 { break-after: avoid; }
               figure, tr { break-inside: avoid; } }
"""
_RESULTS = {
    "pass": '<span class="pass">pass</span>',
    "PASS": '<span class="pass">PASS</span>',
    "FAIL": '<span class="fail">FAIL</span>',
    "fail": '<span class="fail">fail</span>',
}
_CODE = re.compile(r"`([^`]+)`")
_NUMBER = re.compile(r"^[-+]?[0-9][0-9,.]*(e[-+]?[0-9]+)?( ?(%|x|ms|s|B|kB|MB|GB))?$|^-$|^inf$")


def render_html(report: ParityReport) -> str:
    """The whole page."""
    verdict = "pass" if report.verdict == "pass" else "fail"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Parity report: {escape(report.job)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Parity report: {escape(report.job)}</h1>",
        f'<p>Verdict: <span class="{verdict}">{report.verdict.upper()}</span> on {escape(report.data)} '
        f"({report.samples} samples).</p>",
        *(f'<p class="note">{escape(note)}</p>' for note in report.notes),
        _summary(report),
    ]
    if report.failures:
        parts.append("<h2>Failed checks</h2><ul>" + "".join(f"<li>{escape(f)}</li>" for f in report.failures) + "</ul>")
    parts += [_quantization(report), _comparisons(report), _checks(report)]
    parts += [markdown_html(accuracy_section(report)), markdown_html(speed_section(report))]
    parts += [_histograms(report), *(_localisation(localisation) for localisation in report.localisations)]
    if report.distillation is not None:
        parts.append(markdown_html(render_distillation(report.distillation)))
    if report.pruning is not None:
        parts.append(markdown_html(render_pruning(report.pruning)))
    parts += [markdown_html(render_placement(placement)) for placement in report.placements]
    if report.on_target:
        parts.append(markdown_html(render_target_parity(report.on_target)))
    parts += [markdown_html(render_hls(hls)) for hls in report.hls]
    parts.append(markdown_html(generation_section(report.generation)))
    parts.append(
        markdown_html(render_provenance(report.stage_timings, report.models, report.tool_versions, report.input_hashes))
    )
    parts.append("</body></html>")
    return "\n".join(part for part in parts if part) + "\n"


def _summary(report: ParityReport) -> str:
    if not report.summary:
        return ""
    rows = [[_inline(cell) for cell in summary_row(summary)] for summary in report.summary]
    for row in rows:
        row[1] = _RESULTS.get(row[1], row[1])
    return "<h2>Summary</h2>" + table(SUMMARY_COLUMNS, rows, css="summary")


def _quantization(report: ParityReport) -> str:
    parts = []
    for quantization in report.quantization:
        damages = [(kept.node, kept.damage) for kept in quantization.kept_float if kept.damage is not None]
        chart = ""
        if damages:
            caption = "Per-node damage: the cosine each node kept float costs alone in int8 (mixed-precision ranking)"
            chart = f"<figure>{damage_svg(damages)}<figcaption>{caption}</figcaption></figure>"
        parts.append(markdown_html(render_quantization(quantization)) + chart)
    return "".join(parts)


def _checks(report: ParityReport) -> str:
    header, rows = check_table(report)
    cells = [[*(escape(cell) for cell in row[:-1]), _RESULTS.get(row[-1], row[-1])] for row in rows]
    return "<h2>Parity chain: every check</h2>" + table(header, cells)


def _comparisons(report: ParityReport) -> str:
    header, rows = comparison_table(report)
    cells = [[*(escape(cell) for cell in row[:-1]), _RESULTS.get(row[-1], row[-1])] for row in rows]
    return "<h2>Parity chain: comparisons</h2>" + table(header, cells)


def _histograms(report: ParityReport) -> str:
    figures = []
    for comparison in report.comparisons:
        for output in comparison.outputs:
            histogram = output.metrics.error_histogram
            if histogram is None:
                continue
            atol = next((check.limit for check in output.checks if check.metric == "min_atol"), None)
            caption = f"{comparison.label} on {comparison.target}: |error| of {output.name}"
            caption += (
                "; dashed: the policy's atol" if atol is not None else " (task-level policy: no element tolerance)"
            )
            plot = histogram_svg(histogram, atol)
            figures.append(f"<figure>{plot}<figcaption>{escape(caption)}</figcaption></figure>")
    if not figures:
        return ""
    return (
        "<h2>Error histograms</h2><p>Elements per absolute-error bin (both axes log scale; exact matches not "
        "counted in the bins).</p>" + "".join(figures)
    )


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
    header = ["tensor", "step", "op", "SQNR dB", "local SQNR dB", "exclude to remove"]
    steps_table = table(header, rows) if rows else ""
    caption = "SQNR of every compared tensor in graph order (dB; red: below the threshold, dashed)"
    plot = f"<figure>{sqnr_svg(localisation)}<figcaption>{caption}</figcaption></figure>"
    return f"<h2>{escape(title)}</h2><p>{lead}</p>{plot}{steps_table}"


def markdown_html(lines: list[str]) -> str:
    """The report's own Markdown subset as HTML: "## " headings, tables, "> " notes, "- " lists,
    paragraphs and `code` (everything else escaped)."""
    html: list[str] = []
    rows: list[list[str]] = []
    items: list[str] = []
    for line in [*lines, ""]:
        if rows and not line.startswith("|"):
            html.append(table(rows[0], rows[2:], escaped=True))
            rows = []
        if items and not line.startswith("- "):
            html.append("<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>")
            items = []
        text = line.strip()
        if text.startswith("|"):
            rows.append([_inline(cell.strip()) for cell in text.strip("|").split("|")])
        elif text.startswith("- "):
            items.append(_inline(text[2:]))
        elif text.startswith("## "):
            html.append(f"<h2>{_inline(text[3:])}</h2>")
        elif text.startswith(">"):
            html.append(f'<p class="note">{_inline(text.lstrip("> "))}</p>')
        elif text:
            html.append(f"<p>{_inline(text)}</p>")
    return "".join(html)


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", escape(text))


def table(header: list[str], rows: list[list[str]], css: str = "", escaped: bool = False) -> str:
    """A table in its own scrolling box (a wide table never widens the page); cells are HTML."""
    head = "".join(f"<th>{h if escaped else escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in rows)
    style = f' class="{css}"' if css else ""
    return f'<div class="box"><table{style}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _cell(cell: str) -> str:
    """A table cell; numbers align right."""
    return f'<td class="num">{cell}</td>' if _NUMBER.match(cell) else f"<td>{cell}</td>"
