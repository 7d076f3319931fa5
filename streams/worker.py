"""The join worker: impressions × clicks from Kafka → labelled examples on the examples topic.

Workers share one consumer group; partition ``p`` of both input topics lands on one worker,
which owns one :class:`~livectr.streams.join.PartitionJoin` per ``p``. Offsets are committed only
after the examples they produced are delivered and the partition's state is checkpointed
(:mod:`livectr.streams.checkpoint`), so a crash loses no label and repeats none. The guarantee
in detail: docs/design.md, "Delivery, checkpoints, commits".
"""

from __future__ import annotations

import gc
import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition

from livectr.core import bus
from livectr.core.config import CAUGHT_UP_MODES, Config, ConfigError
from livectr.core.events import (
    Click,
    DecodeError,
    EndOfStream,
    ExampleBatch,
    ExampleEnd,
    Impression,
    decode_event,
    encode_example,
)
from livectr.core.lookup import SemanticLookup
from livectr.streams.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    CommitMeta,
    checkpoint_path,
    delivered_after,
    profile_store_path,
    read_checkpoint,
    write_checkpoint,
)
from livectr.streams.join import CLICKS, IMPRESSIONS, JoinCounters, PartitionJoin
from livectr.streams.profile_store import ProfileStore
from livectr.streams.profiles import history_length
from livectr.streams.repartition import (
    ORIGIN,
    PROGRESS,
    PROGRESS_IDLE,
    Repartitioner,
    ensure_repartition_topics,
    join_inputs,
)

log = logging.getLogger(__name__)

#: Records per ``consume()`` call: large batches amortise the Python overhead per call.
CONSUME_BATCH = 10_000
#: Seconds the join's consumer waits when nothing came: with re-keying, raw records that arrive
#: meanwhile wait for the repartitioner in the same loop, so the wait is short there (a 0.2 s wait
#: put 0.3 s on the median event → example in real time; bench/freshness.py).
IDLE_WAIT_S = 0.2
IDLE_WAIT_REKEYED_S = 0.02
#: Examples per ExampleBatch record (≈150 B each without vectors): stays far below 1 MB.
MAX_BATCH_EXAMPLES = 2_000
REASON_AFTER_END = "record after end of stream"
STAGE = "join"
#: Allocations between young-generation collections while the worker runs (see ``run``).
GC_GEN0_THRESHOLD = 100_000
#: Bound of the ``committed()`` round trip of a restore (retried on the next loop when exceeded).
RESTORE_COMMITTED_TIMEOUT_S = 10.0


class _Provenance:
    """Where a rejected record came from, for :class:`livectr.core.bus.DeadLetterSink` headers.

    Orphan clicks are dead-lettered long after their Kafka message is gone; this carries the
    same four facts the sink reads from a live message.
    """

    __slots__ = ("_topic", "_partition", "_offset", "_key")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None) -> None:
        self._topic, self._partition, self._offset, self._key = topic, partition, offset, key

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key


