"""Which Kafka client for the hot path? Consume + decode the same topic with each, in one run.

Prints messages/s for confluent-kafka, aiokafka and kafka-python consuming the same N
impression records (and decoding them with livectr's decoder), plus produce rates for
confluent-kafka and kafka-python, and each figure's ratio to confluent-kafka's.

    python bench/clients.py [--messages 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from livectr.core import bus
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.core.events import Impression, decode_event, encode_event


def _records(n: int) -> list[bytes]:
    return [
        encode_event(
            Impression(
                f"imp{i}", 1_700_000_000.0 + i, f"u{i % 5000}", f"i{i % 2000}", {"device": "mobile", "hour": i % 24}
            )
        )
        for i in range(n)
    ]


def produce_confluent(cfg: Config, topic: str, records: list[bytes]) -> float:
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    start = time.perf_counter()
    for i, rec in enumerate(records):
        bus.produce(prod, topic, rec, key=str(i).encode(), on_delivery=tracker.callback)
        if i % 10_000 == 0:
            prod.poll(0)
    bus.flush_or_raise(prod, tracker)
    return len(records) / (time.perf_counter() - start)


def produce_kafka_python(cfg: Config, topic: str, records: list[bytes]) -> float:
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, linger_ms=5, batch_size=1 << 20)
    start = time.perf_counter()
    for i, rec in enumerate(records):
        prod.send(topic, rec, key=str(i).encode())
    prod.flush()
    rate = len(records) / (time.perf_counter() - start)
    prod.close()
    return rate


def consume_confluent(cfg: Config, topic: str, n: int) -> float:
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [topic])
    seen = 0
    start = time.perf_counter()
    while seen < n:
        for msg in cons.consume(10_000, 1.0):
            if msg.error() is None:
                decode_event(msg.value())
                seen += 1
    rate = n / (time.perf_counter() - start)
    cons.close()
    return rate


def consume_kafka_python(cfg: Config, topic: str, n: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    cons = KafkaConsumer(
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        enable_auto_commit=False,
        max_poll_records=10_000,
        fetch_max_bytes=64 << 20,
    )
    parts = [TopicPartition(topic, p) for p in range(bus.partition_count(cfg.kafka, topic))]
    cons.assign(parts)
    cons.seek_to_beginning(*parts)
    seen = 0
    start = time.perf_counter()
    while seen < n:
        for records in cons.poll(timeout_ms=1000).values():
            for rec in records:
                decode_event(rec.value)
                seen += 1
    rate = n / (time.perf_counter() - start)
    cons.close()
    return rate


def consume_aiokafka(cfg: Config, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> float:
        cons = AIOKafkaConsumer(
            bootstrap_servers=cfg.kafka.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=16 << 20,
        )
        await cons.start()
        parts = [TopicPartition(topic, p) for p in range(bus.partition_count(cfg.kafka, topic))]
        cons.assign(parts)
        await cons.seek_to_beginning(*parts)
        seen = 0
        start = time.perf_counter()
        while seen < n:
            batches = await cons.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                for rec in records:
                    decode_event(rec.value)
                    seen += 1
        rate = n / (time.perf_counter() - start)
        await cons.stop()
        return rate

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    args = parser.parse_args()
    records = _records(args.messages)
    with EmbeddedBroker() as broker:
        cfg = Config()
        cfg.kafka.bootstrap_servers = broker.bootstrap_servers
        cfg.kafka.topic_prefix = "bench-clients."
        topics = bus.ensure_topics(cfg)
        rates = {"produce confluent-kafka": produce_confluent(cfg, topics.impressions, records)}
        rates["produce kafka-python"] = produce_kafka_python(cfg, topics.items, records[: args.messages // 4])
        rates["consume+decode confluent-kafka"] = consume_confluent(cfg, topics.impressions, args.messages)
        rates["consume+decode aiokafka"] = consume_aiokafka(cfg, topics.impressions, args.messages)
        rates["consume+decode kafka-python"] = consume_kafka_python(cfg, topics.impressions, args.messages)
    print(f"{'client':<34} {'msg/s':>12} {'× confluent':>12}")
    for name, rate in rates.items():
        base = (
            rates["produce confluent-kafka"] if name.startswith("produce") else rates["consume+decode confluent-kafka"]
        )
        print(f"{name:<34} {rate:>12,.0f} {rate / base:>12.2f}")


if __name__ == "__main__":
    main()
