"""run_learner against the real (tansu) broker: counts, dead letters, snapshots, resume from offsets."""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec
from toyworld import ToyWorld

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import KIND_FINAL, KIND_SCORE_REQUEST, Example, ExampleBatch, ExampleEnd, encode_example
from livectr.learner import snapshot as snap
from livectr.learner.loop import WarmUp, _Run, run_learner


def produce(
    cfg: Config, batches: dict[int, list[list[Example]]], raw: list[tuple[int, bytes]] = (), ends: int = 0
) -> None:
    """Write example batches per examples partition, then raw records, then ``ends`` end markers per partition."""
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    topic = cfg.topics.examples
    for partition, items in batches.items():
        for batch in items:
            bus.produce(
                prod, topic, encode_example(ExampleBatch(batch)), partition=partition, on_delivery=tracker.callback
            )
    for partition, value in raw:
        bus.produce(prod, topic, value, partition=partition, on_delivery=tracker.callback)
    for source in range(ends):
        for partition in range(cfg.kafka.partitions):
            marker = ExampleEnd(source_partition=source, source_partitions=ends, examples=0, worker="test")
            bus.produce(prod, topic, encode_example(marker), partition=partition, on_delivery=tracker.callback)
    bus.flush_or_raise(prod, tracker)


def dead_letters(cfg: Config, expected: int, timeout_s: float = 15.0) -> list[str]:
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [cfg.topics.dead_letters])
    reasons: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(reasons) < expected and time.monotonic() < deadline:
        for msg in cons.consume(100, timeout=0.2):
            if msg.error() is None:
                reasons.append(dict(msg.headers())["livectr.reason"].decode())
    cons.close()
    return reasons


def test_bounded_run_counts_dead_letters_snapshots_and_resume(kafka_config: Config) -> None:
    cfg = kafka_config
    cfg.learner.batch_size = 256
    cfg.learner.context_buckets = 1 << 12
    cfg.learner.snapshot_every_examples = 1500
    cfg.learner.shuffle_buffer = 0  # train as batches arrive, so the snapshot cadence is per 1,500 examples
    # ... and do not hold one partition back for the other (their toy timestamps interleave
    # arbitrarily): a bulk release would train past several snapshot points at once.
    cfg.learner.align_idle_s = 0.0
    bus.ensure_topics(cfg)
    world = ToyWorld(users=60, items=30, seed=4)

    # Phase 1: 4,000 examples, no end markers; an unbounded learner is stopped once it has them all.
    first = {p: [world.examples(200) for _ in range(10)] for p in range(2)}
    bad_label = world.examples(1)[0]
    bad_label = Example(**{**{f: getattr(bad_label, f) for f in bad_label.__struct_fields__}, "label": 7})
    # An end marker for input partition 5 of 2 (tests/test_fuzz_decoders.py): it used to count
    # toward "every input partition ended"; now it is an invalid example like the others.
    bad_end = msgspec.msgpack.encode(["end", 5, 2, 0, "evil", 0.0])
    produce(
        cfg,
        first,
        raw=[(0, b"\xc1 not msgpack"), (1, encode_example(ExampleBatch([bad_label]))), (1, bad_end)],
    )
    stop = threading.Event()
    statuses: list[dict[str, Any]] = []

    def on_status(status: dict[str, Any]) -> None:
        statuses.append(status)
        if status["examples_trained"] >= 4000:
            stop.set()

    s1 = run_learner(cfg, on_status=on_status, stop=stop, bounded=False)
    assert s1["examples_trained"] == 4000 and s1["dead_letters"] == 3
    assert s1["positives"] == sum(e.label for b in first.values() for batch in b for e in batch)
    assert s1["snapshots_published"] >= 3  # every 1,500 examples, plus the final one
    assert 0.5 < s1["progressive_auc"] < 1 and s1["freshness_p50_s"] >= 0 and s1["gate_usage"] > 0
    assert {"examples_per_second", "progressive_auc", "windowed_auc", "gate_usage"} <= set(statuses[-1])
    reasons = dead_letters(cfg, 3)
    assert sorted(r.split(":")[0] for r in reasons) == ["invalid example"] * 3
    assert any("label 7" in r for r in reasons) and any("source_partition 5" in r for r in reasons)
    manifest, _ = snap.load_latest(cfg.data_dir)
    # Next offsets = records written per partition (10 batches + 1 bad record on 0, 2 on 1). Counted, not read
    # from watermarks, which tansu may report per record batch (see EndOfStream's docstring).
    assert manifest["offsets"] == {"0": 11, "1": 12}
    assert manifest["examples_seen"] == 4000 and manifest["offsets_topic"] == cfg.topics.examples
    v1 = manifest["version"]

    # Phase 2: 1,000 more examples and end markers from 2 join inputs; a bounded run resumes and finishes.
    second = {p: [world.examples(250) for _ in range(2)] for p in range(2)}
    produce(cfg, second, ends=2)
    s2 = run_learner(cfg, bounded=True)
    assert s2["examples_trained"] == 1000  # only the new ones: it resumed from the snapshot's offsets
    assert s2["examples_seen_total"] == 5000 and s2["resumed_from_version"] == v1
    assert s2["dead_letters"] == 0 and s2["snapshots_published"] >= 1
    manifest, _ = snap.load_latest(cfg.data_dir)
    assert manifest["offsets"] == {"0": 11 + 2 + 2, "1": 12 + 2 + 2}  # + 2 batches + 2 end markers
    assert manifest["end_markers"]["source_partitions"] == 2

    # Phase 3: restarting a finished bounded run trains nothing and returns at once.
    t = time.monotonic()
    s3 = run_learner(cfg, bounded=True)
    assert s3["examples_trained"] == 0 and s3["snapshots_published"] == 0 and time.monotonic() - t < 10


