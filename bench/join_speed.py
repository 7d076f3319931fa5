"""How fast is the join next to the client's own ceiling? One short run on an embedded broker.

Publishes N impressions (plus ≈``ctr`` clicks, end markers) to 2 partitions, then measures on
the same topics:

* the ceiling: a bare confluent-kafka consumer that only ``consume()``s and ``decode_event``s;
* the join worker (policy ``wait``) with one ExampleBatch record per consume batch and input
  partition, and with one record per example, reading the raw topics (``join.repartition`` off:
  they are co-partitioned here);
* the join worker re-keying its inputs first (``join.repartition``, the default), and its rate
  against the direct one: the price of not depending on the producers' partitioner.

    python bench/join_speed.py [--impressions 300000]

Keep N modest on a shared machine; the ratios are stable from ~100k events on.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from livectr.core import bus
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.core.events import Click, Impression, decode_event, encode_event
from livectr.streams.worker import run_join_worker

T0 = 1_700_000_000.0


def publish(cfg: Config, impressions: int, ctr: float, seed: int = 1) -> int:
    """Impressions at 200/s of event time, clicks 1–120 s later, in event-time order per partition."""
    rng = random.Random(seed)
    topics = cfg.topics
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    timed: list[tuple[float, str, int, bytes]] = []
    for k in range(impressions):
        ts, p = T0 + k / 200.0, k % cfg.kafka.partitions
        iid = f"imp{k}"
        timed.append(
            (
                ts,
                topics.impressions,
                p,
                encode_event(
                    Impression(
                        iid,
                        ts,
                        f"u{rng.randrange(5000)}",
                        f"i{rng.randrange(2000)}",
                        {"device": "mobile", "hour": k % 24},
                    )
                ),
            )
        )
        if rng.random() < ctr:
            cts = ts + rng.uniform(1, 120)
            timed.append((cts, topics.clicks, p, encode_event(Click(iid, cts))))
    timed.sort(key=lambda t: t[0])
    counts: dict[tuple[str, int], int] = {}
    for i, (_, topic, p, value) in enumerate(timed):
        bus.produce(prod, topic, value, partition=p, on_delivery=tracker.callback)
        counts[(topic, p)] = counts.get((topic, p), 0) + 1
        if i % 10_000 == 0:
            prod.poll(0)
    for topic in (topics.impressions, topics.clicks):
        bus.write_end_markers(prod, topic, "bench", {p: counts.get((topic, p), 0) for p in range(cfg.kafka.partitions)})
    bus.flush_or_raise(prod, tracker)
    return len(timed)


def ceiling(cfg: Config, n: int) -> float:
    """consume + decode_event messages/s over both input topics (same client settings as the worker)."""
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [cfg.topics.impressions, cfg.topics.clicks])
    seen, start = 0, 0.0
    while seen < n:
        # A short timeout: consume() waits for a full batch, and the tail must not count as work.
        msgs = cons.consume(10_000, 0.05)
        if msgs and not start:
            start = time.perf_counter()
        for msg in msgs:
            if msg.error() is None:
                decode_event(msg.value())
                seen += 1
    rate = seen / (time.perf_counter() - start)
    cons.close()
    return rate


def join_rate(cfg: Config, batch: bool, run: int, repartition: bool = False) -> dict:
    cfg.join.group_id = f"bench-join-{run}"
    cfg.join.batch_examples = batch
    cfg.join.repartition = repartition
    cfg.data_dir = cfg.data_dir.parent / f"bench-{run}"
    return run_join_worker(cfg, worker_id=f"bench-{run}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=300_000)
    parser.add_argument("--ctr", type=float, default=0.08)
    args = parser.parse_args()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        cfg = Config()
        cfg.kafka.bootstrap_servers = broker.bootstrap_servers
        cfg.kafka.topic_prefix = "bench-join."
        cfg.kafka.partitions = 2
        cfg.data_dir = Path(tmp) / "data"
        bus.ensure_topics(cfg)
        n = publish(cfg, args.impressions, args.ctr) + 4
        base = ceiling(cfg, n)
        print(f"events {n:,}; consume+decode ceiling {base:,.0f} msg/s")
        rates: dict[str, float] = {}
        for run, (batch, repartition) in enumerate(((True, False), (False, False), (True, True))):
            summary = join_rate(cfg, batch, run, repartition)
            rate = summary["events_per_second"]
            label = ("ExampleBatch" if batch else "one record per example") + (", re-keyed" if repartition else "")
            rates[label] = rate
            print(
                f"join ({label}): {rate:,.0f} events/s "
                f"= {rate / base:.2f} × ceiling; examples {summary['examples_out']:,} in "
                f"{summary['example_records_out']:,} records; {summary['elapsed_s']:.1f} s from start "
                "(group join included)"
            )
        print(f"re-keyed / direct (ExampleBatch): {rates['ExampleBatch, re-keyed'] / rates['ExampleBatch']:.2f}")


if __name__ == "__main__":
    main()
