"""Unit and property tests of the pure join logic (streams/join.py): no Kafka here."""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lookups import ClickSetLookup

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
    Impression,
    decision_time,
    encode_event,
)
from livectr.core.words import pack_words
from livectr.streams.join import (
    CLICKS,
    IMPRESSIONS,
    POLICY_DEFER,
    POLICY_FAKE_NEGATIVE,
    POLICY_WAIT,
    REASON_DUPLICATE_IMPRESSION,
    REASON_LATE_CLOSED,
    REASON_LATE_OUTSIDE,
    REASON_ORPHAN,
    PartitionJoin,
    PartitionState,
    decode_state,
    encode_state,
)
from livectr.streams.profile_store import ProfileStore
from livectr.streams.profiles import ProfileChanges

W = 600.0
T0 = 1_700_000_000.0


def imp(iid: str, ts: float, user: str = "u1", item: str = "i1") -> Impression:
    return Impression(iid, T0 + ts, user, item, {"device": "mobile"})


def clk(iid: str, ts: float) -> Click:
    return Click(iid, T0 + ts)


class Feeder:
    """Feeds a join like the worker does: offsets per source, publish time = a fake wall clock."""

    def __init__(self, join: PartitionJoin) -> None:
        self.join = join
        self.offsets = [0, 0]
        self.examples: list = []
        self.rejected: list = []

    def imp(self, event: Impression, published: float = 0.0) -> None:
        self.join.on_impression(event, self.offsets[IMPRESSIONS], published, encode_event(event))
        self.offsets[IMPRESSIONS] += 1

    def click(self, event: Click, published: float = 0.0) -> None:
        self.join.on_click(event, self.offsets[CLICKS], published, encode_event(event))
        self.offsets[CLICKS] += 1

    def advance(self) -> None:
        self.join.advance()
        self.drain()

    def close(self, published: float = 0.0) -> None:
        self.join.close_all(published)
        self.drain()

    def drain(self) -> None:
        out, rejected = self.join.take()
        self.examples += out
        self.rejected += rejected


def labels(examples: list) -> dict[str, int]:
    return {ex.impression_id: ex.label for ex in examples}


# ---------------------------------------------------------------------------- unit tests


def test_in_order_click_is_positive_and_unclicked_closes_negative() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 0), published=100.0)
    f.imp(imp("b", 5), published=101.0)
    f.click(clk("a", 30), published=102.0)
    f.advance()  # watermark 5: a's click (30) is not reached yet, so its positive waits
    assert f.examples == []
    f.imp(imp("c", 700), published=103.0)
    f.advance()  # watermark 30 releases a's positive; clicks at 30 cannot pass b's window
    assert [(e.impression_id, e.label, e.kind, e.decided_at, e.click_delay) for e in f.examples] == [
        ("a", 1, KIND_FINAL, 102.0, 30.0)
    ]
    f.click(clk("c", 704), published=104.0)
    f.advance()  # watermark 700 > 5 + 600 closes b, decided by the impressions record that set it
    neg = f.examples[-1]
    assert (neg.impression_id, neg.label, neg.kind, neg.decided_at, neg.click_delay) == (
        "b",
        0,
        KIND_FINAL,
        103.0,
        -1.0,
    )
    assert f.join.counters.negatives == 1 and f.join.counters.positives == 2


def test_click_before_impression_joins_when_impression_arrives() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.click(clk("a", 12), published=200.0)
    f.advance()
    assert f.examples == [] and "a" in f.join.orphans
    f.imp(imp("a", 10), published=201.0)
    f.advance()  # watermark min(10, 12) = 10: the click at 12 is not reached yet
    assert f.examples == [] and not f.join.orphans
    f.close()
    assert [(e.label, e.decided_at, e.click_delay) for e in f.examples] == [(1, 201.0, 2.0)]


def test_click_with_clock_skew_counts_with_zero_delay() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 10))
    f.click(clk("a", 8))
    f.advance()  # watermark 8 reaches the click
    assert [(e.label, e.click_delay) for e in f.examples] == [(1, 0.0)]


def test_click_at_exactly_window_end_counts() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 0))
    f.imp(imp("z", W))
    f.click(clk("x", W))  # an unrelated click moves the clicks clock to W: watermark = W, not > W
    f.advance()
    f.click(clk("a", W))
    f.close()
    assert labels(f.examples)["a"] == 1


def test_late_click_after_window_closed_is_dead_lettered_as_late() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 0))
    f.imp(imp("b", 700))
    f.click(clk("b", 701))
    f.advance()  # watermark 700 closes a; b's click at 701 waits for the watermark
    assert labels(f.examples) == {"a": 0}
    late = clk("a", 650)
    f.click(late)
    f.drain()
    assert [(r.reason, r.key, r.raw, r.source) for r in f.rejected] == [
        (REASON_LATE_CLOSED, "a", encode_event(late), CLICKS)
    ]
    assert f.join.counters.late_clicks == 1


def test_click_beyond_window_while_impression_pending_is_late() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 0))
    f.click(clk("a", W + 1))
    f.drain()
    assert f.examples == [] and [r.reason for r in f.rejected] == [REASON_LATE_OUTSIDE]
    f.close()
    assert labels(f.examples) == {"a": 0}


def test_duplicate_clicks_count_once() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.click(clk("a", 3))
    f.click(clk("a", 3))  # duplicate while still an orphan
    f.imp(imp("a", 1))
    f.click(clk("a", 4))  # duplicate after the join
    f.close()
    assert [(e.impression_id, e.label) for e in f.examples] == [("a", 1)]
    assert f.join.counters.duplicates == 2 and f.rejected == []


