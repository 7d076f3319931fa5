"""Scale the join from 1 to 2 to 1 workers mid-stream: what is lost or repeated, how long each
rebalance takes, and what the scaling costs against one worker on the same stream (same run).

Publishes N impressions (clicks for ≈``ctr`` of them, always within the window, so every label
is known) to 4 partitions in three parts, on an embedded broker:

* baseline: one join worker reads the three parts (published as it catches up) to the end;
* scaled: worker A reads part 1; worker B joins the group (A hands it two partitions); part 2 is
  published; once B has read some of it, B stops (its partitions move back to A); part 3 and the
  end markers are published and A finishes.

Both runs read the examples topic back whole and count lost, repeated and mislabelled
impressions. For the scaled run it prints how long each rebalance took until every partition was
restored and read again, the longest ``on_assign`` callback (the group waits for it) and the
longest restore (run from the worker's loop, outside the callback). Workers run as threads of
this process (they share one core's worth of Python).

    python bench/rebalance.py [--impressions 150000] [--repartition]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from livectr.core import bus
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.core.events import (
    KIND_SCORE_REQUEST,
    Click,
    Example,
    ExampleBatch,
    ExampleEnd,
    Impression,
    decode_example,
    encode_event,
)
from livectr.streams.worker import run_join_worker

T0 = 1_700_000_000.0
PARTITIONS = 4
WINDOW_S = 30.0
IMPRESSIONS, CLICKS = 0, 1
#: (IMPRESSIONS or CLICKS, partition, value) in publishing order.
Events = list[tuple[int, int, bytes]]


def make_parts(impressions: int, ctr: float, seed: int = 3) -> tuple[list[Events], dict[str, int]]:
    """Three parts of the stream (event-time order) and every impression's label."""
    rng = random.Random(seed)
    timed: list[tuple[float, int, int, bytes]] = []
    truth: dict[str, int] = {}
    for k in range(impressions):
        ts, p, iid = T0 + k / 100.0, k % PARTITIONS, f"imp{k}"
        imp = Impression(iid, ts, f"u{rng.randrange(5000)}", f"i{rng.randrange(2000)}", {"hour": k % 24})
        timed.append((ts, IMPRESSIONS, p, encode_event(imp)))
        truth[iid] = int(rng.random() < ctr)
        if truth[iid]:
            cts = ts + rng.uniform(0.5, WINDOW_S - 5)
            timed.append((cts, CLICKS, p, encode_event(Click(iid, cts))))
    timed.sort(key=lambda t: t[0])
    third = len(timed) // 3
    cuts = [0, third, 2 * third, len(timed)]
    return [[(t, p, v) for _, t, p, v in timed[cuts[i] : cuts[i + 1]]] for i in range(3)], truth


class Publisher:
    """Appends the parts to the input topics; end markers after the last."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.prod = bus.producer(cfg.kafka)
        self.tracker = bus.DeliveryTracker()
        self.counts: Counter[tuple[str, int]] = Counter()
        self.topics = (cfg.topics.impressions, cfg.topics.clicks)

    def publish(self, events: Events, end: bool = False) -> None:
        for i, (source, p, value) in enumerate(events):
            topic = self.topics[source]
            bus.produce(self.prod, topic, value, partition=p, on_delivery=self.tracker.callback)
            self.counts[(topic, p)] += 1
            if i % 10_000 == 0:
                self.prod.poll(0)
        if end:
            for topic in (self.cfg.topics.impressions, self.cfg.topics.clicks):
                counts = {p: self.counts[(topic, p)] for p in range(PARTITIONS)}
                bus.write_end_markers(self.prod, topic, "bench", counts, on_delivery=self.tracker.callback)
        bus.flush_or_raise(self.prod, self.tracker)


class Worker:
    """A join worker in a thread, with its latest status."""

    def __init__(self, cfg: Config, worker_id: str) -> None:
        self.stop = threading.Event()
        self.status: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, args=(cfg, worker_id), daemon=True)
        self.thread.start()

    def _run(self, cfg: Config, worker_id: str) -> None:
        self.summary = run_join_worker(cfg, worker_id=worker_id, stop=self.stop, on_status=self._on_status)

    def _on_status(self, status: dict[str, Any]) -> None:
        self.status = dict(status)

    def wait_for(self, check: Any, timeout_s: float = 300.0) -> float:
        """Seconds until ``check(status)`` holds."""
        began = time.monotonic()
        while not check(self.status):
            if not self.thread.is_alive():
                raise RuntimeError(f"worker ended early: {self.status}")
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"timed out; last status {self.status}")
            time.sleep(0.02)
        return time.monotonic() - began


def read_back(cfg: Config, timeout_s: float = 120.0) -> list[Example]:
    """Every example on the examples topic, read until each output partition holds the end marker
    of every input partition (markers follow all of an input partition's examples)."""
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [cfg.topics.examples])
    n_out = bus.partition_count(cfg.kafka, cfg.topics.examples)
    ends: set[tuple[int, int]] = set()
    examples: list[Example] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(ends) < n_out * PARTITIONS and time.monotonic() < deadline:
            for msg in cons.consume(10_000, 0.3):
                if msg.error() is not None:
                    continue
                rec = decode_example(msg.value())
                if isinstance(rec, ExampleBatch):
                    examples += rec.examples
                elif isinstance(rec, ExampleEnd):
                    ends.add((msg.partition(), rec.source_partition))
                elif isinstance(rec, Example):
                    examples.append(rec)
    finally:
        cons.close()
    if len(ends) < n_out * PARTITIONS:
        raise TimeoutError(f"only {len(ends)} of {n_out * PARTITIONS} end markers read back")
    return [e for e in examples if e.kind != KIND_SCORE_REQUEST]


