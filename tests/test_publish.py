"""Publisher against the real (embedded tansu) broker: exact counts, end markers, dead letters."""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import Click, DecodeError, EndOfStream, Impression, Item, decode_event
from livectr.simulators.publish import partition_for, publish
from livectr.simulators.sources import open_source

pytestmark = pytest.mark.integration


def consume_until_markers(
    cfg: Config, topics: list[str], producers: int = 1, timeout_s: float = 30.0
) -> tuple[dict[tuple[str, int], list], dict[tuple[str, int], list[EndOfStream]]]:
    """All data records (decoded, or raw bytes when undecodable) per (topic, partition) before the markers."""
    cons = bus.consumer(cfg.kafka)
    tps = bus.assign_all(cons, cfg.kafka, topics)
    data: dict[tuple[str, int], list] = defaultdict(list)
    markers: dict[tuple[str, int], list[EndOfStream]] = defaultdict(list)
    deadline = time.monotonic() + timeout_s
    try:
        while any(len(markers[(tp.topic, tp.partition)]) < producers for tp in tps):
            assert time.monotonic() < deadline, "end markers not seen in time"
            for msg in cons.consume(10_000, timeout=0.2):
                assert msg.error() is None, msg.error()
                where = (msg.topic(), msg.partition())
                try:
                    event = decode_event(msg.value())
                except DecodeError:
                    data[where].append(msg.value())
                    continue
                if isinstance(event, EndOfStream):
                    markers[where].append(event)
                else:
                    data[where].append(event)
    finally:
        cons.close()
    return data, markers


def test_publish_synthetic_exact_counts_markers_and_co_partitioning(kafka_config: Config) -> None:
    cfg = kafka_config
    cfg.simulator.events = 4_000
    cfg.simulator.users, cfg.simulator.items = 200, 100
    cfg.simulator.malformed_rate = 0.01
    topics = bus.ensure_topics(cfg)
    source = open_source(cfg)
    statuses: list[dict] = []
    summary = publish(cfg, source.events, producer_id="sim-1", on_status=statuses.append)
    truth = source.truth
    assert truth is not None
    assert summary["events_published"] == 4_000
    assert summary["impressions"] == truth.impressions
    assert summary["clicks"] == truth.clicks + truth.duplicate_clicks
    assert summary["items"] == truth.items
    assert summary["malformed"] == truth.malformed > 0
    assert summary["dead_letters"] == 0 and not summary["stopped"]
    assert summary["first_publish_wall"] <= summary["last_publish_wall"]
    assert statuses and statuses[-1]["events_published"] == 4_000

    names = [topics.impressions, topics.clicks, topics.items]
    data, markers = consume_until_markers(cfg, names)
    for (topic, partition), ms in markers.items():
        assert len(ms) == 1 and ms[0].producer == "sim-1" and ms[0].partition == partition
        assert ms[0].count == len(data[(topic, partition)])
    events = [e for records in data.values() for e in records]
    kinds = Counter(type(e) for e in events)
    assert kinds[Impression] == truth.impressions
    assert kinds[Click] == truth.clicks + truth.duplicate_clicks
    assert kinds[Item] == truth.items
    assert kinds[bytes] == truth.malformed
    # Clicks share their impression's partition (co-partitioning by impression id).
    where_imp = {
        e.impression_id: p
        for (t, p), recs in data.items()
        if t == topics.impressions
        for e in recs
        if isinstance(e, Impression)
    }
    for (t, p), recs in data.items():
        if t == topics.clicks:
            assert all(where_imp[c.impression_id] == p for c in recs if isinstance(c, Click))
    # Per partition, records keep the stream's event-time order.
    for recs in data.values():
        ts = [e.ts for e in recs if not isinstance(e, bytes)]
        assert ts == sorted(ts)


def test_publish_matches_librdkafka_default_partitioner(kafka_config: Config) -> None:
    """Our explicit partition equals what librdkafka picks for the same key, so foreign producers agree."""
    cfg = kafka_config
    topics = bus.ensure_topics(cfg)
    prod = bus.producer(cfg.kafka, partitioner="consistent")
    seen: dict[bytes, int] = {}
    keys = [f"k{i}".encode() for i in range(40)]
    for key in keys:
        prod.produce(
            topics.impressions, b"x", key, on_delivery=lambda err, msg: seen.__setitem__(msg.key(), msg.partition())
        )
    prod.flush(10)
    assert seen == {k: partition_for(k, cfg.kafka.partitions) for k in keys}
    assert partition_for(b"abc", 7) == zlib.crc32(b"abc") % 7


def test_replay_bad_rows_go_to_dead_letters(kafka_config: Config, tmp_path: Path) -> None:
    cfg = kafka_config
    topics = bus.ensure_topics(cfg)
    log = tmp_path / "log.csv"
    log.write_text(
        "ts,type,impression_id,user_id,item_id\n"
        "1700000001,impression,a,u1,i1\n"
        "1700000002,click,a,,\n"
        "oops,impression,b,u1,i1\n"
    )
    summary = publish(cfg, open_source(cfg, log=log).events, producer_id="replay")
    assert (summary["impressions"], summary["clicks"], summary["dead_letters"]) == (1, 1, 1)
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [topics.dead_letters])
    msgs = []
    deadline = time.monotonic() + 15
    while not msgs and time.monotonic() < deadline:
        msgs = [m for m in cons.consume(10, timeout=0.2) if m.error() is None]
    cons.close()
    assert len(msgs) == 1
    assert msgs[0].value() == b"oops,impression,b,u1,i1"
    headers = dict(msgs[0].headers())
    assert b"not a number" in headers["livectr.reason"] and headers["livectr.stage"] == b"publish"


def test_stop_still_writes_consistent_end_markers(kafka_config: Config) -> None:
    cfg = kafka_config
    cfg.simulator.events = 50_000
    cfg.simulator.users, cfg.simulator.items = 100, 50
    topics = bus.ensure_topics(cfg)
    stop = threading.Event()
    stop.set()
    summary = publish(cfg, open_source(cfg).events, producer_id="stopped", stop=stop, speed=0.0)
    assert summary["stopped"] and 0 < summary["events_published"] < 50_000
    data, markers = consume_until_markers(cfg, [topics.impressions, topics.clicks, topics.items])
    total = sum(m[0].count for m in markers.values())
    assert total == sum(len(v) for v in data.values()) == summary["events_published"] + summary["items"]


def test_paced_publish_follows_event_time(kafka_config: Config, tmp_path: Path) -> None:
    cfg = kafka_config
    bus.ensure_topics(cfg)
    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(
            f'{{"ts": {1700000000 + i * 0.5}, "type": "impression", "impression_id": "m{i}", "user_id": "u", "item_id": "i"}}'
            for i in range(5)
        )
    )
    start = time.monotonic()
    summary = publish(cfg, open_source(cfg, log=log).events, producer_id="paced", speed=4.0)
    spent = time.monotonic() - start
    assert summary["impressions"] == 5
    assert spent >= 2.0 / 4.0 - 0.05  # 2 s of event time at 4× real time