def test_orphan_click_is_dead_lettered_when_watermark_passes_its_window() -> None:
    f = Feeder(PartitionJoin(0, W))
    orphan = clk("ghost", 10)
    f.click(orphan)
    f.imp(imp("x", 611))
    f.click(clk("x", 611))
    f.advance()
    assert [(r.reason, r.key, r.offset, r.raw) for r in f.rejected] == [
        (REASON_ORPHAN, "ghost", 0, encode_event(orphan))
    ]
    assert f.join.counters.orphans == 1


def test_duplicate_impression_id_is_rejected() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 0))
    f.imp(imp("a", 1))
    f.close()
    assert [r.reason for r in f.rejected] == [REASON_DUPLICATE_IMPRESSION]
    assert len(f.examples) == 1


def test_fake_negative_policy_emits_negative_at_once_then_positive_copy() -> None:
    f = Feeder(PartitionJoin(0, W, POLICY_FAKE_NEGATIVE))
    f.imp(imp("a", 0), published=10.0)
    f.imp(imp("b", 1), published=11.0)
    f.click(clk("x", 1), published=11.5)  # the clicks source reaches t=1: the watermark is 1
    f.advance()
    # "at once" in event time: as soon as the watermark reaches the impression; decided_at is
    # the impression's publish time
    assert [(e.impression_id, e.label, e.kind, e.decided_at) for e in f.examples] == [
        ("a", 0, KIND_FAKE_NEGATIVE, 10.0),
        ("b", 0, KIND_FAKE_NEGATIVE, 11.0),
    ]
    f.click(clk("a", 20), published=12.0)
    f.click(clk("a", 21), published=13.0)  # duplicate: no second copy
    f.close()
    assert [(e.impression_id, e.label, e.kind, e.decided_at, e.click_delay) for e in f.examples[2:]] == [
        ("a", 1, KIND_POSITIVE_COPY, 12.0, 20.0)
    ]
    assert f.join.counters.duplicates == 1 and not f.join.pending


def test_fake_negative_with_click_before_impression() -> None:
    f = Feeder(PartitionJoin(0, W, POLICY_FAKE_NEGATIVE))
    f.click(clk("a", 5))
    f.imp(imp("a", 0), published=3.0)
    f.advance()  # watermark min(0, 5) = 0: the impression's time
    assert [(e.kind, e.label) for e in f.examples] == [(KIND_FAKE_NEGATIVE, 0)]  # at once, as the policy says
    f.close()
    assert [(e.kind, e.label) for e in f.examples] == [(KIND_FAKE_NEGATIVE, 0), (KIND_POSITIVE_COPY, 1)]


def test_fake_negatives_wait_for_the_watermark_when_impressions_are_read_ahead() -> None:
    """A replay's consumer reads the impressions topic far ahead of the clicks topic (ml-100k:
    months of event time in one fetch). The fake negatives must still leave in decision-time
    order with the positive copies, not as each impression is read: else the learner trains on
    every impression as a non-click long before its click comes back."""
    f = Feeder(PartitionJoin(0, W, POLICY_FAKE_NEGATIVE))
    for k in range(50):  # one impression every 1,000 s, each clicked 5 s later
        f.imp(imp(f"i{k}", 1000.0 * k), published=float(k))
    f.advance()  # the clicks source has delivered nothing: the watermark is undefined
    assert f.examples == []
    for k in range(50):
        f.click(clk(f"i{k}", 1000.0 * k + 5), published=100.0 + k)
        f.advance()
    f.close()
    decided = [decision_time(ex, W) for ex in f.examples]
    assert decided == sorted(decided)
    assert [(ex.impression_id, ex.kind) for ex in f.examples[:4]] == [
        ("i0", KIND_FAKE_NEGATIVE),
        ("i0", KIND_POSITIVE_COPY),
        ("i1", KIND_FAKE_NEGATIVE),
        ("i1", KIND_POSITIVE_COPY),
    ]
    assert Counter(ex.kind for ex in f.examples) == {KIND_FAKE_NEGATIVE: 50, KIND_POSITIVE_COPY: 50}


def test_watermark_is_min_over_sources_end_markers_count_as_infinite() -> None:
    join = PartitionJoin(0, W)
    f = Feeder(join)
    f.imp(imp("a", 0), published=1.0)
    f.imp(imp("b", 5000), published=2.0)
    f.advance()
    assert join.watermark == -math.inf and f.examples == []  # clicks have said nothing yet
    f.click(clk("b", 5001), published=3.0)
    f.advance()
    assert join.watermark == T0 + 5000 and labels(f.examples) == {"a": 0}  # b's click at 5001 not reached
    assert f.examples[-1].decided_at == 2.0  # the impressions record limited the watermark
    f.imp(imp("c", 6000), published=4.0)
    join.end_of_stream(CLICKS, published=5.0)
    f.advance()
    assert join.watermark == T0 + 6000 and labels(f.examples) == {"a": 0, "b": 1}  # clicks ended: impressions drive it
    join.end_of_stream(IMPRESSIONS, published=6.0)
    f.advance()
    assert join.watermark == math.inf and labels(f.examples)["c"] == 0
    assert f.examples[-1].decided_at == 6.0  # the end marker that made it infinite


def test_watermark_never_moves_back() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 100))
    f.click(clk("a", 100))
    f.advance()
    wm = f.join.watermark
    f.click(clk("x", 50))
    f.advance()
    assert f.join.watermark == wm


