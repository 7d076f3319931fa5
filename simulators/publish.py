"""Publish an event stream to the impressions / clicks / items topics.

Why these choices:

* Impressions and clicks are keyed by ``impression_id`` and items by ``item_id``; the partition
  is computed here as ``crc32(key) % partitions`` — the same function as librdkafka's default
  (``consistent``) partitioner — so an impression and its clicks always land on the same
  partition number (the join relies on that co-partitioning) and the per-partition record
  counts for the end markers are known without a delivery callback per record.
* Delivery reports are requested for failures only (``delivery.report.only.error``): a
  per-record Python callback would cost more than producing. ``flush_or_raise`` still proves
  every record was acknowledged (nothing left in the queue, no failure reported) before the end
  markers are written, and again after them.
* Bounded runs end with one :class:`~livectr.core.events.EndOfStream` per partition of each topic,
  carrying how many records this producer wrote there, so consumers can tell they have read
  everything without trusting watermarks. Markers are also written when ``stop`` is set.
* Bad records from a replay go to the dead-letter topic with their reason; malformed synthetic
  records go raw to the topic they claim, so the join's validation has to catch them.
"""

from __future__ import annotations

import operator
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Producer
from tqdm import tqdm

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import Click, Impression, Item, encode_event
from livectr.simulators.records import BadRecord, SourceRecord

#: Records between two housekeeping steps (poll, stop check, status, progress bar) at full speed.
HOUSEKEEPING_EVERY = 1024
STATUS_INTERVAL_S = 1.0


def partition_for(key: bytes, partitions: int) -> int:
    """Partition of a keyed record: librdkafka's ``consistent`` partitioner (CRC-32 of the key)."""
    return zlib.crc32(key) % partitions


def _send(prod: Producer, topic: str, value: bytes, key: bytes, partition: int) -> None:
    """Produce, waiting for room when the local queue is full (inlined ``bus.produce`` without kwargs)."""
    while True:
        try:
            prod.produce(topic, value, key, partition)
            return
        except BufferError:
            prod.poll(0.05)


class _Pacer:
    """Holds event time to ``speed`` × wall time (speed 0: never waits)."""

    def __init__(self, speed: float, prod: Producer, stop: threading.Event) -> None:
        self.speed, self.prod, self.stop = speed, prod, stop
        self.t0: float | None = None
        self.w0 = 0.0

    def wait(self, ts: float) -> None:
        if self.t0 is None:
            self.t0, self.w0 = ts, time.monotonic()
            return
        target = self.w0 + (ts - self.t0) / self.speed
        while not self.stop.is_set():
            delay = target - time.monotonic()
            if delay <= 0:
                return
            self.prod.poll(min(delay, 0.1))  # serves delivery reports while waiting


