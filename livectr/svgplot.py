"""Line charts as inline SVG text: the plots of ``livectr report`` without a plotting library.

Why hand-drawn: the report must be one self-contained HTML file that opens with no network,
and a few line charts do not justify a plotting dependency (matplotlib is tens of MB; the
JavaScript ones need their code inlined). A chart here is a frame, "nice" ticks, one polyline
per series (broken where a value is missing), a legend, and ``<title>`` tooltips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

#: Series colours, distinct and readable on white (the first ones are the most distinct).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#e377c2", "#8c564b")

Number = float | int
Formatter = Callable[[float], str]


@dataclass
class Series:
    """One line: points ``(x, y)``; a ``None`` or non-finite y breaks the line there."""

    name: str
    xs: list[float] = field(default_factory=list)
    ys: list[float | None] = field(default_factory=list)
    #: Draw as steps (the value holds until the next point), e.g. a snapshot version.
    step: bool = False

    def points(self) -> list[tuple[float, float]]:
        return [(x, y) for x, y in zip(self.xs, self.ys) if _finite(x) and y is not None and _finite(y)]


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 × 10^k apart) covering ``[lo, hi]``."""
    if not (_finite(lo) and _finite(hi)):
        return []
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    # The round step whose tick count is nearest the target (the larger step on a tie).
    step = min((m * mag for m in (10, 5, 2.5, 2, 1)), key=lambda st: abs((hi - lo) / st - target))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def format_number(v: float) -> str:
    """Short human form: 12.3k, 4.5M, 0.612, 1e-05."""
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 1e-3:
        return f"{v:.4g}"
    return f"{v:.1e}"


def format_duration(v: float) -> str:
    """Seconds as 45s, 2.5m, 1.2h."""
    a = abs(v)
    if a < 120:
        return f"{v:.4g}s"
    if a < 7200:
        return f"{v / 60:.3g}m"
    return f"{v / 3600:.3g}h"


def _range(values: Sequence[float], floor: float | None, ceil: float | None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if floor is not None:
        lo = min(lo, floor)
    if ceil is not None:
        hi = max(hi, ceil)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
        if floor is not None and lo < floor <= min(values):
            lo = floor
    return lo, hi


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str = "",
    y_label: str = "",
    width: int = 560,
    height: int = 280,
    x_format: Formatter = format_number,
    y_format: Formatter = format_number,
    y_floor: float | None = None,
    y_ceil: float | None = None,
    y_integer: bool = False,
    empty_text: str = "no samples recorded",
) -> str:
    """An SVG element (text) plotting ``series``; ``empty_text`` in the frame when none has a point.

    ``y_floor``/``y_ceil`` widen the y range to include them (e.g. 0 for rates); ``y_integer``
    keeps only whole-number y ticks (counts, versions).
    """
    left, right, bottom = 64, 16, 46
    drawn = [(s, s.points(), PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
    with_points = [(s, pts, c) for s, pts, c in drawn if pts]
    legend, rows = _legend([(s.name + ("" if pts else " (no data)"), c) for s, pts, c in drawn], left, width - right)
    top = 30 + 15 * rows
    pw, ph = width - left - right, height - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="18" class="title">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>',
        *legend,
    ]
    if not with_points:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" class="empty">{escape(empty_text)}</text>')
        out.append("</svg>")
        return "\n".join(out)
    xs = [x for _, pts, _ in with_points for x, _ in pts]
    ys = [y for _, pts, _ in with_points for _, y in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = _range(ys, y_floor, y_ceil)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in nice_ticks(y0, y1):
        if y0 <= t <= y1 and not (y_integer and t != int(t)):
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>')
            out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" class="ytick">{escape(y_format(t))}</text>')
    for t in nice_ticks(x0, x1):
        if x0 <= t <= x1:
            out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" class="axis"/>')
            out.append(f'<text x="{px(t):.1f}" y="{top + ph + 17}" class="xtick">{escape(x_format(t))}</text>')
    if x_label:
        out.append(f'<text x="{left + pw / 2}" y="{height - 6}" class="xlabel">{escape(x_label)}</text>')
    if y_label:
        out.append(
            f'<text x="14" y="{top + ph / 2}" class="ylabel" transform="rotate(-90 14 {top + ph / 2})">'
            f"{escape(y_label)}</text>"
        )
    for s, _, colour in with_points:
        for segment in _segments(s):
            coords = _path(segment, s.step, px, py)
            tip = f"{s.name}: last {y_format(segment[-1][1])} at {x_format(segment[-1][0])}"
            if len(segment) == 1:
                x, y = segment[0]
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
            else:
                out.append(
                    f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2" '
                    f'stroke-linejoin="round"><title>{escape(tip)}</title></polyline>'
                )
    out.append("</svg>")
    return "\n".join(out)


def _legend(entries: list[tuple[str, str]], left: float, right: float) -> tuple[list[str], int]:
    """Legend swatches and labels from ``left``, wrapped before ``right``; returns (elements, rows)."""
    out: list[str] = []
    x, row = left, 0
    for label, colour in entries:
        w = 22 + 6.2 * len(label)
        if x > left and x + w > right:
            x, row = left, row + 1
        y = 27 + 15 * row
        out.append(f'<rect x="{x:.0f}" y="{y}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 14:.0f}" y="{y + 9}" class="legend">{escape(label)}</text>')
        x += w
    return out, row + 1 if entries else 0


def _segments(s: Series) -> list[list[tuple[float, float]]]:
    """Runs of consecutive valid points (a missing value ends a run)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(s.xs, s.ys):
        if _finite(x) and y is not None and _finite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _path(
    points: list[tuple[float, float]], step: bool, px: Callable[[float], float], py: Callable[[float], float]
) -> str:
    coords: list[str] = []
    previous: tuple[float, float] | None = None
    for x, y in points:
        if step and previous is not None:
            coords.append(f"{px(x):.1f},{py(previous[1]):.1f}")
        coords.append(f"{px(x):.1f},{py(y):.1f}")
        previous = (x, y)
    return " ".join(coords)