def test_idle_source_is_left_out_and_all_idle_holds() -> None:
    join = PartitionJoin(0, W)
    f = Feeder(join)
    f.imp(imp("a", 0))
    f.imp(imp("b", 1000))
    f.advance()
    assert f.examples == []
    join.set_idle(CLICKS, True)
    f.advance()
    assert labels(f.examples) == {"a": 0} and join.watermark == T0 + 1000
    join.set_idle(IMPRESSIONS, True)
    f.imp(imp("c", 5000))
    f.advance()
    assert join.watermark == T0 + 1000  # every live source idle: held, not guessed
    join.set_idle(IMPRESSIONS, False)
    join.set_idle(CLICKS, False)
    f.click(clk("c", 5001))
    f.advance()  # watermark 5000: c's click at 5001 is not reached yet
    assert labels(f.examples) == {"a": 0, "b": 0}
    f.close()
    assert labels(f.examples) == {"a": 0, "c": 1, "b": 0}


def test_every_source_idle_lets_event_time_run_with_the_wall_clock() -> None:
    """Producers that stop do not hold the last windows open: with every live source idle, event
    time runs on from each source's newest record at wall speed, the smaller estimate wins."""
    join = PartitionJoin(0, W)
    f = Feeder(join)
    f.imp(imp("a", 0), published=1000.0)
    f.imp(imp("b", 100), published=1010.0)
    f.click(clk("a", 50), published=1005.0)
    join.set_idle(IMPRESSIONS, True)
    join.set_idle(CLICKS, True)
    join.advance(now=1300.0)  # impressions: 100 + 290 = 390; clicks: 50 + 295 = 345
    f.drain()
    assert join.watermark == T0 + 345 and labels(f.examples) == {"a": 1}
    join.advance(now=1710.0)  # clicks: 50 + 705 = 755 > 100 + 600 closes b; impressions: 100 + 700
    f.drain()
    assert labels(f.examples) == {"a": 1, "b": 0} and join.watermark == T0 + 755
    join.advance()  # without a wall clock nothing is guessed
    assert join.watermark == T0 + 755
    join.set_idle(CLICKS, False)
    join.advance(now=5000.0)  # a live source again bounds the watermark (which never goes back)
    assert join.watermark == T0 + 755


def test_a_caught_up_source_runs_on_with_the_wall_clock() -> None:
    """Sparse clicks (issue 15's freshness): a clicks partition with nothing more to deliver no
    longer holds fake negatives until the next click; its clock runs on from its newest record."""
    join = PartitionJoin(0, W, policy=POLICY_FAKE_NEGATIVE)
    f = Feeder(join)
    f.click(clk("x", 0), published=1000.0)  # the last click so far (an orphan for now)
    for k in range(1, 6):
        f.imp(imp(f"i{k}", k), published=1000.0 + k)
    join.advance(now=1005.0)
    f.drain()
    assert join.watermark == T0 + 0 and f.examples == []  # held by the clicks' clock
    join.caught_up[CLICKS] = True  # the worker saw the end of the clicks partition
    join.advance(now=1003.5)  # clicks: 0 + 3.5 s of wall time
    f.drain()
    assert join.watermark == T0 + 3.5
    assert sorted(ex.impression_id for ex in f.examples) == ["i1", "i2", "i3"]
    assert {ex.kind for ex in f.examples} == {KIND_FAKE_NEGATIVE}
    assert [ex.decided_at for ex in f.examples] == [1001.0, 1002.0, 1003.0]  # their impressions' publish times
    join.advance(now=1100.0)  # never past the impressions' own clock (5): the minimum still holds
    assert join.watermark == T0 + 5
    join.advance()  # without a wall clock nothing is guessed, and the watermark never goes back
    assert join.watermark == T0 + 5
    join.caught_up[CLICKS] = False  # a click arrives: the clicks' own clock again
    f.click(clk("i5", 6), published=1106.0)
    f.imp(imp("i6", 7), published=1107.0)
    join.advance(now=1107.0)
    f.drain()
    assert join.watermark == T0 + 6 and {ex.impression_id for ex in f.examples if ex.label == 1} == {"i5"}


def test_a_caught_up_rekeyed_source_runs_on_from_its_slowest_raw_partition() -> None:
    """Re-keyed clicks merge raw partitions: the clock is the slowest one's event time, and once
    caught up it runs on from *that* partition's record. From the newest record's publish time
    (as before) it lagged by the gap between raw partitions — sparse clicks held fake negatives
    ~2 s at p99 (bench/freshness.py)."""
    join = PartitionJoin(0, W, policy=POLICY_FAKE_NEGATIVE)
    f = Feeder(join)
    for q, (t, at) in enumerate(((2, 1002.0), (8, 1008.0))):  # the newest click of raw partitions 0, 1
        f.click(clk(f"x{q}", t), published=at)
        join.origin_ts[CLICKS][q], join.origin_published[CLICKS][q] = T0 + t, at
    for k in range(1, 11):
        f.imp(imp(f"i{k}", k), published=1000.0 + k)
        join.origin_ts[IMPRESSIONS][0], join.origin_published[IMPRESSIONS][0] = T0 + k, 1000.0 + k
    join.merge_origins((1, 2))
    join.advance(now=1009.0)
    f.drain()
    assert join.watermark == T0 + 2 and labels(f.examples) == {"i1": 0, "i2": 0}  # the slowest partition
    join.caught_up[CLICKS] = True
    join.advance(now=1009.0)  # partition 0: 2 + 7 s of wall time; partition 1: 8 + 1 s
    f.drain()
    assert join.watermark == T0 + 9
    assert sorted(ex.impression_id for ex in f.examples) == sorted(f"i{k}" for k in range(1, 10))


