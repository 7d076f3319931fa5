"""The impression/click join as pure logic: no Kafka, no clocks, no I/O.

One :class:`PartitionJoin` owns input partition ``p`` of the impressions and clicks topics
(co-partitioned by impression id), so its state can be checkpointed, handed to another worker
and restored on its own. Windows close on an event-time watermark; clicks may come before
their impression; each policy (``wait``, ``fake-negative``) decides which examples leave and
when, in decision-time order. The rules and why: docs/design.md, "The join".
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections import deque
from collections.abc import Iterable
from typing import Final

import msgspec

from livectr.core.events import (
    KIND_DEFER_OBSERVED,
    KIND_DEFER_TRUE,
    KIND_FAKE_NEGATIVE,
    KIND_FINAL,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    SEM_ITEM_MISS,
    SEM_USER_MISS,
    Click,
    Example,
    Impression,
    decision_time,
)
from livectr.core.lookup import SemanticLookup
from livectr.streams.profiles import ClickHistory, ClickLog, ProfileChanges

POLICY_WAIT: Final[str] = "wait"
POLICY_FAKE_NEGATIVE: Final[str] = "fake-negative"
POLICY_DEFER: Final[str] = "defer"
POLICIES: Final[tuple[str, ...]] = (POLICY_WAIT, POLICY_FAKE_NEGATIVE, POLICY_DEFER)

#: Source indices of a partition: its impressions partition and its clicks partition.
IMPRESSIONS: Final[int] = 0
CLICKS: Final[int] = 1

REASON_ORPHAN: Final[str] = "click without impression within window"
REASON_LATE_CLOSED: Final[str] = "late click: impression window already closed"
REASON_LATE_OUTSIDE: Final[str] = "late click: outside attribution window"
REASON_DUPLICATE_IMPRESSION: Final[str] = "duplicate impression id"

_INF: Final[float] = math.inf


#: Every example kind, to forget an impression's ``suppress`` entries when it closes.
_ALL_KINDS: Final = (
    KIND_FINAL,
    KIND_FAKE_NEGATIVE,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    KIND_DEFER_OBSERVED,
    KIND_DEFER_TRUE,
)


def request_threshold(score_sample: float) -> int:
    """Hash threshold below which an impression is sent as a score request (see :func:`requested`)."""
    return int(min(max(score_sample, 0.0), 1.0) * 2**32)


def requested(impression_id: str, below: int) -> bool:
    """Whether the join samples this impression as a score request: a stable hash, so the same
    impressions are sampled after a restart and by anyone replaying the stream (the bench)."""
    return zlib.crc32(impression_id.encode()) < below


class Rejection(msgspec.Struct, frozen=True):
    """A record the join refuses, for the dead-letter topic (original bytes kept)."""

    reason: str
    raw: bytes
    source: int
    offset: int
    key: str


class SourceClock(msgspec.Struct):
    """Event-time progress of one source: newest ts, when it was published, end/idle flags."""

    max_ts: float = -_INF
    max_published: float = 0.0
    done: bool = False
    done_published: float = 0.0
    idle: bool = False


class OrphanClick(msgspec.Struct):
    """A click waiting for its impression (clicks may overtake impressions).

    ``more`` holds later clicks on the same impression, (click, offset, publish time, raw), so
    that they are judged once the impression arrives — as duplicates or as late — exactly as
    they would have been had the impression come first: which of the two topics a consumer
    reads ahead must not change the accounting.
    """

    click: Click
    offset: int
    published: float
    raw: bytes
    more: list[tuple[Click, int, float, bytes]] = msgspec.field(default_factory=list)


class PartitionState(msgspec.Struct):
    """Everything a :class:`PartitionJoin` needs to resume: the checkpoint payload."""

    partition: int
    window_s: float
    policy: str
    watermark: float
    watermark_published: float
    clocks: list[SourceClock]
    queue: list[Impression]
    queue_offsets: list[int]
    out_of_order: list[Impression]
    out_of_order_offsets: list[int]
    clicked: dict[str, int]
    orphans: list[OrphanClick]
    closed_recent: list[str]
    closed_older: list[str]
    examples_total: int
    finished: bool
    #: Matched positives not yet emitted: (click ts, impression id, click publish time, click delay).
    ready: list[tuple[float, str, float, float]] = msgspec.field(default_factory=list)
    #: Score requests not yet emitted: (impression ts, impression id); and the sampling rate.
    requests: list[tuple[float, str]] = msgspec.field(default_factory=list)
    score_sample: float = 0.0
    #: Policy ``defer``: the waiting window, the impressions whose observed label is still to be
    #: sent (heap of (impression ts, impression id)), and those clicked within the waiting window.
    defer_wait_s: float = 0.0
    waiting: list[tuple[float, str]] = msgspec.field(default_factory=list)
    clicked_early: list[str] = msgspec.field(default_factory=list)
    observed_negative: list[str] = msgspec.field(default_factory=list)
    #: Fake negatives not yet emitted (policy fake-negative): (impression ts, impression id,
    #: impression publish time). Checkpoints written before they waited for the watermark lack it.
    fake_negatives: list[tuple[float, str, float]] = msgspec.field(default_factory=list)
    #: Re-keyed inputs (``streams/repartition.py``), per source: next raw offset expected from
    #: each raw partition (older ones are copies and dropped), and raw partitions that have ended.
    input_next: list[dict[int, int]] = msgspec.field(default_factory=list)
    inputs_ended: list[list[int]] = msgspec.field(default_factory=list)
    #: Re-keyed inputs, per source: newest event time per raw partition, and raw partitions idle.
    origin_ts: list[dict[int, float]] = msgspec.field(default_factory=list)
    origins_idle: list[list[int]] = msgspec.field(default_factory=list)
    #: ...and when the record that set each raw partition's newest event time was published.
    origin_published: list[dict[int, float]] = msgspec.field(default_factory=list)
    #: Examples (impression id, kind) a previous owner delivered after the checkpoint it restored
    #: from and this state has not produced again yet: still to be dropped when they come.
    suppress: list[tuple[str, int]] = msgspec.field(default_factory=list)


class JoinCounters(msgspec.Struct):
    """What this process did for the partition (not checkpointed; summed into status)."""

    impressions: int = 0
    clicks: int = 0
    duplicates: int = 0
    duplicate_impressions: int = 0
    positives: int = 0
    negatives: int = 0
    examples: int = 0
    orphans: int = 0
    late_clicks: int = 0
    late_impressions: int = 0
    suppressed: int = 0
    score_requests: int = 0
    #: Re-keyed records dropped as copies of ones already joined (a repartitioner re-read them).
    input_copies: int = 0


class PartitionJoin:
    """Join state and logic for one input partition (see the module docstring).

    Examples are appended to :attr:`out` and rejected records to :attr:`rejected`; the caller
    drains both with :meth:`take` after each batch.
    """

    def __init__(
        self,
        partition: int,
        window_s: float,
        policy: str = POLICY_WAIT,
        *,
        semantics: SemanticLookup | None = None,
        closed_memory: int = 100_000,
        score_sample: float = 0.0,
        profile_history: int = 0,
        profile_ttl_s: float = 0.0,
        defer_wait_s: float = 0.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown join policy {policy!r}; expected one of {POLICIES}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, not {window_s!r}")
        self.partition = partition
        self.window_s = float(window_s)
        self.policy = policy
        self.semantics = semantics
        #: Clicks this partition matched, per user (the last ``profile_history``), kept for the
        #: checkpoint only when semantics are attached: the cache's profiles live in memory. The
        #: worker persists them incrementally (:meth:`take_profile_changes`), apart from the
        #: state snapshot, and users idle for ``profile_ttl_s`` of event time are forgotten.
        self.user_clicks = (
            ClickHistory(profile_history, track_changes=True) if semantics is not None and profile_history > 0 else None
        )
        self.profile_ttl_s = float(profile_ttl_s)
        self._wait = policy == POLICY_WAIT
        self._defer = policy == POLICY_DEFER
        if self._defer and not 0 <= defer_wait_s < window_s:
            raise ValueError(f"defer_wait_s must be in [0, window_s), not {defer_wait_s!r}")
        self.defer_wait_s = float(defer_wait_s) if self._defer else 0.0
        #: ``defer``: impressions whose observed label is still to be sent, as a heap of
        #: (impression ts, id); ids clicked within the waiting window (their observed label is
        #: sent at the click); ids whose observed label went out as a 0. Kept until the window closes.
        self._waiting: list[tuple[float, str]] = []
        self._clicked_early: set[str] = set()
        self._observed_negative: set[str] = set()
        self.watermark = -_INF
        self.watermark_published = 0.0
        self.clocks = [SourceClock(), SourceClock()]
        #: Per source: at the end of its partition (set by the worker; never checkpointed). A
        #: caught-up source's clock runs on with the wall clock (:meth:`current_watermark`).
        self.caught_up = [False, False]
        self.pending: dict[str, Impression] = {}
        self._queue: deque[Impression] = deque()
        self._queue_offsets: deque[int] = deque()
        self._last_queued_ts = -_INF
        self._disorder: list[tuple[float, int, str]] = []
        self._disorder_offsets: dict[str, int] = {}
        self.clicked: dict[str, int] = {}
        #: Positives matched but not yet emitted: heap of (click ts, impression id), released in
        #: event-time order as the watermark passes the click (see "Output order" above).
        self._ready: list[tuple[float, str]] = []
        self._ready_info: dict[str, tuple[float, float]] = {}
        #: Score requests (see "Score requests" above): heap of (impression ts, impression id).
        #: Not under ``fake-negative``, nor ``defer`` without a waiting window: there the example
        #: sent at the impression's time (the fake negative, the observed copy) is the score.
        at_once = policy == POLICY_FAKE_NEGATIVE or (self._defer and self.defer_wait_s == 0)
        self.score_sample = 0.0 if at_once else score_sample
        self._sample_below = request_threshold(self.score_sample)
        self._requests: list[tuple[float, str]] = []
        #: Fake negatives (policy fake-negative), emitted when the watermark reaches their
        #: impression: heap of (impression ts, impression id, impression publish time).
        self._fake_negatives: list[tuple[float, str, float]] = []
        self.orphans: dict[str, OrphanClick] = {}
        self._orphan_heap: list[tuple[float, int, str]] = []
        self._closed_memory = max(1, closed_memory)
        self._closed_now: set[str] = set()
        self._closed_prev: set[str] = set()
        self.examples_total = 0
        self.finished = False
        self.suppress: set[tuple[str, int]] = set()
        #: Re-keyed inputs only: per source, next raw offset expected per raw partition, and the
        #: raw partitions whose end marker arrived (see ``streams/repartition.py``).
        self.input_next: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self.inputs_ended: tuple[set[int], set[int]] = (set(), set())
        #: Re-keyed inputs: newest event time seen per raw partition (data or progress marker),
        #: and raw partitions declared idle; see :meth:`merge_origins`.
        self.origin_ts: tuple[dict[int, float], dict[int, float]] = ({}, {})
        self.origins_idle: tuple[set[int], set[int]] = (set(), set())
        #: ...and the publish time of the record (or progress marker) that set each ``origin_ts``.
        self.origin_published: tuple[dict[int, float], dict[int, float]] = ({}, {})
        self.counters = JoinCounters()
        self.out: list[Example] = []
        self.rejected: list[Rejection] = []

    # ------------------------------------------------------------------ events

    def on_impression(self, imp: Impression, offset: int, published: float, raw: bytes = b"") -> None:
        """An impression from this partition's impressions source; ``raw`` is kept for dead letters."""
        clock = self.clocks[IMPRESSIONS]
        ts = imp.ts
        if ts > clock.max_ts:
            clock.max_ts = ts
            clock.max_published = published
        self.counters.impressions += 1
        iid = imp.impression_id
        if iid in self.pending:
            self.counters.duplicate_impressions += 1
            self.rejected.append(Rejection(REASON_DUPLICATE_IMPRESSION, raw, IMPRESSIONS, offset, iid))
            return
        self.pending[iid] = imp
        if self._sample_below and requested(iid, self._sample_below):
            heapq.heappush(self._requests, (ts, iid))
        if ts >= self._last_queued_ts:
            self._queue.append(imp)
            self._queue_offsets.append(offset)
            self._last_queued_ts = ts
        else:
            heapq.heappush(self._disorder, (ts, offset, iid))
            self._disorder_offsets[iid] = offset
        if ts + self.window_s < self.watermark:
            self.counters.late_impressions += 1
        if self._defer:
            heapq.heappush(self._waiting, (ts, iid))
        elif not self._wait:
            heapq.heappush(self._fake_negatives, (ts, iid, published))
        if self.orphans:
            orphan = self.orphans.pop(iid, None)
            if orphan is not None:
                self._match(imp, orphan.click, orphan.offset, published, orphan.raw)  # decided by the impression
                for click, click_offset, click_published, raw in orphan.more:
                    self._click_on_pending(imp, click, click_offset, click_published, raw)

    def on_click(self, click: Click, offset: int, published: float, raw: bytes) -> None:
        """A click from this partition's clicks source; ``raw`` is kept for dead letters."""
        clock = self.clocks[CLICKS]
        ts = click.ts
        if ts > clock.max_ts:
            clock.max_ts = ts
            clock.max_published = published
        self.counters.clicks += 1
        iid = click.impression_id
        imp = self.pending.get(iid)
        if imp is not None:
            self._click_on_pending(imp, click, offset, published, raw)
            return
        orphan = self.orphans.get(iid)
        if orphan is not None:
            if offset != orphan.offset and all(offset != o for _, o, _, _ in orphan.more):  # not a replayed record
                orphan.more.append((click, offset, published, raw))
        elif iid in self._closed_now or iid in self._closed_prev:
            self.counters.late_clicks += 1
            self.rejected.append(Rejection(REASON_LATE_CLOSED, raw, CLICKS, offset, iid))
        else:
            self.orphans[iid] = OrphanClick(click, offset, published, raw)
            heapq.heappush(self._orphan_heap, (ts, offset, iid))

    def _click_on_pending(self, imp: Impression, click: Click, offset: int, published: float, raw: bytes) -> None:
        """A click on an impression whose window is open: the first counting one matches, a
        later one within the window is a duplicate, one outside the window is late."""
        if imp.impression_id not in self.clicked or click.ts - imp.ts > self.window_s:
            self._match(imp, click, offset, published, raw)
        else:
            self.counters.duplicates += 1

    def _match(self, imp: Impression, click: Click, click_offset: int, published: float, raw: bytes) -> None:
        delay = click.ts - imp.ts
        if delay > self.window_s:
            self.counters.late_clicks += 1
            self.rejected.append(Rejection(REASON_LATE_OUTSIDE, raw, CLICKS, click_offset, imp.impression_id))
            return
        self.clicked[imp.impression_id] = click_offset
        if self._defer and delay <= self.defer_wait_s and imp.impression_id not in self._observed_negative:
            self._clicked_early.add(imp.impression_id)
        self.counters.positives += 1
        heapq.heappush(self._ready, (click.ts, imp.impression_id))
        self._ready_info[imp.impression_id] = (published, max(delay, 0.0))
        if self.semantics is not None:
            self.semantics.observe_click(imp.user_id, imp.item_id, click.ts)
            if self.user_clicks is not None:
                self.user_clicks.observe(imp.user_id, click.ts, imp.item_id)

    def _emit(self, imp: Impression, label: int, kind: int, decided_at: float, delay: float) -> None:
        """Append an example (or, with ``KIND_SCORE_REQUEST``, a score request, not counted as one)."""
        request = kind == KIND_SCORE_REQUEST
        if self.suppress and (imp.impression_id, kind) in self.suppress:
            self.suppress.discard((imp.impression_id, kind))
            self.counters.suppressed += 1
            if not request:
                self.examples_total += 1
            return
        sem = self.semantics
        if sem is None:
            ex = Example(
                imp.impression_id, imp.ts, imp.user_id, imp.item_id, imp.context, label, kind, decided_at, delay
            )
        else:
            item_vec = sem.item(imp.item_id)
            # As of the impression's time: emitted up to a window later (and, in a replay, read
            # while the clicks topic runs ahead or behind), a profile read "now" would hold
            # clicks made after the impression — a leak no live scorer has.
            user_vec = sem.user(imp.user_id, imp.ts)
            flags = (SEM_ITEM_MISS if item_vec is None else 0) | (SEM_USER_MISS if user_vec is None else 0)
            ex = Example(
                imp.impression_id,
                imp.ts,
                imp.user_id,
                imp.item_id,
                imp.context,
                label,
                kind,
                decided_at,
                delay,
                item_vec,
                user_vec,
                flags,
                sem.version,
                sem.item_words(imp.item_id),
            )
        self.out.append(ex)
        if request:
            self.counters.score_requests += 1
        else:
            self.examples_total += 1
            self.counters.examples += 1

    # --------------------------------------------------------------- watermark

    def end_of_stream(self, source: int, published: float) -> None:
        """``source`` delivered its end marker: it counts as +inf from now on."""
        clock = self.clocks[source]
        clock.done = True
        clock.done_published = published

    def set_idle(self, source: int, idle: bool) -> None:
        """Leave an idle source out of the watermark (or bring it back); see module docstring."""
        self.clocks[source].idle = idle

    def reopen(self) -> None:
        """A finished partition receives data again (unbounded runs): start a new event-time epoch."""
        self.clocks = [SourceClock(), SourceClock()]
        self.caught_up = [False, False]
        self.watermark = -_INF
        self.watermark_published = 0.0
        self._last_queued_ts = -_INF
        self.finished = False
        for ended in self.inputs_ended:
            ended.clear()
        for seen in (*self.origin_ts, *self.origin_published):
            seen.clear()  # event time restarts; idleness (``origins_idle``) is about liveness and stays

    def merge_origins(self, raw_partitions: tuple[int, int]) -> None:
        """Re-keyed inputs: set each source's event time to that of its slowest raw partition.

        A re-keyed partition merges records of every raw partition, in whatever order the
        repartitioner read them; the newest time seen would run ahead of a raw partition read
        later and close windows its clicks still belong to. As Flink does across input channels,
        the source's clock is the minimum over raw partitions not ended and not idle (an ended one
        has nothing more, an idle one holds nothing back); the repartitioner sends progress
        markers so that raw partitions with no record for this partition still advance it.

        The clock's publish time goes with it: a caught-up source runs on with the wall clock
        from it (:meth:`current_watermark`), and each raw partition's event time runs from its
        own newest record's publish time. The publish time is set so that the clock's estimate
        is the smallest over those raw partitions (``now + min(ts − published)``); the newest
        record's publish time with the slowest partition's event time held fake negatives and
        windows back by the gap between raw partitions (sparse clicks: ~2 s at p99).
        """
        inf = _INF
        for src in (IMPRESSIONS, CLICKS):
            clock = self.clocks[src]
            if clock.done:
                continue
            seen, ended, idle = self.origin_ts[src], self.inputs_ended[src], self.origins_idle[src]
            published = self.origin_published[src]
            slowest = inf
            lead = inf  # smallest event time − publish time over the live raw partitions
            for q in range(raw_partitions[src]):
                if q not in ended and q not in idle:
                    t = seen.get(q, -inf)
                    if t < slowest:
                        slowest = t
                    at = published.get(q)
                    if at is not None and t - at < lead:
                        lead = t - at
            if slowest < inf:
                clock.max_ts = slowest
                if slowest > -inf and lead < inf:
                    clock.max_published = slowest - lead
            elif seen:
                clock.max_ts = max(seen.values())

    def current_watermark(self, now: float | None = None) -> tuple[float, float]:
        """(watermark the sources allow now, publish time of the record that set it).

        ``now`` (wall seconds, unbounded runs): when every live source is idle, event time goes
        on with the wall clock from each source's newest record (see :meth:`idle_watermark`).
        A source marked :attr:`caught_up` (it has delivered everything published so far) counts
        as its newest event time plus the wall time since that record was published: sparse
        clicks then no longer hold fake negatives (and windows) until the next click comes. The
        same assumption as :meth:`idle_watermark` — event time runs with the wall clock — made
        per source and at once, since the source has nothing more to deliver. A caught-up source
        that never delivered a record (no click yet at a stream's start) holds nothing.
        """
        best, published = _INF, 0.0
        live = 0
        for i, clock in enumerate(self.clocks):
            if clock.done:
                continue
            if clock.idle:
                continue
            ts, at = clock.max_ts, clock.max_published
            if now is not None and self.caught_up[i]:
                if ts == -_INF:
                    continue  # caught up without a record yet (no click so far): holds nothing
                if now > at:
                    ts, at = ts + (now - at), now
            live += 1
            if ts < best:
                best, published = ts, at
        if live == 0:
            if all(c.done for c in self.clocks):
                return _INF, max(c.done_published for c in self.clocks)
            if now is not None:
                return max(self.watermark, self.idle_watermark(now)), now
            return self.watermark, 0.0
        return best, published

    def idle_watermark(self, now: float) -> float:
        """Event time at wall time ``now`` when every live source is idle: the newest event time
        of each source plus the wall time since it was published, the smallest over the sources.

        Why: producers that stop (a quiet night, the end of a hand-fed stream) would otherwise
        hold every open window — and its label — until the next event. Event time is taken to
        run with the wall clock, as it does for live producers, so the last windows close W
        after their impressions in wall time.
        """
        ests = [c.max_ts + max(now - c.max_published, 0.0) for c in self.clocks if not c.done and c.max_ts > -_INF]
        return min(ests) if ests else -_INF

    def advance(self, now: float | None = None) -> None:
        """Move the watermark; emit the positives it passed, then close every window it passed.

        ``now``: wall seconds, to let event time run on while every source is idle.
        """
        wm, published = self.current_watermark(now)
        if wm > self.watermark:
            self.watermark = wm
            self.watermark_published = published
        start = len(self.out)
        requested = self._request(self.watermark)
        requested |= self._fake_negatives_until(self.watermark)
        self._release(self.watermark)
        if self._defer:
            self._observe_waited(self.watermark - self.defer_wait_s, self.watermark_published)
        # Also when the watermark stands still: a late impression may already be closable.
        self._expire(self.watermark - self.window_s, self.watermark_published)
        if requested or self._defer:
            self._order_by_decision(start)

    def close_all(self, published: float) -> None:
        """End of stream: emit every positive, close every window and reject every orphan."""
        self.watermark = _INF
        self.watermark_published = published
        start = len(self.out)
        requested = self._request(_INF)
        requested |= self._fake_negatives_until(_INF)
        self._release(_INF)
        if self._defer:
            self._observe_waited(_INF, published)
        self._expire(_INF, published)
        if requested or self._defer:
            self._order_by_decision(start)

    def _request(self, horizon: float) -> bool:
        """Emit the score requests of impressions at or before ``horizon``; whether there were any."""
        heap = self._requests
        emitted = False
        while heap and heap[0][0] <= horizon:
            _, iid = heapq.heappop(heap)
            imp = self.pending.get(iid)
            if imp is None:
                continue
            self._emit(imp, 0, KIND_SCORE_REQUEST, self.watermark_published, -1.0)
            emitted = True
        return emitted

    def _fake_negatives_until(self, horizon: float) -> bool:
        """Emit the fake negatives of impressions at or before ``horizon``; whether there were any.

        In event time like every other decision: emitted as each impression was *read*, a
        replay's fake negatives ran a whole fetch of the impressions topic ahead of the positive
        copies, which wait for the clicks topic (on MovieLens 100K, months of event time). Live,
        the watermark is near now, so they still leave at once.
        """
        heap, pending = self._fake_negatives, self.pending
        emitted = False
        while heap and heap[0][0] <= horizon:
            _, iid, published = heapq.heappop(heap)
            imp = pending.get(iid)
            if imp is None:
                continue
            self._emit(imp, 0, KIND_FAKE_NEGATIVE, published, -1.0)
            emitted = True
        return emitted

    def _order_by_decision(self, start: int) -> None:
        """Sort what this step emitted (from ``out[start]``) by decision time (stable).

        Why only when requests were emitted: positives and negatives of one step already leave
        in order of their kind's horizon, and only a request must sit *between* them exactly.
        """
        window, wait = self.window_s, self.defer_wait_s
        self.out[start:] = sorted(self.out[start:], key=lambda ex: decision_time(ex, window, wait))

    def _release(self, horizon: float) -> None:
        """Emit matched positives whose click time is at or before ``horizon``, in click-time order."""
        ready, info = self._ready, self._ready_info
        kind = KIND_FINAL if self._wait else KIND_DEFER_TRUE if self._defer else KIND_POSITIVE_COPY
        while ready and ready[0][0] <= horizon:
            _, iid = heapq.heappop(ready)
            published, delay = info.pop(iid)
            if self._defer and iid in self._clicked_early:  # the observed label is this click too
                self._emit(self.pending[iid], 1, KIND_DEFER_OBSERVED, published, delay)
            self._emit(self.pending[iid], 1, kind, published, delay)

    def _observe_waited(self, horizon: float, published: float) -> None:
        """``defer``: send the observed label 0 of impressions with ``ts < horizon`` that were not
        clicked within their waiting window (such a click sends the observed label 1 itself)."""
        waiting, pending, early, observed = self._waiting, self.pending, self._clicked_early, self._observed_negative
        while waiting and waiting[0][0] < horizon:
            _, iid = heapq.heappop(waiting)
            imp = pending.get(iid)
            if imp is None or iid in early:
                continue
            observed.add(iid)
            self._emit(imp, 0, KIND_DEFER_OBSERVED, published, -1.0)

    def _expire(self, horizon: float, published: float) -> None:
        """Close impressions with ``ts < horizon`` and orphans with ``click.ts < horizon``."""
        queue = self._queue
        if queue and queue[0].ts < horizon:
            self._close_queued(horizon, published)
        heap = self._disorder
        while heap and heap[0][0] < horizon:
            _, _, iid = heapq.heappop(heap)
            del self._disorder_offsets[iid]
            self._close(self.pending.pop(iid), published)
        if not queue:
            self._last_queued_ts = -_INF
        orphan_heap = self._orphan_heap
        while orphan_heap and orphan_heap[0][0] < horizon:
            _, offset, iid = heapq.heappop(orphan_heap)
            orphan = self.orphans.get(iid)
            if orphan is not None and orphan.offset == offset:
                del self.orphans[iid]
                self.counters.orphans += 1
                self.counters.duplicates += len(orphan.more)  # as if each had found the orphan buffered
                self.rejected.append(Rejection(REASON_ORPHAN, orphan.raw, CLICKS, offset, iid))

    def _close(self, imp: Impression, published: float) -> None:
        iid = imp.impression_id
        if self._defer:
            self._clicked_early.discard(iid)
            self._observed_negative.discard(iid)
        if self.clicked.pop(iid, None) is None:
            self.counters.negatives += 1
            if self._wait:
                self._emit(imp, 0, KIND_FINAL, published, -1.0)
            elif self._defer:
                self._emit(imp, 0, KIND_DEFER_TRUE, published, -1.0)
        if self.suppress:
            # Closed: every example of this impression has been produced (positives, requests and
            # fake or observed negatives are released before the window closes), so its entries
            # can never match again; dropping them lets ``suppress`` empty and the fast path of
            # ``_close_queued`` come back after a restore.
            for kind in _ALL_KINDS:
                self.suppress.discard((iid, kind))
        self._remember_closed(iid)

    def _remember_closed(self, iid: str) -> None:
        self._closed_now.add(iid)
        if len(self._closed_now) >= self._closed_memory:
            self._closed_prev = self._closed_now
            self._closed_now = set()

    def _close_queued(self, horizon: float, published: float) -> None:
        """The common case of expiry, flattened: this runs once per impression."""
        if not self._wait or self.semantics is not None or self.suppress:
            queue, offsets, pending = self._queue, self._queue_offsets, self.pending
            while queue and queue[0].ts < horizon:
                offsets.popleft()
                imp = queue.popleft()
                del pending[imp.impression_id]
                self._close(imp, published)
            return
        queue, offsets, pending, clicked, out = self._queue, self._queue_offsets, self.pending, self.clicked, self.out
        closed, memory = self._closed_now, self._closed_memory
        negatives = 0
        while queue and queue[0].ts < horizon:
            offsets.popleft()
            imp = queue.popleft()
            iid = imp.impression_id
            del pending[iid]
            if clicked.pop(iid, None) is None:
                negatives += 1
                out.append(Example(iid, imp.ts, imp.user_id, imp.item_id, imp.context, 0, KIND_FINAL, published, -1.0))
            closed.add(iid)
            if len(closed) >= memory:
                self._closed_prev = closed
                closed = self._closed_now = set()
        self.counters.negatives += negatives
        self.counters.examples += negatives
        self.examples_total += negatives

    # ------------------------------------------------------------- inspection

    def take(self) -> tuple[list[Example], list[Rejection]]:
        """Hand over (and forget) the examples and rejections produced since the last call."""
        out, rejected = self.out, self.rejected
        self.out, self.rejected = [], []
        return out, rejected

    def oldest_offsets(self) -> tuple[int | None, int | None]:
        """Offsets of the oldest impression / click still held (``None`` when none is).

        Replaying both sources from here rebuilds this state (and re-emits some already
        delivered examples), which is what the worker commits to Kafka.
        """
        imp_candidates = []
        if self._queue_offsets:
            imp_candidates.append(self._queue_offsets[0])
        if self._disorder_offsets:
            imp_candidates.append(min(self._disorder_offsets.values()))
        click_candidates = [o.offset for o in self.orphans.values()]
        if self.clicked:
            click_candidates.append(min(self.clicked.values()))
        return (min(imp_candidates) if imp_candidates else None, min(click_candidates) if click_candidates else None)

    @property
    def watermark_lag(self) -> float:
        """Event-time seconds between the newest event seen and the watermark (0 if undefined)."""
        newest = max(c.max_ts for c in self.clocks)
        if not (math.isfinite(newest) and math.isfinite(self.watermark)):
            return 0.0
        return max(0.0, newest - self.watermark)

    # ------------------------------------------------------------ checkpoints

    def snapshot(self) -> PartitionState:
        """The state to checkpoint (call between batches, after :meth:`take`)."""
        disorder = sorted(self._disorder)
        return PartitionState(
            partition=self.partition,
            window_s=self.window_s,
            policy=self.policy,
            watermark=self.watermark,
            watermark_published=self.watermark_published,
            clocks=[msgspec.structs.replace(c) for c in self.clocks],
            queue=list(self._queue),
            queue_offsets=list(self._queue_offsets),
            out_of_order=[self.pending[iid] for _, _, iid in disorder],
            out_of_order_offsets=[off for _, off, _ in disorder],
            clicked=dict(self.clicked),
            orphans=list(self.orphans.values()),
            closed_recent=list(self._closed_now),
            closed_older=list(self._closed_prev),
            examples_total=self.examples_total,
            finished=self.finished,
            ready=[(ts, iid, *self._ready_info[iid]) for ts, iid in sorted(self._ready)],
            requests=sorted(self._requests),
            score_sample=self.score_sample,
            defer_wait_s=self.defer_wait_s,
            waiting=sorted(self._waiting),
            clicked_early=sorted(self._clicked_early),
            observed_negative=sorted(self._observed_negative),
            fake_negatives=sorted(self._fake_negatives),
            input_next=[dict(d) for d in self.input_next],
            inputs_ended=[sorted(e) for e in self.inputs_ended],
            origin_ts=[dict(d) for d in self.origin_ts],
            origins_idle=[sorted(e) for e in self.origins_idle],
            origin_published=[dict(d) for d in self.origin_published],
            suppress=sorted(self.suppress),
        )

    def suppress_delivered(self, delivered: Iterable[tuple[str, int]]) -> int:
        """Drop these examples (impression id, kind) once each when the replay produces them again.

        They were delivered after the restored state (by a previous owner, or before a crash).
        Entries of impressions this state has already closed are skipped: a closed impression
        produces nothing more, so they could never match, and while any entry is held the fast
        close path is off. Returns how many entries were added.
        """
        closed_now, closed_prev = self._closed_now, self._closed_prev
        before = len(self.suppress)
        self.suppress.update(e for e in delivered if e[0] not in closed_now and e[0] not in closed_prev)
        return len(self.suppress) - before

    def expire_profiles(self) -> list[str]:
        """Forget the kept clicks of users idle for ``profile_ttl_s`` before the watermark.

        Event time, not wall time, so a replay forgets exactly what a live run would; nothing
        happens before the watermark is defined or after the partition has ended (+∞).
        """
        if self.user_clicks is None or self.profile_ttl_s <= 0 or not math.isfinite(self.watermark):
            return []
        return self.user_clicks.expire(self.watermark - self.profile_ttl_s)

    def take_profile_changes(self) -> ProfileChanges | None:
        """Users whose kept clicks changed or were forgotten since the last call (None without profiles)."""
        return self.user_clicks.take_changes() if self.user_clicks is not None else None

    def user_clicks_log(self) -> ClickLog:
        """Every user's kept clicks (what a full restore needs)."""
        return self.user_clicks.export() if self.user_clicks is not None else ClickLog()

    def load_user_clicks(self, user_clicks: ClickLog) -> None:
        """Feed persisted clicks back into the semantic cache's profiles and this partition's
        kept clicks (not marked as changed: they are persisted already)."""
        if self.semantics is None:
            return
        for user_id, ts, item_id in user_clicks.clicks():
            self.semantics.observe_click(user_id, item_id, ts)
            if self.user_clicks is not None:
                self.user_clicks.observe(user_id, ts, item_id)
        if self.user_clicks is not None:
            self.user_clicks.take_changes()

    @classmethod
    def restore(
        cls,
        state: PartitionState,
        *,
        semantics: SemanticLookup | None = None,
        closed_memory: int = 100_000,
        profile_history: int = 0,
        profile_ttl_s: float = 0.0,
        user_clicks: ClickLog | None = None,
    ) -> PartitionJoin:
        """Rebuild a join from :meth:`snapshot` output (window and policy come from the state).

        ``user_clicks`` (the kept clicks, persisted apart from the snapshot) go back into
        ``semantics`` (which ignores clicks it already holds), so user profiles are as they were
        when the checkpoint was taken; the clicks after it are read again from the checkpoint's
        offsets. Clicks persisted *after* the snapshot are harmless: the replay re-matches them
        (counted once), and profiles are read as of each impression's time.
        """
        join = cls(
            state.partition,
            state.window_s,
            state.policy,
            semantics=semantics,
            closed_memory=closed_memory,
            score_sample=state.score_sample,
            profile_history=profile_history,
            profile_ttl_s=profile_ttl_s,
            defer_wait_s=state.defer_wait_s,
        )
        if user_clicks is not None:
            join.load_user_clicks(user_clicks)
        join.watermark = state.watermark
        join.watermark_published = state.watermark_published
        join.clocks = [msgspec.structs.replace(c) for c in state.clocks]
        for imp, off in zip(state.queue, state.queue_offsets):
            join.pending[imp.impression_id] = imp
            join._queue.append(imp)
            join._queue_offsets.append(off)
        if state.queue:
            join._last_queued_ts = state.queue[-1].ts
        for imp, off in zip(state.out_of_order, state.out_of_order_offsets):
            join.pending[imp.impression_id] = imp
            join._disorder.append((imp.ts, off, imp.impression_id))
            join._disorder_offsets[imp.impression_id] = off
        heapq.heapify(join._disorder)
        join.clicked = dict(state.clicked)
        for orphan in state.orphans:
            join.orphans[orphan.click.impression_id] = orphan
            join._orphan_heap.append((orphan.click.ts, orphan.offset, orphan.click.impression_id))
        heapq.heapify(join._orphan_heap)
        join._closed_now = set(state.closed_recent)
        join._closed_prev = set(state.closed_older)
        join.examples_total = state.examples_total
        join.finished = state.finished
        for ts, iid, published, delay in state.ready:
            join._ready.append((ts, iid))
            join._ready_info[iid] = (published, delay)
        heapq.heapify(join._ready)
        join._requests = [tuple(r) for r in state.requests]  # type: ignore[misc]
        heapq.heapify(join._requests)
        join._waiting = [(float(ts), str(iid)) for ts, iid in state.waiting]
        heapq.heapify(join._waiting)
        join._clicked_early = set(state.clicked_early)
        join._observed_negative = set(state.observed_negative)
        join._fake_negatives = [(float(ts), str(iid), float(pub)) for ts, iid, pub in state.fake_negatives]
        heapq.heapify(join._fake_negatives)
        for src, nxt in enumerate(state.input_next[:2]):
            join.input_next[src].update(nxt)
        for src, ended in enumerate(state.inputs_ended[:2]):
            join.inputs_ended[src].update(ended)
        for src, seen in enumerate(state.origin_ts[:2]):
            join.origin_ts[src].update(seen)
        for src, idle in enumerate(state.origins_idle[:2]):
            join.origins_idle[src].update(idle)
        for src, times in enumerate(state.origin_published[:2]):
            join.origin_published[src].update(times)
        join.suppress_delivered((str(iid), int(kind)) for iid, kind in state.suppress)
        return join


_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(PartitionState)


def encode_state(state: PartitionState) -> bytes:
    """MessagePack bytes of a partition state."""
    return _state_encoder.encode(state)


def decode_state(raw: bytes) -> PartitionState:
    """Inverse of :func:`encode_state`."""
    return _state_decoder.decode(raw)
