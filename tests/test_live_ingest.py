"""Issue 13: stages started by hand (unbounded) and fed live by a third-party producer must learn.

The join and the learner run as ``livectr join --forever`` / ``livectr learn --forever`` do
(``bounded=False``), are up before the first event, and a kafka-python producer (no end markers,
its own partitioner) publishes JSON events with a planted CTR signal at about 1000× real time,
under the default policy. (Under ``wait`` the stream's first window reaches such a learner as
clicks alone; see the README's known limits.)
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import numpy as np
import pytest

from livectr.core import bus
from livectr.core.config import Config
from livectr.learner.loop import run_learner
from livectr.streams.worker import run_join_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

kafka = pytest.importorskip("kafka")

T0 = 1_700_000_000.0


def planted_stream(impressions: int, span_s: float, seed: int = 13) -> list[tuple[str, dict[str, Any]]]:
    """(topic kind, event) in event-time order: user, item and device effects, clicks 2–60 s later."""
    rng = np.random.default_rng(seed)
    users, items = 400, 150
    u_eff, i_eff = rng.normal(0, 1.0, users), rng.normal(0, 1.0, items)
    dev = {"mobile": 0.4, "desktop": -0.4, "tablet": 0.0}
    ts = np.sort(rng.uniform(0, span_s, impressions)) + T0
    u, it = rng.integers(0, users, impressions), rng.integers(0, items, impressions)
    devices = rng.choice(list(dev), impressions)
    timed: list[tuple[float, int, str, dict[str, Any]]] = []
    for k in range(impressions):
        iid = f"s{seed}-{k}"
        p = 1 / (1 + math.exp(-(-1.6 + u_eff[u[k]] + i_eff[it[k]] + dev[devices[k]])))
        timed.append(
            (
                ts[k],
                0,
                "impressions",
                {
                    "type": "impression",
                    "impression_id": iid,
                    "ts": float(ts[k]),
                    "user_id": f"u{u[k]}",
                    "item_id": f"i{it[k]}",
                    "context": {"device": str(devices[k])},
                },
            )
        )
        if rng.random() < p:
            cts = float(ts[k] + rng.uniform(2, 60))
            timed.append((cts, 1, "clicks", {"type": "click", "impression_id": iid, "ts": cts}))
    timed.sort(key=lambda e: (e[0], e[1]))
    return [(kind, event) for _, _, kind, event in timed]


def publish_live(cfg: Config, events: list[tuple[str, dict[str, Any]]], wall_s: float) -> None:
    """kafka-python, keyed by impression id, paced so that the stream takes ``wall_s`` seconds."""
    prod = kafka.KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, linger_ms=5)
    first, last = events[0][1]["ts"], events[-1][1]["ts"]
    start = time.monotonic()
    for kind, event in events:
        delay = start + (event["ts"] - first) / (last - first) * wall_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        prod.send(cfg.kafka.topic(kind), key=event["impression_id"].encode(), value=json.dumps(event).encode())
    prod.flush()
    prod.close()


def test_live_stream_from_an_outside_producer_is_learned(kafka_config: Config) -> None:
    cfg = kafka_config
    cfg.join.policy = Config().join.policy  # the default, as a user starting the stages gets it
    cfg.semantic.enabled = False
    cfg.join.group_id = f"join-{cfg.kafka.topic_prefix}"
    cfg.join.commit_interval_s = 0.5
    cfg.join.score_sample = 1.0
    cfg.learner.device = "cpu"
    cfg.learner.context_buckets = 1 << 12
    cfg.learner.align_idle_s = 1.0  # release the last examples soon after the producer stops
    bus.ensure_topics(cfg)
    events = planted_stream(impressions=24_000, span_s=4_800.0)  # 80 min of event time, W = 10 min

    stop, stop_learner = threading.Event(), threading.Event()
    join_status: dict[str, Any] = {}
    learn_status: dict[str, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    threads = [
        threading.Thread(
            target=lambda: results.update(
                join=run_join_worker(cfg, on_status=join_status.update, stop=stop, bounded=False)
            ),
            daemon=True,
        ),
        threading.Thread(
            target=lambda: results.update(
                learn=run_learner(cfg, on_status=learn_status.update, stop=stop_learner, bounded=False)
            ),
            daemon=True,
        ),
    ]
    for t in threads:
        t.start()
    try:
        # Started by hand, the stages are up before the producer: wait for the join's group join.
        deadline = time.monotonic() + 30
        while not join_status.get("partitions") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert join_status.get("partitions"), "the join worker got no partitions"
        publish_live(cfg, events, wall_s=5.0)
        # Unbounded: no end markers. Done when the join has read every event and the learner has
        # caught up with every example the join wrote (the join goes on writing the real
        # negatives of windows that close as the wall clock runs on, a few a second).
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            time.sleep(0.5)
            # Every example the join wrote is trained (or, under defer, a real negative left out).
            handled = learn_status.get("examples_trained", -1) + learn_status.get("real_negatives_left_out", 0)
            if join_status.get("events_in", 0) >= len(events) and handled >= join_status.get("examples_out", 1 << 62):
                break
        # The join may still emit after that (the watermark runs on with the wall clock once the
        # sources are caught up: clicks after the last impression leave as it passes them), so it
        # stops first and the learner gets what it wrote until then.
        stop.set()
        threads[0].join(60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            handled = learn_status.get("examples_trained", -1) + learn_status.get("real_negatives_left_out", 0)
            if handled == results.get("join", {}).get("examples_out"):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        stop_learner.set()
        for t in threads:
            t.join(60)
    join, learn = results["join"], results["learn"]
    assert join["orphans"] == 0 and join["dead_letters"] == 0
    assert learn["examples_trained"] + learn["real_negatives_left_out"] == join["examples_out"] > 20_000

    impressions = sum(kind == "impressions" for kind, _ in events)
    rate = sum(kind == "clicks" for kind, _ in events) / impressions
    base_rate_logloss = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    print(
        f"serving AUC {learn['serving_auc']:.4f}, log loss {learn['serving_logloss']:.4f} "
        f"(base rate {base_rate_logloss:.4f}) over {learn['serving_auc_impressions']:,} impressions"
    )
    # Every impression whose window the stream has passed is scored once (the last ~W stays open).
    assert 0.8 * impressions < learn["serving_auc_impressions"] <= impressions
    assert learn["serving_auc"] > 0.66
    assert learn["serving_logloss"] < base_rate_logloss - 0.03