def test_a_caught_up_source_without_records_holds_nothing() -> None:
    """At a stream's start the first click comes a click delay after the first impressions: a
    clicks partition at its end with no record yet does not hold the fake negatives until then."""
    join = PartitionJoin(0, W, policy=POLICY_FAKE_NEGATIVE)
    f = Feeder(join)
    f.imp(imp("a", 0), published=1000.0)
    f.imp(imp("b", 1), published=1001.0)
    join.advance(now=1001.0)
    assert join.watermark == -math.inf
    join.caught_up[CLICKS] = True
    join.advance(now=1001.0)
    f.drain()
    assert join.watermark == T0 + 1 and labels(f.examples) == {"a": 0, "b": 0}
    join.caught_up[IMPRESSIONS] = True  # both at their end: the impressions' clock runs on alone
    join.advance(now=1003.0)
    assert join.watermark == T0 + 3


def test_end_of_stream_flush_closes_everything() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 0))
    f.imp(imp("b", 1))
    f.click(clk("b", 2))
    f.click(clk("ghost", 3))
    f.close(published=42.0)
    assert labels(f.examples) == {"b": 1, "a": 0}
    assert f.examples[-1].decided_at == 42.0
    assert [r.reason for r in f.rejected] == [REASON_ORPHAN]
    assert not f.join.pending and not f.join.orphans and not f.join.clicked


def test_out_of_order_and_late_impressions_expire_on_time() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 100))
    f.imp(imp("b", 50))  # older than its predecessor: kept in the disorder heap
    f.click(clk("q", 651))
    f.advance()  # watermark 100: nothing closes
    f.imp(imp("c", 2000))
    f.advance()  # watermark 651 > 50 + 600: b closes, although it sits behind a
    assert labels(f.examples) == {"b": 0}
    f.imp(imp("d", 0))  # arrives with its window already closed
    f.advance()
    assert labels(f.examples) == {"b": 0, "d": 0} and f.join.counters.late_impressions == 1


def test_oldest_offsets_track_what_state_still_needs() -> None:
    f = Feeder(PartitionJoin(0, W))
    assert f.join.oldest_offsets() == (None, None)
    f.imp(imp("a", 0))  # imp offset 0
    f.imp(imp("b", 10))  # imp offset 1
    f.click(clk("b", 11))  # click offset 0 (b is clicked, still pending)
    f.click(clk("z", 12))  # click offset 1 (orphan)
    assert f.join.oldest_offsets() == (0, 0)
    f.imp(imp("c", 605))
    f.click(clk("c", 606))
    f.advance()  # closes a (ts 0)
    assert f.join.oldest_offsets() == (1, 0)


class DictLookup:
    """A real in-memory SemanticLookup (the protocol's simplest implementation).

    A user's vector is the vector of the item they clicked last up to the asked time.
    """

    version = "v-test"

    def __init__(self, items: dict[str, bytes], words: dict[str, bytes] | None = None) -> None:
        self.items = items
        self.words = words or {}
        self.users: dict[str, list[tuple[float, bytes]]] = {}
        self.clicks: list[tuple[str, str]] = []

    def item(self, item_id: str) -> bytes | None:
        return self.items.get(item_id)

    def item_words(self, item_id: str) -> bytes | None:
        return self.words.get(item_id)

    def user(self, user_id: str, at: float | None = None) -> bytes | None:
        before = [blob for ts, blob in sorted(self.users.get(user_id, [])) if at is None or ts < at]
        return before[-1] if before else None

    def observe_click(self, user_id: str, item_id: str, ts: float) -> None:
        self.clicks.append((user_id, item_id))
        self.users.setdefault(user_id, []).append((ts, self.items.get(item_id, b"")))

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def test_semantic_vectors_and_miss_flags_are_attached() -> None:
    words = pack_words("The Usual Suspects (1995)", 16)
    sem = DictLookup({"i1": b"\x01\x02"}, {"i1": words})
    f = Feeder(PartitionJoin(0, W, semantics=sem))
    f.imp(imp("a", 0, user="u1", item="i1"))
    f.imp(imp("b", 1, user="u2", item="i9"))
    f.click(clk("a", 2))
    f.close()
    by_id = {e.impression_id: e for e in f.examples}
    assert (by_id["a"].item_sem, by_id["a"].user_sem, by_id["a"].sem_flags) == (b"\x01\x02", None, SEM_USER_MISS)
    assert by_id["b"].sem_flags == SEM_ITEM_MISS | SEM_USER_MISS and by_id["b"].sem_version == "v-test"
    assert by_id["a"].item_words == words and by_id["b"].item_words is None  # the item's words ride along
    assert sem.clicks == [("u1", "i1")]


def test_user_vectors_hold_only_clicks_made_before_the_impression() -> None:
    """A replay may read a click before an earlier impression: the profile must not show it."""
    sem = DictLookup({"i1": b"\x01\x02", "i2": b"\x03\x04"})
    f = Feeder(PartitionJoin(0, W, semantics=sem))
    f.imp(imp("a", 0, user="u1", item="i1"))
    f.click(clk("a", 2))
    f.imp(imp("b", 1, user="u1", item="i2"))  # read after the click at 2, shown before it
    f.imp(imp("c", 3, user="u1", item="i2"))
    f.close()
    by_id = {e.impression_id: e for e in f.examples}
    assert by_id["a"].user_sem is None and by_id["b"].user_sem is None
    assert by_id["c"].user_sem == b"\x01\x02" and not by_id["c"].sem_flags & SEM_USER_MISS


def test_suppressed_examples_are_counted_but_not_resent() -> None:
    f = Feeder(PartitionJoin(0, W))
    f.join.suppress = {("a", KIND_FINAL)}
    f.imp(imp("a", 0))
    f.imp(imp("b", 0))
    f.close()
    assert labels(f.examples) == {"b": 0}
    assert f.join.examples_total == 2 and f.join.counters.suppressed == 1 and not f.join.suppress


