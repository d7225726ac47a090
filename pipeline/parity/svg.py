"""Inline SVG plots of report.html: error histograms, SQNR along the graph, per-node damage bars.

Every plot has labelled axes with a scale; sizes are in the viewBox, so the page's CSS can shrink
a plot to its column without cutting the labels at its edges.
"""

from __future__ import annotations

import math
from html import escape

from pipeline.parity.localize import EXACT_DB, Localisation
from pipeline.parity.metrics import ErrorHistogram

BAR = "#3b6fb6"
BAD = "#b00020"
GUIDE = "#d08000"


def svg(width: int, height: int, body: str) -> str:
    """An SVG element of the given viewBox size."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">{body}</svg>'
    )


def _text(x: float, y: float, label: str, anchor: str = "middle", extra: str = "", fill: str = "#333") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="11" fill="{fill}"{extra}>'
        f"{escape(label)}</text>"
    )


def _exponent(value: float) -> str:
    return f"1e{round(math.log10(value)):d}"


def histogram_svg(histogram: ErrorHistogram, tolerance: float | None = None) -> str:
    """Elements per |error| bin (log-log), with the tolerance as a dashed line when there is one.

    The x axis is labelled at whole decades, the y axis at powers of ten up to the tallest bin.
    """
    width, height, left, right, top, bottom = 400, 190, 52, 24, 12, 44
    counts = histogram.counts
    used = [i for i, count in enumerate(counts) if count]
    if not used:  # every element exact: one bar of them, so the plot still says how many were compared
        return svg(
            width,
            70,
            f'<rect x="{left}" y="14" width="{width - left - right}" height="20" fill="{BAR}"/>'
            f'<path d="M{left},10 V38" stroke="#444" fill="none"/>'
            + _text(left + 6, 28, f"{histogram.zeros:,} elements, every one exact", anchor="start", fill="#fff")
            + _text(left + (width - left) / 2, 58, "|error| = 0"),
        )
    first, last = max(0, used[0] - 2), min(len(counts) - 1, used[-1] + 2)
    tolerance_bin = _bin_of(histogram, tolerance)
    if tolerance_bin is not None:
        first, last = min(first, tolerance_bin), max(last, tolerance_bin)
    shown = counts[first : last + 1]
    plot_w, plot_h = width - left - right, height - top - bottom
    bar = plot_w / len(shown)
    decades = max(1, math.ceil(math.log10(max(shown) + 1)))

    def y(count: float) -> float:
        return top + plot_h * (1 - math.log10(1 + count) / decades)

    marks = "".join(
        f'<rect x="{left + i * bar:.1f}" y="{y(c):.1f}" width="{max(bar - 0.6, 0.6):.1f}" '
        f'height="{top + plot_h - y(c):.1f}" fill="{BAR}"/>'
        for i, c in enumerate(shown)
        if c
    )
    axes = (
        f'<path d="M{left},{top} V{top + plot_h} H{left + plot_w}" stroke="#444" fill="none"/>'
        + "".join(
            _text(left - 4, y(10**k - 1) + 4, f"{10**k:g}" if k < 4 else f"1e{k}", anchor="end")
            + f'<line x1="{left - 3}" y1="{y(10**k - 1):.1f}" x2="{left}" y2="{y(10**k - 1):.1f}" stroke="#444"/>'
            for k in range(decades + 1)
        )
        + _text(12, top + plot_h / 2, "elements", extra=f' transform="rotate(-90 12 {top + plot_h / 2:.1f})"')
        + _text(left + plot_w / 2, height - 6, "|error| (log scale)")
    )
    edges = histogram.edges()
    ticks = "".join(
        _text(left + i * bar, top + plot_h + 14, _exponent(edges[first + i]))
        + f'<line x1="{left + i * bar:.1f}" y1="{top + plot_h}" x2="{left + i * bar:.1f}" '
        f'y2="{top + plot_h + 3}" stroke="#444"/>'
        for i in range(len(shown) + 1)
        if (first + i) % histogram.per_decade == 0
    )
    guide = ""
    if tolerance_bin is not None and tolerance is not None:
        x = left + (math.log10(tolerance) - math.log10(edges[first])) * histogram.per_decade * bar
        guide = _tolerance(x, top, plot_h, min(x, left + plot_w - 4), tolerance)
    return svg(width, height, marks + axes + ticks + guide)


def _tolerance(x: float, top: float, plot_h: float, label_x: float, tolerance: float) -> str:
    """A dashed vertical line at the tolerance, labelled."""
    return (
        f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{GUIDE}" '
        'stroke-width="1.5" stroke-dasharray="4 3"/>' + _text(label_x, top + 10, f"atol {tolerance:g}", anchor="end")
    )


def _bin_of(histogram: ErrorHistogram, value: float | None) -> int | None:
    """The bin a positive value falls in (None: no value, or outside the histogram's bins)."""
    if value is None or value <= 0:
        return None
    index = math.floor((math.log10(value) - histogram.low_exponent) * histogram.per_decade)
    return index if 0 <= index < len(histogram.counts) else None


def sqnr_svg(localisation: Localisation) -> str:
    """SQNR of every compared tensor in graph order; red bars below the threshold (a dashed line)."""
    width, height, left, top, bottom = 1000, 230, 44, 10, 34
    values = [t.sqnr_db for t in localisation.tensors]
    if not values:
        return svg(width, 40, _text(10, 20, "no shared tensors", anchor="start"))
    high, low = EXACT_DB, min(0.0, min(values))
    step = (width - left - 10) / len(values)
    plot_h = height - top - bottom

    def y(value: float) -> float:
        return top + plot_h * (high - value) / (high - low)

    marks = "".join(
        f'<rect x="{left + i * step:.1f}" y="{y(v):.1f}" width="{max(step - 0.3, 0.4):.2f}" '
        f'height="{max(y(low) - y(v), 0.5):.1f}" fill="{BAD if v < localisation.threshold_db else BAR}"/>'
        for i, v in enumerate(values)
    )
    threshold = y(localisation.threshold_db)
    axes = (
        f'<path d="M{left},{top} V{y(low):.1f} H{width - 10}" stroke="#444" fill="none"/>'
        f'<line x1="{left}" y1="{threshold:.1f}" x2="{width - 10}" y2="{threshold:.1f}" '
        f'stroke="{GUIDE}" stroke-dasharray="4 3"/>'
        + "".join(_text(left - 4, y(v) + 4, f"{v:.0f}", anchor="end") for v in (high, localisation.threshold_db, low))
        + _text(left + (width - left) / 2, height - 6, f"compared tensors in graph order ({len(values)}); dB SQNR")
    )
    return svg(width, height, marks + axes)


def damage_svg(damages: list[tuple[str, float]]) -> str:
    """Horizontal bars: the cosine each node costs alone in int8 (the mixed-precision ranking)."""
    width, label_w, row, top = 720, 230, 18, 8
    if not damages:
        return ""
    peak = max(value for _, value in damages) or 1.0
    plot_w = width - label_w - 90
    height = top + row * len(damages) + 30
    bars = []
    for i, (node, value) in enumerate(damages):
        y = top + i * row
        length = max(plot_w * value / peak, 0.8)
        name = node if len(node) <= 34 else "…" + node[-33:]
        bars.append(
            _text(label_w - 6, y + 12, name, anchor="end")
            + f'<rect x="{label_w}" y="{y + 2}" width="{length:.1f}" height="{row - 5}" fill="{BAR}"/>'
            + _text(label_w + length + 4, y + 12, f"{value:.2e}", anchor="start")
        )
    axis = f'<path d="M{label_w},{top} V{height - 24}" stroke="#444" fill="none"/>' + _text(
        label_w + plot_w / 2, height - 8, "cosine lost with only this node in int8"
    )
    return svg(width, height, "".join(bars) + axis)
