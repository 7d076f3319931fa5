"""Property tests (hypothesis) of every decoder of external input.

Contract of each decoder, for ANY input: it returns a valid typed record — one every later stage
can use without crashing (it re-encodes on its wire, its times are finite, its ids are text) — or
it raises its one documented error type with a one-line reason (what goes to the dead-letter
topic, or the HTTP error body). Never another exception type.

Inputs: arbitrary bytes, arbitrary JSON / MessagePack values, and mutations of valid records
(fields dropped, retyped, NaN/±inf, huge numbers, unicode and lone surrogates, nested junk,
truncated or corrupted bytes).
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from toyworld import ToyWorld

from livectr.core.config import Config, ServeConfig
from livectr.core.events import (
    MAX_EVENT_BYTES,
    MAX_FUTURE_S,
    MAX_REASON_CHARS,
    Click,
    DecodeError,
    EndOfStream,
    Example,
    ExampleBatch,
    ExampleEnd,
    Impression,
    Item,
    decode_event,
    decode_example,
    encode_event,
    encode_example,
)
from livectr.learner import snapshot as snap
from livectr.learner.loop import example_problem
from livectr.learner.online import OnlineLearner
from livectr.learner.scorer import Scorer
from livectr.learner.serve import Rejected, decode_score_request
from livectr.semantic_cache import wire
from livectr.simulators.replay import ReplayInputError, RowError, event_from_row, item_from_row, load_replay, read_rows

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT64 = (-(2**63), 2**63 - 1)

# ------------------------------------------------------------------------ strategies

#: Values that break naive decoders: non-finite floats, numbers beyond int64/float64, odd text.
NASTY = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        10**30,
        -(10**30),
        2**63,
        2**64,
        10**400,
        1e308,
        -1e308,
        1e11,
        "",
        " ",
        "\x00",
        "\ud800",
        "\udcff",
        "é😀\u202e",
        "line\nbreak",
        True,
        None,
        [],
        {},
        [[[]]],
        {"a": {"b": [1, {"c": None}]}},
    ]
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | NASTY
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
IDS = st.text(min_size=1, max_size=12)
TIMES = st.floats(min_value=0, max_value=1.7e9)
CONTEXT_VALUES = (
    st.text(max_size=8) | st.integers(*INT64) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
)
CONTEXTS = st.dictionaries(st.text(max_size=8), CONTEXT_VALUES, max_size=4)

VALID_EVENTS = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("impression"), "impression_id": IDS, "ts": TIMES, "user_id": IDS, "item_id": IDS},
        optional={"context": CONTEXTS},
    ),
    st.fixed_dictionaries({"type": st.just("click"), "impression_id": IDS, "ts": TIMES}),
    st.fixed_dictionaries(
        {"type": st.just("item"), "item_id": IDS, "ts": TIMES, "text": st.text(max_size=30)},
        optional={"attributes": CONTEXTS},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("end"),
            "producer": IDS,
            "partition": st.integers(0, 64),
            "count": st.integers(0, 10**6),
        },
        optional={"ts": TIMES},
    ),
)


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    """JSON text of ``value`` as Python writes it (NaN/Infinity tokens included: invalid JSON)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def mutated_dict(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid record with one to three fields dropped, retyped, or junk added."""
    record = dict(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "retype", "nasty", "add", "nest"]))
        key = draw(st.sampled_from(sorted(record))) if record else "type"
        if op == "drop":
            record.pop(key, None)
        elif op == "retype":
            record[key] = draw(JSON_VALUES)
        elif op == "nasty":
            record[key] = draw(NASTY)
        elif op == "add":
            record[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            holder = draw(st.sampled_from(["context", "attributes", key]))
            record[holder] = {draw(st.text(max_size=4)): draw(JSON_VALUES | NASTY)}
    return record


@st.composite
def corrupted(draw: st.DrawFn, raw: st.SearchStrategy[bytes]) -> bytes:
    """Bytes of a record, truncated, with a byte flipped, or with invalid UTF-8 spliced in."""
    data = draw(raw)
    op = draw(st.sampled_from(["truncate", "flip", "splice", "none"]))
    if not data or op == "none":
        return data
    i = draw(st.integers(0, len(data) - 1))
    if op == "truncate":
        return data[:i]
    if op == "flip":
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    return data[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\\ud800"])) + data[i:]


EVENT_BYTES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(dumps),
    VALID_EVENTS.map(dumps),
    mutated_dict(VALID_EVENTS).map(dumps),
    corrupted(VALID_EVENTS.map(lambda v: dumps(v, ascii_only=False))),
    st.tuples(mutated_dict(VALID_EVENTS), st.booleans()).map(lambda t: dumps(t[0], ascii_only=t[1])),
    st.tuples(VALID_EVENTS, st.text(max_size=30) | NASTY).map(
        lambda t: dumps({**t[0], "type": t[1]}, ascii_only=False)
    ),
)

# ------------------------------------------------------------------------ invariants


def assert_reason(reason: object) -> None:
    """A dead-letter reason: one non-empty line of bounded length that travels as a header."""
    assert isinstance(reason, str) and reason.strip(), reason
    assert "\n" not in reason and "\r" not in reason, reason
    assert len(reason) <= MAX_REASON_CHARS, len(reason)
    reason.encode()


def assert_text(*values: object) -> None:
    for v in values:
        assert isinstance(v, str)
        v.encode()  # no lone surrogates: every later stage writes ids as UTF-8


def assert_features(features: dict[str, Any]) -> None:
    for key, value in features.items():
        assert_text(key)
        assert isinstance(value, (str, int, float, bool)), value
        if isinstance(value, str):
            assert_text(value)
        elif isinstance(value, float):
            assert math.isfinite(value), value
        elif isinstance(value, int) and not isinstance(value, bool):
            assert INT64[0] <= value <= INT64[1], value


def assert_unix_time(ts: float) -> None:
    assert isinstance(ts, float) and math.isfinite(ts) and abs(ts) < 1e11, ts
    assert ts <= time.time() + MAX_FUTURE_S, ts


def assert_valid_input_event(ev: object) -> None:
    """What the join, the refresher and the scorer rely on; it also survives both wire formats."""
    assert type(ev) in (Impression, Click, Item, EndOfStream)
    if isinstance(ev, EndOfStream):
        assert_text(ev.producer)
        assert ev.partition >= 0 and ev.count >= 0 and math.isfinite(ev.ts)
    else:
        assert_unix_time(ev.ts)
    if isinstance(ev, Impression):
        assert_text(ev.impression_id, ev.user_id, ev.item_id)
        assert ev.impression_id and ev.user_id and ev.item_id
        assert_features(ev.context)
        ex = Example(ev.impression_id, ev.ts, ev.user_id, ev.item_id, ev.context, 0, 0, ev.ts)
        batch = decode_example(encode_example(ExampleBatch([ex])))
        assert isinstance(batch, ExampleBatch) and batch.examples == [ex]
    elif isinstance(ev, Click):
        assert_text(ev.impression_id)
        assert ev.impression_id
    elif isinstance(ev, Item):
        assert_text(ev.item_id, ev.text)
        assert ev.item_id
        assert_features(ev.attributes)
    assert decode_event(encode_event(ev)) == ev


def check_event(raw: bytes | None) -> object:
    try:
        ev = decode_event(raw)
    except DecodeError as exc:
        assert_reason(exc.reason)
        return None
    assert_valid_input_event(ev)
    return ev


# ------------------------------------------------------------------------ input events (JSON)


@FUZZ
@given(EVENT_BYTES)
@example(
    b'{"type":"impression","impression_id":"a","ts":1,"user_id":"u","item_id":"i","context":{"x":1' + b"0" * 40 + b"}}"
)
@example(b'{"type":"end","producer":"p","partition":-1,"count":3}')
@example(b'{"type":"click","impression_id":"a","ts":9e10}')
@example(b'{"type":"click","impression_id":"","ts":1}')
@example(None)
@example(b"x" * (MAX_EVENT_BYTES + 1))
@example(b'{"type":"im\\npression","impression_id":"a","ts":1}')
@example(b'{"type":"' + b"x" * 60_000 + b'"}')
def test_any_bytes_decode_to_a_valid_event_or_a_decode_error(raw: bytes | None) -> None:
    check_event(raw)


@FUZZ
@given(VALID_EVENTS)
def test_valid_events_are_accepted_unchanged(record: dict[str, Any]) -> None:
    ev = check_event(dumps(record, ascii_only=False))
    assert ev is not None, record
    assert {k: getattr(ev, k) for k in record if k != "type"} == {k: v for k, v in record.items() if k != "type"}


# ------------------------------------------------------------------------ examples (MessagePack)

EXAMPLES = st.builds(
    lambda iid, ts, u, i, ctx, label, kind, sem: [
        "ex",
        iid,
        ts,
        u,
        i,
        ctx,
        label,
        kind,
        ts + 1.0,
        -1.0,
        sem,
        None,
        0,
        "v1",
    ],
    IDS,
    TIMES,
    IDS,
    IDS,
    CONTEXTS,
    st.integers(0, 1),
    st.integers(0, 5),
    st.none() | st.binary(min_size=32, max_size=32),
)
EXAMPLE_ENDS = st.builds(
    lambda p, n, c, w: ["end", p, n, c, w, 1.0], st.integers(0, 8), st.integers(1, 8), st.integers(0, 10**6), IDS
)
MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def mutated_list(draw: st.DrawFn, base: st.SearchStrategy[list[Any]]) -> list[Any]:
    """An array-like record with elements retyped, dropped, appended, or set to nasty values."""
    rec = list(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["retype", "nasty", "drop", "append"]))
        i = draw(st.integers(0, len(rec) - 1)) if rec else 0
        if op == "retype" and rec:
            rec[i] = draw(MSGPACK_VALUES)
        elif op == "nasty" and rec:
            rec[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 2**63, -(2**63), 2**64 - 1, "", b"", [], {}]))
        elif op == "drop" and rec:
            del rec[i:]
        else:
            rec.append(draw(MSGPACK_VALUES))
    return rec


def packb(value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except (OverflowError, UnicodeEncodeError):
        return b"\xc1"  # never used by MessagePack


EXAMPLE_BYTES = st.one_of(
    st.binary(max_size=200),
    MSGPACK_VALUES.map(packb),
    st.one_of(EXAMPLES, EXAMPLE_ENDS, st.lists(EXAMPLES, max_size=3).map(lambda xs: ["batch", xs])).map(packb),
    mutated_list(st.one_of(EXAMPLES, EXAMPLE_ENDS)).map(packb),
    st.lists(mutated_list(EXAMPLES), min_size=1, max_size=3).map(lambda xs: packb(["batch", xs])),
    corrupted(EXAMPLES.map(packb)),
)


def assert_valid_example(ex: Example) -> None:
    assert_text(ex.impression_id, ex.user_id, ex.item_id, ex.sem_version)
    assert_features(ex.context)
    problem = example_problem(ex)  # what the learner dead-letters per example
    if problem is not None:
        assert_reason(problem)


@FUZZ
@given(EXAMPLE_BYTES)
@example(b"\x93\xa3end\x00\x00")
@example(  # an example whose ts is a NaN: never equal to itself (found by hypothesis)
    b"\x9e\xa2ex\xa1\x00\xcb\x7f\xf1\x00\x00\x00\x00\x00\x00\xa1\x00\xa1\x00\x80\x00\x00"
    b"\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xc0\xc0\x00\xa2\x00\x00"
)
def test_any_bytes_decode_to_a_valid_example_or_a_decode_error(raw: bytes) -> None:
    try:
        rec = decode_example(raw)
    except DecodeError as exc:
        assert_reason(exc.reason)
        return
    assert type(rec) in (Example, ExampleBatch, ExampleEnd)
    if isinstance(rec, ExampleEnd):
        assert_text(rec.worker)
        assert rec.source_partition >= 0 and rec.source_partitions >= 1 and rec.examples >= 0
        assert rec.source_partition < rec.source_partitions and math.isfinite(rec.ts)
    else:
        for ex in rec.examples if isinstance(rec, ExampleBatch) else [rec]:
            assert_valid_example(ex)
    # Byte-wise: an example with a NaN field (which the learner dead-letters, above) never
    # equals itself, but it must survive a round trip unchanged.
    encoded = encode_example(rec)
    assert encode_example(decode_example(encoded)) == encoded


# ------------------------------------------------------------------------ semantic cache messages

VECTORS = st.builds(
    lambda kind, id_, v, red, t: ["vec", kind, id_, v, red, t, t, t],
    st.sampled_from(["item", "user"]),
    IDS,
    st.text(max_size=8),
    st.binary(min_size=32, max_size=32),
    TIMES,
)
MISSES = st.builds(lambda ids, t, r: ["miss", "item", ids, t, r], st.lists(IDS, max_size=4), TIMES, st.text(max_size=6))
USER_CLICKS = st.builds(lambda u, ids, t: ["clicks", u, ids, t, "join-0", t], IDS, st.lists(IDS, max_size=4), TIMES)
SEMANTIC_BYTES = st.one_of(
    st.binary(max_size=200),
    MSGPACK_VALUES.map(packb),
    st.one_of(VECTORS, MISSES, USER_CLICKS).map(packb),
    mutated_list(st.one_of(VECTORS, MISSES, USER_CLICKS)).map(packb),
    corrupted(st.one_of(VECTORS, MISSES, USER_CLICKS).map(packb)),
)


@FUZZ
@given(SEMANTIC_BYTES)
def test_any_bytes_decode_to_a_valid_semantic_record_or_a_decode_error(raw: bytes) -> None:
    for decode in (wire.decode_vector, wire.decode_request):
        try:
            rec = decode(raw)
        except DecodeError as exc:
            assert_reason(exc.reason)
            continue
        if isinstance(rec, wire.SemanticVector):
            assert_text(rec.kind, rec.id, rec.version)
            assert rec.kind in ("item", "user") and rec.id
            times = (rec.computed_at, rec.source_ts, rec.requested_at)
        elif isinstance(rec, wire.MissReport):
            assert_text(rec.kind, rec.reporter, *rec.ids)
            times = (rec.ts,)
        else:
            assert isinstance(rec, wire.UserClicks)
            assert_text(rec.user_id, rec.reporter, *rec.item_ids)
            times = (rec.ts, rec.event_ts)
        assert all(math.isfinite(t) for t in times), rec
        assert decode(wire.encode(rec)) == rec


def test_semantic_decoders_accept_null_with_a_reason() -> None:
    for decode in (wire.decode_vector, wire.decode_request):
        with pytest.raises(DecodeError, match="empty message"):
            decode(None)


# ------------------------------------------------------------------------ replay rows

ROW_VALUES = JSON_VALUES | st.text(max_size=10) | st.integers() | st.floats()
EVENT_ROWS = st.dictionaries(st.sampled_from(["ts", "type", "impression_id", "user_id", "item_id", "x"]), ROW_VALUES)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A replay row from an event record: context fields become columns."""
    row = {k: v for k, v in record.items() if k not in ("context", "attributes")}
    for key in ("context", "attributes"):
        if isinstance(record.get(key), dict):
            row.update(record[key])
    return row


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def check_row(build: Callable[[dict[str, Any]], object], row: dict[str, Any]) -> object:
    # Rows come from read_rows: UTF-8 decoded with replacement (CSV) or by msgspec (JSONL), which
    # refuses lone surrogates; so a row never holds one.
    assume(not _has_surrogate(row))
    try:
        ev = build(row)
    except RowError as exc:
        assert_reason(str(exc))
        return None
    assert_valid_input_event(ev)  # what the replay accepts, the join accepts
    return ev


@FUZZ
@given(st.one_of(EVENT_ROWS, mutated_dict(VALID_EVENTS).map(_row), VALID_EVENTS.map(_row)))
@example({"type": "click", "impression_id": "a", "ts": 10**400})
@example({"type": "impression", "impression_id": "a", "ts": 1, "user_id": "u", "item_id": "i", "x": 10**30})
@example({"type": "impression", "impression_id": "a", "ts": 1, "user_id": 10**5000, "item_id": "i"})
@example({"type": "click", "impression_id": "a", "ts": "1e400"})
def test_replay_event_rows_build_valid_events_or_a_row_error(row: dict[str, Any]) -> None:
    check_row(event_from_row, row)


@FUZZ
@given(
    st.one_of(
        mutated_dict(VALID_EVENTS).map(_row), VALID_EVENTS.map(_row), st.dictionaries(st.text(max_size=6), ROW_VALUES)
    )
)
@example({"item_id": "a", "text": "t", "ts": 10**400})
def test_replay_item_rows_build_valid_items_or_a_row_error(row: dict[str, Any]) -> None:
    check_row(lambda r: item_from_row(r, 1.0), row)


GOOD_LINES = [
    '{"ts": 100, "type": "impression", "impression_id": "a", "user_id": "u1", "item_id": "i1", "slot": 2}',
    '{"ts": 101, "type": "click", "impression_id": "a"}',
]
CSV_GOOD = ["100,impression,a,u1,i1,2", "101,click,a,,,"]
CSV_HEADER = "ts,type,impression_id,user_id,item_id,slot"


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(["jsonl", "csv", "tsv", "jsonl.gz", "csv.gz"]),
    junk=st.lists(
        st.one_of(st.binary(max_size=40), JSON_VALUES.map(dumps), mutated_dict(VALID_EVENTS).map(dumps)), max_size=6
    ),
)
def test_replay_file_with_junk_lines_trains_every_good_row(
    tmp_path_factory: pytest.TempPathFactory, fmt: str, junk: list[bytes]
) -> None:
    """Good rows mixed with junk lines: every good row becomes an event, the rest bad records."""
    path = tmp_path_factory.mktemp("replay") / f"log.{fmt}"
    junk = [j.replace(b"\n", b" ").replace(b"\r", b" ") for j in junk]
    if fmt.startswith("jsonl"):
        lines = [g.encode() for g in GOOD_LINES]
    else:
        sep = "\t" if fmt == "tsv" else ","
        lines = [CSV_HEADER.replace(",", sep).encode()] + [g.replace(",", sep).encode() for g in CSV_GOOD]
        # csv quoting can join junk with the lines after it: keep junk free of quotes here
        junk = [j.replace(b'"', b"'") for j in junk]
    body = b"\n".join(lines[:1] + junk + lines[1:]) + b"\n"
    path.write_bytes(gzip.compress(body) if fmt.endswith(".gz") else body)
    try:
        records, counts = load_replay(path)
    except ReplayInputError as exc:
        assert_reason(str(exc))
        return
    events = [r for r in records if isinstance(r, (Impression, Click))]
    assert counts["impressions"] >= 1 and counts["clicks"] >= 1
    for ev in events:
        assert_valid_input_event(ev)
    bad = [r for r in records if not isinstance(r, (Impression, Click, Item))]
    for b in bad:
        assert_reason(b.reason)
    assert len(events) + len(bad) >= 2