def test_suppress_entries_that_never_match_go_when_their_impression_closes() -> None:
    """After a restore ``suppress`` may hold entries the replay never produces again (here a
    fake negative under the wait policy); once the impression's window has passed they can never
    match, so they go, ``suppress`` empties and closing takes the fast path again."""
    f = Feeder(PartitionJoin(0, W))
    f.join.suppress = {("a", KIND_FAKE_NEGATIVE), ("b", KIND_FINAL), ("b", KIND_SCORE_REQUEST)}
    f.imp(imp("a", 0))
    f.imp(imp("b", 1))
    f.imp(imp("c", 2 * W))
    f.click(clk("x", 2 * W))
    f.advance()
    assert labels(f.examples) == {"a": 0}  # b's negative was delivered before the restart
    assert f.join.suppress == set() and f.join.counters.suppressed == 1
    slow_closes = []
    original = f.join._close
    f.join._close = lambda i, p: (slow_closes.append(i.impression_id), original(i, p))  # type: ignore[method-assign]
    f.imp(imp("d", 2 * W + 1))
    f.imp(imp("e", 4 * W))
    f.click(clk("y", 4 * W))
    f.advance()
    assert labels(f.examples) == {"a": 0, "c": 0, "d": 0}
    assert slow_closes == []  # _close_queued's fast path, back on


def test_pending_suppressions_travel_in_the_checkpoint_and_closed_ones_are_dropped() -> None:
    """A checkpoint taken after a restore records examples offsets past what the previous owner
    delivered: the suppressions not matched yet must travel in the state, or a second restore
    resends those examples. Entries of impressions already closed can never match: dropped."""
    f = Feeder(PartitionJoin(0, W))
    f.imp(imp("a", 0))
    f.imp(imp("b", 1))
    f.imp(imp("c", 2 * W))
    f.click(clk("x", 2 * W))
    f.advance()
    assert labels(f.examples) == {"a": 0, "b": 0}  # a and b closed; c pending
    assert f.join.suppress_delivered([("a", KIND_FINAL), ("c", KIND_FINAL), ("c", KIND_SCORE_REQUEST)]) == 2
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(f.join.snapshot()), type=PartitionState)
    restored = Feeder(PartitionJoin.restore(state))
    assert restored.join.suppress == {("c", KIND_FINAL), ("c", KIND_SCORE_REQUEST)}
    restored.close()
    assert labels(restored.examples) == {}  # c's label was delivered by the previous owner
    assert restored.join.counters.suppressed == 1 and not restored.join.suppress


def test_unknown_policy_and_bad_window_are_refused() -> None:
    with pytest.raises(ValueError):
        PartitionJoin(0, W, "eager")
    with pytest.raises(ValueError):
        PartitionJoin(0, 0.0)


# ------------------------------------------------------------------ property tests

WP = 20.0  # a small window so random timestamps land on both sides of it
WAIT = 5.0  # policy defer's waiting window in the property tests


class ReferenceJoin:
    """The documented semantics written the naive way (lists and scans, no deque or heaps)."""

    def __init__(self, policy: str) -> None:
        self.wait = policy == POLICY_WAIT
        self.defer = policy == POLICY_DEFER
        self.observed: set[str] = set()  # defer: impressions whose observed label went out
        self.max_ts = [-math.inf, -math.inf]
        self.wm = -math.inf
        self.pending: dict[str, list] = {}  # iid -> [impression, clicked]
        self.orphans: dict[str, list[Click]] = {}  # every click of a not-yet-seen impression, in arrival order
        self.closed: set[str] = set()
        self.out: list[tuple[str, int, int]] = []
        self.rejected: list[tuple[str, str]] = []

    def impression(self, i: Impression) -> None:
        self.max_ts[0] = max(self.max_ts[0], i.ts)
        self.pending[i.impression_id] = [i, False]
        if not self.wait and not self.defer:
            self.out.append((i.impression_id, 0, KIND_FAKE_NEGATIVE))
        for c in self.orphans.pop(i.impression_id, []):
            self.click(c)  # judged as if the impression had come first

    def click(self, c: Click) -> None:
        self.max_ts[1] = max(self.max_ts[1], c.ts)
        iid = c.impression_id
        if iid in self.pending:
            if not self.pending[iid][1] or c.ts - self.pending[iid][0].ts > WP:
                self.match(iid, c)
        elif iid in self.orphans:
            self.orphans[iid].append(c)
        elif iid in self.closed:
            self.rejected.append((iid, REASON_LATE_CLOSED))
        else:
            self.orphans[iid] = [c]

    def match(self, iid: str, c: Click) -> None:
        entry = self.pending[iid]
        if c.ts - entry[0].ts > WP:
            self.rejected.append((iid, REASON_LATE_OUTSIDE))
            return
        entry[1] = True
        if self.defer:
            if c.ts - entry[0].ts <= WAIT and iid not in self.observed:
                self.observed.add(iid)
                self.out.append((iid, 1, KIND_DEFER_OBSERVED))
            self.out.append((iid, 1, KIND_DEFER_TRUE))
            return
        self.out.append((iid, 1, KIND_FINAL if self.wait else KIND_POSITIVE_COPY))

    def advance(self, horizon: float | None = None) -> None:
        if horizon is None:
            self.wm = max(self.wm, min(self.max_ts))
            horizon, waited = self.wm - WP, self.wm - WAIT
        else:
            waited = horizon
        if self.defer:
            for iid, (i, _) in self.pending.items():
                if i.ts < waited and iid not in self.observed:
                    self.observed.add(iid)
                    self.out.append((iid, 0, KIND_DEFER_OBSERVED))
        for iid, (i, clicked) in list(self.pending.items()):
            if i.ts < horizon:
                del self.pending[iid]
                self.closed.add(iid)
                if self.wait and not clicked:
                    self.out.append((iid, 0, KIND_FINAL))
                if self.defer and not clicked:
                    self.out.append((iid, 0, KIND_DEFER_TRUE))
        for iid, cs in list(self.orphans.items()):
            if cs[0].ts < horizon:  # the first click decides; later ones were duplicates of an orphan
                del self.orphans[iid]
                self.rejected.append((iid, REASON_ORPHAN))


