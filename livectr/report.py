"""``livectr report``: one self-contained HTML page of a run, from the metrics its stages recorded.

The stages append samples to ``DATA_DIR/metrics/<stage>.jsonl`` as they run
(:mod:`livectr.core.metrics_log`); this page plots them: serving AUC and log loss over event
time, throughput per stage, freshness, the semantic cache's miss rate, snapshot versions,
consumer lag, dead letters, the teacher's throughput and the scorers' request latency
(``livectr serve`` on the same data dir records ``serve-PORT``). Everything is inline (CSS and SVG, no
script, no network), so the file can be mailed or opened offline. The layout is fixed-size
(:func:`chart_boxes`), which is what lets a test find every plot in a screenshot.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from livectr.core.metrics_log import metrics_dir, read_all
from livectr.svgplot import Series, format_duration, format_number, line_chart

Samples = list[dict[str, Any]]

#: Page layout in CSS pixels: padding, header height, chart size, gap between charts, columns.
PAD, HEADER_H, CHART_W, CHART_H, GAP, COLUMNS = 16, 300, 560, 280, 16, 2


class NoMetrics(LookupError):
    """The data dir holds no recorded metrics (no stage ran on it, or recording was off)."""


@dataclass
class Run:
    """The samples of one data dir, by stage, with the time origins the charts share."""

    data_dir: Path
    stages: dict[str, Samples]

    @property
    def t0(self) -> float:
        return min(s[0]["t"] for s in self.stages.values())

    @property
    def t1(self) -> float:
        return max(s[-1]["t"] for s in self.stages.values())

    def of_kind(self, kind: str) -> dict[str, Samples]:
        """Stages of one kind (``join`` covers ``join-0``, ``join-1`` …), in name order."""
        return {n: s for n, s in sorted(self.stages.items()) if stage_kind(n) == kind}

    def event_t0(self) -> float | None:
        times = [s["event_time"] for samples in self.of_kind("learn").values() for s in samples if "event_time" in s]
        return min(times) if times else None


def stage_kind(name: str) -> str:
    """``join-0`` → ``join``; stage names without a worker suffix are their own kind."""
    for kind in ("join", "learn", "refresh", "produce", "catalogue", "serve"):
        if name == kind or name.startswith(kind + "-") or name.startswith(kind + "_"):
            return kind
    return name


def load_run(data_dir: Path) -> Run:
    """The run recorded in ``data_dir``; :class:`NoMetrics` when there is none."""
    stages = read_all(data_dir)
    if not stages:
        where = metrics_dir(data_dir)
        why = "does not exist" if not Path(data_dir).exists() else f"has no metrics ({where} is empty or absent)"
        raise NoMetrics(
            f"{data_dir} {why}: run `livectr run --data-dir {data_dir}` (or the stages with that data dir) first"
        )
    return Run(Path(data_dir), stages)


def _wall(run: Run, samples: Samples, key: str, name: str, step: bool = False) -> Series:
    """``key`` against seconds since the run's first sample."""
    pts = [(s["t"] - run.t0, s.get(key)) for s in samples]
    return Series(name, [x for x, _ in pts], [y for _, y in pts], step=step)


def _event(run: Run, samples: Samples, key: str, name: str) -> Series:
    """``key`` against event time since the first trained example."""
    origin = run.event_t0() or 0.0
    pts = [(s["event_time"] - origin, s.get(key)) for s in samples if "event_time" in s]
    return Series(name, [x for x, _ in pts], [y for _, y in pts])


