"""Integration tests of the join worker on the real (tansu) broker fixture."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from lookups import ClickSetLookup

from livectr.core import bus
from livectr.core.config import Config, from_dict, to_dict
from livectr.core.events import (
    KIND_FAKE_NEGATIVE,
    KIND_FINAL,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    MAX_EVENT_BYTES,
    Click,
    Example,
    ExampleBatch,
    ExampleEnd,
    Impression,
    Item,
    decision_time,
    decode_example,
    encode_event,
)
from livectr.streams.checkpoint import checkpoint_path, profile_store_path, read_checkpoint
from livectr.streams.join import REASON_ORPHAN
from livectr.streams.profile_store import ProfileStore
from livectr.streams.repartition import join_inputs, partition_of
from livectr.streams.worker import run_join_worker

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
Record = tuple[str, int, "bytes | None"]


@dataclass
class Stream:
    """A hand-made input stream and what the join must make of it."""

    records: list[Record] = field(default_factory=list)
    truth: dict[str, int] = field(default_factory=dict)
    late_clicks: int = 0
    orphans: int = 0
    duplicates: int = 0
    malformed: list[tuple[bytes | None, str]] = field(default_factory=list)


def make_stream(cfg: Config, start: int, n: int, partitions: int = 2) -> Stream:
    """Impressions every 2 s; clicks at +30 s (every 5th), early clicks (every 11th, published
    before their impression), duplicates, clicks far past the window (every 7th), orphans."""
    topics = cfg.topics
    stream = Stream()
    timed: list[tuple[float, int, Record]] = []
    for k in range(start, start + n):
        iid, ts, p = f"imp{k}", T0 + 2 * k, k % partitions
        timed.append(
            (
                ts,
                1,
                (topics.impressions, p, encode_event(Impression(iid, ts, f"u{k % 7}", f"i{k % 5}", {"slot": k % 3}))),
            )
        )
        positive = k % 5 == 0 or k % 11 == 4
        stream.truth[iid] = int(positive)
        stream.duplicates += (k % 10 == 0) + (k % 5 == 0 and k % 11 == 4)
        if k % 5 == 0:
            timed.append((ts + 30, 2, (topics.clicks, p, encode_event(Click(iid, ts + 30)))))
            if k % 10 == 0:
                timed.append((ts + 31, 2, (topics.clicks, p, encode_event(Click(iid, ts + 31)))))
        if k % 11 == 4:
            timed.append((ts, 0, (topics.clicks, p, encode_event(Click(iid, ts + 1)))))  # before the impression
        if k % 7 == 3:
            timed.append((ts + 900, 2, (topics.clicks, p, encode_event(Click(iid, ts + 900)))))
            stream.late_clicks += 1
        if k % 50 == 17:
            timed.append((ts, 2, (topics.clicks, p, encode_event(Click(f"ghost{k}", ts)))))
            stream.orphans += 1
    timed.sort(key=lambda t: (t[0], t[1]))
    stream.records = [r for _, _, r in timed]
    return stream


def add_malformed(cfg: Config, stream: Stream) -> None:
    topics = cfg.topics
    bad: list[tuple[str, int, bytes | None, str]] = [
        (topics.impressions, 0, b"{not json", "malformed JSON"),
        (topics.impressions, 1, encode_event(Click("imp1", T0)), "wrong topic"),
        (topics.clicks, 0, encode_event(Item("i1", T0, "text")), "wrong topic"),
        (topics.impressions, 0, b"x" * (MAX_EVENT_BYTES + 1), "oversized"),
        (topics.clicks, 1, None, "empty message"),
        (
            topics.impressions,
            1,
            b'{"type":"impression","impression_id":"z","ts":"soon","user_id":"u","item_id":"i"}',
            "invalid event",
        ),
        # Found by tests/test_fuzz_decoders.py. A feature beyond int64 used to pass the decoder and
        # then crash the worker when it encoded the example (MessagePack has no such integers).
        (
            topics.impressions,
            0,
            b'{"type":"impression","impression_id":"big","ts":1700000001,"user_id":"u","item_id":"i",'
            b'"context":{"n":123456789012345678901234567890}}',
            "invalid event",
        ),
        (topics.clicks, 1, b'{"type":"end","producer":"evil","partition":-1,"count":3}', "invalid event"),
        (topics.clicks, 0, b'{"type":"click","impression_id":"","ts":1700000001}', "invalid event"),
        (topics.impressions, 1, b'{"type":"click","impression_id":"\xff\xfe","ts":1}', "malformed JSON"),
        (topics.clicks, 1, b'{"type":"click","impression_id":"imp3","ts":NaN}', "malformed JSON"),
        (topics.impressions, 0, b'{"type":"impression","impression_id":"inf","ts":1e999}', "invalid event"),
        (topics.clicks, 0, b'{"type":"sco\\npe","x":[[[{}]]]}', "invalid event"),
        (topics.impressions, 1, b'[1, {"type": "impression"}]', "invalid event"),
        # An impression and its click stamped in the far future used to move partition 1's
        # watermark there: every later window closed at once, every later click was "late".
        (topics.impressions, 1, encode_event(Impression("future", 9e10, "u", "i")), "invalid event"),
        (topics.clicks, 1, encode_event(Click("future", 9e10)), "invalid event"),
        # Near the broker's size limit: its dead letter (+ headers) used to be refused by the
        # broker, killing the worker on every restart (a poison record); now it is cut short.
        (topics.clicks, 1, b'{"type":"click","impression_id":"' + b"p" * 999_800 + b'"}', "oversized"),
    ]
    for i, (topic, p, value, reason) in enumerate(bad):
        stream.records.insert(7 + 5 * i, (topic, p, value))
        stream.malformed.append((value, reason))


def publish(cfg: Config, records: list[Record], end_partitions: int = 0) -> None:
    """Tiny producer loop; with ``end_partitions`` also end markers on impressions and clicks."""
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    counts: dict[tuple[str, int], int] = Counter()
    for topic, p, value in records:
        bus.produce(prod, topic, value, partition=p, on_delivery=tracker.callback)
        counts[(topic, p)] += 1
    for topic in (cfg.topics.impressions, cfg.topics.clicks)[: 2 if end_partitions else 0]:
        bus.write_end_markers(
            prod, topic, "test", {p: counts[(topic, p)] for p in range(end_partitions)}, on_delivery=tracker.callback
        )
    bus.flush_or_raise(prod, tracker)


def read_topic(cfg: Config, topic: str, done: Any, timeout_s: float = 20.0) -> list[Any]:
    """Every record of ``topic`` until ``done(records)`` holds (or the timeout)."""
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [topic])
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not done(records):
            records += [m for m in cons.consume(10_000, 0.3) if m.error() is None]
    finally:
        cons.close()
    return records


SEAL_HEADER = "livectr.test-seal"


def seal(cfg: Config, topic: str) -> int:
    """Append one marker record to every partition of ``topic`` (returns how many) before reading it to the end.

    tansu can report a partition's high watermark at the start of its last record batch (see
    the README); a record after that batch makes the batch readable.
    """
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    partitions = bus.partition_count(cfg.kafka, topic)
    for partition in range(partitions):
        bus.produce(
            prod, topic, b"seal", partition=partition, on_delivery=tracker.callback, headers=[(SEAL_HEADER, b"1")]
        )
    bus.flush_or_raise(prod, tracker)
    return partitions


def is_seal(msg: Any) -> bool:
    return any(k == SEAL_HEADER for k, _ in (msg.headers() or []))


def read_examples(cfg: Config, ends: int, timeout_s: float = 20.0) -> tuple[list[Example], list[ExampleEnd], list[Any]]:
    def done(msgs: list[Any]) -> bool:
        return sum(isinstance(decode_example(m.value()), ExampleEnd) for m in msgs) >= ends

    msgs = read_topic(cfg, cfg.topics.examples, done, timeout_s)
    examples: list[Example] = []
    markers: list[ExampleEnd] = []
    for m in msgs:
        rec = decode_example(m.value())
        if isinstance(rec, ExampleBatch):
            examples += rec.examples
        elif isinstance(rec, ExampleEnd):
            markers.append(rec)
        else:
            examples.append(rec)
    return [e for e in examples if e.kind != KIND_SCORE_REQUEST], markers, msgs


def run_bounded(cfg: Config, limit_s: float = 60.0, **kwargs: Any) -> dict[str, Any]:
    stop = threading.Event()
    timer = threading.Timer(limit_s, stop.set)
    timer.start()
    try:
        summary = run_join_worker(cfg, stop=stop, **kwargs)
    finally:
        timer.cancel()
    assert not stop.is_set(), f"worker did not finish within {limit_s}s: {summary}"
    return summary


def configure(cfg: Config, **join: Any) -> Config:
    cfg.join.commit_interval_s = 0.5
    cfg.join.group_id = f"join-{cfg.kafka.topic_prefix}"
    for k, v in join.items():
        setattr(cfg.join, k, v)
    bus.ensure_topics(cfg)
    return cfg


# ------------------------------------------------------------------------ tests


def test_bounded_run_joins_exactly_and_dead_letters_bad_input(kafka_config: Config) -> None:
    cfg = configure(kafka_config)
    stream = make_stream(cfg, 0, 300)
    add_malformed(cfg, stream)
    publish(cfg, stream.records, end_partitions=2)
    statuses: list[dict[str, Any]] = []
    summary = run_bounded(cfg, worker_id="w-a", on_status=statuses.append)

    examples, ends, msgs = read_examples(cfg, ends=4)
    assert Counter(e.impression_id for e in examples) == Counter({iid: 1 for iid in stream.truth})
    assert {e.impression_id: e.label for e in examples} == stream.truth
    assert all(e.kind == KIND_FINAL for e in examples)
    assert all((e.click_delay >= 0) == (e.label == 1) for e in examples)
    assert all(msg.key() in (b"0", b"1") for msg in msgs)
    # One end marker per input partition on every examples partition, with that partition's count.
    end_partitions = [m.partition() for m in msgs if isinstance(decode_example(m.value()), ExampleEnd)]
    assert sorted(zip((m.source_partition for m in ends), end_partitions)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    per_partition = Counter(partition_of(iid, 2) for iid in stream.truth)
    assert {(m.source_partition, m.examples, m.source_partitions, m.worker) for m in ends} == {
        (0, per_partition[0], 2, "w-a"),
        (1, per_partition[1], 2, "w-a"),
    }

    expected_dead = len(stream.malformed) + stream.late_clicks + stream.orphans
    seals = seal(cfg, cfg.topics.dead_letters)
    dead = [
        m
        for m in read_topic(cfg, cfg.topics.dead_letters, lambda r: len(r) >= expected_dead + seals, timeout_s=30)
        if not is_seal(m)
    ]
    assert len(dead) == expected_dead
    reasons = [dict(m.headers())["livectr.reason"].decode() for m in dead]
    assert sum(r.startswith("late click") for r in reasons) == stream.late_clicks
    assert reasons.count(REASON_ORPHAN) == stream.orphans
    for value, reason in stream.malformed:
        match = [m for m in dead if (m.value() or b"") == (value or b"")[: bus.DEAD_LETTER_MAX_VALUE]]
        assert match, f"{reason} record not dead-lettered"
        headers = dict(match[0].headers())
        assert headers["livectr.reason"].decode().startswith(reason)
        assert "\n" not in headers["livectr.reason"].decode()  # one line, whatever the record held
        assert headers["livectr.stage"] == b"join" and headers["livectr.topic"] in (
            cfg.topics.impressions.encode(),
            cfg.topics.clicks.encode(),
        )
    truncated = [dict(m.headers()).get("livectr.truncated") for m in dead]
    big = [len(v) for v, _ in stream.malformed if v is not None and len(v) > bus.DEAD_LETTER_MAX_VALUE]
    assert [t for t in truncated if t] == [f"value={n}".encode() for n in big] and big
    orphan = next(m for m in dead if dict(m.headers())["livectr.reason"] == REASON_ORPHAN.encode())
    assert orphan.value().startswith(b'{"type":"click","impression_id":"ghost')

    assert summary["examples_out"] == len(stream.truth) and summary["positives"] == sum(stream.truth.values())
    assert summary["dead_letters"] == expected_dead and summary["duplicates"] == stream.duplicates
    assert summary["finished_partitions"] == [0, 1] and summary["pending"] == 0
    assert statuses and statuses[-1]["events_in"] == summary["events_in"]
    assert read_checkpoint(checkpoint_path(cfg, 0)).state.finished


def test_fake_negative_policy_on_the_broker(kafka_config: Config) -> None:
    cfg = configure(kafka_config, policy="fake-negative")
    stream = make_stream(cfg, 0, 120)
    publish(cfg, stream.records, end_partitions=2)
    run_bounded(cfg)
    examples, ends, _ = read_examples(cfg, ends=4)
    kinds = Counter(e.kind for e in examples)
    assert kinds[KIND_FAKE_NEGATIVE] == len(stream.truth)
    assert {e.impression_id for e in examples if e.kind == KIND_POSITIVE_COPY} == {
        k for k, v in stream.truth.items() if v
    }
    assert kinds[KIND_POSITIVE_COPY] == sum(stream.truth.values())
    assert sum(m.examples for m in ends) == 2 * len(examples)  # each marker is on both examples partitions


def run_until_consumed(cfg: Config, records: int, **kwargs: Any) -> dict[str, Any]:
    """Run a worker until it has read ``records`` events, then stop it (windows still open)."""
    stop = threading.Event()

    def stop_when_consumed(status: dict[str, Any]) -> None:
        if status["events_in"] >= records:
            stop.set()

    timer = threading.Timer(60, stop.set)
    timer.start()
    try:
        return run_join_worker(cfg, stop=stop, on_status=stop_when_consumed, **kwargs)
    finally:
        timer.cancel()


def test_restart_after_stop_loses_and_repeats_nothing(kafka_config: Config) -> None:
    cfg = configure(kafka_config)
    first = make_stream(cfg, 0, 200)
    publish(cfg, first.records)
    summary1 = run_until_consumed(cfg, len(first.records), worker_id="w-1")
    assert summary1["events_in"] == len(first.records) and summary1["pending"] > 0
    ckpt = read_checkpoint(checkpoint_path(cfg, 0))
    assert ckpt is not None and ckpt.state.queue and not ckpt.state.finished

    second = make_stream(cfg, 200, 200)
    publish(cfg, second.records, end_partitions=2)
    summary2 = run_bounded(cfg, worker_id="w-2")
    assert summary2["events_in"] < len(first.records) + len(second.records) + 4  # resumed, not replayed

    examples, _, _ = read_examples(cfg, ends=4)
    truth = {**first.truth, **second.truth}
    assert Counter(e.impression_id for e in examples) == Counter({iid: 1 for iid in truth})
    assert {e.impression_id: e.label for e in examples} == truth


def test_user_profiles_survive_a_restart(kafka_config: Config) -> None:
    """The restarted worker's cache is empty; the checkpoint gives it back the users' clicks."""
    cfg = configure(kafka_config)
    first = make_stream(cfg, 0, 200)
    publish(cfg, first.records)
    run_until_consumed(cfg, len(first.records), worker_id="w-1", semantics=ClickSetLookup())
    second = make_stream(cfg, 200, 200)
    publish(cfg, second.records, end_partitions=2)
    restarted = ClickSetLookup()
    run_bounded(cfg, worker_id="w-2", semantics=restarted)
    assert restarted.clicks, "the checkpoint restored clicks into the new cache"

    truth = {**first.truth, **second.truth}
    matched: dict[str, set[tuple[float, str]]] = {}
    for k in range(400):
        if truth[f"imp{k}"]:
            click_ts = T0 + 2 * k + (1 if k % 11 == 4 else 30)  # the first click that counts
            matched.setdefault(f"u{k % 7}", set()).add((click_ts, f"i{k % 5}"))
    examples, _, _ = read_examples(cfg, ends=4)
    assert len(examples) == 400
    for ex in examples:
        before = sorted(c for c in matched.get(ex.user_id, ()) if c[0] < ex.ts)
        assert ex.user_sem == (repr(before).encode() if before else None), ex.impression_id


def stored_users(cfg: Config, partitions: int = 2) -> set[str]:
    """Users whose kept clicks the worker persisted, over all input partitions."""
    users: set[str] = set()
    for p in range(partitions):
        store = ProfileStore(profile_store_path(cfg, p))
        users.update(store.load().users)
        store.close()
    return users


def test_idle_users_profiles_are_forgotten_by_cache_and_store(kafka_config: Config) -> None:
    """A user idle for longer than user_profile_ttl_s (event time) leaves the cache, the
    persisted clicks and so the restarted worker; active users stay."""
    cfg = configure(kafka_config)
    cfg.semantic.user_profile_ttl_s = 200.0
    topics = cfg.topics
    early: list[Record] = []
    for k in range(3):  # one user who clicks in the first seconds only
        iid, ts = f"early{k}", T0 - 10 + k
        early.append((topics.impressions, 0, encode_event(Impression(iid, ts, "u-early", "i1"))))
        early.append((topics.clicks, 0, encode_event(Click(iid, ts + 0.5))))
    stream = make_stream(cfg, 0, 200)  # 400 s of event time: the watermark passes T0 + 200 + ttl
    publish(cfg, early + stream.records)
    first = ClickSetLookup()
    run_until_consumed(cfg, len(early) + len(stream.records), worker_id="w-1", semantics=first)
    kept = stored_users(cfg)
    assert "u-early" not in first.clicks and "u-early" not in kept
    assert {f"u{k}" for k in range(7)} <= kept and set(first.clicks) == kept

    publish(cfg, make_stream(cfg, 200, 20).records, end_partitions=2)
    restarted = ClickSetLookup()
    run_bounded(cfg, worker_id="w-2", semantics=restarted)
    assert "u-early" not in restarted.clicks and {f"u{k}" for k in range(7)} <= set(restarted.clicks)


def delivered(msgs: list[Any], wanted: set[str]) -> bool:
    """Whether any example record among ``msgs`` is about one of the ``wanted`` impressions."""
    for m in msgs:
        rec = decode_example(m.value())
        if isinstance(rec, ExampleBatch) and any(
            e.impression_id in wanted and e.kind != KIND_SCORE_REQUEST for e in rec.examples
        ):
            return True
    return False


def test_score_requests_precede_their_labels_in_decision_order(kafka_config: Config) -> None:
    """Sampled impressions come back as score requests, once each, ahead of their own label and
    of every label decided after them, and are not counted as examples."""
    cfg = configure(kafka_config, score_sample=0.25)
    stream = make_stream(cfg, 0, 300)
    publish(cfg, stream.records, end_partitions=2)
    summary = run_bounded(cfg, worker_id="w-r")
    msgs = read_topic(
        cfg, cfg.topics.examples, lambda ms: sum(isinstance(decode_example(m.value()), ExampleEnd) for m in ms) >= 4, 20
    )
    per_source: dict[bytes, list[Example]] = {}
    for m in msgs:
        rec = decode_example(m.value())
        if isinstance(rec, ExampleBatch):
            per_source.setdefault(m.key(), []).extend(rec.examples)
    requests = [e for seq in per_source.values() for e in seq if e.kind == KIND_SCORE_REQUEST]
    sampled = {iid for iid in stream.truth if zlib.crc32(iid.encode()) < 0.25 * 2**32}
    assert Counter(e.impression_id for e in requests) == Counter({iid: 1 for iid in sampled})
    assert summary["score_requests_out"] == len(sampled)
    assert summary["examples_out"] == len(stream.truth)
    for seq in per_source.values():
        position = {(e.impression_id, e.kind): k for k, e in enumerate(seq)}
        for k, e in enumerate(seq):
            if e.kind == KIND_SCORE_REQUEST:
                assert position[(e.impression_id, KIND_FINAL)] > k
                later_decided = [
                    x for x in seq[:k] if x.kind != KIND_SCORE_REQUEST and decision_time(x, cfg.join.window_s) > e.ts
                ]
                assert not later_decided, "a label decided after the impression was sent before its request"


def _worker_process(cfg_dict: dict[str, Any]) -> None:
    run_join_worker(from_dict(cfg_dict), worker_id="doomed", bounded=True)


def test_sigkill_loses_no_label_and_resends_none(kafka_config: Config) -> None:
    """Kill -9 after examples were delivered past the last checkpoint; the restarted worker
    restores the checkpoint, replays, and drops what it had already delivered."""
    kafka_config.kafka.session_timeout_ms = 2000  # the killed member must leave the group quickly
    cfg = configure(kafka_config, commit_interval_s=4.0, repartition=True)
    first = make_stream(cfg, 0, 200)
    publish(cfg, first.records)
    proc = multiprocessing.get_context("spawn").Process(target=_worker_process, args=(to_dict(cfg),))
    proc.start()
    try:
        deadline = time.monotonic() + 40
        while read_checkpoint(checkpoint_path(cfg, 1)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        ckpt = read_checkpoint(checkpoint_path(cfg, 1))
        assert ckpt is not None
        second = make_stream(cfg, 200, 100)
        publish(cfg, second.records)
        # Wait until some example of the second part is on the topic, then kill before the next checkpoint.
        want = {f"imp{k}" for k in range(200, 300) if second.truth[f"imp{k}"]}
        read_topic(cfg, cfg.topics.examples, lambda msgs: delivered(msgs, want), timeout_s=20)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        assert read_checkpoint(checkpoint_path(cfg, 1)).seq == ckpt.seq, "checkpointed again before the kill"
    finally:
        if proc.is_alive():
            proc.kill()
    assert delivered(read_topic(cfg, cfg.topics.examples, lambda msgs: delivered(msgs, want), timeout_s=5), want)

    third = make_stream(cfg, 300, 60)
    publish(cfg, third.records, end_partitions=2)
    summary = run_bounded(cfg, worker_id="survivor", limit_s=60)
    assert summary["suppressed_replays"] > 0
    # The killed worker's repartitioner had moved records it never committed: moved again, dropped as copies.
    assert summary["input_copies"] > 0

    examples, _, _ = read_examples(cfg, ends=4)
    truth = {**first.truth, **second.truth, **third.truth}
    assert {e.impression_id: e.label for e in examples} == truth
    assert Counter(e.impression_id for e in examples) == Counter({iid: 1 for iid in truth})


@pytest.mark.parametrize("repartition", [False, True], ids=["direct", "rekeyed"])
def test_sigkill_before_the_first_checkpoint_resends_nothing(kafka_config: Config, repartition: bool) -> None:
    """Kill -9 after examples were delivered but before any periodic checkpoint or commit (the
    case of a join killed soon after ``livectr run`` restarted it): the partitions were
    checkpointed when taken over, so the restarted worker re-reads what was delivered since and
    drops it. Restored from nothing, it replayed from the start and sent all of it again."""
    kafka_config.kafka.session_timeout_ms = 2000  # the killed member must leave the group quickly
    cfg = configure(kafka_config, commit_interval_s=3600.0, repartition=repartition)
    first = make_stream(cfg, 0, 200)
    publish(cfg, first.records)
    proc = multiprocessing.get_context("spawn").Process(target=_worker_process, args=(to_dict(cfg),))
    proc.start()
    want = {iid for iid, label in first.truth.items() if label}
    try:
        assert delivered(read_topic(cfg, cfg.topics.examples, lambda msgs: delivered(msgs, want), 40), want)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
    finally:
        if proc.is_alive():
            proc.kill()
    probe = bus.consumer(cfg.kafka, cfg.join.group_id)
    try:
        topic = join_inputs(cfg)[0]
        committed = probe.committed(
            [TopicPartition(topic, p) for p in range(bus.partition_count(cfg.kafka, topic))], 10
        )
    finally:
        probe.close()
    assert all(tp.offset < 0 for tp in committed), "committed before the kill: not the case under test"

    rest = make_stream(cfg, 200, 60)
    publish(cfg, rest.records, end_partitions=2)
    summary = run_bounded(cfg, worker_id="survivor", limit_s=60)

    examples, _, _ = read_examples(cfg, ends=4)
    truth = {**first.truth, **rest.truth}
    repeated = sorted(iid for iid, n in Counter(e.impression_id for e in examples).items() if n > 1)
    assert not repeated, f"{len(repeated)} impressions labelled more than once, e.g. {repeated[:5]}"
    assert {e.impression_id: e.label for e in examples} == truth
    assert summary["suppressed_replays"] > 0


def test_two_workers_share_the_partitions(kafka_config: Config) -> None:
    cfg = configure(kafka_config)
    stream = make_stream(cfg, 0, 200)
    publish(cfg, stream.records, end_partitions=2)
    results: dict[str, dict[str, Any]] = {}
    threads = [
        threading.Thread(target=lambda w=w: results.__setitem__(w, run_bounded(cfg, worker_id=w)))
        for w in ("w-x", "w-y")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    examples, ends, _ = read_examples(cfg, ends=4)
    assert {e.impression_id: e.label for e in examples} == stream.truth
    assert Counter(e.impression_id for e in examples) == Counter({iid: 1 for iid in stream.truth})
    assert set(results) == {"w-x", "w-y"}
    assert sum(r["impressions"] for r in results.values()) == len(stream.truth)


def late_labels(msgs: list[Any]) -> dict[str, int]:
    """Labels of the ``late…`` impressions among the example records ``msgs``."""
    return {
        e.impression_id: e.label
        for m in msgs
        if isinstance(r := decode_example(m.value()), ExampleBatch)
        for e in r.examples
        if e.impression_id.startswith("late") and e.kind != KIND_SCORE_REQUEST
    }


def test_unbounded_worker_reopens_after_end_and_idle_clicks_release_the_watermark(kafka_config: Config) -> None:
    """Forever mode: a finished partition takes a new stream (new event-time epoch); a clicks
    partition that stays empty is declared idle, so impressions alone close their windows."""
    cfg = configure(kafka_config, idle_timeout_s=0.5)
    first = make_stream(cfg, 0, 60)
    publish(cfg, first.records, end_partitions=2)
    stop = threading.Event()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(run_join_worker(cfg, stop=stop, bounded=False)))
    thread.start()
    try:
        examples, ends, _ = read_examples(cfg, ends=4)
        assert {e.impression_id: e.label for e in examples} == first.truth
        # A second stream, no clicks at all and no end markers: only idleness can close windows.
        topics = cfg.topics
        later = [
            (topics.impressions, 0, encode_event(Impression(f"late{k}", T0 + 10 * k, "u", "i"))) for k in range(100)
        ]
        publish(cfg, later)
        # Re-keyed by impression id, the stream spreads over both join partitions; each one's clock
        # follows raw partition 0 (the only one not idle), so both close up to its newest impression.
        want = {f"late{k}" for k in range(100) if T0 + 10 * k + cfg.join.window_s < T0 + 990}
        msgs = read_topic(cfg, topics.examples, lambda m: want <= set(late_labels(m)), timeout_s=20)
    finally:
        stop.set()
        thread.join(30)
    got = late_labels(msgs)
    # Once the impressions source is idle too, event time runs on with the wall clock (a few
    # seconds here), so a window or two more may close before the stop: never fewer.
    assert want <= set(got) and set(got.values()) == {0}
    assert 0 < result["pending"] <= 100 - len(want)


def test_unbounded_worker_closes_the_last_windows_after_the_producers_stop(kafka_config: Config) -> None:
    """Producers that stop do not hold the last windows open: with every source idle, event time
    runs on with the wall clock, so each impression is labelled about W (wall) after it."""
    cfg = configure(kafka_config, idle_timeout_s=0.5, window_s=2.0)
    now, topics = time.time(), cfg.topics
    records = [
        (topics.impressions, k % 2, encode_event(Impression(f"q{k}", now + 0.01 * k, "u", "i"))) for k in range(20)
    ]
    records.append((topics.clicks, 1, encode_event(Click("q3", now + 0.5))))
    publish(cfg, records)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: run_join_worker(cfg, stop=stop, bounded=False))
    thread.start()
    try:
        wanted = {f"q{k}" for k in range(20)}
        msgs = read_topic(cfg, topics.examples, lambda m: all(delivered(m, {iid}) for iid in wanted), timeout_s=30)
    finally:
        stop.set()
        thread.join(30)
    got = [
        (e.impression_id, e.label)
        for m in msgs
        if isinstance(r := decode_example(m.value()), ExampleBatch)
        for e in r.examples
        if e.kind != KIND_SCORE_REQUEST
    ]
    assert sorted(got) == sorted((f"q{k}", int(k == 3)) for k in range(20))