def audit(examples: list[Example], truth: dict[str, int]) -> dict[str, int]:
    counts = Counter(e.impression_id for e in examples)
    return {
        "impressions": len(truth),
        "labelled": sum(1 for iid in truth if counts[iid]),
        "lost": sum(1 for iid in truth if not counts[iid]),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "wrong_labels": sum(1 for e in examples if e.impression_id in truth and e.label != truth[e.impression_id]),
        "unexpected": sum(1 for iid in counts if iid not in truth),
    }


def owns(n: int) -> Any:
    """Status check: ``n`` partitions restored (the status lists restored partitions only)."""
    return lambda s: len(s.get("partitions", [])) == n


def setup(bootstrap: str, tmp: Path, name: str, repartition: bool) -> Config:
    cfg = Config()
    cfg.kafka.bootstrap_servers = bootstrap
    cfg.kafka.topic_prefix = f"bench-{name}."
    cfg.kafka.partitions = PARTITIONS
    cfg.data_dir = tmp / name
    cfg.simulator.progress = False
    cfg.join.policy = "wait"
    cfg.join.window_s = WINDOW_S
    cfg.join.group_id = f"bench-{name}"
    cfg.join.repartition = repartition
    bus.ensure_topics(cfg)
    return cfg


def baseline(cfg: Config, parts: list[Events], truth: dict[str, int]) -> dict[str, Any]:
    pub = Publisher(cfg)
    began = time.monotonic()
    pub.publish(parts[0])
    a = Worker(cfg, "solo")
    sizes = [len(parts[0]), len(parts[0]) + len(parts[1])]
    a.wait_for(lambda s: s.get("events_in", 0) >= sizes[0])
    pub.publish(parts[1])
    a.wait_for(lambda s: s.get("events_in", 0) >= sizes[1])
    pub.publish(parts[2], end=True)
    a.thread.join()
    return {"elapsed_s": time.monotonic() - began, **audit(read_back(cfg), truth), "worker": a.summary}


def scaled(cfg: Config, parts: list[Events], truth: dict[str, int]) -> dict[str, Any]:
    pub = Publisher(cfg)
    began = time.monotonic()
    pub.publish(parts[0])
    a = Worker(cfg, "a")
    a.wait_for(lambda s: s.get("events_in", 0) >= len(parts[0]))
    b_started = time.monotonic()
    b = Worker(cfg, "b")
    # Scale out: the group's rebalance, B's first join included, until both read again.
    b.wait_for(owns(PARTITIONS // 2))
    a.wait_for(owns(PARTITIONS // 2))
    scale_out_s = time.monotonic() - b_started
    pub.publish(parts[1])
    b.wait_for(lambda s: s.get("events_in", 0) >= len(parts[1]) // 4)
    b_stopped = time.monotonic()
    b.stop.set()
    b.thread.join()
    a.wait_for(owns(PARTITIONS))
    scale_in_s = time.monotonic() - b_stopped
    pub.publish(parts[2], end=True)
    a.thread.join()
    return {
        "elapsed_s": time.monotonic() - began,
        "scale_out_s": scale_out_s,
        "scale_in_s": scale_in_s,
        **audit(read_back(cfg), truth),
        "workers": {"a": a.summary, "b": b.summary},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=150_000)
    parser.add_argument("--ctr", type=float, default=0.05)
    parser.add_argument("--repartition", action="store_true", help="join.repartition on (re-keyed inputs)")
    args = parser.parse_args()
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        parts, truth = make_parts(args.impressions, args.ctr)
        events = sum(len(p) for p in parts)
        solo = baseline(setup(broker.bootstrap_servers, Path(tmp), "solo", args.repartition), parts, truth)
        run = scaled(setup(broker.bootstrap_servers, Path(tmp), "scaled", args.repartition), parts, truth)
        print(
            f"events {events:,} ({args.impressions:,} impressions), {PARTITIONS} partitions, policy wait, "
            f"re-keyed inputs {'on' if args.repartition else 'off'}"
        )
        for name, res in (("1 worker", solo), ("1 → 2 → 1", run)):
            print(
                f"{name}: labelled {res['labelled']:,} of {res['impressions']:,}; lost {res['lost']}, "
                f"duplicates {res['duplicates']}, wrong labels {res['wrong_labels']}, "
                f"unexpected {res['unexpected']}; {res['elapsed_s']:.1f} s"
            )
        a, b = run["workers"]["a"], run["workers"]["b"]
        print(
            f"scale out (B joins until both read again) {run['scale_out_s']:.2f} s; "
            f"scale in (B stops until A reads all {PARTITIONS}) {run['scale_in_s']:.2f} s"
        )
        print(
            "longest on_assign callback: "
            f"A {a['assign_callback_max_s'] * 1000:.1f} ms, B {b['assign_callback_max_s'] * 1000:.1f} ms; "
            f"longest restore (worker loop): A {a['restore_max_s']:.2f} s, B {b['restore_max_s']:.2f} s; "
            f"partitions restored A {a['partitions_restored']}, B {b['partitions_restored']}; "
            f"replays suppressed A {a['suppressed_replays']}, B {b['suppressed_replays']}"
        )
        print(f"time 1 → 2 → 1 / 1 worker: {run['elapsed_s'] / solo['elapsed_s']:.2f}")


if __name__ == "__main__":
    main()