def _event_axis(run: Run) -> str:
    origin = run.event_t0()
    if origin is None:
        return "event time"
    if origin > 1e8:  # unix seconds
        start = dt.datetime.fromtimestamp(origin, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"event time since {start}"
    return "event time (s)"


WALL = "wall time since the run's first sample"


def _serving_chart(run: Run, key: str, title: str) -> str:
    """A learner figure over event time: cumulative and over the latest impressions."""
    series = []
    for name, samples in run.of_kind("learn").items():
        series.append(_event(run, samples, key, f"{name}: cumulative"))
        series.append(_event(run, samples, f"{key}_recent", f"{name}: latest impressions"))
    return _chart(title, series, x_label=_event_axis(run), x_format=format_duration)


def chart_serving_auc(run: Run) -> str:
    return _serving_chart(run, "serving_auc", "Serving AUC over event time")


def chart_serving_logloss(run: Run) -> str:
    return _serving_chart(run, "serving_logloss", "Serving log loss over event time")


def chart_throughput(run: Run) -> str:
    series = []
    for kind, key, what in (
        ("produce", "events_rate", "events/s"),
        ("join", "events_rate", "events/s"),
        ("join", "examples_rate", "examples/s"),
        ("learn", "examples_rate", "examples/s"),
    ):
        for name, samples in run.of_kind(kind).items():
            series.append(_wall(run, samples, key, f"{name} {what}"))
    return _chart("Throughput per stage (records/s)", series, x_label=WALL, x_format=format_duration, y_floor=0)


def chart_freshness(run: Run) -> str:
    series = []
    for name, samples in run.of_kind("learn").items():
        series.append(_wall(run, samples, "freshness_p50_s", f"{name}: label→trained p50"))
        series.append(_wall(run, samples, "freshness_p99_s", "p99"))
        series.append(_wall(run, samples, "snapshot_age_s", "snapshot age"))
    return _chart(
        "Freshness (seconds)", series, x_label=WALL, x_format=format_duration, y_format=format_duration, y_floor=0
    )


def chart_cache_miss_rate(run: Run) -> str:
    series = []
    for name, samples in run.of_kind("join").items():
        series.append(_wall(run, samples, "semantic_miss_rate_recent", f"{name}: last interval"))
        series.append(_wall(run, samples, "semantic_miss_rate", f"{name}: cumulative"))
    return _chart(
        "Semantic cache miss rate",
        series,
        x_label=WALL,
        x_format=format_duration,
        y_floor=0,
        empty_text="no lookups recorded (semantics off?)",
    )


def chart_snapshot_versions(run: Run) -> str:
    series = [
        _wall(run, s, "snapshot_version", f"{n} latest version", step=True) for n, s in run.of_kind("learn").items()
    ]
    return _chart(
        "Snapshot versions",
        series,
        x_label=WALL,
        x_format=format_duration,
        y_integer=True,
        empty_text="no snapshot yet",
    )


def chart_consumer_lag(run: Run) -> str:
    series = [
        _wall(run, s, "consumer_lag", n) for kind in ("join", "learn", "refresh") for n, s in run.of_kind(kind).items()
    ]
    return _chart("Consumer lag (records behind the end)", series, x_label=WALL, x_format=format_duration, y_floor=0)


def chart_dead_letters(run: Run) -> str:
    series = [
        _wall(run, s, "dead_letters", n)
        for n, s in sorted(run.stages.items())
        if stage_kind(n) not in ("catalogue", "serve")
    ]
    return _chart("Dead letters (cumulative, per stage)", series, x_label=WALL, x_format=format_duration, y_floor=0)


def chart_teacher(run: Run) -> str:
    return _per_stage_chart(
        run,
        "refresh",
        (("texts_rate", "{name} texts encoded/s"), ("queue_depth", "texts waiting")),
        "Semantic refresher (teacher)",
        "no refresher ran (semantics off?)",
    )


def chart_served_latency(run: Run) -> str:
    """``/score`` latency of each scorer (``livectr serve``), p50 and p99 per recording interval."""
    return _per_stage_chart(
        run,
        "serve",
        (("latency_p50_ms", "{name}: p50"), ("latency_p99_ms", "p99")),
        "Served latency, POST /score (ms)",
        "no scorer recorded (livectr serve --data-dir on this data dir)",
    )


def _per_stage_chart(run: Run, kind: str, fields: tuple[tuple[str, str], ...], title: str, empty_text: str) -> str:
    """One chart over wall time of ``fields`` (sample key, label; ``{name}``: the stage) of every
    stage of ``kind``."""
    series = [
        _wall(run, samples, key, label.format(name=name))
        for name, samples in run.of_kind(kind).items()
        for key, label in fields
    ]
    return _chart(title, series, x_label=WALL, x_format=format_duration, y_floor=0, empty_text=empty_text)


def _chart(title: str, series: list[Series], **options: Any) -> str:
    """A chart of the page's size (:func:`~livectr.svgplot.line_chart` options pass through)."""
    return line_chart(title, series, width=CHART_W, height=CHART_H, **options)


#: The plots, in page order (left to right, top to bottom).
CHARTS: tuple[Callable[[Run], str], ...] = (
    chart_serving_auc,
    chart_serving_logloss,
    chart_throughput,
    chart_freshness,
    chart_cache_miss_rate,
    chart_snapshot_versions,
    chart_consumer_lag,
    chart_dead_letters,
    chart_teacher,
    chart_served_latency,
)


def chart_boxes() -> list[tuple[int, int, int, int]]:
    """Where each chart of :data:`CHARTS` lands on the page: ``(x, y, width, height)`` in CSS px."""
    top = PAD + HEADER_H + GAP
    return [
        (PAD + (i % COLUMNS) * (CHART_W + GAP), top + (i // COLUMNS) * (CHART_H + GAP), CHART_W, CHART_H)
        for i in range(len(CHARTS))
    ]


def _last(samples: Samples, key: str) -> Any:
    return next((s[key] for s in reversed(samples) if s.get(key) is not None), None)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return escape(format_number(value)) if math.isfinite(value) else "–"
    return escape(f"{value:,}" if isinstance(value, int) else str(value))


def headline(run: Run) -> list[tuple[str, Any]]:
    """The run's figures at its last sample."""
    learn = next(iter(run.of_kind("learn").values()), [])
    joins = run.of_kind("join")
    producers = run.of_kind("produce")
    serve = next(iter(run.of_kind("serve").values()), [])
    lookups = sum(_last(s, "semantic_lookups") or 0 for s in joins.values())
    misses = sum(_last(s, "semantic_misses") or 0 for s in joins.values())
    return [
        ("serving AUC", _last(learn, "serving_auc")),
        ("serving log loss", _last(learn, "serving_logloss")),
        ("impressions evaluated", _last(learn, "serving_auc_impressions")),
        ("examples trained", _last(learn, "examples_trained")),
        ("latest snapshot", _last(learn, "snapshot_version")),
        ("events published", sum(_last(s, "events_published") or 0 for s in producers.values()) if producers else None),
        ("semantic cache miss rate", misses / lookups if lookups else None),
        ("dead letters", sum(_last(s, "dead_letters") or 0 for s in run.stages.values())),
        ("served p99 latency (ms, last interval)", _last(serve, "latency_p99_ms")),
    ]


def _stage_rows(run: Run) -> str:
    rows = []
    for name, samples in sorted(run.stages.items()):
        span = samples[-1]["t"] - samples[0]["t"]
        rate = next(
            (
                _last(samples, k)
                for k in ("examples_rate", "events_rate", "texts_rate", "requests_rate")
                if _last(samples, k) is not None
            ),
            None,
        )
        rows.append(
            f"<tr><td>{escape(name)}</td><td>{len(samples)}</td><td>{escape(format_duration(span))}</td>"
            f"<td>{_cell(rate)}</td><td>{_cell(_last(samples, 'consumer_lag'))}</td>"
            f"<td>{_cell(_last(samples, 'dead_letters'))}</td></tr>"
        )
    return "\n".join(rows)


CSS = f"""
body {{ margin: 0; padding: {PAD}px; font: 13px/1.35 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: #222; background: #fff; width: {COLUMNS * CHART_W + (COLUMNS - 1) * GAP}px; }}
header {{ height: {HEADER_H}px; overflow: auto; box-sizing: border-box; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
.sub {{ color: #666; margin: 0 0 10px; }}
.cols {{ display: flex; gap: 24px; align-items: flex-start; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
th {{ color: #555; font-weight: 600; }}
.charts {{ display: grid; grid-template-columns: repeat({COLUMNS}, {CHART_W}px); grid-auto-rows: {CHART_H}px;
          gap: {GAP}px; margin-top: {GAP}px; }}
.charts > div {{ width: {CHART_W}px; height: {CHART_H}px; overflow: hidden; }}
svg.chart text {{ font: 11px system-ui, sans-serif; fill: #333; }}
svg.chart text.title {{ font-size: 14px; font-weight: 600; }}
svg.chart .frame {{ fill: none; stroke: #bbb; }}
svg.chart .grid {{ stroke: #eee; }}
svg.chart .axis {{ stroke: #999; }}
svg.chart .ytick {{ text-anchor: end; }}
svg.chart .xtick, svg.chart .xlabel, svg.chart .ylabel, svg.chart .empty {{ text-anchor: middle; }}
svg.chart .empty {{ fill: #999; font-size: 13px; }}
"""


def build_report(data_dir: Path) -> str:
    """The report page of ``data_dir`` as HTML text; :class:`NoMetrics` when nothing was recorded."""
    run = load_run(data_dir)
    start = dt.datetime.fromtimestamp(run.t0, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    figures = "\n".join(f"<tr><td>{escape(k)}</td><td>{_cell(v)}</td></tr>" for k, v in headline(run))
    charts = "\n".join(f"<div>{chart(run)}</div>" for chart in CHARTS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>livectr report: {escape(str(data_dir))}</title>
<style>{CSS}</style></head>
<body>
<header>
<h1>livectr run report</h1>
<p class="sub">{escape(str(Path(data_dir).resolve()))} · from {start} for {escape(format_duration(run.t1 - run.t0))}
· {sum(len(s) for s in run.stages.values()):,} samples of {len(run.stages)} stage(s)</p>
<div class="cols">
<table><tr><th>at the last sample</th><th></th></tr>
{figures}</table>
<table><tr><th>stage</th><th>samples</th><th>span</th><th>last rate/s</th><th>consumer lag</th><th>dead letters</th></tr>
{_stage_rows(run)}</table>
</div>
</header>
<main class="charts">
{charts}
</main>
</body></html>
"""


def write_report(data_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``data_dir`` to ``out`` (default ``DATA_DIR/report.html``); returns the path."""
    html = build_report(data_dir)
    path = Path(out) if out is not None else Path(data_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
