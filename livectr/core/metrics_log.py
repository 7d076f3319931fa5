"""Metrics a stage records as it runs: samples on disk for ``livectr report``, ``/metrics`` for Prometheus.

Why on top of the status files (:mod:`livectr.core.status`): a status file holds a stage's
*latest* counters, which is what ``livectr run`` draws; a report needs their history. Every
stage already hands its counters to an ``on_status`` callback about once a second, so the
recorder is one more callback in that chain (:meth:`StageRecorder.chain`): no stage keeps a
second set of counters. It adds what needs more than one status to know (rates per second,
the cache's recent miss rate, how old the current snapshot is) and the consumer lag, read
from librdkafka's own statistics (:func:`livectr.core.bus.watch_consumers`: no extra broker
calls). Samples go to ``DATA_DIR/metrics/<stage>.jsonl``, one JSON object a line, thinned
past ``max_bytes`` (every other older sample dropped), so a run of any length keeps its whole
span in bounded space. The same latest sample is served on ``/metrics`` in Prometheus text
format when a port is given.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from livectr.core import bus
from livectr.core.config import Config, MetricsConfig

log = logging.getLogger(__name__)

StatusCallback = Callable[[dict[str, Any]], None]

#: Sub-directory of the data dir that holds the samples files.
METRICS_DIR = "metrics"

#: Status counter → the per-second rate derived from it (the first one a stage reports wins).
RATES: dict[str, str] = {
    "events_in": "events_rate",
    "events_published": "events_rate",
    "examples_out": "examples_rate",
    "examples_trained": "examples_rate",
    "texts_encoded": "texts_rate",
    "requests_served": "requests_rate",
}
#: (numerator, denominator) counters → their ratio over the last interval.
RECENT_RATIOS: dict[str, tuple[str, str]] = {
    "semantic_miss_rate_recent": ("semantic_misses", "semantic_lookups"),
}


def metrics_dir(data_dir: Path) -> Path:
    """Where the stages of a data dir record their samples."""
    return Path(data_dir) / METRICS_DIR


def samples_path(data_dir: Path, stage: str) -> Path:
    """The samples file of ``stage`` (a name safe as a file name)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stage) or "stage"
    return metrics_dir(data_dir) / f"{safe}.jsonl"


def _number(value: Any) -> float | int | None:
    """``value`` as a JSON-safe number (NaN and infinities as None), or None if not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- consumer lag -------------------------------------------------------------------------------


class ConsumerLag:
    """Records between each consumed partition's position and its end, from librdkafka statistics.

    librdkafka's own ``consumer_lag`` counts from the committed (or stored) offset, which the
    learner and the refresher never have (they ``assign()`` and keep positions in snapshots), so
    the lag here is ``hi_offset - app_offset`` (the next record handed to the application). A
    partition nothing was read from yet counts from its committed offset, else it is left out.
    A client whose statistics stopped coming (closed) is forgotten after ``stale_s``.
    """

    def __init__(self, stale_s: float = 10.0) -> None:
        self.stale_s = stale_s
        self._clients: dict[str, tuple[float, dict[str, int]]] = {}
        self._lock = threading.Lock()

    def on_stats(self, raw: str) -> None:
        """librdkafka ``stats_cb``: remember this client's lag per topic."""
        try:
            stats = json.loads(raw)
        except ValueError:
            return
        per_topic: dict[str, int] = {}
        for topic, tstats in (stats.get("topics") or {}).items():
            for partition, p in (tstats.get("partitions") or {}).items():
                if partition == "-1" or not p.get("assigned", True):
                    continue
                hi = p.get("hi_offset", -1)
                position = p.get("app_offset", -1)
                if position is None or position < 0:
                    position = p.get("committed_offset", -1)
                if hi is None or hi < 0 or position is None or position < 0:
                    continue
                per_topic[topic] = per_topic.get(topic, 0) + max(0, hi - position)
        with self._lock:
            self._clients[str(stats.get("name", ""))] = (time.monotonic(), per_topic)

    def by_topic(self) -> dict[str, int]:
        """Lag in records per topic, summed over this process's live consumers."""
        now = time.monotonic()
        out: dict[str, int] = {}
        with self._lock:
            for name in [n for n, (at, _) in self._clients.items() if now - at > self.stale_s]:
                del self._clients[name]
            for _, per_topic in self._clients.values():
                for topic, lag in per_topic.items():
                    out[topic] = out.get(topic, 0) + lag
        return out


