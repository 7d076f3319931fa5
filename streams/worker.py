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

log = logging.getLogger(__name__)

#: Records per ``consume()`` call: large batches amortise the Python overhead per call.
CONSUME_BATCH = 10_000
#: Examples per ExampleBatch record (≈150 B each without vectors): stays far below 1 MB.
MAX_BATCH_EXAMPLES = 2_000
REASON_AFTER_END = "record after end of stream"
STAGE = "join"
#: Allocations between young-generation collections while the worker runs (see ``run``).
GC_GEN0_THRESHOLD = 100_000


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
        self.n_in = bus.partition_count(cfg.kafka, self.topics.impressions)
        self.n_out = bus.partition_count(cfg.kafka, self.topics.examples)
        if self.n_in == 0 or self.n_out == 0:
            raise RuntimeError("join topics missing: run livectr.core.bus.ensure_topics(cfg) first")
        self.track_idle = not bounded and cfg.join.idle_timeout_s > 0
        mode = cfg.join.caught_up_clock
        if mode not in CAUGHT_UP_MODES:
            raise ConfigError(
                f"join.caught_up_clock must be one of {', '.join(CAUGHT_UP_MODES)}, not {mode!r} "
                "(--caught-up-clock, LIVECTR_JOIN__CAUGHT_UP_CLOCK)"
            )
        #: Sources at the end of their partition run on with the wall clock (PartitionJoin.caught_up).
        self.track_caught_up = mode == "always" or (mode == "unbounded" and not bounded)
        self.track_eof = self.track_idle or self.track_caught_up
        extra: dict[str, object] = {"enable.partition.eof": True} if self.track_eof else {}
        self.consumer: Consumer = bus.consumer(cfg.kafka, cfg.join.group_id, **extra)
        self.producer = bus.producer(cfg.kafka)
        self.delivery = _ExampleDelivery()
        self.dead = bus.DeadLetterSink(self.producer, self.topics.dead_letters, STAGE)
        self.joins: dict[int, PartitionJoin] = {}
        self.seq: dict[int, int] = {}
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

    # ------------------------------------------------------------ rebalance

    def _source_of(self, topic: str) -> int:
        return IMPRESSIONS if topic == self.topics.impressions else CLICKS

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = consumer.committed(partitions, timeout=30) if partitions else []
        by_tp = {(self._source_of(tp.topic), tp.partition): tp for tp in committed}
        for p in sorted({tp.partition for tp in partitions}):
            self._restore(p, by_tp)
        for tp in partitions:
            pos = self.positions.get((self._source_of(tp.topic), tp.partition), OFFSET_INVALID)
            tp.offset = pos if pos >= 0 else OFFSET_INVALID
        consumer.assign(partitions)
        log.info("%s assigned input partitions %s", self.worker_id, sorted(self.joins))

    def _restore(self, p: int, committed: dict[tuple[int, int], TopicPartition]) -> None:
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
            if not join.finished and ckpt.out_offset >= 0:
                join.suppress = delivered_after(self.cfg, p, ckpt.out_partition, ckpt.out_offset)
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
        if join.finished:
            self.ended.update({(IMPRESSIONS, p), (CLICKS, p)})
        else:
            for src in (IMPRESSIONS, CLICKS):
                if join.clocks[src].done:
                    self.ended.add((src, p))
        self.joins[p] = join

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions} & set(self.joins)
        if revoked and not self._closing and not self._failed:
            self._commit(sorted(revoked))
        self._retire(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._retire({tp.partition for tp in partitions} & set(self.joins))

    def _retire(self, partitions: set[int]) -> None:
        for p in partitions:
            join = self.joins.pop(p)
            store = self.profile_stores.pop(p, None)
            if store is not None:
                store.close()
            self._add_counters(self.retired, join.counters)
            for src in (IMPRESSIONS, CLICKS):
                self.ended.discard((src, p))
                self.at_end.pop((src, p), None)
                self.positions.pop((src, p), None)

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
        imp_topic = self.topics.impressions
        dead = self.dead
        last_topic: str | None = None
        last_p = -1
        join: PartitionJoin | None = None
        handler: Any = None
        expected: type = Impression
        src = IMPRESSIONS
        after_end = False
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
                if self.track_eof and self.at_end.pop((src, p), None) is not None:
                    join.set_idle(src, False)
                    join.caught_up[src] = False
            elif join is None:
                continue
            raw = msg.value()
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
                handler(event, msg.offset(), ms * 0.001 if ms > 0 else time.time(), raw)
            elif type(event) is EndOfStream:
                self._on_end(join, src, event, msg)
                last_p = -1
            else:
                dead.send(raw, f"wrong topic: {kind.__name__.lower()} event on {topic}", source=msg)

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
        else:
            join.clocks[src].done = False
            self.ended.discard((src, p))
        return True

    def _on_end(self, join: PartitionJoin, src: int, marker: EndOfStream, msg: Message) -> None:
        if marker.partition != msg.partition():
            self.dead.send(
                msg.value(),
                f"end marker for partition {marker.partition} read from partition {msg.partition()}",
                source=msg,
            )
            return
        ms = msg.timestamp()[1]
        join.end_of_stream(src, ms * 0.001 if ms > 0 else time.time())
        self.ended.add((src, join.partition))

    def _on_error(self, msg: Message, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            if self.track_eof:
                topic, p = msg.topic(), msg.partition()
                assert topic is not None and p is not None  # a partition-EOF event names its partition
                src = self._source_of(topic)
                self.at_end.setdefault((src, p), time.monotonic())
                join = self.joins.get(p)
                if join is not None and self.track_caught_up:
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
            topic = self.topics.impressions if rej.source == IMPRESSIONS else self.topics.clicks
            self.dead.send(rej.raw, rej.reason, source=_Provenance(topic, p, rej.offset, rej.key.encode()))

    def _after_batch(self) -> None:
        now = time.time() if self.track_eof else None
        for p, join in list(self.joins.items()):
            if join.finished:
                continue
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
        tps = [TopicPartition(t, p) for p in partitions for t in (self.topics.impressions, self.topics.clicks)]
        for tp in self.consumer.position(tps):
            if tp.offset >= 0:
                self.positions[(self._source_of(tp.topic), tp.partition)] = tp.offset
        offsets: list[TopicPartition] = []
        for p in partitions:
            join = self.joins[p]
            imp_pos = self.positions.get((IMPRESSIONS, p), OFFSET_INVALID)
            clk_pos = self.positions.get((CLICKS, p), OFFSET_INVALID)
            seq = self.seq.get(p, 0) + 1
            self.seq[p] = seq
            out_partition = p % self.n_out
            self._persist_profiles(p, join)
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
                    out_offset=self.delivery.next_offset.get(out_partition, -1),
                    state=join.snapshot(),
                ),
            )
            meta = CommitMeta(seq, join.finished, join.examples_total).encode()
            oldest_imp, oldest_clk = join.oldest_offsets()
            for topic, oldest, pos in (
                (self.topics.impressions, oldest_imp, imp_pos),
                (self.topics.clicks, oldest_clk, clk_pos),
            ):
                offset = oldest if oldest is not None else pos
                if offset >= 0:
                    offsets.append(TopicPartition(topic, p, offset, metadata=meta))
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        self._expire_cache_profiles()

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
            "late_clicks": total.late_clicks,
            "late_impressions": total.late_impressions,
            "suppressed_replays": total.suppressed,
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
        if self.joins:
            return len(self.joins) == self._expected_partitions() and all(j.finished for j in self.joins.values())
        # Nothing assigned (more workers than partitions): done when every partition's commit says so.
        tps = [TopicPartition(self.topics.impressions, p) for p in range(self.n_in)]
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
            [self.topics.impressions, self.topics.clicks],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        interval = self.cfg.join.commit_interval_s
        last_commit = last_status = last_finish_check = time.monotonic()
        try:
            while not self.stop.is_set():
                msgs = cons.consume(CONSUME_BATCH, 0.2)
                if msgs:
                    if not self.first_event_at:
                        self.first_event_at = time.monotonic()
                    self.events_in += len(msgs)
                    self._process(msgs)
                now = time.monotonic()
                if self.track_idle and self.at_end:
                    self._check_idle(now)
                self._after_batch()
                self.producer.poll(0)
                if now - last_commit >= interval:
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
