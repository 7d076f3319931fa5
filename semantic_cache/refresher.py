"""The refresher: keeps teacher vectors of every item fresh, off the join's hot path.

It consumes the items topic (new or changed texts) and the misses topic, encodes in batches on
its own thread (optionally after LLM enrichment), reduces with a PCA fitted once, stores the
vectors in SQLite and publishes them on the semantic topic. Details: docs/design.md, "Semantics".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message, Producer

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import DecodeError, EndOfStream, Item, decode_event
from livectr.core.words import pack_words
from livectr.semantic_cache import wire
from livectr.semantic_cache.enrich import Enricher, make_enricher
from livectr.semantic_cache.reducer import PCAReducer, bytes_per_example, load_reducer, reducer_path
from livectr.semantic_cache.store import StoredVector, VectorStore, text_hash
from livectr.semantic_cache.teacher import Teacher, make_teacher

log = logging.getLogger(__name__)

StatusCallback = Callable[[dict[str, Any]], None]
#: A vector is republished for a miss at most this often (the client may simply not have it yet).
REPUBLISH_AFTER_S = 1.0


@dataclass
class EncodeJob:
    """One item text waiting for the teacher."""

    item_id: str
    text: str
    attributes: dict[str, Any]
    hash: str
    source_ts: float
    requested_at: float


@dataclass
class UserJob:
    """A user whose preference summary is due: recent clicked items, most recent first."""

    user_id: str
    item_ids: list[str]
    requested_at: float
    #: Event time of the newest clicked item (the summary's ``source_ts``).
    event_ts: float = 0.0


class WorkQueue:
    """Pending item texts, latest text per id, urgent (missed) ids first; thread-safe."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, EncodeJob] = OrderedDict()
        self._urgent: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: EncodeJob, urgent: bool = False) -> None:
        """Queue (or replace the pending text of) an item."""
        with self._cond:
            self._jobs[job.item_id] = job
            if urgent:
                self._urgent[job.item_id] = None
            self._cond.notify()

    def discard(self, item_id: str) -> None:
        """Drop a pending item (a later record made its queued text obsolete)."""
        with self._cond:
            self._jobs.pop(item_id, None)
            self._urgent.pop(item_id, None)

    def prioritise(self, item_id: str) -> bool:
        """Move a pending item to the front; False when it is not pending."""
        with self._cond:
            if item_id not in self._jobs:
                return False
            self._urgent[item_id] = None
            return True

    def take(self, n: int, timeout_s: float) -> list[EncodeJob]:
        """Up to ``n`` jobs, urgent first, waiting at most ``timeout_s`` for the first one."""
        with self._cond:
            if not self._jobs:
                self._cond.wait(timeout_s)
            out: list[EncodeJob] = []
            while self._urgent and len(out) < n:
                item_id, _ = self._urgent.popitem(last=False)
                job = self._jobs.pop(item_id, None)
                if job is not None:
                    out.append(job)
            while self._jobs and len(out) < n:
                item_id, job = self._jobs.popitem(last=False)
                self._urgent.pop(item_id, None)
                out.append(job)
            return out


def message_time(msg: Message) -> float:
    """The record's Kafka timestamp in unix seconds (now, when the broker gave none)."""
    kind, ms = msg.timestamp()
    return ms / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else time.time()


@dataclass
class RefresherCounters:
    items_seen: int = 0
    end_markers: int = 0
    skipped_unchanged: int = 0
    skipped_outdated: int = 0
    texts_encoded: int = 0
    encode_seconds: float = 0.0
    batches: int = 0
    published: int = 0
    published_from_store: int = 0
    misses_received: int = 0
    misses_served_from_store: int = 0
    misses_prioritised: int = 0
    misses_unknown: int = 0
    user_clicks_received: int = 0
    user_summaries: int = 0
    user_summaries_skipped: int = 0
    delivery_failures: int = 0
    started: float = field(default_factory=time.time)


