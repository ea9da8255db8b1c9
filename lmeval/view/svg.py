"""Inline SVG charts for the report: a line chart with optional interval bands, drawn from
the run's tables (no library, no script). Each series has its own dash pattern and marker
as well as its colour, so the lines stay apart in greyscale and in print. Every label is
escaped; the numbers themselves are in the tables beside each chart."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 28, 44
# colour-blind-safe (Okabe-Ito), each with a dash pattern and a marker of its own
STYLES = (
    ("#0072b2", "", "circle"),
    ("#d55e00", "6 3", "square"),
    ("#009e73", "2 2", "diamond"),
    ("#cc79a7", "8 3 2 3", "triangle"),
    ("#e69f00", "4 4", "circle"),
    ("#56b4e9", "1 3", "square"),
)


@dataclass(frozen=True)
class Series:
    """One line: ``x`` and ``y`` values, and optionally an interval (``low``, ``high``) per point."""

    name: str
    x: list[float]
    y: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _marker(kind: str, x: float, y: float, colour: str) -> str:
    if kind == "square":
        return f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="{colour}"/>'
    if kind == "diamond":
        return f'<path d="M{x:.1f} {y - 4:.1f}L{x + 4:.1f} {y:.1f}L{x:.1f} {y + 4:.1f}L{x - 4:.1f} {y:.1f}Z" fill="{colour}"/>'
    if kind == "triangle":
        return f'<path d="M{x:.1f} {y - 4:.1f}L{x + 4:.1f} {y + 3:.1f}L{x - 4:.1f} {y + 3:.1f}Z" fill="{colour}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'


def _open(height: int, title: str, title_x: int) -> str:
    """An ``<svg>`` of the charts' width, its title for screen readers and drawn above the plot."""
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
        f'<text x="{title_x}" y="{TOP - 10}" font-weight="bold">{html.escape(title)}</text>'
    )


def line_chart(
    series: list[Series], *, title: str, x_label: str, y_label: str, diagonal: bool = False, log_x: bool = False
) -> str:
    """An ``<svg role="img">`` line chart of ``series`` (bands where they have intervals);
    ``diagonal`` draws y = x (a reliability diagram's perfect calibration); ``log_x`` puts x on
    a log scale (x below 1 drawn at 1: token positions from 0)."""
    if log_x:
        series = [Series(s.name, [math.log10(max(x, 1.0)) for x in s.x], s.y, s.low, s.high) for s in series]
    xs = _finite(v for s in series for v in s.x)
    ys = _finite(v for s in series for v in [*s.y, *(s.low or []), *(s.high or [])])
    if not xs or not ys:
        return ""
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if diagonal:
        x0, x1 = y0, y1 = min(x0, y0), max(x1, y1)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        _open(HEIGHT, title, LEFT),
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>',
    ]
    for t in _ticks(y0, y1):
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>'
        )
    for t in range(math.ceil(x0), math.floor(x1) + 1) if log_x else _ticks(x0, x1):
        label = f"{10**t:,.0f}" if log_x else f"{t:.4g}"
        parts.append(f'<text x="{px(t):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{label}</text>')
    parts.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text transform="translate(14 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">{html.escape(y_label)}</text>'
    )
    if diagonal:
        parts.append(
            f'<line x1="{px(x0):.1f}" y1="{py(x0):.1f}" x2="{px(x1):.1f}" y2="{py(x1):.1f}" stroke="#999" stroke-dasharray="3 3"/>'
        )
    for k, s in enumerate(series):
        colour, dash, marker = STYLES[k % len(STYLES)]
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        points = [(px(x), py(y)) for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
        if s.low is not None and s.high is not None:
            band = [(px(x), py(h)) for x, h in zip(s.x, s.high) if math.isfinite(h)]
            band += [(px(x), py(lo)) for x, lo in reversed(list(zip(s.x, s.low))) if math.isfinite(lo)]
            if band:
                path = "M" + "L".join(f"{a:.1f} {b:.1f}" for a, b in band) + "Z"
                parts.append(f'<path d="{path}" fill="{colour}" fill-opacity="0.15" stroke="none"/>')
        if points:
            line = "M" + "L".join(f"{a:.1f} {b:.1f}" for a, b in points)
            parts.append(f'<path d="{line}" fill="none" stroke="{colour}" stroke-width="2"{dashes}/>')
            parts.extend(_marker(marker, a, b, colour) for a, b in points)
        legend_y = TOP + 14 + 18 * k
        parts.append(
            f'<line x1="{WIDTH - RIGHT + 10}" x2="{WIDTH - RIGHT + 34}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
            f'stroke="{colour}" stroke-width="2"{dashes}/>'
            + _marker(marker, WIDTH - RIGHT + 22, legend_y - 4, colour)
            + f'<text x="{WIDTH - RIGHT + 40}" y="{legend_y}">{html.escape(s.name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class Interval:
    """One row of a forest plot: a label, the estimate and its interval, and the series (model)."""

    label: str
    value: float
    low: float
    high: float
    series: int = 0


def forest_chart(rows: list[Interval], names: list[str], *, title: str, x_label: str) -> str:
    """A forest plot: one row per group, the estimate as a marker and its interval as a line."""
    values = _finite(v for r in rows for v in (r.value, r.low, r.high))
    if not rows or not values:
        return ""
    x0, x1 = min(values), max(values)
    pad = (x1 - x0) * 0.05 or 1.0
    x0, x1 = x0 - pad, x1 + pad
    row_h, label_w = 18, 220
    height = TOP + BOTTOM + row_h * len(rows)
    plot_w = WIDTH - label_w - 20

    def px(x: float) -> float:
        return label_w + (x - x0) / (x1 - x0) * plot_w

    parts = [_open(height, title, 4)]
    for t in _ticks(x0, x1):
        parts.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{TOP}" y2="{height - BOTTOM}" stroke="#ddd"/>'
            f'<text x="{px(t):.1f}" y="{height - BOTTOM + 16}" text-anchor="middle">{t:.4g}</text>'
        )
    parts.append(
        f'<text x="{label_w + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    for k, r in enumerate(rows):
        colour, _, marker = STYLES[r.series % len(STYLES)]
        y = TOP + row_h * k + row_h / 2
        parts.append(f'<text x="{label_w - 6}" y="{y + 4:.1f}" text-anchor="end">{html.escape(r.label)}</text>')
        if math.isfinite(r.low) and math.isfinite(r.high):
            parts.append(
                f'<line x1="{px(r.low):.1f}" x2="{px(r.high):.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" stroke-width="2"/>'
            )
        if math.isfinite(r.value):
            parts.append(_marker(marker, px(r.value), y, colour))
    legend = " ".join(f"{STYLES[i % len(STYLES)][2]}: {n}" for i, n in enumerate(names))
    parts.append(f'<text x="{label_w}" y="{TOP - 10}" dx="{plot_w - 4}" text-anchor="end">{html.escape(legend)}</text>')
    parts.append("</svg>")
    return "".join(parts)
