"""Click profiles as of an event time (semantic_cache.profiles): the pure logic under the join's user vectors."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livectr.semantic_cache.codec import dequantize, to_bytes
from livectr.semantic_cache.profiles import ClickProfiles
from livectr.streams.profiles import NEGLIGIBLE_WEIGHT, ClickHistory, history_length

DIM = 8


def _blob(seed: int) -> bytes:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return to_bytes(v / np.linalg.norm(v))


BLOBS = {f"i{seed}": _blob(seed) for seed in range(21)}


def _profiles(decay: float) -> ClickProfiles:
    return ClickProfiles(DIM, decay, BLOBS.get)


def _reference(clicks: list[tuple[float, int]], at: float | None, decay: float, keep: int) -> np.ndarray | None:
    """Decayed mean over the newest ``keep`` distinct clicks, of those with ts < at, in event-time
    order (clicks at the same time by item id)."""
    distinct = list(dict.fromkeys(clicks))  # the same click twice is one click
    ordered = sorted(distinct, key=lambda c: (c[0], f"i{c[1]}"))[-keep:]
    used = [seed for ts, seed in ordered if at is None or ts < at]
    if not used:
        return None
    vecs = np.stack([dequantize(_blob(s), DIM) for s in used])
    w = decay ** np.arange(len(used) - 1, -1, -1)
    return (w @ vecs) / w.sum()


def test_history_keeps_clicks_until_their_weight_is_negligible() -> None:
    n = history_length(0.8)
    assert 0.8**n < NEGLIGIBLE_WEIGHT <= 0.8 ** (n - 1)
    assert history_length(1.0) == history_length(0.0) == 64


def test_profile_as_of_a_time_ignores_later_clicks() -> None:
    p = _profiles(decay=0.5)
    p.observe("u", 10.0, "i1")
    p.observe("u", 30.0, "i3")
    p.observe("u", 20.0, "i2")  # out of order: inserted at its time
    assert p.profile("u", at=5.0).vector is None and p.profile("nobody").vector is None
    assert p.profile("u", at=10.0).vector is None, "a click at the very time of the impression is not before it"
    np.testing.assert_allclose(p.profile("u", at=10.5).vector, dequantize(_blob(1), DIM))
    both = (0.5 * dequantize(_blob(1), DIM) + dequantize(_blob(2), DIM)) / 1.5
    np.testing.assert_allclose(p.profile("u", at=25.0).vector, both, rtol=1e-6)
    assert p.newest("u") == 30.0 and p.clicks_before("u", 20.0) == 1 and p.clicks_before("u", None) == 3


@settings(max_examples=150, deadline=None)
@given(
    clicks=st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.integers(0, 20)), max_size=40),
    at=st.one_of(st.none(), st.floats(-1, 101, allow_nan=False)),
    decay=st.sampled_from([0.5, 0.8, 0.95]),
)
def test_profile_is_the_decayed_mean_of_the_clicks_before_the_time(
    clicks: list[tuple[float, int]], at: float | None, decay: float
) -> None:
    p = _profiles(decay)
    for ts, seed in clicks:
        p.observe("u", ts, f"i{seed}")
    got, want = p.profile("u", at).vector, _reference(clicks, at, decay, p.history)
    if want is None:
        assert got is None
    else:
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_click_seen_twice_counts_once() -> None:
    """A restored checkpoint or a replayed partition hands the cache clicks it already holds."""
    h = ClickHistory(3)
    assert h.observe("u", 1.0, "a") and h.observe("u", 1.0, "b") and not h.observe("u", 1.0, "a")
    assert h.observe("u", 2.0, "a") and h.items("u") == ["a", "b", "a"]
    assert not h.observe("u", 0.5, "c"), "older than every click of a full history: not kept"
    assert h.observe("u", 3.0, "c") and h.observe("v", 1.0, "a")
    assert list(h.export().clicks()) == [("u", 1.0, "b"), ("u", 2.0, "a"), ("u", 3.0, "c"), ("v", 1.0, "a")]
    assert h.clicks_before("u", 2.5) == 2 and h.newest("u") == 3.0 and len(h) == 2


def test_a_click_without_a_vector_yet_counts_once_the_vector_arrives() -> None:
    blobs: dict[str, bytes] = {"i1": _blob(1)}
    p = ClickProfiles(DIM, 0.5, blobs.get)
    p.observe("u", 10.0, "i1")
    p.observe("u", 20.0, "late")
    early = p.profile("u")
    assert early.missing == 1
    np.testing.assert_allclose(early.vector, dequantize(_blob(1), DIM), err_msg="the missing click weighs nothing")
    blobs["late"] = _blob(2)
    later = p.profile("u")
    want = (0.5 * dequantize(_blob(1), DIM) + dequantize(_blob(2), DIM)) / 1.5
    assert later.missing == 0
    np.testing.assert_allclose(later.vector, want, rtol=1e-6)
    nothing = ClickProfiles(DIM, 0.5, {}.get)
    nothing.observe("u", 1.0, "unknown")
    assert nothing.profile("u") == (None, 1)


def test_expire_forgets_idle_users_only() -> None:
    h = ClickHistory(3, track_changes=True)
    h.observe("idle", 10.0, "a")
    h.observe("busy", 5.0, "a")
    h.observe("busy", 50.0, "b")  # newer click: the entry at 5.0 is stale, "busy" stays
    h.observe("late", 60.0, "a")
    h.observe("late", 1.0, "b")  # an older click does not make the user look idle
    assert h.expire(20.0) == ["idle"]
    assert h.newest("idle") is None and h.newest("busy") == 50.0 and h.newest("late") == 60.0
    assert h.expire(20.0) == []
    changes = h.take_changes()
    assert changes.expired == ["idle"] and set(changes.changed) == {"busy", "late"}
    h.observe("idle", 70.0, "c")  # back after being forgotten: changed, no longer expired
    changes = h.take_changes()
    assert changes.expired == [] and list(changes.clicks()) == [("idle", 70.0, "c")]
    assert h.take_changes() == ({}, [])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("click"), st.sampled_from(["u0", "u1", "u2", "u3"]), st.integers(0, 60), st.integers(0, 4)
            ),
            st.tuples(st.just("expire"), st.integers(0, 80)),
            st.just(("commit",)),
        ),
        max_size=80,
    )
)
def test_incremental_changes_rebuild_the_whole_history(ops: list[tuple]) -> None:
    """Applying every take_changes() to a store (upsert changed users, delete expired ones)
    gives exactly the full export, whatever the interleaving of clicks, expiry and commits."""
    h = ClickHistory(3, track_changes=True)
    store: dict[str, list[tuple[float, str]]] = {}

    def commit() -> None:
        changes = h.take_changes()
        for user in changes.expired:
            store.pop(user, None)
        for user, (times, items) in changes.changed.items():
            store[user] = list(zip(times, items))

    for op in ops:
        if op[0] == "click":
            h.observe(op[1], float(op[2]), f"i{op[3]}")
        elif op[0] == "expire":
            h.expire(float(op[1]))
        else:
            commit()
    commit()
    full: dict[str, list[tuple[float, str]]] = {}
    for user, ts, item in h.export().clicks():
        full.setdefault(user, []).append((ts, item))
    assert store == full