# -- samples on disk ----------------------------------------------------------------------------


class SamplesFile:
    """Append-only JSON lines, thinned in place once larger than ``max_bytes``.

    Thinning keeps the first and the newest sample and every other one in between, so the file
    always spans the whole run; older parts get coarser each time. Appends are single ``write``
    calls of whole lines, so a reader sees at worst an incomplete last line (which it skips).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max(4096, max_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._size = path.stat().st_size if path.exists() else 0

    def append(self, sample: dict[str, Any]) -> None:
        line = (json.dumps(sample, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
        self._size += len(line)
        if self._size > self.max_bytes:
            self.thin()

    def thin(self) -> None:
        """Drop every other sample (first and newest kept), atomically."""
        lines = [ln for ln in self.path.read_bytes().splitlines(keepends=True) if ln.endswith(b"\n")]
        if len(lines) < 3:
            return
        kept = [lines[0], *lines[1:-1:2], lines[-1]] if len(lines) % 2 else [lines[0], *lines[2:-1:2], lines[-1]]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, self.path)
        self._size = sum(len(ln) for ln in kept)


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The samples of one file, oldest first; unreadable lines (a write in progress) are skipped."""
    out: list[dict[str, Any]] = []
    try:
        data = path.read_text(errors="replace")
    except OSError:
        return out
    for line in data.splitlines():
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        if isinstance(sample, dict) and isinstance(sample.get("t"), (int, float)):
            out.append(sample)
    return out


def read_all(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every stage's samples in ``data_dir``, by stage name (empty when nothing was recorded)."""
    folder = metrics_dir(data_dir)
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob("*.jsonl")):
        samples = read_samples(path)
        if samples:
            found[str(samples[-1].get("stage", path.stem))] = samples
    return found


# -- the recorder -------------------------------------------------------------------------------


