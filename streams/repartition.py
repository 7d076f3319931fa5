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
markers of all raw partitions have arrived. Event time: a re-keyed partition merges raw
partitions read at different paces, so its clock is the slowest raw partition's
(``PartitionJoin.merge_origins``); after each batch the repartitioner sends every re-keyed
partition a progress marker per raw partition it moved (key: raw partition and offset -1, value:
newest event time), so a raw partition that has no record for some re-keyed partition does not
hold it back; in unbounded runs one that stays at its end for ``join.idle_timeout_s`` is declared
idle the same way (like the join's own idle sources). Malformed records and events on the wrong topic are
dead-lettered here, with the raw topic's provenance, exactly as the join would.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
import zlib
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import NewTopic

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import Click, DecodeError, EndOfStream, Impression, decode_event

log = logging.getLogger(__name__)

#: Key of a re-keyed record: raw partition (uint32) and raw offset (int64), big-endian.
ORIGIN: Final = struct.Struct(">Iq")
#: Value of a progress marker (key: raw partition, offset -1): the newest event time moved from
#: that raw partition, a big-endian double; or :data:`PROGRESS_IDLE`.
PROGRESS: Final = struct.Struct(">d")
#: Value of an idle marker: the raw partition has had nothing new for ``join.idle_timeout_s``.
PROGRESS_IDLE: Final[bytes] = b"idle"
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
    admin = bus.admin(cfg.kafka)
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

    def __init__(
        self, cfg: Config, dead: bus.DeadLetterSink, stop: threading.Event, idle_timeout_s: float = 0.0
    ) -> None:
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
        self.idle_timeout_s = idle_timeout_s
        eof = idle_timeout_s > 0 or cfg.join.max_skew_s > 0
        extra: dict[str, object] = {"enable.partition.eof": True} if eof else {}
        self.consumer: Consumer = bus.consumer(cfg.kafka, f"{cfg.join.group_id}.repartition", **extra)
        #: Per (is impressions, raw partition): newest event time announced, since when the partition
        #: has been read to its end (until its next record), and the ones announced idle.
        self.announced: dict[tuple[bool, int], float] = {}
        self.at_end: dict[tuple[bool, int], float] = {}
        self.idle: set[tuple[bool, int]] = set()
        #: Raw partitions owned, ended (end marker moved) and paused for running ahead.
        self.owned: set[tuple[bool, int]] = set()
        self.ended: set[tuple[bool, int]] = set()
        self.held: set[tuple[bool, int]] = set()
        self.max_skew_s = cfg.join.max_skew_s
        self.pauses = 0
        self.records_in = 0
        self.records_out = 0
        self.fenced = 0
        self._closed = False

    def subscribe(self) -> None:
        self.consumer.subscribe(
            list(self.raw), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def _sources(self, partitions: list[TopicPartition]) -> set[tuple[bool, int]]:
        return {(tp.topic == self.raw[0], tp.partition) for tp in partitions}

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        self.owned |= self._sources(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._closed:
            self.commit()
        self._forget(self._sources(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Not committed: what was moved since the last commit is moved again by the next owner
        # and its copies are dropped by the join.
        self.fenced += 1
        log.warning("repartitioner lost raw partitions (fenced out of its group); they are re-read")
        self._forget(self._sources(partitions))

    def _forget(self, sources: set[tuple[bool, int]]) -> None:
        for state in (self.owned, self.ended, self.held, self.idle):
            state -= sources
        for source in sources:
            self.announced.pop(source, None)
            self.at_end.pop(source, None)

    def step(self, timeout_s: float) -> int:
        """Move one batch of raw records; return how many records were moved.

        Error events (a frozen broker reports some at once) are not records: the caller waits
        on its own consumer when nothing was moved, so a loop on errors cannot spin.
        """
        msgs = self.consumer.consume(CONSUME_BATCH, timeout_s)
        before = self.records_out
        if msgs:
            self._route(msgs)
        if self.at_end and self.idle_timeout_s > 0:
            self._announce_idle(time.monotonic())
        if self.max_skew_s > 0 and self.owned:
            self._backpressure()
        return self.records_out - before

    def _backpressure(self) -> None:
        """Pause a raw partition more than ``join.max_skew_s`` of event time ahead of the slowest
        live one of its topic (resume within half that): a re-keyed partition's clock is its
        slowest raw partition's, so whatever one raw partition runs ahead waits in the join's
        memory. Bounded among the raw partitions this worker owns."""
        limit = self.max_skew_s
        pause: list[tuple[bool, int]] = []
        resume: list[tuple[bool, int]] = []
        for is_imp in (True, False):
            # Ended, idle or read to the end for now: nothing to wait for (waiting would deadlock).
            live = [
                s
                for s in self.owned
                if s[0] == is_imp and s not in self.ended and s not in self.idle and s not in self.at_end
            ]
            times = {s: self.announced.get(s, -math.inf) for s in live}
            slowest = min(times.values(), default=math.inf)
            for source in self.owned:
                if source[0] != is_imp:
                    continue
                ts = times.get(source)
                ahead = ts - slowest if ts is not None and ts > -math.inf and len(live) > 1 else 0.0
                if source not in self.held and ahead > limit:
                    pause.append(source)
                elif source in self.held and ahead <= limit / 2:
                    resume.append(source)
        if pause:
            self.consumer.pause([TopicPartition(self.raw[0 if imp else 1], q) for imp, q in pause])
            self.held.update(pause)
            self.pauses += len(pause)
        if resume:
            self.consumer.resume([TopicPartition(self.raw[0 if imp else 1], q) for imp, q in resume])
            self.held.difference_update(resume)

    def _broadcast(self, is_imp: bool, q: int, value: bytes) -> None:
        """A progress or idle marker of raw partition ``q`` to every re-keyed partition."""
        target = self.out[0] if is_imp else self.out[1]
        key = ORIGIN.pack(q, -1)
        for p in range(self.n_out):
            bus.produce(self.producer, target, value, key=key, partition=p)

    def _announce_idle(self, now: float) -> None:
        for source, since in self.at_end.items():
            if source not in self.idle and now - since >= self.idle_timeout_s:
                self.idle.add(source)
                self._broadcast(source[0], source[1], PROGRESS_IDLE)

    def _route(self, msgs: list[Message]) -> None:
        """Re-key one batch (kept flat: this loop runs once per input record)."""
        imp_raw = self.raw[0]
        imp_out, clk_out = self.out
        n = self.n_out
        produce = self.producer.produce
        pack = ORIGIN.pack
        dead = self.dead
        moved = 0
        newest: dict[tuple[bool, int], float] = {}
        at_end = self.at_end
        ended = self.ended
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.setdefault((msg.topic() == imp_raw, msg.partition() or 0), time.monotonic())
                elif err.fatal():
                    raise KafkaException(err)
                else:
                    log.warning("repartition consumer error: %s", err)
                continue
            topic, q, offset = msg.topic(), msg.partition(), msg.offset()
            assert q is not None and offset is not None  # a consumed record without error has both
            if at_end:
                source = (topic == imp_raw, q)
                if at_end.pop(source, None) is not None:
                    self.idle.discard(source)
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
                ts = event.ts
                if ended:
                    ended.discard((is_imp, q))  # data after the end (unbounded): a new epoch
                if ts > newest.get((is_imp, q), -math.inf):
                    newest[(is_imp, q)] = ts
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
                self.ended.add((is_imp, q))
            else:
                dead.send(raw, f"wrong topic: {kind.__name__.lower()} event on {topic}", source=msg)
        for source, ts in newest.items():
            if ts > self.announced.get(source, -math.inf):
                self.announced[source] = ts
                self._broadcast(source[0], source[1], PROGRESS.pack(ts))
                moved += n
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
