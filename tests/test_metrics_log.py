"""What the stages record as they run: bounded samples files, derived rates, consumer lag from
librdkafka's statistics on the real broker, the Prometheus exposition, the learner's recent figures."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from livectr.core import bus
from livectr.core.config import Config, MetricsConfig
from livectr.core.metrics_log import (
    ConsumerLag,
    SamplesFile,
    StageRecorder,
    assign_ports,
    read_all,
    read_samples,
    samples_path,
)
from livectr.learner.live_metrics import RecentLearnerMetrics, histogram_auc
from livectr.learner.metrics import HistogramAUC, LearnerMetrics


def test_samples_file_stays_bounded_and_keeps_the_whole_span(tmp_path: Path) -> None:
    path = tmp_path / "m" / "s.jsonl"
    f = SamplesFile(path, max_bytes=4096)
    for i in range(2000):
        f.append({"t": float(i), "stage": "s", "x": i})
        assert path.stat().st_size <= 4096 + 100
    samples = read_samples(path)
    ts = [s["t"] for s in samples]
    assert ts[0] == 0.0 and ts[-1] == 1999.0 and ts == sorted(ts)
    assert 20 < len(samples) < 200
    # Older parts are coarser than the newest part (each thinning halves what was there).
    gaps = np.diff(ts)
    assert gaps[: len(gaps) // 4].mean() > gaps[-len(gaps) // 4 :].mean()


def test_read_samples_skips_a_line_being_written(tmp_path: Path) -> None:
    path = samples_path(tmp_path, "join worker/1")
    assert path.name == "join_worker_1.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"t": 1, "stage": "join worker/1"}\n{"t": 2, "stage": "join worker/1"}\n{"t": 3, "sta')
    assert [s["t"] for s in read_samples(path)] == [1, 2]
    assert list(read_all(tmp_path)) == ["join worker/1"]
    assert read_all(tmp_path / "nothing") == {}


def _recorder(tmp_path: Path, **overrides: object) -> StageRecorder:
    cfg = MetricsConfig(interval_s=0.0, **overrides)  # type: ignore[arg-type]
    return StageRecorder("join-0", cfg, samples_path(tmp_path, "join-0"))


def test_recorder_derives_rates_ratios_and_snapshot_age(tmp_path: Path) -> None:
    rec = _recorder(tmp_path)
    rec({"events_in": 0, "examples_out": 0, "semantic_lookups": 0, "semantic_misses": 0, "policy": "wait"}, now=100.0)
    rec(
        {
            "events_in": 500,
            "examples_out": 200,
            "semantic_lookups": 100,
            "semantic_misses": 25,
            "snapshot_version": 3,
            "serving_auc": math.nan,
            "partitions": [0, 1],
        },
        now=102.0,
    )
    rec(
        {"events_in": 800, "examples_out": 200, "semantic_lookups": 300, "semantic_misses": 35, "snapshot_version": 3},
        now=104.0,
    )
    rec.close()
    samples = read_samples(samples_path(tmp_path, "join-0"))
    assert [s["t"] for s in samples] == [100.0, 102.0, 104.0]
    first, second, third = samples
    assert "events_rate" not in first and "policy" not in first  # no rate from one point; text is left out
    assert second["events_rate"] == pytest.approx(250.0) and second["examples_rate"] == pytest.approx(100.0)
    assert second["semantic_miss_rate_recent"] == pytest.approx(0.25)
    assert "serving_auc" not in second and "partitions" not in second  # NaN and lists are not numbers
    assert third["events_rate"] == pytest.approx(150.0) and third["examples_rate"] == 0.0
    assert third["semantic_miss_rate_recent"] == pytest.approx(0.05)
    assert second["snapshot_age_s"] == 0.0 and third["snapshot_age_s"] == pytest.approx(2.0)


def test_recorder_throttles_writes_but_keeps_the_last_sample(tmp_path: Path) -> None:
    rec = StageRecorder("learn", MetricsConfig(interval_s=3600.0), samples_path(tmp_path, "learn"))
    for i in range(10):
        rec({"examples_trained": i})
    assert len(read_samples(samples_path(tmp_path, "learn"))) == 1
    rec.close()
    samples = read_samples(samples_path(tmp_path, "learn"))
    assert [s["examples_trained"] for s in samples] == [0, 9]


def test_recorder_serves_prometheus_text(tmp_path: Path) -> None:
    rec = StageRecorder("learn", MetricsConfig(), None)
    port = rec.serve("127.0.0.1", 0)
    try:
        rec({"examples_trained": 10, "serving_auc": 0.7, "dead_letters": 2, "snapshot_version": 4}, now=1.0)
        rec({"examples_trained": 30, "serving_auc": 0.72, "dead_letters": 2, "snapshot_version": 4}, now=3.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
    finally:
        rec.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["livectr_examples_trained"].type == "counter"
    values = {s.name: s.value for f in families.values() for s in f.samples}
    assert values["livectr_examples_trained_total"] == 30
    assert values["livectr_examples_per_second"] == pytest.approx(10.0)
    assert values["livectr_serving_auc"] == pytest.approx(0.72)
    assert values["livectr_dead_letters_total"] == 2
    assert values["livectr_snapshot_version"] == 4
    assert values["livectr_stage_up"] == 1
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)  # closed with the recorder


def test_assign_ports_gives_each_long_running_stage_its_own() -> None:
    plan = {
        "refresh": ["refresh"],
        "join-0": ["join", "--worker-id", "join-0"],
        "join-1": ["join", "--worker-id", "join-1"],
        "learn": ["learn"],
        "produce": ["produce"],
    }
    assign_ports(plan, 9100)
    ports = {n: a[a.index("--metrics-port") + 1] for n, a in plan.items() if "--metrics-port" in a}
    assert ports == {"join-0": "9100", "join-1": "9101", "learn": "9102", "refresh": "9103"}
    untouched = {"learn": ["learn"]}
    assign_ports(untouched, 0)
    assert untouched == {"learn": ["learn"]}


@pytest.mark.integration
def test_consumer_lag_from_librdkafka_statistics(kafka_config: Config) -> None:
    cfg = kafka_config
    bus.ensure_topics(cfg)
    topic = cfg.topics.examples
    prod = bus.producer(cfg.kafka)
    for i in range(100):  # one batch per record: the broker's high watermark lags by at most the last one
        bus.produce(prod, topic, json.dumps({"i": i}).encode(), partition=0)
        prod.flush(10)
    lag = ConsumerLag()
    bus.watch_consumers(lag.on_stats, interval_ms=100)
    try:
        cons = bus.consumer(cfg.kafka)
    finally:
        bus.watch_consumers(None)
    try:
        cons.assign([TopicPartition(topic, 0, -2)])
        got = 0
        deadline = time.monotonic() + 30
        while got < 40 and time.monotonic() < deadline:
            got += len(cons.consume(40 - got, 0.5))
        assert got == 40
        cons.pause([TopicPartition(topic, 0)])  # polls now only serve callbacks, statistics included
        seen: dict[str, int] = {}
        while time.monotonic() < deadline:
            assert cons.poll(0.2) is None
            seen = lag.by_topic()
            if seen.get(topic, 0) >= 59:
                break
        assert 59 <= seen[topic] <= 60
    finally:
        cons.close()
    lag.stale_s = 0.0
    assert lag.by_topic() == {}  # a client that stopped reporting is forgotten


def test_histogram_auc_matches_the_learner_metric() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random(5000)
    labels = (rng.random(5000) < probs).astype(np.float32)
    h = HistogramAUC()
    h.add(probs, labels)
    assert histogram_auc(h.pos, h.neg) == pytest.approx(h.value())
    assert math.isnan(histogram_auc(h.pos, np.zeros_like(h.neg)))


def test_recent_figures_follow_the_latest_impressions() -> None:
    rng = np.random.default_rng(1)
    m = LearnerMetrics()
    recent = RecentLearnerMetrics(min_impressions=1000, min_examples=1000)
    cold = np.zeros(1000, dtype=bool)
    assert recent.sample(m) == {}  # nothing yet
    for _ in range(5):  # a useless model: random scores
        labels = (rng.random(1000) < 0.3).astype(np.float32)
        m.update_serving(rng.random(1000), labels, cold)
        m.freshness.add(np.full(1000, 10.0))
        recent.sample(m)
    for _ in range(2):  # then a perfect one, fresher
        labels = (rng.random(1000) < 0.3).astype(np.float32)
        m.update_serving(np.where(labels > 0, 0.9, 0.1), labels, cold)
        m.freshness.add(np.full(1000, 1.0))
        out = recent.sample(m)
    assert out["serving_auc_recent"] == pytest.approx(1.0)
    assert out["serving_impressions_recent"] == 1000
    assert m.serving_auc.value() < 0.8  # the cumulative figure still remembers the random model
    assert out["freshness_p50_s"] == pytest.approx(1.0, rel=0.03)
    assert out["serving_logloss_recent"] == pytest.approx(-math.log(0.9), rel=1e-3)
    assert "event_time" not in out

    class Ex:
        def __init__(self, ts: float) -> None:
            self.ts = ts

    recent.released([Ex(5.0), Ex(7.0), Ex(6.0)])  # type: ignore[list-item]
    assert recent.sample(m)["event_time"] == 7.0


def test_metrics_port_from_env_config_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from livectr.cli import build_config, build_parser
    from livectr.core.config import from_dict, from_env, to_dict

    cfg = from_env({"LIVECTR_METRICS__PORT": "9100", "LIVECTR_METRICS__HOST": "0.0.0.0"})
    assert (cfg.metrics.port, cfg.metrics.host) == (9100, "0.0.0.0")
    assert from_dict(to_dict(cfg)).metrics.port == 9100  # what `livectr run` hands its stages
    for command in ("join", "learn", "refresh", "run"):
        args = build_parser().parse_args([command, "--metrics-port", "9200"])
        assert build_config(args).metrics.port == 9200
    monkeypatch.delenv("LIVECTR_METRICS__PORT", raising=False)
    assert build_config(build_parser().parse_args(["learn"])).metrics.port == 0  # off unless asked
    monkeypatch.setenv("LIVECTR_METRICS__PORT", "9300")
    assert build_config(build_parser().parse_args(["learn"])).metrics.port == 9300