class StageRecorder:
    """An ``on_status`` callback that turns each status into a sample, records and exposes it.

    ``latest`` is the newest sample (what ``/metrics`` serves); one sample per ``interval_s``
    reaches the samples file, and the last one always does (:meth:`close`).
    """

    def __init__(self, stage: str, cfg: MetricsConfig, path: Path | None, lag: ConsumerLag | None = None) -> None:
        self.stage = stage
        self.cfg = cfg
        self.file = SamplesFile(path, cfg.max_bytes) if path is not None else None
        self.lag = lag
        self.latest: dict[str, Any] = {}
        self.lag_by_topic: dict[str, int] = {}
        self._previous: dict[str, Any] = {}
        self._previous_t = 0.0
        self._last_written = -math.inf
        self._pending = False
        self._version: Any = None
        self._version_since = 0.0
        self._lock = threading.Lock()
        self._server: Any = None

    def chain(self, first: StatusCallback) -> StatusCallback:
        """A callback that calls ``first`` (e.g. the status file), then records."""

        def both(status: dict[str, Any]) -> None:
            first(status)
            self(status)

        return both

    def __call__(self, status: dict[str, Any], now: float | None = None) -> None:
        """Record ``status`` as of ``now`` (default: the wall clock)."""
        sample = self._sample(status, time.time() if now is None else now)
        with self._lock:
            self.latest = sample
            self._pending = True
        if self.file is not None and time.monotonic() - self._last_written >= self.cfg.interval_s:
            self._write()

    def _sample(self, status: dict[str, Any], now: float) -> dict[str, Any]:
        sample: dict[str, Any] = {"t": round(now, 3), "stage": self.stage}
        for key, value in status.items():
            number = _number(value)
            if number is not None:
                sample[key] = number
        dt = now - self._previous_t if self._previous_t else 0.0
        for counter, rate in RATES.items():
            if rate in sample or counter not in sample:
                continue
            before = self._previous.get(counter)
            if dt > 0 and before is not None:
                sample[rate] = max(0.0, (sample[counter] - before) / dt)
        for name, (num, den) in RECENT_RATIOS.items():
            if num in sample and den in sample:
                d_den = sample[den] - self._previous.get(den, 0)
                if d_den > 0:
                    sample[name] = (sample[num] - self._previous.get(num, 0)) / d_den
        version = status.get("snapshot_version")
        if version is not None:
            if version != self._version:
                self._version, self._version_since = version, now
            sample["snapshot_age_s"] = now - self._version_since
        if self.lag is not None:
            self.lag_by_topic = self.lag.by_topic()
            if self.lag_by_topic:
                sample["consumer_lag"] = sum(self.lag_by_topic.values())
        self._previous, self._previous_t = sample, now
        return sample

    def _write(self) -> None:
        assert self.file is not None
        with self._lock:
            sample, self._pending = self.latest, False
        if sample:
            self.file.append(sample)
            self._last_written = time.monotonic()

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: any free port) from a daemon thread; returns the port."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        server, _ = start_http_server(port, addr=host, registry=registry)
        self._server = server
        bound = int(server.server_address[1])
        log.info("%s: Prometheus metrics on http://%s:%d/metrics", self.stage, host, bound)
        return bound

    def close(self) -> None:
        """Write the newest sample if it is not on disk yet; stop serving; stop watching consumers."""
        if self.file is not None and self._pending:
            self._write()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.lag is not None:
            bus.watch_consumers(None)


#: Sample key → (metric name, kind, help). Counters are cumulative totals of the stage.
PROMETHEUS: dict[str, tuple[str, str, str]] = {
    "events_in": ("livectr_events_consumed", "counter", "Impression and click records read by the join"),
    "events_published": ("livectr_events_published", "counter", "Events published by the producer"),
    "examples_out": ("livectr_examples_emitted", "counter", "Labelled examples the join emitted"),
    "examples_trained": ("livectr_examples_trained", "counter", "Examples the learner trained on"),
    "texts_encoded": ("livectr_texts_encoded", "counter", "Item texts the teacher encoded"),
    "dead_letters": ("livectr_dead_letters", "counter", "Records sent to the dead-letter topic"),
    "semantic_lookups": ("livectr_semantic_cache_lookups", "counter", "Item lookups in the semantic cache"),
    "semantic_misses": ("livectr_semantic_cache_misses", "counter", "Item lookups the semantic cache missed"),
    "misses_received": ("livectr_semantic_miss_reports", "counter", "Missed ids reported to the refresher"),
    "snapshots": ("livectr_snapshots_published", "counter", "Snapshots this learner published"),
    "events_rate": ("livectr_events_per_second", "gauge", "Events per second over the last status interval"),
    "examples_rate": ("livectr_examples_per_second", "gauge", "Examples per second over the last status interval"),
    "texts_rate": ("livectr_texts_per_second", "gauge", "Texts encoded per second over the last status interval"),
    "serving_auc": ("livectr_serving_auc", "gauge", "AUC of the scores served at impression time (cumulative)"),
    "serving_auc_recent": ("livectr_serving_auc_recent", "gauge", "Serving AUC over the latest impressions"),
    "serving_logloss": ("livectr_serving_logloss", "gauge", "Log loss of the served scores (cumulative)"),
    "serving_logloss_recent": ("livectr_serving_logloss_recent", "gauge", "Serving log loss, latest impressions"),
    "freshness_p50_s": ("livectr_freshness_p50_seconds", "gauge", "Label decided to trained, median (recent)"),
    "freshness_p99_s": ("livectr_freshness_p99_seconds", "gauge", "Label decided to trained, p99 (recent)"),
    "event_time": ("livectr_event_time_seconds", "gauge", "Newest event time trained on (unix seconds)"),
    "snapshot_version": ("livectr_snapshot_version", "gauge", "Version of the newest snapshot"),
    "snapshot_age_s": ("livectr_snapshot_age_seconds", "gauge", "Seconds since the newest snapshot appeared"),
    "semantic_miss_rate": ("livectr_semantic_cache_miss_rate", "gauge", "Semantic cache miss rate (cumulative)"),
    "semantic_miss_rate_recent": ("livectr_semantic_cache_miss_rate_recent", "gauge", "Miss rate, last interval"),
    "watermark_lag_s": ("livectr_watermark_lag_seconds", "gauge", "Join: event time behind the newest record"),
    "queue_depth": ("livectr_teacher_queue_depth", "gauge", "Item texts waiting for the teacher"),
    "buffered": ("livectr_examples_buffered", "gauge", "Examples waiting in the learner"),
    "pending": ("livectr_impressions_pending", "gauge", "Impressions waiting for their label in the join"),
}