def _keyed(cfg: Config, source: int, examples: list[Example], per_record: int, ends: int = 0) -> None:
    """Write ``examples`` as join source ``source`` would: keyed records on examples partition ``source``."""
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    for k in range(0, len(examples), per_record):
        bus.produce(
            prod,
            cfg.topics.examples,
            encode_example(ExampleBatch(examples[k : k + per_record])),
            key=str(source).encode(),
            partition=source,
            on_delivery=tracker.callback,
        )
    if ends:
        marker = ExampleEnd(source_partition=source, source_partitions=ends, examples=0, worker="test")
        for partition in range(cfg.kafka.partitions):
            bus.produce(
                prod,
                cfg.topics.examples,
                encode_example(marker),
                key=str(source).encode(),
                partition=partition,
                on_delivery=tracker.callback,
            )
    bus.flush_or_raise(prod, tracker)


def _stream(source: int, start: int, stop: int) -> list[Example]:
    """Impressions at t = start..stop-1 (s), every fifth clicked after 5 s; ids unique per source."""
    return [
        Example(
            f"s{source}-{t}",
            T + t,
            f"u{t % 17}",
            f"i{t % 11}",
            {"slot": t % 3},
            int(t % 5 == 0),
            0,
            0.0,
            5.0 if t % 5 == 0 else -1.0,
        )
        for t in range(start, stop)
    ]


T = 1_700_000_000.0


def test_merge_holds_a_partition_ahead_and_a_restart_trains_each_example_once(kafka_config: Config) -> None:
    """Source 0 runs 500 s of event time ahead of source 1: the learner trains source 0 only as far
    as source 1 has got, stops with examples held (some records partly trained), and a restart
    resumes so that every example is trained exactly once."""
    cfg = kafka_config
    cfg.learner.batch_size = 100
    cfg.learner.shuffle_buffer = 0
    cfg.learner.align_idle_s = 60.0  # source 1 is slow, not idle
    bus.ensure_topics(cfg)
    _keyed(cfg, 0, _stream(0, 0, 1000), per_record=30)
    _keyed(cfg, 1, _stream(1, 0, 500), per_record=30)
    stop = threading.Event()
    trained: list[int] = []

    def on_status(status: dict[str, Any]) -> None:
        trained.append(status["examples_trained"])
        if len(trained) >= 4 and trained[-1] == trained[-4] > 0:  # nothing new for a few reports
            stop.set()

    s1 = run_learner(cfg, on_status=on_status, stop=stop, bounded=False)
    manifest, _ = snap.load_latest(cfg.data_dir)
    # Source 1 has decided everything up to t = 499 + 600 s; source 0's later examples wait.
    assert 1000 <= s1["examples_trained"] < 1500
    assert manifest["partly_trained"], "the stop should fall inside a record of source 0"
    assert int(manifest["offsets"]["0"]) < 34  # 1000 examples / 30 per record, not all trained

    _keyed(cfg, 1, _stream(1, 500, 1000), per_record=30, ends=2)
    _keyed(cfg, 0, [], per_record=30, ends=2)
    s2 = run_learner(cfg, bounded=True)
    assert s1["examples_trained"] + s2["examples_trained"] == 2000
    assert s2["examples_seen_total"] == 2000


def test_a_fresh_learner_waits_until_the_negatives_cover_the_stream(cfg: Config) -> None:
    """At a stream's start under ``wait`` the first window releases clicks alone: a fresh learner
    scores requests but trains nothing until the negatives cover half the impression time the
    positives do, then trains what waited, shuffled. Mid-stream both labels come at once."""
    cfg.semantic.enabled = False
    world = ToyWorld(users=40, items=20, seed=5)

    def at(ts: list[float], label: int, kind: int = KIND_FINAL) -> list[Example]:
        return [
            msgspec.structs.replace(e, ts=float(t), label=label, kind=kind)
            for e, t in zip(world.examples(len(ts)), ts, strict=True)
        ]

    run = _Run(cfg, None)
    run.release(at(list(range(0, 600, 2)), 0, KIND_SCORE_REQUEST) + at(list(range(0, 600, 4)), 1))
    run.train(force=True)
    assert run.trained == 0 and run.requests_scored == 300 and run.warming
    run.release(at(list(range(0, 200, 2)), 0))  # negatives of 200 s against positives of 600 s
    run.train(force=True)
    assert run.trained == 0 and run.warming
    run.release(at(list(range(200, 320, 2)), 0) + at(list(range(600, 640, 4)), 1))
    assert not run.warming
    assert 0.2 < sum(e.label for e in run.buffer[:256]) / 256 < 0.8  # shuffled: clicks and negatives mixed
    run.train(force=True)
    assert run.trained == 150 + 100 + 60 + 10

    mid = _Run(cfg, None)  # started mid-stream: the first records hold both labels
    mid.release(
        sorted(
            at([400.0 + k for k in range(20)], 0) + at([990.0 + k for k in range(10)], 1),
            key=lambda e: e.ts + (0 if e.label else 600),
        )
    )
    assert not mid.warming

    clicks_only = WarmUp(600.0)  # a stream without negatives is still learned, after 3 W
    assert not clicks_only.observe(at([0.0, 1000.0], 1))
    assert clicks_only.observe(at([1800.0], 1))