@st.composite
def streams_(draw: st.DrawFn, in_order: bool = False) -> tuple[list, list[bool]]:
    """Impressions with unique ids, clicks (duplicates, unknown ids), an arrival order, advance points."""
    n = draw(st.integers(0, 14))
    imps = [Impression(f"i{k}", float(draw(st.integers(0, 100))), "u", "it", {}) for k in range(n)]
    clicks = []
    for i in imps:
        for _ in range(draw(st.integers(0, 2))):
            low = 0 if in_order else -5
            clicks.append(Click(i.impression_id, i.ts + draw(st.integers(low, int(2 * WP)))))
    for k in range(draw(st.integers(0, 3))):
        clicks.append(Click(f"ghost{k}", float(draw(st.integers(0, 120)))))
    if in_order:
        imps.sort(key=lambda e: e.ts)
        clicks.sort(key=lambda e: e.ts)
        sources = draw(st.permutations([0] * len(imps) + [1] * len(clicks)))
        its, cts = iter(imps), iter(clicks)
        events = [next(its) if s == 0 else next(cts) for s in sources]
    else:
        events = draw(st.permutations(imps + clicks))
    advances = draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)))
    return events, advances


def feed_checked(join: PartitionJoin, events: list, advances: list[bool], check: Any) -> Feeder:
    """Feed ``events``, advancing where ``advances`` says (else only draining), and call
    ``check(feeder, new examples, advanced)`` after each step; then close."""
    f = Feeder(join)
    for event, adv in zip(events, advances):
        (f.imp if isinstance(event, Impression) else f.click)(event)
        before = len(f.examples)
        if adv:
            f.advance()
        else:
            f.drain()
        check(f, f.examples[before:], adv)
    f.close()
    return f


def run_impl(join: PartitionJoin, events: list, advances: list[bool]) -> Feeder:
    f = Feeder(join)
    for event, adv in zip(events, advances):
        (f.imp if isinstance(event, Impression) else f.click)(event)
        if adv:
            f.advance()
    f.close()
    return f


@settings(max_examples=300, deadline=None)
@given(streams_(), st.sampled_from([POLICY_WAIT, POLICY_FAKE_NEGATIVE, POLICY_DEFER]))
def test_join_matches_reference_model(data: tuple[list, list[bool]], policy: str) -> None:
    events, advances = data
    f = run_impl(PartitionJoin(0, WP, policy, closed_memory=1_000_000, defer_wait_s=WAIT), events, advances)
    ref = ReferenceJoin(policy)
    for event, adv in zip(events, advances):
        (ref.impression if isinstance(event, Impression) else ref.click)(event)
        if adv:
            ref.advance()
    ref.advance(horizon=math.inf)
    assert Counter((e.impression_id, e.label, e.kind) for e in f.examples) == Counter(ref.out)
    assert Counter((r.key, r.reason) for r in f.rejected) == Counter(ref.rejected)
    # Invariants: no example twice; wait → exactly one final label per impression;
    # fake-negative → one negative each plus at most one positive copy.
    n_imps = sum(isinstance(e, Impression) for e in events)
    keys = Counter((e.impression_id, e.kind) for e in f.examples)
    assert max(keys.values(), default=1) == 1
    if policy == POLICY_WAIT:
        assert len(f.examples) == n_imps and all(e.kind == KIND_FINAL for e in f.examples)
    elif policy == POLICY_DEFER:  # every impression twice: its observed label, then its true one
        assert (
            Counter(e.kind for e in f.examples) == {KIND_DEFER_OBSERVED: n_imps, KIND_DEFER_TRUE: n_imps} or not n_imps
        )
        true = {e.impression_id: e.label for e in f.examples if e.kind == KIND_DEFER_TRUE}
        assert all(true[e.impression_id] for e in f.examples if e.kind == KIND_DEFER_OBSERVED and e.label)
    else:
        assert sum(e.kind == KIND_FAKE_NEGATIVE for e in f.examples) == n_imps
    assert not f.join.pending and not f.join.orphans


@pytest.mark.parametrize("impression_first", [True, False])
def test_clicks_that_overtake_their_impression_are_judged_as_if_it_had_come_first(impression_first: bool) -> None:
    """A clicked impression's second click, outside the window, is late whichever topic the
    consumer read ahead; a third, within the window, a duplicate. (Counted as duplicates of a
    buffered orphan, the late one's dead letter used to depend on the read order.)"""
    join = PartitionJoin(0, WP, POLICY_WAIT)
    f = Feeder(join)
    imp = Impression("a", 100.0, "u", "it", {})
    clicks = [Click("a", 110.0), Click("a", 100.0 + 2 * WP), Click("a", 120.0)]
    if impression_first:
        f.imp(imp)
    for c in clicks:
        f.click(c)
    if not impression_first:
        f.imp(imp)
    f.close()
    assert [(e.impression_id, e.label) for e in f.examples] == [("a", 1)]
    assert [(r.key, r.reason) for r in f.rejected] == [("a", REASON_LATE_OUTSIDE)]
    assert join.counters.duplicates == 1 and join.counters.late_clicks == 1