class _ExampleDelivery(bus.DeliveryTracker):
    """Delivery tracker that also remembers the next offset per examples partition."""

    def __init__(self) -> None:
        super().__init__()
        self.next_offset: dict[int, int] = {}

    def callback(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            offset, part = msg.offset(), msg.partition()
            assert offset is not None and part is not None  # a delivered record has both
            nxt = offset + 1
            if nxt > self.next_offset.get(part, -1):
                self.next_offset[part] = nxt
        else:
            self.failed += 1
            self.last_error = str(err)


class JoinWorker:
    """State and loop of one join worker process; use :func:`run_join_worker`."""

    def __init__(
        self,
        cfg: Config,
        worker_id: str,
        semantics: SemanticLookup | None,
        on_status: Callable[[dict[str, Any]], None] | None,
        stop: threading.Event | None,
        bounded: bool,
    ) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.semantics = semantics
        #: Clicks per user each partition checkpoints for the cache's profiles (as many as they keep).
        self._profile_history = history_length(cfg.semantic.user_decay) if semantics is not None else 0
        self._profile_ttl_s = cfg.semantic.user_profile_ttl_s
        #: Per input partition: its users' kept clicks, persisted incrementally (semantics only).
        self.profile_stores: dict[int, ProfileStore] = {}
        self.on_status = on_status
        self.stop = stop or threading.Event()
        self.bounded = bounded
        self.topics = cfg.topics
        #: Raw partitions per source (re-keyed inputs end when all of them have ended).
        self.n_raw = (
            bus.partition_count(cfg.kafka, self.topics.impressions),
            bus.partition_count(cfg.kafka, self.topics.clicks),
        )
        self.n_out = bus.partition_count(cfg.kafka, self.topics.examples)
        if 0 in self.n_raw or self.n_out == 0:
            raise RuntimeError("join topics missing: run livectr.core.bus.ensure_topics(cfg) first")
        #: The topics the join reads: the raw ones, or re-keyed copies (``join.repartition``).
        self.rekeyed: bool = cfg.join.repartition
        self.imp_topic, self.clk_topic = join_inputs(cfg)
        if self.rekeyed:
            ensure_repartition_topics(cfg)
        self.n_in = bus.partition_count(cfg.kafka, self.imp_topic)
        self.track_idle = not bounded and cfg.join.idle_timeout_s > 0
        #: A source at the end of its partition runs on with the wall clock (PartitionJoin.caught_up);
        #: ``join.caught_up_clock`` is checked with the config (livectr.core.config.validate) and here.
        mode = cfg.join.caught_up_clock
        if mode not in CAUGHT_UP_MODES:
            raise ConfigError(
                f"join.caught_up_clock must be one of {', '.join(CAUGHT_UP_MODES)}, not {mode!r} "
                "(--caught-up-clock, LIVECTR_JOIN__CAUGHT_UP_CLOCK)"
            )
        self.track_caught_up = mode == "always" or (mode == "unbounded" and not bounded)
        # Partition ends are also what a deferred end of stream waits for (``_on_end``, re-keyed).
        eof = self.track_idle or self.rekeyed or self.track_caught_up
        extra: dict[str, object] = {"enable.partition.eof": True} if eof else {}
        #: (source, partition) read to the end of what the topic holds (until the next record).
        self.eof: set[tuple[int, int]] = set()
        #: Re-keyed: (source, partition) whose end of stream waits for the other source to catch up.
        self.deferred_end: dict[tuple[int, int], float] = {}
        self.consumer: Consumer = bus.consumer(cfg.kafka, cfg.join.group_id, **extra)
        self.producer = bus.producer(cfg.kafka)
        self.delivery = _ExampleDelivery()
        self.dead = bus.DeadLetterSink(self.producer, self.topics.dead_letters, STAGE)
        self.repartitioner = (
            Repartitioner(cfg, self.dead, self.stop, cfg.join.idle_timeout_s if self.track_idle else 0.0)
            if self.rekeyed
            else None
        )
        self.joins: dict[int, PartitionJoin] = {}
        self.seq: dict[int, int] = {}
        #: Per input partition: an examples offset at or before anything delivered for it that its
        #: state does not reflect (its restored checkpoint's, or the examples partition's end when
        #: taken over without one); what a checkpoint records while nothing newer is known.
        self.out_from: dict[int, int] = {}
        self.positions: dict[tuple[int, int], int] = {}
        self.ended: set[tuple[int, int]] = set()
        self.at_end: dict[tuple[int, int], float] = {}
        self.retired = JoinCounters()
        self.events_in = 0
        self.examples_out = 0
        self.batches_out = 0
        self.ends_written = 0
        self.first_event_at = 0.0
        self.started = time.monotonic()
        self._closing = False
        self._failed = False
        #: Partitions assigned (paused) and not restored yet / restored but not yet sought.
        self.to_restore: set[int] = set()
        #: Offset each (source, partition) was assigned at (the checkpoint's position, or invalid).
        self.assigned_at: dict[tuple[int, int], int] = {}
        self.seek_pending: set[int] = set()
        #: Sources paused because they ran ahead of the other by more than ``join.max_skew_s``.
        self.held: set[tuple[int, int]] = set()
        self.backpressure_pauses = 0
        self.peak_pending = 0
        self.peak_orphans = 0
        #: Times this member was fenced out of the group: assignments lost (session expired) and
        #: commits refused (see ``_commit_offsets``); each time it rejoined and restored.
        self.fenced = 0
        #: Longest time spent in one ``on_assign`` callback (the group waits for it) and in one
        #: restore from the main loop; partitions restored so far (rebalances, restarts).
        self.assign_callback_max_s = 0.0
        self.restore_max_s = 0.0
        self.partitions_restored = 0

    # ------------------------------------------------------------ rebalance

    def _source_of(self, topic: str) -> int:
        return IMPRESSIONS if topic == self.imp_topic else CLICKS

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take the partitions paused; :meth:`_restore_assigned` restores them from the main loop.

        Nothing slow runs here: the group waits for every member's callback, and a restore
        (a ``committed()`` round trip, a checkpoint read, re-reading the examples delivered after
        it) can take seconds per partition.
        """
        # Start where the checkpoint (a local file, read at once) says; the main loop seeks only if
        # the restore decides otherwise. A seek racing librdkafka's own lookup of the committed
        # offset (when assigned without one) can lose to it, and replaying from the committed,
        # replay-safe offsets into a restored state repeats examples.
        began = time.monotonic()
        ckpts = {p: read_checkpoint(checkpoint_path(self.cfg, p)) for p in {tp.partition for tp in partitions}}
        for tp in partitions:
            ckpt = ckpts[tp.partition]
            if ckpt is not None:
                pos = ckpt.impressions_position if tp.topic == self.imp_topic else ckpt.clicks_position
                tp.offset = pos if pos >= 0 else OFFSET_INVALID
            self.assigned_at[(self._source_of(tp.topic), tp.partition)] = tp.offset
        consumer.assign(partitions)
        if partitions:
            consumer.pause(partitions)
        self.to_restore.update(tp.partition for tp in partitions)
        self.assign_callback_max_s = max(self.assign_callback_max_s, time.monotonic() - began)
        log.info("%s assigned input partitions %s (restoring)", self.worker_id, sorted(self.to_restore))

    def _restore_assigned(self) -> None:
        """Restore the partitions assigned since the last call, seek to their positions, resume them."""
        assigned = {tp.partition for tp in self.consumer.assignment()}
        todo = sorted(p for p in self.to_restore if p in assigned and p not in self.joins)
        self.to_restore.clear()
        if not todo:
            return
        began = time.monotonic()
        tps = [TopicPartition(t, p) for p in todo for t in (self.imp_topic, self.clk_topic)]
        try:
            committed = self.consumer.committed(tps, timeout=RESTORE_COMMITTED_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("%s: reading committed offsets failed (%s); retrying", self.worker_id, exc)
            self.to_restore.update(todo)
            return
        try:
            ends = self._output_ends({p % self.n_out for p in todo})
        except KafkaException as exc:
            log.warning("%s: reading the examples topic's ends failed (%s); retrying", self.worker_id, exc)
            self.to_restore.update(todo)
            return
        by_tp = {(self._source_of(tp.topic), tp.partition): tp for tp in committed}
        for p in todo:
            self._restore(p, by_tp, ends[p % self.n_out])
        self.seek_pending.update(todo)
        self._seek_restored()
        self.partitions_restored += len(todo)
        self.restore_max_s = max(self.restore_max_s, time.monotonic() - began)
        log.info("%s restored input partitions %s", self.worker_id, todo)

    def _output_ends(self, parts: set[int]) -> dict[int, int]:
        """High watermark of each examples partition in ``parts`` (queried, not cached).

        The broker may report a partition's high watermark at the start of its last record
        batch, below its true end: a lower bound of where the next record will land, which is
        all :meth:`_restore` needs it for.
        """
        topic = self.topics.examples
        return {
            q: self.consumer.get_watermark_offsets(
                TopicPartition(topic, q), timeout=RESTORE_COMMITTED_TIMEOUT_S, cached=False
            )[1]
            for q in sorted(parts)
        }

    def _seek_restored(self) -> None:
        """Seek restored partitions to their positions and resume them (retried while not ready)."""
        done: list[TopicPartition] = []
        for p in sorted(self.seek_pending):
            if p not in self.joins:
                continue
            tps = [TopicPartition(t, p) for t in (self.imp_topic, self.clk_topic)]
            try:
                for tp in tps:
                    src = self._source_of(tp.topic)
                    pos = self.positions.get((src, p), OFFSET_INVALID)
                    # Always seek: a partition resumed before anything was consumed from it
                    # restarts at its committed offset, not at the one it was assigned at.
                    if pos >= 0:
                        self.consumer.seek(TopicPartition(tp.topic, p, pos))
            except KafkaException as exc:
                log.debug("partition %d not ready to seek (%s); retrying", p, exc)
                continue
            done += tps
        if done:
            self.consumer.resume(done)
        self.seek_pending.difference_update(tp.partition for tp in done)
        self.seek_pending.intersection_update(self.joins)

    def _restore(self, p: int, committed: dict[tuple[int, int], TopicPartition], out_end: int) -> None:
        """Rebuild partition ``p``'s join from its checkpoint (or Kafka's commit), then make the
        restore durable before anything is delivered for it (:meth:`_anchor`).

        ``out_end``: the examples partition's end now, a lower bound of this owner's deliveries.
        """
        imp_tp, clk_tp = committed.get((IMPRESSIONS, p)), committed.get((CLICKS, p))
        meta = CommitMeta.parse(imp_tp.metadata if imp_tp is not None else None)
        ckpt = read_checkpoint(checkpoint_path(self.cfg, p))
        join_cfg = self.cfg.join
        profile_args: dict[str, Any] = {"profile_history": self._profile_history, "profile_ttl_s": self._profile_ttl_s}
        user_clicks = None
        if self._profile_history:
            previous = self.profile_stores.pop(p, None)
            if previous is not None:
                previous.close()
            store = self.profile_stores[p] = ProfileStore(profile_store_path(self.cfg, p))
            user_clicks = store.load()
        if ckpt is not None and ckpt.seq >= meta.seq:
            if (ckpt.state.window_s, ckpt.state.policy) != (join_cfg.window_s, join_cfg.policy):
                log.warning(
                    "partition %d: checkpoint has window %.0fs/%s, config %.0fs/%s; keeping the "
                    "checkpoint's until the partition finishes",
                    p,
                    ckpt.state.window_s,
                    ckpt.state.policy,
                    join_cfg.window_s,
                    join_cfg.policy,
                )
            join = PartitionJoin.restore(
                ckpt.state,
                semantics=self.semantics,
                closed_memory=join_cfg.closed_memory,
                user_clicks=user_clicks,
                **profile_args,
            )
            self.positions[(IMPRESSIONS, p)] = ckpt.impressions_position
            self.positions[(CLICKS, p)] = ckpt.clicks_position
            self.seq[p] = ckpt.seq
            # The checkpoint's examples offset, or (written before anything was known there, by
            # an older version) the end now, which misses what was delivered in between.
            self.out_from[p] = ckpt.out_offset if ckpt.out_offset >= 0 else out_end
            if not join.finished and ckpt.out_offset >= 0:
                join.suppress_delivered(delivered_after(self.cfg, p, ckpt.out_partition, ckpt.out_offset))
        else:
            join = PartitionJoin(
                p,
                join_cfg.window_s,
                join_cfg.policy,
                semantics=self.semantics,
                closed_memory=join_cfg.closed_memory,
                score_sample=join_cfg.score_sample,
                defer_wait_s=join_cfg.defer_wait_s,
                **profile_args,
            )
            if user_clicks is not None:
                join.load_user_clicks(user_clicks)
            join.examples_total = meta.examples
            join.finished = meta.finished
            for src, tp in ((IMPRESSIONS, imp_tp), (CLICKS, clk_tp)):
                self.positions[(src, p)] = tp.offset if tp is not None and tp.offset >= 0 else OFFSET_INVALID
            self.seq[p] = meta.seq
            self.out_from[p] = out_end
        if join.finished:
            self.ended.update({(IMPRESSIONS, p), (CLICKS, p)})
        else:
            for src in (IMPRESSIONS, CLICKS):
                if join.clocks[src].done:
                    self.ended.add((src, p))
                elif self.rekeyed and len(join.inputs_ended[src]) >= self.n_raw[src]:
                    self.ended.add((src, p))  # checkpointed while its end waited (``_apply_deferred_ends``)
                    self.deferred_end[(src, p)] = time.time()
        self.joins[p] = join
        if not join.finished and (ckpt is None or ckpt.seq < meta.seq or ckpt.out_offset < 0):
            self._anchor(p, join)

    def _anchor(self, p: int, join: PartitionJoin) -> None:
        """Checkpoint a partition just taken over without a checkpoint that says where its examples
        stand, before it is resumed.

        Without it, a worker killed between its first deliveries and its first periodic
        checkpoint left nothing that tells the next owner where to look for them: it restored
        from Kafka's commit (or from nothing), replayed, and delivered every one of them again.
        The anchor records the restored state, its positions and ``out_from`` (the examples
        partition's end, below anything this owner will deliver), so the next restore re-reads
        from there and drops what it finds.
        """
        self._write_checkpoint(
            p,
            join,
            self.positions.get((IMPRESSIONS, p), OFFSET_INVALID),
            self.positions.get((CLICKS, p), OFFSET_INVALID),
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget_pending({tp.partition for tp in partitions})
        revoked = {tp.partition for tp in partitions} & set(self.joins)
        if revoked and not self._closing and not self._failed:
            self._commit(sorted(revoked))
        self._retire(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning(
            "%s lost input partitions %s (fenced out of the group)",
            self.worker_id,
            sorted({tp.partition for tp in partitions}),
        )
        self.fenced += 1
        self._forget_pending({tp.partition for tp in partitions})
        self._retire({tp.partition for tp in partitions} & set(self.joins))

    def _forget_pending(self, partitions: set[int]) -> None:
        self.to_restore.difference_update(partitions)
        self.seek_pending.difference_update(partitions)
        self.held = {(src, p) for src, p in self.held if p not in partitions}

    def _retire(self, partitions: set[int]) -> None:
        for p in partitions:
            join = self.joins.pop(p)
            self.out_from.pop(p, None)
            store = self.profile_stores.pop(p, None)
            if store is not None:
                store.close()
            self._add_counters(self.retired, join.counters)
            for src in (IMPRESSIONS, CLICKS):
                self.ended.discard((src, p))
                self.at_end.pop((src, p), None)
                self.positions.pop((src, p), None)
                self.held.discard((src, p))
                self.eof.discard((src, p))
                self.deferred_end.pop((src, p), None)

    @staticmethod
    def _add_counters(total: JoinCounters, part: JoinCounters) -> None:
        for name in total.__struct_fields__:
            setattr(total, name, getattr(total, name) + getattr(part, name))

    # ------------------------------------------------------------- hot path

    def _process(self, msgs: list[Message]) -> None:
        """Decode and join one consume batch (kept flat: this loop is the join's cost).

        librdkafka hands out records in runs of one (topic, partition); everything that depends
        only on those two is looked up once per run, not once per record.
        """
        joins = self.joins
        imp_topic = self.imp_topic
        dead = self.dead
        last_topic: str | None = None
        last_p = -1
        join: PartitionJoin | None = None
        handler: Any = None
        expected: type = Impression
        src = IMPRESSIONS
        after_end = False
        rekeyed = self.rekeyed
        unpack = ORIGIN.unpack
        next_origin: dict[int, int] = {}
        origin_ts: dict[int, float] = {}
        origin_published: dict[int, float] = {}
        idle_origins: set[int] = set()
        q = 0
        for msg in msgs:
            err = msg.error()
            if err is not None:
                self._on_error(msg, err)
                continue
            topic = msg.topic()
            p = msg.partition()
            if p != last_p or topic != last_topic:
                assert p is not None  # a consumed record without error has a partition (checked once per run)
                last_topic, last_p = topic, p
                join = joins.get(p)
                if join is None:
                    continue
                src = IMPRESSIONS if topic == imp_topic else CLICKS
                expected = Impression if src == IMPRESSIONS else Click
                handler = join.on_impression if src == IMPRESSIONS else join.on_click
                after_end = (src, p) in self.ended
                self.eof.discard((src, p))
                join.caught_up[src] = False
                next_origin = join.input_next[src]
                origin_ts = join.origin_ts[src]
                origin_published = join.origin_published[src]
                idle_origins = join.origins_idle[src]
                if self.track_idle and self.at_end.pop((src, p), None) is not None:
                    join.set_idle(src, False)
            elif join is None:
                continue
            raw = msg.value()
            if rekeyed:
                # Drop a copy of a raw record already joined (the repartitioner re-read it after a
                # crash or a rebalance): its origin is behind what this partition has seen.
                try:
                    q, origin = unpack(msg.key())  # type: ignore[arg-type]
                except (TypeError, struct.error):
                    dead.send(raw, "re-keyed record without its origin key", source=msg)
                    continue
                if origin < 0:
                    self._on_progress(join, src, q, raw, msg)
                    continue
                if origin < next_origin.get(q, 0):
                    join.counters.input_copies += 1
                    continue
                next_origin[q] = origin + 1
                if idle_origins:
                    idle_origins.discard(q)
            try:
                event = decode_event(raw)
            except DecodeError as exc:
                dead.send(raw, exc.reason, source=msg)
                continue
            kind = type(event)
            if kind is expected:
                if after_end:
                    last_p = -1  # the partition's flags may change: look them up again
                    if not self._reopen(join, src, p, raw, msg):
                        continue
                ms = msg.timestamp()[1]
                published = ms * 0.001 if ms > 0 else time.time()
                handler(event, msg.offset(), published, raw)
                if rekeyed and event.ts > origin_ts.get(q, -math.inf):
                    origin_ts[q] = event.ts
                    origin_published[q] = published
            elif type(event) is EndOfStream:
                self._on_end(join, src, event, msg)
                last_p = -1
            else:
                dead.send(raw, f"wrong topic: {kind.__name__.lower()} event on {topic}", source=msg)

    def _on_progress(self, join: PartitionJoin, src: int, q: int, raw: bytes | None, msg: Message) -> None:
        """A repartitioner's progress marker: raw partition ``q`` reached an event time, or is idle.

        Not an event: taken back out of ``events_in``.
        """
        self.events_in -= 1
        if raw == PROGRESS_IDLE:
            join.origins_idle[src].add(q)
            return
        try:
            (ts,) = PROGRESS.unpack(raw or b"")
        except struct.error:
            self.dead.send(raw, "malformed progress marker on a re-keyed topic", source=msg)
            return
        join.origins_idle[src].discard(q)
        if ts > join.origin_ts[src].get(q, -math.inf):
            join.origin_ts[src][q] = ts
            ms = msg.timestamp()[1]
            join.origin_published[src][q] = ms * 0.001 if ms > 0 else time.time()

    def _reopen(self, join: PartitionJoin, src: int, p: int, raw: bytes | None, msg: Message) -> bool:
        """A data record after its source's end marker: dead letter (bounded) or new epoch."""
        if self.bounded:
            self.dead.send(raw, REASON_AFTER_END, source=msg)
            return False
        log.info("partition %d: data after end of stream, starting a new event-time epoch", p)
        if join.finished:
            join.reopen()
            self.ended.discard((IMPRESSIONS, p))
            self.ended.discard((CLICKS, p))
            self.deferred_end.pop((IMPRESSIONS, p), None)
            self.deferred_end.pop((CLICKS, p), None)
        else:
            join.clocks[src].done = False
            join.inputs_ended[src].clear()
            self.ended.discard((src, p))
            self.deferred_end.pop((src, p), None)
        return True

    def _on_end(self, join: PartitionJoin, src: int, marker: EndOfStream, msg: Message) -> None:
        if self.rekeyed:
            # A raw partition's end, copied to every re-keyed partition: the source ends with the last.
            ended = join.inputs_ended[src]
            ended.add(marker.partition)
            if len(ended) < self.n_raw[src]:
                return
        elif marker.partition != msg.partition():
            self.dead.send(
                msg.value(),
                f"end marker for partition {marker.partition} read from partition {msg.partition()}",
                source=msg,
            )
            return
        ms = msg.timestamp()[1]
        published = ms * 0.001 if ms > 0 else time.time()
        self.ended.add((src, join.partition))
        if self.rekeyed:
            self.deferred_end[(src, join.partition)] = published
        else:
            join.end_of_stream(src, published)

    def _apply_deferred_ends(self) -> None:
        """Re-keyed: end a source once the other has been read to what its topic holds.

        An ended source counts as +∞, so the watermark jumps to the other source's clock; read
        through a repartitioner, the end marker can reach the join before records of the other
        topic that were published before it (they travel through another topic), and windows
        would close under clicks not read yet. Reading the raw topics directly, one consume batch
        held both; here the end waits until the other source's re-keyed partition is at its end
        (or has ended, or waits too).
        """
        for (src, p), published in list(self.deferred_end.items()):
            join = self.joins.get(p)
            if join is None:
                del self.deferred_end[(src, p)]
                continue
            other = (1 - src, p)
            if other in self.eof or other in self.deferred_end or join.clocks[1 - src].done:
                del self.deferred_end[(src, p)]
                join.end_of_stream(src, published)

    def _on_error(self, msg: Message, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            self.events_in -= 1  # an event of the client, not a record
            topic, p = msg.topic(), msg.partition()
            assert topic is not None and p is not None  # a partition-EOF event names its partition
            src = self._source_of(topic)
            self.eof.add((src, p))
            if self.track_idle:
                self.at_end.setdefault((src, p), time.monotonic())
            if self.track_caught_up:
                join = self.joins.get(p)
                if join is not None:
                    join.caught_up[src] = True
            return
        if err.fatal():
            raise KafkaException(err)
        log.warning("consumer error: %s", err)

    def _drain(self, p: int, join: PartitionJoin) -> None:
        """Send what the join produced: examples (batched) and dead letters."""
        out, rejected = join.take()
        if out:
            topic = self.topics.examples
            key = str(p).encode()
            part = p % self.n_out
            cb = self.delivery.callback
            if self.cfg.join.batch_examples:
                for start in range(0, len(out), MAX_BATCH_EXAMPLES):
                    chunk = out[start : start + MAX_BATCH_EXAMPLES]
                    bus.produce(
                        self.producer,
                        topic,
                        encode_example(ExampleBatch(chunk)),
                        key=key,
                        partition=part,
                        on_delivery=cb,
                    )
                    self.batches_out += 1
            else:
                for ex in out:
                    bus.produce(self.producer, topic, encode_example(ex), key=key, partition=part, on_delivery=cb)
                self.batches_out += len(out)
            self.examples_out += len(out)
        for rej in rejected:
            topic = self.imp_topic if rej.source == IMPRESSIONS else self.clk_topic
            self.dead.send(rej.raw, rej.reason, source=_Provenance(topic, p, rej.offset, rej.key.encode()))

    def _after_batch(self) -> None:
        if self.deferred_end:
            self._apply_deferred_ends()
        now = time.time() if self.track_idle or self.track_caught_up else None
        for p, join in list(self.joins.items()):
            if join.finished:
                continue
            if self.rekeyed:
                join.merge_origins(self.n_raw)
            join.advance(now)
            self._drain(p, join)
            if join.clocks[IMPRESSIONS].done and join.clocks[CLICKS].done:
                self._finish(p, join)

    def _finish(self, p: int, join: PartitionJoin) -> None:
        """Both sources of ``p`` ended: close everything, deliver, announce, checkpoint, commit."""
        join.close_all(max(c.done_published for c in join.clocks))
        self._drain(p, join)
        self._flush()
        end = encode_example(
            ExampleEnd(
                source_partition=p,
                source_partitions=self.n_in,
                examples=join.examples_total,
                worker=self.worker_id,
                ts=time.time(),
            )
        )
        for q in range(self.n_out):
            bus.produce(
                self.producer,
                self.topics.examples,
                end,
                key=str(p).encode(),
                partition=q,
                on_delivery=self.delivery.callback,
            )
        self.ends_written += self.n_out
        join.finished = True
        self._commit([p])
        log.info("%s finished input partition %d: %d examples", self.worker_id, p, join.examples_total)

    def _backpressure(self) -> None:
        """Pause a source that runs more than ``max_skew_s`` ahead of the other in event time;
        resume it once the other is within half that, has ended, or is idle; only while the
        partition holds at least ``backpressure_floor`` pending impressions and orphans. Also tracks the
        peak of the join state (pending impressions, orphan clicks) for the status.

        Without it, when one topic is read far ahead of the other (a backlog on one side, a
        producer that writes all impressions first) the watermark — the slower source — holds
        every impression read ahead (or every click, as an orphan) in memory. Paused, the state
        stays bounded by window + skew (plus one consume batch: the pause acts between batches).
        """
        pending = orphans = 0
        for join in self.joins.values():
            pending += len(join.pending)
            orphans += len(join.orphans)
        self.peak_pending = max(self.peak_pending, pending)
        self.peak_orphans = max(self.peak_orphans, orphans)
        limit = self.cfg.join.max_skew_s
        if limit <= 0:
            return
        floor = self.cfg.join.backpressure_floor
        pause: list[tuple[int, int]] = []
        resume: list[tuple[int, int]] = []
        for p, join in self.joins.items():
            if p in self.seek_pending:
                continue
            for src in (IMPRESSIONS, CLICKS):
                mine, other = join.clocks[src], join.clocks[1 - src]
                # Nothing to wait for when the other has ended (its end may wait for this one to
                # be read: ``_apply_deferred_ends``) or is idle; small state is no concern.
                free = (
                    join.finished
                    or mine.done
                    or other.done
                    or other.idle
                    or (1 - src, p) in self.ended
                    or len(join.pending) + len(join.orphans) < floor
                )
                # Re-keyed, a source's clock is its slowest raw partition's; while one of them is
                # unseen (-∞) its newest tells how far it has read (it must not hide a backlog).
                newest = mine.max_ts
                if newest == -math.inf and self.rekeyed:
                    newest = max(join.origin_ts[src].values(), default=newest)
                ahead = newest - other.max_ts if newest > -math.inf else 0.0
                if (1 - src, p) in self.held:
                    ahead = 0.0  # one source per partition held at most: never both (a deadlock)
                held = (src, p) in self.held
                if not held and not free and ahead > limit:
                    pause.append((src, p))
                elif held and (free or ahead <= limit / 2):
                    resume.append((src, p))
        topics = (self.imp_topic, self.clk_topic)
        if pause:
            self.consumer.pause([TopicPartition(topics[src], p) for src, p in pause])
            self.held.update(pause)
            self.backpressure_pauses += len(pause)
        if resume:
            self.consumer.resume([TopicPartition(topics[src], p) for src, p in resume])
            self.held.difference_update(resume)

    # -------------------------------------------------------------- commits

    def _flush(self) -> None:
        timeout_s = bus.flush_timeout(self.stop)
        bus.flush_or_raise(self.producer, self.delivery, timeout_s)
        bus.flush_or_raise(self.producer, self.dead.tracker, timeout_s)

    def _commit(self, partitions: list[int]) -> None:
        """Deliver, checkpoint, then commit the replay-safe offsets of ``partitions``."""
        partitions = [p for p in partitions if p in self.joins]
        if not partitions:
            return
        for p in partitions:
            self._drain(p, self.joins[p])
        self._flush()
        tps = [TopicPartition(t, p) for p in partitions for t in (self.imp_topic, self.clk_topic)]
        for tp in self.consumer.position(tps):
            if tp.offset >= 0:
                self.positions[(self._source_of(tp.topic), tp.partition)] = tp.offset
        offsets: list[TopicPartition] = []
        for p in partitions:
            join = self.joins[p]
            imp_pos = self.positions.get((IMPRESSIONS, p), OFFSET_INVALID)
            clk_pos = self.positions.get((CLICKS, p), OFFSET_INVALID)
            self._persist_profiles(p, join)
            seq = self._write_checkpoint(p, join, imp_pos, clk_pos)
            meta = CommitMeta(seq, join.finished, join.examples_total).encode()
            oldest_imp, oldest_clk = join.oldest_offsets()
            for topic, oldest, pos in (
                (self.imp_topic, oldest_imp, imp_pos),
                (self.clk_topic, oldest_clk, clk_pos),
            ):
                offset = oldest if oldest is not None else pos
                if offset >= 0:
                    offsets.append(TopicPartition(topic, p, offset, metadata=meta))
        if offsets:
            self._commit_offsets(offsets)
        self._expire_cache_profiles()

    def _write_checkpoint(self, p: int, join: PartitionJoin, imp_pos: int, clk_pos: int) -> int:
        """Write partition ``p``'s checkpoint under the next sequence number (returned).

        Its examples offset is the later of two lower bounds of what the state does not reflect:
        this process's next offset on the examples partition (everything it delivered is flushed
        by now) and ``out_from``. What a previous owner delivered after it and the replay has
        not produced again yet travels in the state's ``suppress``.
        """
        seq = self.seq.get(p, 0) + 1
        self.seq[p] = seq
        out_partition = p % self.n_out
        out_offset = max(self.delivery.next_offset.get(out_partition, -1), self.out_from.get(p, -1))
        write_checkpoint(
            checkpoint_path(self.cfg, p),
            Checkpoint(
                version=CHECKPOINT_VERSION,
                group_id=self.cfg.join.group_id,
                partition=p,
                seq=seq,
                impressions_position=imp_pos,
                clicks_position=clk_pos,
                out_partition=out_partition,
                out_offset=out_offset,
                state=join.snapshot(),
            ),
        )
        return seq

    def _commit_offsets(self, offsets: list[TopicPartition]) -> None:
        """Commit; a member fenced out of its group (session expired during a pause, a broker
        freeze, a slow disk) logs and carries on instead of dying.

        The checkpoints written just before are newer than the refused commit, so whoever is
        assigned these partitions next (this worker after it rejoins, or another) restores them
        and nothing is lost: librdkafka rejoins on the next ``consume()`` and calls ``on_lost``
        (or ``on_revoke``) and ``on_assign``, which drop and restore the state.
        """
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            if not bus.is_fenced(exc):
                raise
            self.fenced += 1
            log.warning(
                "%s: commit refused (%s); rejoining the group, resuming from the checkpoints", self.worker_id, exc
            )

    def _persist_profiles(self, p: int, join: PartitionJoin) -> None:
        """Forget idle users, then write the kept clicks that changed (before the checkpoint)."""
        store = self.profile_stores.get(p)
        join.expire_profiles()
        changes = join.take_profile_changes()
        if store is not None and changes is not None:
            store.apply(changes)

    def _expire_cache_profiles(self) -> None:
        """Forget the cache's profiles of users idle for ``user_profile_ttl_s`` of event time.

        The cut-off follows the slowest open partition: the cache serves all of them, and a
        partition behind the others still asks for profiles as of its own (earlier) times.
        """
        if self.semantics is None or self._profile_ttl_s <= 0:
            return
        marks = [j.watermark for j in self.joins.values() if not j.finished and math.isfinite(j.watermark)]
        if marks:
            self.semantics.expire_users(min(marks) - self._profile_ttl_s)

    # --------------------------------------------------------------- status

    def counters(self) -> dict[str, Any]:
        """Totals of this process (live partitions plus the ones it handed over)."""
        total = JoinCounters()
        self._add_counters(total, self.retired)
        for join in self.joins.values():
            self._add_counters(total, join.counters)
        elapsed = time.monotonic() - self.first_event_at if self.first_event_at else 0.0
        lag = max((j.watermark_lag for j in self.joins.values()), default=0.0)
        return {
            "worker": self.worker_id,
            "events_in": self.events_in,
            "impressions": total.impressions,
            "clicks": total.clicks,
            "duplicates": total.duplicates,
            "duplicate_impressions": total.duplicate_impressions,
            # Score requests travel with the examples but are not examples.
            "examples_out": self.examples_out - total.score_requests,
            "score_requests_out": total.score_requests,
            "example_records_out": self.batches_out,
            "positives": total.positives,
            "negatives": total.negatives,
            "pending": sum(len(j.pending) for j in self.joins.values()),
            "orphans": total.orphans,
            "orphans_buffered": sum(len(j.orphans) for j in self.joins.values()),
            "peak_pending": self.peak_pending,
            "peak_orphans": self.peak_orphans,
            "paused_sources": len(self.held),
            "backpressure_pauses": self.backpressure_pauses
            + (self.repartitioner.pauses if self.repartitioner is not None else 0),
            "late_clicks": total.late_clicks,
            "late_impressions": total.late_impressions,
            "suppressed_replays": total.suppressed,
            "fenced": self.fenced + (self.repartitioner.fenced if self.repartitioner is not None else 0),
            "input_copies": total.input_copies,
            "assign_callback_max_s": self.assign_callback_max_s,
            "restore_max_s": self.restore_max_s,
            "partitions_restored": self.partitions_restored,
            "repartitioned_in": self.repartitioner.records_in if self.repartitioner is not None else 0,
            "dead_letters": self.dead.count,
            "dead_letter_reasons": dict(self.dead.reasons),
            "watermark_lag_s": lag if math.isfinite(lag) else 0.0,
            "events_per_second": self.events_in / elapsed if elapsed > 0 else 0.0,
            "partitions": sorted(self.joins),
            "finished_partitions": sorted(p for p, j in self.joins.items() if j.finished),
            "policy": self.cfg.join.policy,
            "window_s": self.cfg.join.window_s,
            "elapsed_s": time.monotonic() - self.started,
        }

    # ----------------------------------------------------------------- loop

    def _all_finished(self) -> bool:
        if self.to_restore:
            return False
        if self.joins:
            return len(self.joins) == self._expected_partitions() and all(j.finished for j in self.joins.values())
        # Nothing assigned (more workers than partitions): done when every partition's commit says so.
        tps = [TopicPartition(self.imp_topic, p) for p in range(self.n_in)]
        try:
            committed = self.consumer.committed(tps, timeout=5)
        except KafkaException:
            return False
        return all(CommitMeta.parse(tp.metadata).finished for tp in committed)

    def _open_partitions(self) -> list[int]:
        return sorted(p for p, j in self.joins.items() if not j.finished)

    def _expected_partitions(self) -> int:
        return len({tp.partition for tp in self.consumer.assignment()})

    def _check_idle(self, now: float) -> None:
        timeout = self.cfg.join.idle_timeout_s
        for (src, p), since in self.at_end.items():
            join = self.joins.get(p)
            if join is not None and not join.clocks[src].idle and now - since >= timeout:
                join.set_idle(src, True)

    def run(self) -> dict[str, Any]:
        # The join holds W seconds of impressions as long-lived small objects; with CPython's
        # default thresholds (700, 10, 10) the cyclic GC rescans them over and over (measured:
        # ≈30 % of the join's CPU). They are freed by reference counting, so collecting rarely
        # is safe; the previous thresholds are restored on return.
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], GC_GEN0_THRESHOLD), max(thresholds[1], 50), max(thresholds[2], 100))
        try:
            return self._run()
        finally:
            gc.set_threshold(*thresholds)

    def _run(self) -> dict[str, Any]:
        cons = self.consumer
        cons.subscribe(
            [self.imp_topic, self.clk_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        rep = self.repartitioner
        if rep is not None:
            rep.subscribe()
        interval = self.cfg.join.commit_interval_s
        idle_wait = IDLE_WAIT_REKEYED_S if rep is not None else IDLE_WAIT_S
        last_commit = last_status = last_finish_check = time.monotonic()
        try:
            while not self.stop.is_set():
                if self.to_restore:
                    self._restore_assigned()
                if self.seek_pending:
                    self._seek_restored()
                moved = rep.step(0.0) if rep is not None else 0
                msgs = cons.consume(CONSUME_BATCH, 0.0 if moved else idle_wait)
                if msgs:
                    if not self.first_event_at:
                        self.first_event_at = time.monotonic()
                    self.events_in += len(msgs)
                    self._process(msgs)
                now = time.monotonic()
                if self.track_idle and self.at_end:
                    self._check_idle(now)
                self._after_batch()
                self._backpressure()
                self.producer.poll(0)
                if now - last_commit >= interval:
                    if rep is not None:
                        rep.commit()
                    self._commit(self._open_partitions())
                    last_commit = now
                if self.on_status is not None and now - last_status >= 1.0:
                    self.on_status(self.counters())
                    last_status = now
                if self.bounded and now - last_finish_check >= (0.0 if self.joins else 1.0):
                    last_finish_check = now
                    if self._all_finished():
                        break
            self._commit(self._open_partitions())
            summary = self.counters()
        except BaseException:
            self._failed = True
            raise
        finally:
            self._closing = True
            try:
                try:
                    if rep is not None:
                        rep.close(self._failed)
                finally:
                    cons.close()
            finally:
                for store in self.profile_stores.values():
                    store.close()
                self.profile_stores.clear()
                # After a failure nothing more is committed: what is still queued is replayed.
                self.producer.flush(1.0 if self._failed else bus.flush_timeout(self.stop))
        if self.on_status is not None:
            self.on_status(summary)
        return summary


def run_join_worker(
    cfg: Config,
    *,
    worker_id: str = "join-0",
    semantics: SemanticLookup | None = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
    bounded: bool = True,
) -> dict[str, Any]:
    """Run one join worker until its partitions are finished (bounded) or ``stop`` is set.

    Returns the summary counters (the same keys ``on_status`` receives about once a second).
    """
    return JoinWorker(cfg, worker_id, semantics, on_status, stop, bounded).run()
