"""Labels do not depend on how producers partition (issue 14).

Impressions come from kafka-python's default producer (murmur2 of the key, as Java clients),
clicks from confluent-kafka's default producer (librdkafka's CRC-32), both keyed by impression
id: an impression and its clicks land on different partition numbers. The join re-keys both
into its own co-partitioned topics, so every label is exact and no click is dead-lettered as
"click without impression" beyond the ones that really have none.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest
from confluent_kafka import Producer
from test_join_worker import configure, is_seal, make_stream, read_examples, read_topic, run_bounded, seal

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import decode_event
from livectr.streams.join import REASON_ORPHAN

pytestmark = pytest.mark.integration

kafka = pytest.importorskip("kafka")

PARTITIONS = 4


def publish_two_ways(cfg: Config, records: list[tuple[str, int, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """Impressions by kafka-python, clicks by confluent-kafka, keyed, default partitioners;
    then end markers with each partition's count. Returns each impression's and click's partition."""
    topics = cfg.topics
    murmur = kafka.KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, linger_ms=5)
    crc = Producer({"bootstrap.servers": cfg.kafka.bootstrap_servers, "linger.ms": 5})
    futures: list[tuple[str, Any]] = []
    click_parts: dict[str, int] = {}
    failed: list[Any] = []

    def on_click(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(err)
        else:
            click_parts[msg.key().decode()] = msg.partition()

    for topic, _, value in records:  # the partitions make_stream chose are ignored: the producers decide
        iid = decode_event(value).impression_id
        if topic == topics.impressions:
            futures.append((iid, murmur.send(topic, key=iid.encode(), value=value)))
        else:
            crc.produce(topic, value, key=iid.encode(), on_delivery=on_click)
            crc.poll(0)
    murmur.flush()
    assert crc.flush(30) == 0 and not failed
    imp_parts = {iid: fut.get(timeout=30).partition for iid, fut in futures}
    murmur.close()
    marker_prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    for topic, parts in ((topics.impressions, imp_parts), (topics.clicks, click_parts)):
        counts = Counter(parts.values())
        bus.write_end_markers(
            marker_prod, topic, "test", {p: counts[p] for p in range(PARTITIONS)}, on_delivery=tracker.callback
        )
    bus.flush_or_raise(marker_prod, tracker)
    return imp_parts, click_parts


def test_producers_that_hash_differently_lose_no_label(kafka_config: Config) -> None:
    kafka_config.kafka.partitions = PARTITIONS
    cfg = configure(kafka_config, repartition=True)
    stream = make_stream(cfg, 0, 400, partitions=PARTITIONS)
    imp_parts, click_parts = publish_two_ways(cfg, stream.records)
    apart = [iid for iid, p in click_parts.items() if iid in imp_parts and imp_parts[iid] != p]
    assert len(apart) > 20, "the two partitioners agreed: the test proves nothing"

    summary = run_bounded(cfg, limit_s=90, worker_id="w-mixed")
    examples, _, _ = read_examples(cfg, ends=PARTITIONS * PARTITIONS, timeout_s=30)
    assert Counter(e.impression_id for e in examples) == Counter({iid: 1 for iid in stream.truth})
    assert {e.impression_id: e.label for e in examples} == stream.truth

    expected_dead = stream.late_clicks + stream.orphans
    seals = seal(cfg, cfg.topics.dead_letters)
    dead = [
        m
        for m in read_topic(cfg, cfg.topics.dead_letters, lambda r: len(r) >= expected_dead + seals, timeout_s=30)
        if not is_seal(m)
    ]
    reasons = Counter(dict(m.headers())["livectr.reason"].decode() for m in dead)
    assert reasons[REASON_ORPHAN] == stream.orphans  # only the ghost clicks, which have no impression
    assert all(
        msgspec.json.decode(m.value())["impression_id"].startswith("ghost")
        for m in dead
        if dict(m.headers())["livectr.reason"] == REASON_ORPHAN.encode()
    )
    assert len(dead) == expected_dead
    assert summary["orphans"] == stream.orphans and summary["input_copies"] == 0
