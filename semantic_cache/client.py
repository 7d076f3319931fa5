"""The join worker's view of the semantic cache: a dict filled from the semantic topic.

The join must never wait on the teacher: ``item()`` is one dict lookup and ``user()`` folds a
few kept clicks; a miss returns ``None`` at once and is reported on the misses topic, to be
filled by the refresher. A background thread reads the semantic topic into the dict.
Details: docs/design.md, "Semantics".
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message, TopicPartition

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import DecodeError
from livectr.core.words import pack_words
from livectr.semantic_cache import wire
from livectr.semantic_cache.codec import dequantize, to_bytes
from livectr.semantic_cache.profiles import ClickProfiles
from livectr.semantic_cache.store import VectorStore

log = logging.getLogger(__name__)

#: Most ids in one miss report record.
MISS_BATCH = 500
#: Latency samples kept for the percentiles.
SAMPLES = 50_000
#: Stamp of a cached user answer whose clicks all had vectors: valid until the user's clicks or
#: summary change. Otherwise the stamp is the count of item vectors that had arrived when it was
#: folded, and any later arrival (maybe one of its missing items) makes it stale.
COMPLETE = -1


class _Answer(NamedTuple):
    """A folded user vector and what it was folded from (see ``SemanticCacheClient._valid``)."""

    vector: bytes | None
    #: COMPLETE, or the count of item vector arrivals when a fold lacked some vector.
    stamp: int
    #: The user's LLM summary entry when folded (compared by identity).
    summary: tuple[np.ndarray, float] | None
    #: The client's version epoch when folded.
    epoch: int


def _percentile(samples: Any, q: float) -> float:
    values = np.fromiter(samples, dtype=np.float64)
    return float(np.percentile(values, q)) if values.size else float("nan")


def _warm_rows(cfg: Config) -> tuple[str, dict[str, tuple[bytes, float, str]]]:
    """Reduced item vectors (with their stamp and text) from the persisted store: the newest
    (version, dim) group, if any."""
    directory = Path(cfg.data_dir) / "semantic"
    if not (directory / VectorStore.FILE).exists():
        return "", {}
    store = VectorStore(directory)
    try:
        groups: dict[tuple[str, str], list[Any]] = {}
        for row in store.rows("item"):
            if row.reduced is not None and row.reducer and len(row.reduced) == cfg.semantic.reduced_dim:
                groups.setdefault((row.teacher_version, row.reducer), []).append(row)
    finally:
        store.close()
    if not groups:
        return "", {}
    (teacher_version, reducer), rows = max(groups.items(), key=lambda kv: max(r.updated_at for r in kv[1]))
    version = f"{teacher_version}/pca{cfg.semantic.reduced_dim}-{reducer}"
    return version, {r.id: (r.reduced, r.updated_at, r.text) for r in rows}


#: Consumer-thread failures in a row before the client gives up (see ``SemanticCacheClient._run``).
MAX_RESTARTS = 5
#: First backoff before a restart, doubled after each failure in a row up to the max.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
#: A consumer that ran this long before failing starts a new count of failures in a row.
HEALTHY_S = 60.0


class SemanticClientFailed(RuntimeError):
    """The semantic cache client's consumer thread failed for good: its vectors no longer update."""