@settings(max_examples=300, deadline=None)
@given(streams_(in_order=True), st.sampled_from([POLICY_WAIT, POLICY_FAKE_NEGATIVE, POLICY_DEFER]))
def test_in_order_sources_give_event_time_truth(data: tuple[list, list[bool]], policy: str) -> None:
    """Each source in ts order (any interleaving, any advances): positive iff a click within W;
    under defer the observed label is 1 iff a click within the waiting window."""
    events, advances = data
    f = run_impl(PartitionJoin(0, WP, policy, defer_wait_s=WAIT), events, advances)
    imps = {e.impression_id: e for e in events if isinstance(e, Impression)}
    truth = {
        iid: int(any(isinstance(c, Click) and c.impression_id == iid and 0 <= c.ts - i.ts <= WP for c in events))
        for iid, i in imps.items()
    }
    if policy == POLICY_WAIT:
        assert labels(f.examples) == truth and len(f.examples) == len(truth)
    elif policy == POLICY_DEFER:
        early = {
            iid: int(any(isinstance(c, Click) and c.impression_id == iid and 0 <= c.ts - i.ts <= WAIT for c in events))
            for iid, i in imps.items()
        }
        assert labels([e for e in f.examples if e.kind == KIND_DEFER_TRUE]) == truth
        assert labels([e for e in f.examples if e.kind == KIND_DEFER_OBSERVED]) == early
    else:
        assert {e.impression_id for e in f.examples if e.kind == KIND_POSITIVE_COPY} == {
            k for k, v in truth.items() if v
        }
    # In order, a click of a known impression is never mistaken for an orphan.
    assert all(r.key.startswith("ghost") for r in f.rejected if r.reason == REASON_ORPHAN)


@settings(max_examples=200, deadline=None)
@given(streams_(in_order=True))
def test_positives_wait_for_the_watermark_to_reach_their_click(data: tuple[list, list[bool]]) -> None:
    """Output in event time: nothing leaves before the watermark reaches the event that decided it."""
    events, advances = data

    def check(f: Feeder, new: list, advanced: bool) -> None:
        if advanced:
            for ex in new:
                decided = ex.ts + ex.click_delay if ex.label else ex.ts + WP
                assert decided <= f.join.watermark
        else:  # events alone never emit a positive: only the watermark does
            assert not any(ex.label for ex in new)

    f = feed_checked(PartitionJoin(0, WP), events, advances, check)
    assert len(f.examples) == sum(isinstance(e, Impression) for e in events)


@settings(max_examples=200, deadline=None)
@given(streams_(in_order=True), st.sampled_from([POLICY_FAKE_NEGATIVE, POLICY_DEFER]))
def test_fake_negative_and_defer_output_is_in_decision_time_order(data: tuple[list, list[bool]], policy: str) -> None:
    """Under fake-negative and defer too, nothing leaves before the watermark reaches its
    decision, and each step's output is in decision-time order."""
    events, advances = data

    def check(f: Feeder, new: list, advanced: bool) -> None:
        if not advanced:
            assert new == []  # events alone emit nothing: only the watermark does
        decided = [decision_time(ex, WP, WAIT) for ex in new]
        assert all(d <= f.join.watermark for d in decided)
        assert decided == sorted(decided)

    f = feed_checked(PartitionJoin(0, WP, policy, defer_wait_s=WAIT), events, advances, check)
    first = KIND_FAKE_NEGATIVE if policy == POLICY_FAKE_NEGATIVE else KIND_DEFER_OBSERVED
    assert sum(ex.kind == first for ex in f.examples) == sum(isinstance(e, Impression) for e in events)


@settings(max_examples=200, deadline=None)
@given(streams_(in_order=True), st.sampled_from([POLICY_WAIT, POLICY_DEFER]))
def test_score_requests_sit_at_their_impression_time_in_decision_order(
    data: tuple[list, list[bool]], policy: str
) -> None:
    """Each impression's request leaves once the watermark reaches it, after every label decided
    before it and before every label decided after it, and requests do not count as examples."""
    events, advances = data

    def check(f: Feeder, new: list, advanced: bool) -> None:
        assert all(ex.ts <= f.join.watermark for ex in new if ex.kind == KIND_SCORE_REQUEST)

    f = feed_checked(PartitionJoin(0, WP, policy, score_sample=1.0, defer_wait_s=WAIT), events, advances, check)
    join = f.join
    impressions = [e for e in events if isinstance(e, Impression)]
    requests = [ex for ex in f.examples if ex.kind == KIND_SCORE_REQUEST]
    final = KIND_FINAL if policy == POLICY_WAIT else KIND_DEFER_TRUE
    assert Counter(ex.impression_id for ex in requests) == Counter(e.impression_id for e in impressions)
    for k, ex in enumerate(f.examples):
        if ex.kind == KIND_SCORE_REQUEST:
            assert any(x.impression_id == ex.impression_id and x.kind == final for x in f.examples[k + 1 :])
            assert all(decision_time(x, WP, WAIT) <= ex.ts for x in f.examples[:k] if x.kind != KIND_SCORE_REQUEST)
    copies = 1 if policy == POLICY_WAIT else 2
    assert join.examples_total == copies * len(impressions) == len(f.examples) - len(requests)


