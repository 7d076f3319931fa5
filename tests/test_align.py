"""Unit and property tests of the learner's event-time merge (learner/align.py): no Kafka here."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from livectr.core.events import KIND_FINAL, KIND_SCORE_REQUEST, Example, decision_time
from livectr.learner.align import EventTimeMerge

W = 10.0


def ex(iid: str, ts: float, label: int = 0, delay: float = -1.0, kind: int = KIND_FINAL) -> Example:
    return Example(iid, ts, "u", "i", {}, label, kind, 0.0, delay)


def test_a_single_source_passes_through_sorted_by_decision_time() -> None:
    m = EventTimeMerge(W, idle_s=5.0)
    m.add(b"0", 0, 0, [ex("n", 0), ex("p", 4, 1, 1.0), ex("q", 9, kind=KIND_SCORE_REQUEST)], now=0.0)
    assert [e.impression_id for e in m.release(now=0.0)] == ["p", "q", "n"]  # decided 5, 9, 10


def test_release_is_bounded_by_the_slowest_live_source() -> None:
    m = EventTimeMerge(W, idle_s=5.0)
    m.add(b"0", 0, 0, [ex("a", 0), ex("b", 5), ex("c", 20)], now=0.0)  # decided 10, 15, 30
    m.add(b"1", 1, 0, [ex("x", 3, 1, 1.0)], now=0.0)  # decided 4
    assert [e.impression_id for e in m.release(now=0.1)] == ["x"]
    m.add(b"1", 1, 1, [ex("r", 16, kind=KIND_SCORE_REQUEST)], now=0.2)  # decided 16
    assert [e.impression_id for e in m.release(now=0.3)] == ["a", "b", "r"]
    assert len(m) == 1 and m.buffered(0) == 1 and m.buffered(1) == 0


def test_an_ended_or_idle_source_stops_holding_back() -> None:
    m = EventTimeMerge(W, idle_s=5.0)
    m.add(b"0", 0, 0, [ex("a", 0)], now=0.0)
    m.add(b"1", 1, 0, [ex("x", -20)], now=0.0)
    assert [e.impression_id for e in m.release(now=0.0)] == ["x"]
    assert m.release(now=1.0) == []  # source 1 is live and has said nothing past 10
    assert [e.impression_id for e in m.release(now=6.0)] == ["a"]  # ... until it has been quiet for idle_s
    m.add(b"0", 0, 1, [ex("b", 50)], now=6.0)
    m.add(b"1", 1, 1, [ex("y", 40)], now=6.0)
    m.end(b"0")
    assert [e.impression_id for e in m.release(now=6.0)] == ["y"]  # b (60) is past source 1's 50
    m.end(b"1")
    assert [e.impression_id for e in m.release(now=6.0)] == ["b"]


def test_an_expected_source_holds_back_until_it_is_idle() -> None:
    m = EventTimeMerge(W, idle_s=5.0)
    m.expect(b"1", now=0.0)
    m.add(b"0", 0, 0, [ex("a", 0)], now=0.0)
    assert m.release(now=4.0) == []
    assert [e.impression_id for e in m.release(now=5.0)] == ["a"]


def test_offsets_cover_only_released_examples() -> None:
    m = EventTimeMerge(W, idle_s=5.0)
    m.add(b"0", 0, 7, [ex("a", 0), ex("b", 30)], now=0.0)
    m.add(b"1", 1, 3, [ex("x", 10)], now=0.0)
    m.note_record(1, 4)  # an end marker, say
    assert m.safe_offsets() == {0: 7, 1: 3}
    assert [e.impression_id for e in m.release(now=0.0)] == ["a", "x"]
    assert m.safe_offsets() == {0: 7, 1: 5}
    assert m.partly_released() == [(0, 7, 1)]
    m.flush()
    assert m.safe_offsets() == {0: 8, 1: 5} and m.partly_released() == []


@st.composite
def sources_(draw: st.DrawFn) -> list[list[tuple[int, list[float]]]]:
    """Per source, records (offset, decision times) whose times never decrease across the source."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        t, records = 0.0, []
        for offset in range(draw(st.integers(0, 6))):
            times = []
            for _ in range(draw(st.integers(0, 4))):
                t += draw(st.integers(0, 5))
                times.append(t)
            records.append((offset, times))
        out.append(records)
    return out


@settings(max_examples=300, deadline=None)
@given(sources_(), st.data())
def test_merge_releases_in_decision_order_and_resumes_exactly(sources: list, data: st.DataObject) -> None:
    """Whatever the arrival interleaving, released examples come out in decision-time order, none
    is released before every live source has passed it, and a resume from the safe offsets with
    the partly-released counts re-creates exactly what had not been released."""
    cursors = [0] * len(sources)
    m = EventTimeMerge(W, idle_s=1e9)
    for s in range(len(sources)):
        m.expect(str(s).encode(), now=0.0)
    released: list[Example] = []
    # Requests (kind score request, decision time = ts) keep the generated times exact.
    records = {
        (s, off): [ex(f"s{s}o{off}e{k}", t, kind=KIND_SCORE_REQUEST) for k, t in enumerate(times)]
        for s, recs in enumerate(sources)
        for off, times in recs
    }
    while any(c < len(recs) for c, recs in zip(cursors, sources)):
        s = data.draw(st.sampled_from([k for k, recs in enumerate(sources) if cursors[k] < len(recs)]))
        off, _ = sources[s][cursors[s]]
        cursors[s] += 1
        m.add(str(s).encode(), s, off, records[(s, off)], now=0.0)
        if cursors[s] == len(sources[s]):
            m.end(str(s).encode())
        if data.draw(st.booleans()):
            horizon = m.horizon(0.0)
            out = m.release(0.0)
            assert all(decision_time(e, W) <= horizon for e in out)
            released += out
        if data.draw(st.booleans()):
            # Resume check: from the safe offsets, skipping the partly released prefixes, the
            # records still to read hold exactly the examples not released.
            safe, partial = m.safe_offsets(), {(p, o): n for p, o, n in m.partly_released()}
            again = [
                e
                for (s2, off2), exs in sorted(records.items())
                if off2 >= safe.get(s2, 0) and off2 < cursors[s2]
                for e in exs[partial.get((s2, off2), 0) :]
            ]
            done = {e.impression_id for e in released}
            held = {e.impression_id for (s2, off2), exs in records.items() if off2 < cursors[s2] for e in exs} - done
            assert {e.impression_id for e in again} == held
    for s in range(len(sources)):
        m.end(str(s).encode())
    released += m.release(0.0)
    assert len(m) == 0
    assert sorted(e.impression_id for e in released) == sorted(e.impression_id for exs in records.values() for e in exs)
    # Every release was sorted, and the horizon only grows: the whole sequence is sorted.
    times = [decision_time(e, W) for e in released]
    assert times == sorted(times)