class _Collector:
    """Builds the metric families from the recorder's latest sample at each scrape."""

    def __init__(self, recorder: StageRecorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        rec = self.recorder
        with rec._lock:
            sample = dict(rec.latest)
            lag = dict(rec.lag_by_topic)
        up = GaugeMetricFamily("livectr_stage_up", "1 while the stage runs", labels=["stage"])
        up.add_metric([rec.stage], 1.0)
        yield up
        for key, (name, kind, help_text) in PROMETHEUS.items():
            value = sample.get(key)
            if value is None:
                continue
            family: Metric
            if kind == "counter":
                family = CounterMetricFamily(name, help_text, labels=["stage"])
            else:
                family = GaugeMetricFamily(name, help_text, labels=["stage"])
            family.add_metric([rec.stage], float(value))
            yield family
        lag_family = GaugeMetricFamily(
            "livectr_consumer_lag",
            "Records between the stage's position and the end, per topic",
            labels=["stage", "topic"],
        )
        for topic, value in sorted(lag.items()):
            lag_family.add_metric([rec.stage, topic], float(value))
        yield lag_family


def open_recorder(cfg: Config, stage: str, port: int | None = None) -> StageRecorder:
    """The recorder of one stage process: samples under ``cfg.data_dir`` (if ``cfg.metrics.record``),
    consumer lag from every consumer created after this call, and ``/metrics`` on ``port``
    (default ``cfg.metrics.port``; 0 = none). A port already in use raises ``OSError``."""
    mc = cfg.metrics
    lag = ConsumerLag(stale_s=max(10.0, 5 * mc.interval_s))
    bus.watch_consumers(lag.on_stats, interval_ms=max(100, int(mc.interval_s * 1000)))
    recorder = StageRecorder(stage, mc, samples_path(cfg.data_dir, stage) if mc.record else None, lag)
    port = mc.port if port is None else port
    if port:
        try:
            recorder.serve(mc.host, port)
        except BaseException:
            recorder.close()
            raise
    return recorder


def assign_ports(plan: dict[str, list[str]], base: int, stages: Iterable[str] = ("join", "learn", "refresh")) -> None:
    """``livectr run --metrics-port BASE``: give each long-running stage in ``plan`` its own port.

    Join workers first, then the learner, then the refresher: BASE, BASE+1, … (with one join
    worker: join BASE, learn BASE+1, refresh BASE+2). Nothing changes when ``base`` is 0.
    """
    if not base:
        return
    order = [name for kind in stages for name in plan if plan[name] and plan[name][0] == kind]
    for offset, name in enumerate(order):
        plan[name].extend(["--metrics-port", str(base + offset)])