def publish(
    cfg: Config,
    events: Iterable[SourceRecord],
    *,
    producer_id: str,
    speed: float = 0.0,
    progress: bool = False,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
    end_markers: bool = True,
) -> dict[str, Any]:
    """Send ``events`` (in order) and, unless ``end_markers`` is False, end markers; return a summary.

    ``end_markers=False`` is for a prelude that is not the stream itself (the catalogue
    published ahead of traffic, see :func:`livectr.simulators.sources.leading_items`).

    The topics must exist (``bus.ensure_topics``). Raises ``bus.DeliveryFailed`` if the broker
    did not acknowledge every record.
    """
    if speed < 0:
        raise ValueError("speed must be >= 0")
    stop = stop or threading.Event()
    topics = cfg.topics
    names = {"impressions": topics.impressions, "clicks": topics.clicks, "items": topics.items}
    parts = {logical: bus.partition_count(cfg.kafka, topic) for logical, topic in names.items()}
    missing = [names[k] for k, n in parts.items() if n == 0]
    if missing:
        raise RuntimeError(f"topics do not exist: {missing} (call bus.ensure_topics first)")
    counts = {logical: [0] * n for logical, n in parts.items()}
    tracker = bus.DeliveryTracker()
    prod = bus.producer(cfg.kafka, on_delivery=tracker.callback, **{"delivery.report.only.error": True})
    sink = bus.DeadLetterSink(prod, topics.dead_letters, stage="publish")
    pacer = _Pacer(speed, prod, stop) if speed > 0 else None
    bar = (
        tqdm(total=operator.length_hint(events) or None, unit="ev", file=sys.stderr, mininterval=0.5, desc="publish")
        if progress
        else None
    )

    imp_topic, clk_topic, item_topic = names["impressions"], names["clicks"], names["items"]
    imp_counts, clk_counts, item_counts = counts["impressions"], counts["clicks"], counts["items"]
    n_imp, n_clk, n_item = parts["impressions"], parts["clicks"], parts["items"]
    crc32, encode, send = zlib.crc32, encode_event, _send
    impressions = clicks = items = malformed = records = 0
    started = time.time()
    first_wall: float | None = None
    last_status = time.monotonic()
    stopped = False
    # Paced runs are slow: then housekeeping (status, stop check) happens after every record.
    every = 1 if pacer is not None else HOUSEKEEPING_EVERY

    def status() -> dict[str, Any]:
        elapsed = max(time.time() - (first_wall or started), 1e-9)
        return {
            "events_published": impressions + clicks,
            "impressions": impressions,
            "clicks": clicks,
            "items": items,
            "malformed": malformed,
            "dead_letters": sink.count,
            "events_per_second": (impressions + clicks) / elapsed,
        }

    for rec in events:
        if first_wall is None:
            first_wall = time.time()
        if pacer is not None and not isinstance(rec, BadRecord):
            pacer.wait(rec.ts)
        # Exact-type tests (they also narrow ``rec`` for the type checker), most frequent first.
        if type(rec) is Impression:
            key = rec.impression_id.encode()
            p = crc32(key) % n_imp
            send(prod, imp_topic, encode(rec), key, p)
            imp_counts[p] += 1
            impressions += 1
        elif type(rec) is Click:
            key = rec.impression_id.encode()
            p = crc32(key) % n_clk
            send(prod, clk_topic, encode(rec), key, p)
            clk_counts[p] += 1
            clicks += 1
        elif type(rec) is Item:
            key = rec.item_id.encode()
            p = crc32(key) % n_item
            send(prod, item_topic, encode(rec), key, p)
            item_counts[p] += 1
            items += 1
        elif type(rec) is BadRecord:
            if rec.topic is None:
                sink.send(rec.raw, rec.reason, key=rec.key)
            else:
                key = rec.key or b""
                p = crc32(key) % parts[rec.topic]
                send(prod, names[rec.topic], rec.raw, key, p)
                counts[rec.topic][p] += 1
                malformed += 1
        else:
            raise TypeError(f"not an event: {rec!r}")
        records += 1
        if records % every == 0:
            prod.poll(0)
            if bar is not None:
                bar.update(every)
            now = time.monotonic()
            if on_status is not None and now - last_status >= STATUS_INTERVAL_S:
                last_status = now
                on_status(status())
            if stop.is_set():
                stopped = True
                break
    last_wall = time.time() if first_wall is not None else None

    bus.flush_or_raise(prod, tracker, bus.flush_timeout(stop))
    if end_markers:
        for logical, topic in names.items():
            bus.write_end_markers(prod, topic, producer_id, dict(enumerate(counts[logical])))
    bus.flush_or_raise(prod, tracker, bus.flush_timeout(stop))
    bus.flush_or_raise(prod, sink.tracker, bus.flush_timeout(stop))
    if bar is not None:
        bar.update(records % every)
        bar.close()

    summary = status()
    end = last_wall or time.time()
    summary.update(
        {
            "producer_id": producer_id,
            "elapsed_s": time.time() - started,
            "first_publish_wall": first_wall,
            "last_publish_wall": last_wall,
            "events_per_second": (impressions + clicks) / max(end - (first_wall or started), 1e-9),
            "partition_counts": counts,
            "dead_letter_reasons": dict(sink.reasons),
            "stopped": stopped,
        }
    )
    if on_status is not None:
        on_status(summary)
    return summary
