"""report.html's parts: the Markdown subset as HTML, histograms with scale and tolerance, damage bars."""

from __future__ import annotations

from pipeline.parity.html import markdown_html
from pipeline.parity.metrics import ErrorHistogram
from pipeline.parity.svg import damage_svg, histogram_svg


def test_markdown_sections_become_tables_notes_and_lists_not_preformatted_text() -> None:
    html = markdown_html(["## Placement on cpu", "", "8 of 8 on `CPU`.", "> a note", "", "| a | b |", "|---|---|",
                          "| x | 1.5 |", "", "- one", "- two"])  # fmt: skip
    assert html.startswith('<h2>Placement on cpu</h2><p>8 of 8 on <code>CPU</code>.</p><p class="note">a note</p>')
    assert '<th>a</th><th>b</th></tr></thead><tbody><tr><td>x</td><td class="num">1.5</td></tr>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "&gt;" not in html


def test_histogram_has_both_scales_and_marks_the_tolerance() -> None:
    histogram = ErrorHistogram(low_exponent=-12, per_decade=4, counts=[0] * 20 + [5, 50, 500, 7] + [0] * 30, zeros=3)
    plot = histogram_svg(histogram, tolerance=1e-4)
    assert "atol 0.0001" in plot and 'stroke-dasharray="4 3"' in plot
    assert ">1e-7</text>" in plot and ">1e-4</text>" in plot  # decades on x, up to the tolerance
    assert ">1000</text>" in plot and ">elements</text>" in plot and "|error| (log scale)" in plot
    assert plot.count("<rect") == 4


def test_exact_match_histogram_and_damage_chart_still_draw_marks() -> None:
    assert "<rect" in histogram_svg(ErrorHistogram(low_exponent=-12, per_decade=4, counts=[0] * 10, zeros=9))
    chart = damage_svg([("node_a", 2e-3), ("a_very_long_node_name_" * 3, 1e-4)])
    assert chart.count("<rect") == 2 and ">2.00e-03</text>" in chart and "…" in chart
    assert damage_svg([]) == ""