class Refresher:
    """State and logic of one refresher; :func:`run_refresher` drives it."""

    def __init__(
        self,
        cfg: Config,
        teacher: Teacher,
        store: VectorStore,
        producer: Producer,
        dead_letters: bus.DeadLetterSink,
        enricher: Enricher | None = None,
    ) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.enricher = enricher
        self.store = store
        self.producer = producer
        self.dead_letters = dead_letters
        self.topic = cfg.topics.semantic
        self.teacher_version = teacher.version + (f"+{enricher.tag}" if enricher is not None else "")
        self.semantic_dir = store.directory
        self.reducer: PCAReducer | None = load_reducer(
            self.semantic_dir, self.teacher_version, cfg.semantic.reduced_dim
        )
        self.queue = WorkQueue()
        #: Words sent with each item vector (0: none, when the learner has no word weights).
        self.max_words = cfg.learner.max_item_words if cfg.learner.word_buckets else 0
        self.counters = RefresherCounters()
        self.delivery = bus.DeliveryTracker()
        self._lock = threading.Lock()
        #: Missed ids whose text has not been seen yet: encoded first when it arrives.
        self._wanted: set[str] = set()
        #: item id -> (text hash, monotonic time) of the last publish by this process.
        self._published: dict[str, tuple[str, float]] = {}
        #: Request times of vectors encoded before the reduction existed.
        self._awaiting_fit: dict[str, float] = {}
        self._last_work = time.monotonic()
        #: User summaries: recent clicked items per user, clicks since the last summary, due jobs.
        self._recent_clicks: dict[str, deque[str]] = {}
        #: Event time of each user's newest reported click (a summary of their clicks is valid from then).
        self._newest_click: dict[str, float] = {}
        self._clicks_since_summary: dict[str, int] = {}
        self._user_jobs: OrderedDict[str, UserJob] = OrderedDict()
        if self.reducer is not None:
            self._reduce_stale_rows()

    @property
    def version(self) -> str:
        """Published version string ("" until the reduction is fitted)."""
        return self.reducer.version(self.teacher_version) if self.reducer is not None else ""

    # -- consumer side -------------------------------------------------------------------------

    def handle_item_record(self, msg: Message) -> None:
        """Decode an items-topic record; queue it unless its stored vector is current."""
        try:
            event = decode_event(msg.value())
        except DecodeError as exc:
            self.dead_letters.send(msg.value(), exc.reason, source=msg)
            return
        if isinstance(event, EndOfStream):
            self.counters.end_markers += 1
            return
        if not isinstance(event, Item):
            self.dead_letters.send(
                msg.value(), f"unexpected event: {type(event).__name__.lower()} on the items topic", source=msg
            )
            return
        if not event.text.strip():
            self.dead_letters.send(msg.value(), "invalid item: empty text", source=msg)
            return
        self.counters.items_seen += 1
        requested_at = message_time(msg)
        hash_ = text_hash(event.text, event.attributes if self.enricher is not None else None)
        stored = self.store.get("item", event.item_id, self.teacher_version)
        if stored is not None and event.ts < stored.source_ts:
            # Replaying history after a restart: the store already holds a later text of this item.
            self.counters.skipped_outdated += 1
            return
        if stored is not None and stored.text_hash == hash_:
            self.counters.skipped_unchanged += 1
            self.queue.discard(event.item_id)
            self._publish_stored(event.item_id, max(requested_at, self.counters.started), force=False)
            return
        with self._lock:
            urgent = event.item_id in self._wanted
            self._wanted.discard(event.item_id)
        self.queue.put(
            EncodeJob(event.item_id, event.text, dict(event.attributes), hash_, event.ts, requested_at), urgent=urgent
        )

    def handle_miss_record(self, msg: Message) -> None:
        """A join worker lacked these ids: republish, prioritise, or remember them."""
        try:
            report = wire.decode_request(msg.value())
        except DecodeError as exc:
            self.dead_letters.send(msg.value(), exc.reason, source=msg)
            return
        if isinstance(report, wire.UserClicks):
            self.handle_user_clicks(report, message_time(msg))
            return
        if report.kind != "item":
            self.dead_letters.send(msg.value(), f"invalid miss report: unsupported kind {report.kind!r}", source=msg)
            return
        requested_at = message_time(msg)
        for item_id in report.ids:
            self.counters.misses_received += 1
            served = self._publish_stored(item_id, requested_at, force=True)
            self.counters.misses_served_from_store += served
            if self.queue.prioritise(item_id):  # a newer text is pending: encode it next
                self.counters.misses_prioritised += 1
            elif not served and self.store.get("item", item_id, self.teacher_version) is None:
                self.counters.misses_unknown += 1
                with self._lock:
                    self._wanted.add(item_id)

    def handle_user_clicks(self, record: wire.UserClicks, requested_at: float) -> None:
        """Remember a user's clicks; queue a summary on the first click and every ``user_summary_every``."""
        sc = self.cfg.semantic
        self.counters.user_clicks_received += len(record.item_ids)
        recent = self._recent_clicks.setdefault(record.user_id, deque(maxlen=max(1, sc.user_summary_items)))
        recent.extend(record.item_ids)
        newest = self._newest_click[record.user_id] = max(self._newest_click.get(record.user_id, 0.0), record.event_ts)
        first = record.user_id not in self._clicks_since_summary
        since = self._clicks_since_summary.get(record.user_id, 0) + len(record.item_ids)
        if first or since >= sc.user_summary_every:
            with self._lock:
                self._user_jobs[record.user_id] = UserJob(record.user_id, list(reversed(recent)), requested_at, newest)
                self._user_jobs.move_to_end(record.user_id)
            since = 0
        self._clicks_since_summary[record.user_id] = since

    def _publish_stored(self, item_id: str, requested_at: float, force: bool) -> bool:
        """Publish the stored reduced vector of ``item_id`` if there is a current one.

        Without ``force`` a vector this process already published (same text) is not sent again;
        with it (a miss) it is resent unless it was sent within :data:`REPUBLISH_AFTER_S`.
        """
        row = self.store.get("item", item_id, self.teacher_version)
        if row is None or self.reducer is None or row.reduced is None or row.reducer != self.reducer.hash:
            return False
        with self._lock:
            last = self._published.get(item_id)
        if last is not None and last[0] == row.text_hash:
            if not force or time.monotonic() - last[1] < REPUBLISH_AFTER_S:
                return True
        self._publish([row], {item_id: requested_at})
        self.counters.published_from_store += 1
        return True

    # -- encoder side --------------------------------------------------------------------------

    def encode_batch(self, jobs: list[EncodeJob]) -> None:
        """Enrich (optionally), encode, persist and — once the reduction exists — publish."""
        started = time.perf_counter()
        details = [self.enricher.describe_item(j.text, j.attributes) if self.enricher is not None else "" for j in jobs]
        texts = [f"{j.text}. {d}" if d else j.text for j, d in zip(jobs, details)]
        vectors = self.teacher.encode(texts)
        self.counters.encode_seconds += time.perf_counter() - started
        now = time.time()
        reducer = self.reducer
        reduced: list[bytes | None] = list(reducer.reduce_bytes(vectors)) if reducer is not None else [None] * len(jobs)
        rows = [
            StoredVector(
                "item",
                j.item_id,
                self.teacher_version,
                j.hash,
                j.text,
                d,
                v.astype(np.float16),
                r,
                reducer.hash if reducer is not None else "",
                j.source_ts,
                now,
            )
            for j, d, v, r in zip(jobs, details, vectors, reduced)
        ]
        self.store.put_many(rows)
        self.counters.texts_encoded += len(jobs)
        self.counters.batches += 1
        self._last_work = time.monotonic()
        if reducer is not None:
            self._publish(rows, {j.item_id: j.requested_at for j in jobs})
        else:
            self._awaiting_fit.update({j.item_id: j.requested_at for j in jobs})
            self.maybe_fit(idle=False)

    def encode_user_summaries(self, n: int) -> int:
        """Summarise (LLM), encode, persist and publish up to ``n`` due users; returns how many.

        Waits for the reduction (vectors must share the items' space); a user none of whose
        clicked items has a stored text yet is skipped until their next clicks.
        """
        if self.reducer is None:
            return 0
        with self._lock:
            jobs = [self._user_jobs.popitem(last=False)[1] for _ in range(min(n, len(self._user_jobs)))]
        if not jobs:
            return 0
        started = time.perf_counter()
        ready: list[tuple[UserJob, str]] = []
        for job in jobs:
            stored = [self.store.get("item", i, self.teacher_version) for i in job.item_ids]
            texts = [r.text for r in stored if r is not None]
            if not texts:
                self.counters.user_summaries_skipped += 1
                continue
            summary = self.enricher.summarize_user(texts) if self.enricher is not None else "; ".join(texts)
            ready.append((job, summary))
        if not ready:
            return 0
        vectors = self.teacher.encode([summary for _, summary in ready])
        self.counters.encode_seconds += time.perf_counter() - started
        now = time.time()
        reducer = self.reducer
        rows = [
            StoredVector(
                "user",
                job.user_id,
                self.teacher_version,
                text_hash(summary),
                summary,
                "",
                v.astype(np.float16),
                r,
                reducer.hash,
                job.event_ts,
                now,
            )
            for (job, summary), v, r in zip(ready, vectors, reducer.reduce_bytes(vectors))
        ]
        self.store.put_many(rows)
        self.counters.user_summaries += len(rows)
        self._last_work = time.monotonic()
        self._publish(rows, {job.user_id: job.requested_at for job, _ in ready})
        return len(rows)

    def maybe_fit(self, idle: bool) -> bool:
        """Fit the reduction once enough items are encoded (or, when idle, on all there are)."""
        if self.reducer is not None:
            return False
        rows = self.store.rows("item", self.teacher_version)
        enough = len(rows) >= self.cfg.semantic.reducer_fit_min
        quiet = (
            idle
            and len(rows) >= 2
            and len(self.queue) == 0
            and time.monotonic() - self._last_work >= self.cfg.semantic.reducer_fit_idle_s
        )
        if not (enough or quiet):
            return False
        reducer = PCAReducer.fit(np.stack([r.full.astype(np.float32) for r in rows]), self.cfg.semantic.reduced_dim)
        reducer.save(reducer_path(self.semantic_dir, self.teacher_version, reducer.dim))
        self.reducer = reducer
        log.info(
            "fitted PCA %d->%d on %d items (%.1f%% variance kept): version %s",
            reducer.input_dim,
            reducer.dim,
            len(rows),
            100 * reducer.explained_variance,
            self.version,
        )
        reduced_rows = self._reduce_stale_rows()
        waiting, self._awaiting_fit = self._awaiting_fit, {}
        self._publish(reduced_rows, {r.id: waiting.get(r.id, self.counters.started) for r in reduced_rows})
        return True

    def _reduce_stale_rows(self) -> list[StoredVector]:
        """Reduce every stored item vector of this teacher that lacks the current projection."""
        assert self.reducer is not None
        stale = [
            r
            for r in self.store.rows("item", self.teacher_version)
            if r.reducer != self.reducer.hash or r.reduced is None
        ]
        if stale:
            blobs = self.reducer.reduce_bytes(np.stack([r.full.astype(np.float32) for r in stale]))
            self.store.set_reduced((r.key, b, self.reducer.hash) for r, b in zip(stale, blobs))
        return [row for row in (self.store.get(*r.key) for r in stale) if row is not None]

    def _publish(self, rows: list[StoredVector], requested_at: dict[str, float]) -> None:
        version = self.version
        now = time.time()
        for row in rows:
            if row.reduced is None:
                continue
            record = wire.SemanticVector(
                kind=row.kind,
                id=row.id,
                version=version,
                reduced=row.reduced,
                computed_at=row.updated_at,
                source_ts=row.source_ts,
                requested_at=requested_at.get(row.id, now),
                words=pack_words(row.text, self.max_words) if row.kind == "item" and self.max_words else None,
            )
            bus.produce(
                self.producer,
                self.topic,
                wire.encode(record),
                key=wire.vector_key(row.kind, row.id),
                on_delivery=self.delivery.callback,
            )
            with self._lock:
                if row.kind == "item":
                    self._published[row.id] = (row.text_hash, time.monotonic())
                self.counters.published += 1
        self.producer.poll(0)

    # -- reporting -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.counters
        elapsed = max(time.time() - c.started, 1e-9)
        out: dict[str, Any] = {
            "version": self.version,
            "teacher_version": self.teacher_version,
            "items_seen": c.items_seen,
            "texts_encoded": c.texts_encoded,
            "texts_per_second": c.texts_encoded / c.encode_seconds if c.encode_seconds else 0.0,
            "texts_per_wall_second": c.texts_encoded / elapsed,
            "encode_seconds": round(c.encode_seconds, 3),
            "batches": c.batches,
            "queue_depth": len(self.queue),
            "skipped_unchanged": c.skipped_unchanged,
            "skipped_outdated": c.skipped_outdated,
            "published": c.published,
            "published_from_store": c.published_from_store,
            "delivered": self.delivery.delivered,
            "delivery_failures": self.delivery.failed,
            "misses_received": c.misses_received,
            "misses_served_from_store": c.misses_served_from_store,
            "misses_prioritised": c.misses_prioritised,
            "misses_unknown": c.misses_unknown,
            "user_clicks_received": c.user_clicks_received,
            "user_summaries": c.user_summaries,
            "user_summaries_skipped": c.user_summaries_skipped,
            "user_summaries_pending": len(self._user_jobs),
            "end_markers": c.end_markers,
            "stored_vectors": len(self.store),
            "reducer_fitted": self.reducer is not None,
            "reduced_dim": self.cfg.semantic.reduced_dim,
            "bytes_per_example": bytes_per_example(self.cfg.semantic.reduced_dim),
            "dead_letters": self.dead_letters.count,
            "dead_letter_reasons": dict(self.dead_letters.reasons),
            "elapsed_s": elapsed,
        }
        if self.reducer is not None:
            out["pca_explained_variance"] = self.reducer.explained_variance
            out["pca_fitted_on"] = self.reducer.fitted_on
        if self.enricher is not None:
            out.update(self.enricher.stats.as_dict())
        return out