def test_replay_rows_of_arbitrary_files_never_raise(tmp_path: Path) -> None:
    """read_rows on random bytes (every format) yields rows or errors, never an exception."""
    rng = np.random.default_rng(0)
    for i in range(60):
        data = rng.integers(0, 256, size=int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        for name in ("a.jsonl", "a.csv", "a.tsv"):
            path = tmp_path / f"{i}-{name}"
            path.write_bytes(data)
            for row, _raw, error in read_rows(path):
                assert (row is None) == bool(error)
                if error:
                    assert_reason(error)


def test_truncated_gzip_log_is_a_clear_input_error(tmp_path: Path) -> None:
    """A .gz cut short after its first records: one clear ReplayInputError, not a traceback."""
    body = "\n".join(GOOD_LINES[0].replace('"a"', f'"a{k}"') for k in range(5000)).encode()
    blob = gzip.compress(body)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ReplayInputError, match="unreadable"):
        load_replay(path)


def test_oversized_replay_rows_are_bad_records_not_a_crash(tmp_path: Path) -> None:
    """A 2 MB item text used to be published as is: librdkafka refused it and the publisher died."""
    items = tmp_path / "items.jsonl"
    huge = json.dumps({"item_id": "big", "text": "word " * 400_000})
    items.write_text(json.dumps({"item_id": "i1", "text": "fine"}) + "\n" + huge + "\n")
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(GOOD_LINES) + "\n")
    records, counts = load_replay(log, items)
    assert counts["items"] == 1 and counts["bad_records"] == 1
    bad = [r for r in records if not isinstance(r, (Impression, Click, Item))]
    assert bad[0].reason.startswith("oversized row: 2000") and len(bad[0].raw) == len(huge)


