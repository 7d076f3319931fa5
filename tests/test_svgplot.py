"""The report's hand-drawn SVG charts: ticks, scales, gaps, steps, empty charts, escaping."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from livectr.svgplot import PALETTE, Series, format_duration, format_number, line_chart, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # well-formed XML, or this raises


def _polylines(root: ET.Element) -> list[list[tuple[float, float]]]:
    out = []
    for line in root.iter(f"{SVG}polyline"):
        pts = [tuple(float(v) for v in p.split(",")) for p in line.attrib["points"].split()]
        out.append(pts)
    return out


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.55, 0.81, [0.55, 0.6, 0.65, 0.7, 0.75, 0.8]),
        (0, 37_000, [0, 10_000, 20_000, 30_000]),
        (-3, 3, [-3, -2, -1, 0, 1, 2, 3]),
    ],
)
def test_nice_ticks_are_round_and_cover_the_range(lo: float, hi: float, expected: list[float]) -> None:
    assert nice_ticks(lo, hi) == pytest.approx(expected)


def test_nice_ticks_degenerate_ranges() -> None:
    assert nice_ticks(5, 5) == [5]
    assert nice_ticks(math.nan, 1) == []
    assert nice_ticks(1, 0) == nice_ticks(0, 1)


def test_formats() -> None:
    assert format_number(0) == "0"
    assert format_number(12_345) == "12.3k"
    assert format_number(4_500_000) == "4.5M"
    assert format_number(0.6123) == "0.6123"
    assert format_duration(45) == "45s"
    assert format_duration(150) == "2.5m"
    assert format_duration(9000) == "2.5h"


def test_points_map_into_the_frame_with_y_up() -> None:
    root = _parse(line_chart("t", [Series("a", [0, 10], [0.0, 1.0])], width=400, height=200))
    frame = next(r for r in root.iter(f"{SVG}rect") if r.attrib.get("class") == "frame")
    x, y = float(frame.attrib["x"]), float(frame.attrib["y"])
    w, h = float(frame.attrib["width"]), float(frame.attrib["height"])
    [line] = _polylines(root)
    (x0, y0), (x1, y1) = line
    assert x0 == pytest.approx(x) and x1 == pytest.approx(x + w)
    # y grows downwards in SVG: the larger value is higher up; the range includes both ends.
    assert y1 < y0 and y <= y1 and y0 <= y + h


def test_missing_values_break_the_line() -> None:
    s = Series("a", [0, 1, 2, 3, 4, 5], [1.0, 2.0, None, math.nan, 3.0, 4.0])
    lines = _polylines(_parse(line_chart("t", [s])))
    assert [len(line) for line in lines] == [2, 2]


def test_a_lone_point_is_a_dot_and_steps_hold_their_value() -> None:
    root = _parse(line_chart("t", [Series("dot", [1], [2.0]), Series("v", [0, 5, 9], [1, 2, 3], step=True)]))
    assert len(list(root.iter(f"{SVG}circle"))) == 1
    [steps] = _polylines(root)
    assert len(steps) == 5  # 3 points + one corner before each change
    assert steps[1][1] == steps[0][1] and steps[1][0] == steps[2][0]


def test_each_series_has_its_colour_and_a_legend_entry() -> None:
    series = [Series(f"s{i}", [0, 1], [i, i + 1]) for i in range(3)]
    root = _parse(line_chart("t", series))
    strokes = [p.attrib["stroke"] for p in root.iter(f"{SVG}polyline")]
    assert strokes == list(PALETTE[:3])
    legend = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "legend"]
    assert legend == ["s0", "s1", "s2"]


def test_long_legends_wrap_and_push_the_frame_down() -> None:
    one = _parse(line_chart("t", [Series("x" * 10, [0, 1], [0, 1])], width=300))
    many = _parse(line_chart("t", [Series("x" * 30, [0, 1], [0, 1]) for _ in range(4)], width=300))

    def frame_y(root: ET.Element) -> float:
        return float(next(r for r in root.iter(f"{SVG}rect") if r.attrib.get("class") == "frame").attrib["y"])

    assert frame_y(many) > frame_y(one)


def test_a_chart_without_data_says_so() -> None:
    svg = line_chart("Empty", [Series("a"), Series("b", [1, 2], [None, math.inf])], empty_text="nothing here")
    root = _parse(svg)
    assert not list(root.iter(f"{SVG}polyline"))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "nothing here" in texts and "a (no data)" in texts


def test_names_are_escaped() -> None:
    svg = line_chart("<b>&", [Series('<script>"x"</script>', [0, 1], [0, 1])])
    root = _parse(svg)
    assert "<script>" not in svg and not re.search(r"<b>", svg)
    assert root.find(f"{SVG}text").text == "<b>&"  # type: ignore[union-attr]


def test_integer_ticks_for_counts() -> None:
    root = _parse(line_chart("v", [Series("v", [0, 1, 2], [1, 2, 3], step=True)], y_integer=True))
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "ytick"]
    assert ticks == ["1", "2", "3"]
