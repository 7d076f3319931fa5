"""Re-key the join's inputs by impression id into internal co-partitioned topics.

Why: the join needs an impression and its clicks in the same partition number. Producers do not
agree on how a key maps to a partition (Java clients and kafka-python hash with murmur2,
librdkafka clients — confluent-kafka, Go, .NET — with CRC-32), and some set partitions by hand,
so the raw ``impressions`` and ``clicks`` topics cannot be trusted to be co-partitioned. As Kafka
Streams does with its repartition topics, a :class:`Repartitioner` reads both raw topics (a
consumer group of its own, ``<join group>.repartition``) and writes every record, bytes and
timestamp unchanged, to ``<prefix><join group>-impressions-repartition`` /
``-clicks-repartition`` at partition :func:`partition_of` (``impression_id``): livectr's own
hash, so the join's labels no longer depend on any producer's partitioner.

Exactly once, effectively: input offsets are committed only after every re-keyed record was
acknowledged, so a crash loses nothing; it can write a record twice (re-read from the last
commit). Every re-keyed record carries its origin — raw partition and offset, packed in the key
(:data:`ORIGIN`) — and the join drops a record whose origin it has already passed
(``PartitionJoin.input_next``, checkpointed with the join state), so a copy never counts twice.

End markers (:class:`~livectr.core.events.EndOfStream`) of raw partition ``q`` are copied to
every re-keyed partition, after everything of ``q``: a join partition's source ends when the
markers of all raw partitions have arrived. Malformed records and events on the wrong topic are
dead-lettered here, with the raw topic's provenance, exactly as the join would.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import zlib
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import Click, DecodeError, EndOfStream, Impression, decode_event

log = logging.getLogger(__name__)

#: Key of a re-keyed record: raw partition (uint32) and raw offset (int64), big-endian.
ORIGIN: Final = struct.Struct(">Iq")
#: Records per ``consume()`` call of the repartitioner.
CONSUME_BATCH: Final[int] = 10_000
STAGE: Final[str] = "join"


def partition_of(impression_id: str, partitions: int) -> int:
    """livectr's partition of an impression id: CRC-32 of its UTF-8 bytes modulo ``partitions``.

    The same function as librdkafka's default partitioner and livectr's own simulator, so records
    they publish keyed by impression id already sit where the join wants them (each raw
    partition then feeds one re-keyed partition); other producers' records are moved.
    """
    return zlib.crc32(impression_id.encode()) % partitions


def repartition_topics(cfg: Config) -> tuple[str, str]:
    """(impressions, clicks) re-keyed topics of this join group (one pair per group, as Kafka
    Streams names its internal topics after the application id)."""
    base = cfg.kafka.topic(cfg.join.group_id)
    return f"{base}-impressions-repartition", f"{base}-clicks-repartition"


def join_inputs(cfg: Config) -> tuple[str, str]:
    """(impressions, clicks) topics the join reads: re-keyed ones unless ``join.repartition`` is off."""
    if cfg.join.repartition:
        return repartition_topics(cfg)
    return cfg.topics.impressions, cfg.topics.clicks


def ensure_repartition_topics(cfg: Config, timeout_s: float = 15.0) -> int:
    """Create the re-keyed topics (as many partitions as the raw impressions topic) if missing;
    return their partition count. Raises when they exist with another count than each other."""
    n = bus.partition_count(cfg.kafka, cfg.topics.impressions)
    if n == 0:
        raise RuntimeError(f"{cfg.topics.impressions} does not exist: run livectr.core.bus.ensure_topics(cfg) first")
    names = repartition_topics(cfg)
    admin = AdminClient(cfg.kafka.client_properties())
    existing = admin.list_topics(timeout=timeout_s).topics
    new = [
        NewTopic(name, num_partitions=n, replication_factor=cfg.kafka.replication_factor)
        for name in names
        if name not in existing
    ]
    for fut in admin.create_topics(new, request_timeout=timeout_s).values() if new else ():
        try:
            fut.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout_s
    counts = [0, 0]
    while time.monotonic() < deadline:
        counts = [bus.partition_count(cfg.kafka, name) for name in names]
        if all(counts):
            break
        time.sleep(0.1)
    if not all(counts) or counts[0] != counts[1]:
        raise RuntimeError(f"re-keyed join topics {names} are not ready or differ in partitions: {counts}")
    return counts[0]


class Repartitioner:
    """Reads the raw impressions and clicks topics and writes them re-keyed (see module docstring).

    Driven by the join worker's loop: :meth:`step` moves one batch, :meth:`commit` makes what
    was moved durable (flush, then commit the raw offsets), :meth:`close` ends it.
    """

    def __init__(self, cfg: Config, dead: bus.DeadLetterSink, stop: threading.Event) -> None:
        self.cfg = cfg
        self.stop = stop
        self.raw = (cfg.topics.impressions, cfg.topics.clicks)
        self.out = repartition_topics(cfg)
        self.n_out = ensure_repartition_topics(cfg)
        self.dead = dead
        self.tracker = bus.DeliveryTracker()
        # Delivery reports for failures only: a Python callback per record would cost more than
        # producing; ``flush_or_raise`` still proves every record was acknowledged before a commit.
        self.producer = bus.producer(
            cfg.kafka, on_delivery=self.tracker.callback, **{"delivery.report.only.error": True}
        )
        self.consumer: Consumer = bus.consumer(cfg.kafka, f"{cfg.join.group_id}.repartition")
        self.records_in = 0
        self.records_out = 0
        self.fenced = 0
        self._closed = False

    def subscribe(self) -> None:
        self.consumer.subscribe(list(self.raw), on_revoke=self._on_revoke, on_lost=self._on_lost)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._closed:
            self.commit()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Not committed: what was moved since the last commit is moved again by the next owner
        # and its copies are dropped by the join.
        self.fenced += 1
        log.warning("repartitioner lost raw partitions (fenced out of its group); they are re-read")

    def step(self, timeout_s: float) -> int:
        """Move one batch of raw records; return how many were read."""
        msgs = self.consumer.consume(CONSUME_BATCH, timeout_s)
        if msgs:
            self._route(msgs)
        return len(msgs)

    def _route(self, msgs: list[Message]) -> None:
        """Re-key one batch (kept flat: this loop runs once per input record)."""
        imp_raw = self.raw[0]
        imp_out, clk_out = self.out
        n = self.n_out
        produce = self.producer.produce
        pack = ORIGIN.pack
        dead = self.dead
        moved = 0
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    if err.fatal():
                        raise KafkaException(err)
                    log.warning("repartition consumer error: %s", err)
                continue
            topic, q, offset = msg.topic(), msg.partition(), msg.offset()
            assert q is not None and offset is not None  # a consumed record without error has both
            raw = msg.value()
            try:
                event = decode_event(raw)
            except DecodeError as exc:
                dead.send(raw, exc.reason, source=msg)
                continue
            is_imp = topic == imp_raw
            kind = type(event)
            ms = msg.timestamp()[1]
            key = pack(q, offset)
            if kind is (Impression if is_imp else Click):
                target = imp_out if is_imp else clk_out
                p = zlib.crc32(event.impression_id.encode()) % n  # type: ignore[union-attr]
                while True:
                    try:
                        produce(target, raw, key, p, timestamp=ms if ms > 0 else 0)
                        break
                    except BufferError:
                        self.producer.poll(0.05)
                moved += 1
            elif kind is EndOfStream:
                if event.partition != q:  # type: ignore[union-attr]
                    dead.send(raw, f"end marker for partition {event.partition} read from partition {q}", source=msg)  # type: ignore[union-attr]
                    continue
                target = imp_out if is_imp else clk_out
                for p in range(n):
                    bus.produce(self.producer, target, raw or b"", key=key, partition=p, timestamp=ms)
                moved += n
            else:
                dead.send(raw, f"wrong topic: {kind.__name__.lower()} event on {topic}", source=msg)
        self.records_in += len(msgs)
        self.records_out += moved
        self.producer.poll(0)

    def commit(self) -> None:
        """Flush (every moved record acknowledged, else raise), then commit the raw positions."""
        timeout_s = bus.flush_timeout(self.stop)
        bus.flush_or_raise(self.producer, self.tracker, timeout_s)
        bus.flush_or_raise(self.dead.prod, self.dead.tracker, timeout_s)
        assignment = self.consumer.assignment()
        if not assignment:
            return
        offsets = [tp for tp in self.consumer.position(assignment) if tp.offset >= 0]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if not bus.is_fenced(exc):
                raise
            self.fenced += 1
            log.warning("repartitioner commit refused (%s): rejoining; uncommitted records are re-read", exc)

    def close(self, failed: bool) -> None:
        """Commit what was moved (unless failing), leave the group, flush."""
        try:
            if not failed:
                self.commit()
        finally:
            self._closed = True
            self.consumer.close()
            self.producer.flush(1.0 if failed else bus.flush_timeout(self.stop))