def _encoder_loop(refresher: Refresher, stop: threading.Event, errors: list[BaseException]) -> None:
    """The teacher's thread: batches from the queue until ``stop``; errors are handed to the main loop."""
    batch = max(1, refresher.cfg.semantic.refresh_batch)
    try:
        while not stop.is_set():
            jobs = refresher.queue.take(batch, timeout_s=0.2)
            if jobs:
                refresher.encode_batch(jobs)
            elif not refresher.encode_user_summaries(batch):
                refresher.maybe_fit(idle=True)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the main loop
        errors.append(exc)


def _assign(cfg: Config, consumer: Any) -> None:
    """Items from the beginning (the store skips what is current), misses from the end."""
    topics = cfg.topics
    misses_end = {
        (topics.semantic_misses, p): -1 for p in range(bus.partition_count(cfg.kafka, topics.semantic_misses))
    }
    bus.assign_all(consumer, cfg.kafka, [topics.items, topics.semantic_misses], offsets=misses_end)


def run_refresher(
    cfg: Config,
    *,
    teacher: Teacher | None = None,
    on_status: StatusCallback | None = None,
    stop: threading.Event | None = None,
    enricher: Enricher | None = None,
) -> dict[str, Any]:
    """Run the refresher until ``stop`` is set; returns its final counters.

    ``teacher``/``enricher`` default to those named in ``cfg.semantic`` (tests pass a loaded
    teacher to share it).
    """
    stop = stop or threading.Event()
    teacher = teacher if teacher is not None else make_teacher(cfg)
    enricher = enricher if enricher is not None else make_enricher(cfg)
    store = VectorStore.open(cfg)
    prod = bus.producer(cfg.kafka)
    dead = bus.DeadLetterSink(prod, cfg.topics.dead_letters, stage="refresh")
    refresher = Refresher(cfg, teacher, store, prod, dead, enricher)
    consumer = bus.consumer(cfg.kafka)
    encoder_stop = threading.Event()
    errors: list[BaseException] = []
    encoder = threading.Thread(
        target=_encoder_loop, args=(refresher, encoder_stop, errors), name="semantic-encoder", daemon=True
    )
    try:
        _assign(cfg, consumer)
        encoder.start()
        last_status = 0.0
        while not stop.is_set():
            for msg in consumer.consume(500, timeout=0.2):
                if msg.error() is not None:
                    log.warning("consumer error: %s", msg.error())
                elif msg.topic() == cfg.topics.items:
                    refresher.handle_item_record(msg)
                else:
                    refresher.handle_miss_record(msg)
            prod.poll(0)
            if errors:
                raise RuntimeError("semantic encoder thread failed") from errors[0]
            if on_status is not None and time.monotonic() - last_status >= 1.0:
                last_status = time.monotonic()
                on_status(refresher.status())
    finally:
        encoder_stop.set()
        encoder.join(timeout=60 if not stop.is_set() else 5)
        consumer.close()
        remaining = prod.flush(bus.flush_timeout(stop))
        store.close()
    summary = refresher.status()
    summary["undelivered"] = remaining
    if on_status is not None:
        on_status(summary)
    return summary