def test_score_requests_only_where_no_example_is_sent_at_the_impression_and_by_a_stable_hash() -> None:
    fake = Feeder(PartitionJoin(0, W, POLICY_FAKE_NEGATIVE, score_sample=1.0))
    fake.imp(imp("a", 0))
    fake.close()
    assert [ex.kind for ex in fake.examples] == [KIND_FAKE_NEGATIVE]
    at_once = Feeder(PartitionJoin(0, W, POLICY_DEFER, score_sample=1.0, defer_wait_s=0.0))
    at_once.imp(imp("a", 0))
    at_once.close()  # defer without a wait: the observed copy at the impression's time is the score
    assert [ex.kind for ex in at_once.examples] == [KIND_DEFER_OBSERVED, KIND_DEFER_TRUE]
    waiting = Feeder(PartitionJoin(0, W, POLICY_DEFER, score_sample=1.0, defer_wait_s=5.0))
    waiting.imp(imp("a", 0))
    waiting.close()
    assert [ex.kind for ex in waiting.examples] == [KIND_SCORE_REQUEST, KIND_DEFER_OBSERVED, KIND_DEFER_TRUE]
    picks = []
    for _ in range(2):
        f = Feeder(PartitionJoin(0, W, score_sample=0.3))
        for k in range(400):
            f.imp(imp(f"x{k}", k))
        f.close()
        picks.append({ex.impression_id for ex in f.examples if ex.kind == KIND_SCORE_REQUEST})
    assert picks[0] == picks[1] and 80 <= len(picks[0]) <= 160


def normalised(state: PartitionState) -> PartitionState:
    """The closed-id memory is a set: compare it without order."""
    return msgspec.structs.replace(
        state, closed_recent=sorted(state.closed_recent), closed_older=sorted(state.closed_older)
    )


@settings(max_examples=200, deadline=None)
@given(streams_(), st.sampled_from([POLICY_WAIT, POLICY_FAKE_NEGATIVE, POLICY_DEFER]), st.data())
def test_checkpoint_restore_round_trips(data: tuple[list, list[bool]], policy: str, draw: st.DataObject) -> None:
    events, advances = data
    cut = draw.draw(st.integers(0, len(events)))
    sample = draw.draw(st.sampled_from([0.0, 1.0]))
    # With semantics, each process has its own cache: the restored one knows only the checkpoint.
    semantic = draw.draw(st.booleans())

    def lookup() -> ClickSetLookup | None:
        return ClickSetLookup() if semantic else None

    history = 64

    def join() -> PartitionJoin:
        return PartitionJoin(
            0, WP, policy, score_sample=sample, semantics=lookup(), profile_history=history, defer_wait_s=WAIT
        )

    whole = run_impl(join(), events, advances)

    first = Feeder(join())
    with tempfile.TemporaryDirectory() as tmp:
        # The kept clicks are persisted incrementally, as the worker does at each commit.
        store = ProfileStore(Path(tmp) / "p0.profiles.sqlite")
        for event, adv in zip(events[:cut], advances[:cut]):
            (first.imp if isinstance(event, Impression) else first.click)(event)
            if adv:
                first.advance()
                store.apply(first.join.take_profile_changes() or ProfileChanges({}, []))
        first.drain()
        state = first.join.snapshot()
        store.apply(first.join.take_profile_changes() or ProfileChanges({}, []))
        user_clicks = store.load()
        store.close()
    assert sorted(user_clicks.clicks()) == sorted(first.join.user_clicks_log().clicks())
    assert decode_state(encode_state(state)) == state
    restored = PartitionJoin.restore(
        decode_state(encode_state(state)), semantics=lookup(), profile_history=history, user_clicks=user_clicks
    )
    assert normalised(restored.snapshot()) == normalised(state)
    second = Feeder(restored)
    second.offsets = list(first.offsets)
    for event, adv in zip(events[cut:], advances[cut:]):
        (second.imp if isinstance(event, Impression) else second.click)(event)
        if adv:
            second.advance()
    second.close()
    assert first.examples + second.examples == whole.examples
    assert first.rejected + second.rejected == whole.rejected
    assert restored.examples_total == sum(ex.kind != KIND_SCORE_REQUEST for ex in whole.examples)


def test_idle_users_clicks_are_forgotten_at_the_watermark_minus_the_ttl() -> None:
    join = PartitionJoin(0, W, semantics=ClickSetLookup(), profile_history=8, profile_ttl_s=100.0)
    f = Feeder(join)
    f.imp(imp("a", 0, user="u-old"))
    f.click(clk("a", 1))
    f.imp(imp("b", 50, user="u-new"))
    f.click(clk("b", 60))
    f.advance()
    assert join.expire_profiles() == []  # watermark 60: cut-off −40
    f.imp(imp("c", 150, user="u-new"))
    f.click(clk("c", 155))
    f.advance()  # watermark 155: cut-off 55 passes u-old's newest click (1), not u-new's (60)
    assert join.expire_profiles() == ["u-old"]
    changes = join.take_profile_changes()
    assert changes is not None and changes.expired == ["u-old"] and list(changes.changed) == ["u-new"]
    f.close()  # the partition has ended: the watermark is +inf, nothing more is forgotten
    assert join.expire_profiles() == [] and join.user_clicks_log().users == ["u-new"]


def test_profile_store_upserts_deletes_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "p0.profiles.sqlite"
    store = ProfileStore(path)
    store.apply(ProfileChanges({"u1": ([1.0, 2.0], ["a", "b"]), "u2": ([3.0], ["c"])}, []))
    store.apply(ProfileChanges({"u1": ([4.0], ["d"])}, ["u2", "u-never"]))
    store.close()
    again = ProfileStore(path)
    assert list(again.load().clicks()) == [("u1", 4.0, "d")] and len(again) == 1
    again.close()