# ------------------------------------------------------------------------ score request bodies

SCORE_BODIES = st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(dumps),
    st.fixed_dictionaries({"user_id": IDS, "items": st.lists(IDS, max_size=5)}, optional={"context": CONTEXTS}).map(
        dumps
    ),
    mutated_dict(
        st.fixed_dictionaries({"user_id": IDS, "items": st.lists(IDS, max_size=5)}, optional={"context": CONTEXTS})
    ).map(dumps),
    st.lists(VALID_EVENTS.filter(lambda r: r["type"] == "impression"), max_size=3).map(
        lambda xs: dumps({"impressions": xs})
    ),
    st.lists(mutated_dict(VALID_EVENTS.filter(lambda r: r["type"] == "impression")), min_size=1, max_size=3).map(
        lambda xs: dumps({"impressions": xs})
    ),
)


@pytest.fixture(scope="module")
def toy_scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    cfg = Config()
    cfg.data_dir = tmp_path_factory.mktemp("serve-fuzz")
    cfg.learner.device = "cpu"
    cfg.learner.context_buckets = 1 << 10
    cfg.learner.pair_buckets = 1 << 10
    learner = OnlineLearner(cfg)
    learner.learn_batch(ToyWorld(users=20, items=10).examples(128))
    snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": learner.examples_seen}, keep=2)
    return Scorer(cfg.data_dir, reload_ms=60_000, cfg=cfg)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCORE_BODIES)
@example(b'{"impressions":[{"type":"impression","impression_id":"a","ts":1e300,"user_id":"u","item_id":"i"}]}')
@example(b'{"user_id":"u","items":["a"],"context":{"x":100000000000000000000000000000000}}')
@example(b'{"user_id":"","items":["", "\\u00e9"],"context":{"":""}}')
def test_any_score_body_scores_or_is_refused_with_a_reason(toy_scorer: Scorer, body: bytes) -> None:
    cfg = ServeConfig(max_body_bytes=64 * 1024, max_candidates=4)
    try:
        impressions, _ = decode_score_request(body, cfg, 0)
    except Rejected as exc:
        assert exc.status in (413, 422), exc.status
        assert_reason(exc.reason)
        return
    for imp in impressions:
        # The new form may name no user or item (""): it scores as an unknown id, and never
        # travels on Kafka. Everything else is what the join would accept.
        if imp.user_id and imp.item_id:
            assert_valid_input_event(imp)
        else:
            assert_features(imp.context)
    scores, _ = toy_scorer.score_versioned(impressions)
    assert len(scores) == len(impressions)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores.tolist())