class SemanticCacheClient:
    """Implements :class:`livectr.core.lookup.SemanticLookup` over the semantic topic.

    The constructor starts the background thread and waits (at most
    ``cfg.semantic.client_catchup_s``) until the vectors already on the topic are loaded, so
    a restarted join worker does not begin with a burst of misses.
    """

    def __init__(
        self, cfg: Config, *, warm_from_store: bool = True, reporter: str = "", catchup_s: float | None = None
    ) -> None:
        self.cfg = cfg
        self.dim = cfg.semantic.reduced_dim
        self.decay = cfg.semantic.user_decay
        self.reporter = reporter or f"client-{id(self):x}"
        self.topics = cfg.topics
        #: Version of the vectors held; a newer version on the topic replaces them all.
        self.version = ""
        self._items: dict[str, bytes] = {}
        #: Each item's words as the refresher sent them with its vector (not tied to a version).
        self._words: dict[str, bytes] = {}
        self._computed_at: dict[str, float] = {}
        #: Each user's current vector (every click, newest summary) and its stamp (see COMPLETE):
        #: the answer for lookups after the user's newest click, i.e. almost all of them live.
        self._users: dict[str, _Answer] = {}
        self._profiles = ClickProfiles(self.dim, self.decay, self._items_get)
        #: Per user, answers about past times by (clicks included, summary used); see _vector_at.
        self._past: dict[str, dict[tuple[int, bool], _Answer]] = {}
        #: Teacher versions switched to so far (answers folded under another are stale).
        self._epoch = 0
        #: Item vectors that arrived for ids not held before (stamps cached user answers).
        self._arrivals = 0
        #: LLM user summaries (reduced vectors, float; the event time of the newest click each
        #: covers) and clicks waiting to be sent for them.
        self._summaries: dict[str, tuple[np.ndarray, float]] = {}
        self._report_clicks = bool(cfg.semantic.enrich)
        self._click_queue: collections.deque[tuple[str, str, float]] = collections.deque()
        self.user_summaries = 0
        self.click_reports_sent = 0
        self._version_computed = 0.0
        self._miss_queue: collections.deque[str] = collections.deque()
        self._reported: dict[str, float] = {}
        self._first_miss: dict[str, float] = {}
        self._staleness: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self._fill: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self.item_lookups = 0
        self.item_misses = 0
        self.user_lookups = 0
        self.user_misses = 0
        #: User lookups as of a time at or before the user's newest click (see _vector_at).
        self.user_lookups_in_past = 0
        self.clicks_folded = 0
        self.clicks_without_vector = 0
        self.clicks_repeated = 0
        self.users_expired = 0
        self.records = 0
        self.stale_version_records = 0
        self.version_switches = 0
        self.ids_reported = 0
        self.reports_sent = 0
        self.warmed = 0
        if warm_from_store:
            self._warm(cfg)
        self._producer = bus.producer(cfg.kafka)
        self._delivery = bus.DeliveryTracker()
        self._dead_letters = bus.DeadLetterSink(self._producer, self.topics.dead_letters, stage="semantic-client")
        self._consumer = bus.consumer(cfg.kafka)
        self._remaining: dict[int, int] = {}
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        #: Per partition of the semantic topic, the offset after the last record applied.
        self._positions: dict[int, int] = {}
        self.consumer_restarts = 0
        #: Set when the consumer thread gave up (see :meth:`_run`): lookups raise from then on.
        self.failure: BaseException | None = None
        self._assign()
        self._thread = threading.Thread(target=self._run, name="semantic-client", daemon=True)
        self._thread.start()
        self.caught_up.wait(cfg.semantic.client_catchup_s if catchup_s is None else catchup_s)

    # -- hot path ------------------------------------------------------------------------------

    def item(self, item_id: str) -> bytes | None:
        """The item's reduced vector, or ``None`` (counted and reported in the background)."""
        if self.failure is not None:
            self._check()
        self.item_lookups += 1
        vec = self._items.get(item_id)
        if vec is None:
            self.item_misses += 1
            self._miss_queue.append(item_id)
        return vec

    def item_words(self, item_id: str) -> bytes | None:
        """The item's words as sent with its vector, or ``None`` (no miss counted: see :meth:`item`)."""
        return self._words.get(item_id)

    def user(self, user_id: str, at: float | None = None) -> bytes | None:
        """The user's vector as of event time ``at`` (now when None), or ``None`` before any click.

        Only clicks with ``ts < at`` count, and an LLM summary only if all it covers is before ``at``.
        """
        self.user_lookups += 1
        newest = self._profiles.newest(user_id)
        summary = self._summaries.get(user_id)
        if at is None or newest is None or at > newest:
            if summary is not None and at is not None and summary[1] >= at:
                vec = self._vector_at(user_id, at, summary)
            else:
                entry = self._users.get(user_id)
                # _valid(entry, summary), inlined with tuple indices: this is the join's common case.
                if (
                    entry is not None
                    and entry[2] is summary
                    and entry[3] == self._epoch
                    and (entry[1] == COMPLETE or entry[1] == self._arrivals)
                ):
                    vec = entry[0]
                else:
                    vec = self._set_user(user_id, summary)
        else:
            self.user_lookups_in_past += 1
            vec = self._vector_at(user_id, at, summary)
        if vec is None:
            self.user_misses += 1
        return vec

    def observe_click(self, user_id: str, item_id: str, ts: float) -> None:
        """Add a click (event time ``ts``) on ``item_id`` to the user's profile.

        A click on an item without a vector yet is kept and counts once the vector arrives; the
        same click observed again (a restored join checkpoint, a replayed partition) is ignored.
        """
        if not self._profiles.observe(user_id, ts, item_id):
            self.clicks_repeated += 1
            return
        if item_id not in self._items:
            self.clicks_without_vector += 1
        self._past.pop(user_id, None)
        self._users.pop(user_id, None)  # folded at the next lookup: a restore observes many clicks at once
        self.clicks_folded += 1
        if self._report_clicks:
            self._click_queue.append((user_id, item_id, ts))

    def expire_users(self, before: float) -> int:
        """Forget the profiles (and cached answers, LLM summaries) of users with no click since
        event time ``before``; returns how many users were forgotten.

        Why: this client lives as long as its join worker, and without a cut-off it would hold
        every user who ever clicked. The join calls this with its watermark minus
        ``user_profile_ttl_s``.
        """
        gone = self._profiles.expire(before)
        for user_id in gone:
            self._users.pop(user_id, None)
            self._past.pop(user_id, None)
        # Summaries arrive on the semantic topic (also for users this worker never saw click);
        # one older than the cut-off of a user without kept clicks describes no live profile.
        for user_id, (_, covered) in list(self._summaries.items()):
            if covered < before and self._profiles.newest(user_id) is None:
                self._summaries.pop(user_id, None)
                self._users.pop(user_id, None)
                self._past.pop(user_id, None)
        self.users_expired += len(gone)
        return len(gone)

    def _blend(self, profile: np.ndarray | None, summary: np.ndarray | None) -> bytes | None:
        """Click profile, LLM summary, or the normalised mean of both."""
        if summary is not None:
            profile = summary if profile is None else _unit(_unit(profile) + summary)
        return None if profile is None else to_bytes(profile)

    def _valid(self, answer: _Answer, summary: tuple[np.ndarray, float] | None) -> bool:
        """Whether a kept answer still holds: same teacher version, same summary, and either
        complete or folded after the last vector arrival.

        The summary and the version are compared with what the answer was folded from, not
        trusted to have been invalidated: the background thread stores a new summary (or
        switches version) at any moment, possibly while the join thread is folding this user,
        and an answer stored after such an update would otherwise outlive it.
        """
        return (
            answer.summary is summary
            and answer.epoch == self._epoch
            and (answer.stamp == COMPLETE or answer.stamp == self._arrivals)
        )

    def _vector_at(self, user_id: str, at: float, summary: tuple[np.ndarray, float] | None) -> bytes | None:
        """The vector from the clicks before ``at`` (``summary``: the user's, read by the caller).

        Answers are kept per user and (clicks included, summary used) until the user's clicks or
        summary change (or, for a fold that lacked an item's vector, until a vector arrives): a
        replay emits a user's negatives a window after their impressions, many of them between
        the same two clicks, and folding costs ~15 µs against ~0.3 µs.
        """
        usable = summary is not None and summary[1] < at
        key = (self._profiles.clicks_before(user_id, at), usable)
        answers = self._past.get(user_id)
        if answers is None:
            answers = self._past[user_id] = {}
        else:
            cached = answers.get(key)
            if cached is not None and self._valid(cached, summary):
                return cached.vector
        answer = self._fold(user_id, at, summary, summary if usable else None)
        answers[key] = answer
        return answer.vector

    def _set_user(self, user_id: str, summary: tuple[np.ndarray, float] | None) -> bytes | None:
        """Fold, keep and return the user's current vector (every click, newest summary)."""
        answer = self._users[user_id] = self._fold(user_id, None, summary, summary)
        return answer.vector

    def _fold(
        self,
        user_id: str,
        at: float | None,
        summary: tuple[np.ndarray, float] | None,
        blended: tuple[np.ndarray, float] | None,
    ) -> _Answer:
        """Fold the clicks before ``at`` and blend in ``blended``; stamped for :meth:`_valid`.

        The stamps are read *before* folding: a vector, summary or version arriving meanwhile
        makes the answer stale rather than silently current.
        """
        arrivals, epoch = self._arrivals, self._epoch
        fold = self._profiles.profile(user_id, at)
        vec = self._blend(fold.vector, None if blended is None else blended[0])
        return _Answer(vec, COMPLETE if fold.missing == 0 else arrivals, summary, epoch)

    def _items_get(self, item_id: str) -> bytes | None:
        """The item's vector without counting a lookup (profiles fold through this)."""
        return self._items.get(item_id)

    # -- background ----------------------------------------------------------------------------

    def _warm(self, cfg: Config) -> None:
        version, rows = _warm_rows(cfg)
        if not rows:
            return
        self.version = version
        self._items = {item_id: blob for item_id, (blob, _, _) in rows.items()}
        self._computed_at = {item_id: at for item_id, (_, at, _) in rows.items()}
        if cfg.learner.word_buckets:  # as the refresher would send them (livectr.core.words)
            k = cfg.learner.max_item_words
            self._words = {item_id: pack_words(text, k) for item_id, (_, _, text) in rows.items()}
        self._version_computed = max(self._computed_at.values())
        self.warmed = len(rows)

    def _assign(self) -> None:
        tps = bus.assign_all(self._consumer, self.cfg.kafka, [self.topics.semantic])
        if not tps:
            log.warning("semantic topic %s does not exist: no vectors will arrive", self.topics.semantic)
        for tp in tps:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=10.0, cached=False
            )
            if high > low:
                self._remaining[tp.partition] = high
        if not self._remaining:
            self.caught_up.set()

    def _run(self) -> None:
        """The consumer thread: :meth:`_consume` under a supervisor.

        A failure is retried from where the thread got to (the records after the last applied
        one are read again, on a new consumer) after a backoff that doubles up to
        ``RESTART_BACKOFF_MAX_S``; after ``MAX_RESTARTS`` failures in a row (none in between
        lasting ``HEALTHY_S``) the thread gives up and :attr:`failure` makes every lookup raise
        :class:`SemanticClientFailed`, failing the join stage rather than letting it run on
        vectors that stopped updating.
        """
        in_a_row = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._consume()
                return
            except Exception as exc:  # noqa: BLE001 - retried, then surfaced through every lookup
                if time.monotonic() - started >= HEALTHY_S:
                    in_a_row = 0
                in_a_row += 1
                if in_a_row > MAX_RESTARTS:
                    log.exception("semantic cache client thread failed %d times in a row; giving up", in_a_row)
                    self.failure = exc
                    return
                backoff = min(RESTART_BACKOFF_S * 2 ** (in_a_row - 1), RESTART_BACKOFF_MAX_S)
                log.exception("semantic cache client thread failed; restarting it in %.1fs", backoff)
                if self._stop.wait(backoff):
                    return
                try:
                    self._reconnect()
                except Exception as again:  # noqa: BLE001 - counts as the next failure
                    log.warning("semantic cache client could not reconnect: %s", again)
                    continue
                self.consumer_restarts += 1

    def _consume(self) -> None:
        last_flush = time.monotonic()
        positions = self._positions
        while not self._stop.is_set():
            for msg in self._consumer.consume(1000, timeout=0.1):
                if msg.error() is None:
                    self._apply(msg)
                    partition, offset = msg.partition(), msg.offset()
                    if partition is not None and offset is not None:
                        positions[partition] = offset + 1
                else:
                    log.warning("semantic consumer error: %s", msg.error())
            if time.monotonic() - last_flush >= 0.1:
                last_flush = time.monotonic()
                self._report_misses()
                self._report_clicks_for_summaries()
                self._producer.poll(0)

    def _reconnect(self) -> None:
        """A new consumer, assigned just after the last record applied (the beginning elsewhere)."""
        old, self._consumer = self._consumer, bus.consumer(self.cfg.kafka)
        try:
            old.close()
        except Exception:  # noqa: BLE001 - a broken consumer may not close cleanly
            log.debug("closing the failed semantic consumer", exc_info=True)
        offsets = {(self.topics.semantic, p): off for p, off in self._positions.items()}
        bus.assign_all(self._consumer, self.cfg.kafka, [self.topics.semantic], offsets)

    @property
    def consumer_alive(self) -> bool:
        """Whether the consumer thread runs (false after :meth:`close` too)."""
        return self._thread.is_alive()

    def _check(self) -> None:
        if self.failure is not None:
            raise SemanticClientFailed(f"semantic cache client consumer gave up: {self.failure!r}") from self.failure

    def _apply(self, msg: Message) -> None:
        now = time.time()
        self.records += 1
        partition = msg.partition()
        if partition in self._remaining:
            offset = msg.offset()
            assert offset is not None  # a consumed record without error has an offset
            if offset + 1 >= self._remaining[partition]:
                del self._remaining[partition]
                if not self._remaining:
                    self.caught_up.set()
        try:
            record = wire.decode_vector(msg.value())
            if record.kind not in ("item", "user") or len(record.reduced) != self.dim:
                raise DecodeError(
                    f"invalid semantic vector: kind {record.kind!r}, {len(record.reduced)} bytes, "
                    f"expected item or user with {self.dim}"
                )
        except DecodeError as exc:
            self._dead_letters.send(msg.value(), exc.reason, source=msg)
            return
        if record.version != self.version:
            if record.computed_at <= self._version_computed:
                self.stale_version_records += 1
                return
            self._switch_version(record.version)
        self._version_computed = max(self._version_computed, record.computed_at)
        if record.kind == "user":
            self._summaries[record.id] = (_unit(dequantize(record.reduced, self.dim)), record.source_ts)
            self._past.pop(record.id, None)
            self._users.pop(record.id, None)  # folded by the join thread at the next lookup
            self.user_summaries += 1
            return
        new = record.id not in self._items
        self._items[record.id] = record.reduced
        if record.words is not None:
            self._words[record.id] = record.words
        self._computed_at[record.id] = record.computed_at
        if new:
            self._arrivals += 1  # after storing: an answer stamped with the new count has folded it
        kind, ms = msg.timestamp()
        published = ms / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else now
        available = now if self.caught_up.is_set() else published
        self._staleness.append(max(0.0, available - record.requested_at))
        first = self._first_miss.pop(record.id, None)
        if first is not None:
            self._fill.append(max(0.0, time.monotonic() - first))
        self._reported.pop(record.id, None)

    def _switch_version(self, version: str) -> None:
        """Vectors of different versions live in different spaces: drop the old ones entirely."""
        if self.version:
            self.version_switches += 1
            log.info("semantic version %s replaces %s", version, self.version)
        self.version = version
        self._items = {}
        self._computed_at = {}
        # Clicks are kept (they are item ids): profiles re-fold in the new space as vectors arrive.
        self._users = {}
        self._past = {}
        self._summaries = {}
        self._epoch += 1  # after the swap: a fold that read the new epoch used the new vectors

    def _report_misses(self) -> None:
        """Send missed ids not reported within ``miss_retry_s`` (and still missing)."""
        now = time.monotonic()
        retry = self.cfg.semantic.miss_retry_s
        batch: list[str] = []
        seen: set[str] = set()
        while self._miss_queue:
            item_id = self._miss_queue.popleft()
            if item_id in seen or item_id in self._items:
                continue
            seen.add(item_id)
            last = self._reported.get(item_id)
            if last is not None and now - last < retry:
                continue
            self._reported[item_id] = now
            self._first_miss.setdefault(item_id, now)
            batch.append(item_id)
        for start in range(0, len(batch), MISS_BATCH):
            ids = batch[start : start + MISS_BATCH]
            record = wire.MissReport(kind="item", ids=ids, ts=time.time(), reporter=self.reporter)
            bus.produce(
                self._producer, self.topics.semantic_misses, wire.encode(record), on_delivery=self._delivery.callback
            )
            self.ids_reported += len(ids)
            self.reports_sent += 1

    def _report_clicks_for_summaries(self) -> None:
        """Send the clicks folded since the last call, one :class:`UserClicks` per user."""
        by_user: dict[str, tuple[list[str], list[float]]] = {}
        while self._click_queue:
            user_id, item_id, ts = self._click_queue.popleft()
            ids, times = by_user.setdefault(user_id, ([], []))
            ids.append(item_id)
            times.append(ts)
        now = time.time()
        for user_id, (item_ids, times) in by_user.items():
            record = wire.UserClicks(
                user_id=user_id, item_ids=item_ids, ts=now, reporter=self.reporter, event_ts=max(times)
            )
            bus.produce(
                self._producer,
                self.topics.semantic_misses,
                wire.encode(record),
                key=wire.vector_key("user", user_id),
                on_delivery=self._delivery.callback,
            )
            self.click_reports_sent += 1

    # -- reporting -----------------------------------------------------------------------------

    def wait_for(self, item_ids: list[str], timeout_s: float) -> bool:
        """Block until every id has a vector (or the timeout passes); for start-up and tests, never the hot path."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(i in self._items for i in item_ids):
                return True
            time.sleep(0.02)
        return all(i in self._items for i in item_ids)

    def stats(self) -> dict[str, float]:
        """Counters and latency percentiles (NaN where there are no samples yet)."""
        now = time.time()
        ages = [now - at for at in list(self._computed_at.values())]
        return {
            "lookups": float(self.item_lookups),
            "misses": float(self.item_misses),
            "miss_rate": self.item_misses / self.item_lookups if self.item_lookups else 0.0,
            "user_lookups": float(self.user_lookups),
            "user_misses": float(self.user_misses),
            "user_miss_rate": self.user_misses / self.user_lookups if self.user_lookups else 0.0,
            "user_lookups_in_past": float(self.user_lookups_in_past),
            "vectors": float(len(self._items)),
            "users": float(sum(1 for answer in list(self._users.values()) if answer.vector is not None)),
            "warmed_from_store": float(self.warmed),
            "clicks_folded": float(self.clicks_folded),
            "clicks_without_vector": float(self.clicks_without_vector),
            "clicks_repeated": float(self.clicks_repeated),
            "users_expired": float(self.users_expired),
            "users_with_clicks": float(len(self._profiles.clicks)),
            "user_summaries": float(self.user_summaries),
            "click_reports_sent": float(self.click_reports_sent),
            "ids_reported": float(self.ids_reported),
            "miss_reports_sent": float(self.reports_sent),
            "records_consumed": float(self.records),
            "stale_version_records": float(self.stale_version_records),
            "version_switches": float(self.version_switches),
            "staleness_p50_s": _percentile(list(self._staleness), 50),
            "staleness_p99_s": _percentile(list(self._staleness), 99),
            "miss_fill_p50_s": _percentile(list(self._fill), 50),
            "miss_fill_p99_s": _percentile(list(self._fill), 99),
            "vector_age_p50_s": _percentile(ages, 50),
            "vector_age_p99_s": _percentile(ages, 99),
            "caught_up": float(self.caught_up.is_set()),
            "consumer_alive": float(self.consumer_alive),
            "consumer_restarts": float(self.consumer_restarts),
            "dead_letters": float(self._dead_letters.count),
        }

    def close(self) -> None:
        """Stop the thread, send pending miss reports, flush the producer."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._report_misses()
        self._report_clicks_for_summaries()
        self._consumer.close()
        self._producer.flush(10)


def _unit(vec: np.ndarray) -> np.ndarray:
    """``vec`` scaled to unit length (unchanged if zero)."""
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec
