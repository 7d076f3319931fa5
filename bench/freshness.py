"""Freshness as served: event → trained and event → served at a paced, real-time rate.

``python bench/freshness.py [--seconds 90] [--rate 200] [--delta-every-s 2] [--policy fake-negative]``

Runs the real pipeline (``livectr run`` on a broker this script starts: simulator at ``--speed 1``
so nothing is backlogged, join, learner) and, in this process, a scorer that follows the model
from Kafka alone (no data dir: the full snapshot, then the deltas). Every delta carries the
decision times of the examples trained into it (``Example.decided_at``: when the event that
decided the label was published — the click, or the impression itself for a fake negative — so
the labelling policy's own wait is excluded) and when they were trained; when the scorer applies
it, ``now − decided_at`` is that example's event → served time. Printed: p50/p99 of event →
trained (from the deltas, and the learner's own figure over every example), event → served, the
targets (trained p99 ≤ 2 s beyond the policy's wait, served p99 ≤ 5 s) met or missed, and bytes
per delta against a full snapshot; and event → joined by kind and apart for the stream's first
``--warm-s`` seconds (clicks ramp up over their delay there).

By default two runs, one after the other in the same invocation: ``join.caught_up_clock`` off
(the join's watermark waits for the next click of each partition: fake negatives wait with it)
and ``always`` (a source at the end of its partition runs on with the wall clock, as live runs
do by default), so the before/after is measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livectr.core import bus
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config, to_dict
from livectr.core.events import KIND_FAKE_NEGATIVE, KIND_POSITIVE_COPY, KIND_SCORE_REQUEST, ExampleBatch, decode_example
from livectr.learner.deltas import Delta
from livectr.learner.scorer import Scorer
from livectr.learner.updates import UpdateFollower


class RecordingScorer(Scorer):
    """A scorer that keeps, per delta applied, its size and its examples' decision/training times."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []

    def apply_delta(self, delta: Delta) -> bool:
        applied = super().apply_delta(delta)
        if applied:
            now = time.time()
            decided = delta.arrays["freshness.decided_at"]
            self.served.append(now - decided)
            self.trained.append(delta.arrays["freshness.trained_at"] - decided)
        return applied


def quantiles(values: list[np.ndarray]) -> tuple[float, float, int]:
    v = np.concatenate(values) if values else np.zeros(0)
    if not v.size:
        return float("nan"), float("nan"), 0
    return float(np.quantile(v, 0.5)), float(np.quantile(v, 0.99)), int(v.size)


@dataclass
class Joined:
    """Per example read back from the examples topic: kind, ``decided_at``, join publish time."""

    kind: np.ndarray
    decided: np.ndarray
    joined: np.ndarray

    def lags(self, mask: np.ndarray | None = None) -> list[np.ndarray]:
        lag = self.joined - self.decided
        return [lag if mask is None else lag[mask]]


def event_to_joined(cfg: Config) -> Joined:
    """Per example: when the join published it (the record's Kafka timestamp) − its ``decided_at``."""
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [cfg.topics.examples])
    kinds: list[int] = []
    decided_at: list[float] = []
    joined_at: list[float] = []
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 3.0:
        msgs = cons.consume(1000, 0.5)
        if msgs:
            quiet_since = time.monotonic()
        for msg in msgs:
            if msg.error() is not None or not msg.value():
                continue
            rec = decode_example(msg.value())
            examples = rec.examples if isinstance(rec, ExampleBatch) else [rec]
            joined = msg.timestamp()[1] / 1000.0
            for ex in examples:
                kind = getattr(ex, "kind", KIND_SCORE_REQUEST)
                if kind != KIND_SCORE_REQUEST:
                    kinds.append(kind)
                    decided_at.append(ex.decided_at)
                    joined_at.append(joined)
    cons.close()
    return Joined(np.asarray(kinds), np.asarray(decided_at, dtype=np.float64), np.asarray(joined_at))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=90.0, help="seconds of paced traffic")
    ap.add_argument("--rate", type=float, default=200.0, help="impressions per second (real time)")
    ap.add_argument("--delta-every-s", type=float, default=2.0)
    ap.add_argument("--policy", default="fake-negative")
    ap.add_argument("--partitions", type=int, default=4, help="partitions of the topics (join sources)")
    ap.add_argument(
        "--caught-up-clock",
        default="off,always",
        help="join.caught_up_clock, comma-separated: one paced run each, in this order (off: the "
        "previous behaviour; always: a source at the end of its partition runs on with the wall "
        "clock, as live runs do by default). Default: both, for a before/after in one invocation",
    )
    ap.add_argument(
        "--warm-s",
        type=float,
        default=20.0,
        help="event → joined is also shown apart for examples decided in the stream's first N s "
        "(clicks ramp up over the click delay: median 20 s)",
    )
    args = ap.parse_args()
    for k, mode in enumerate(args.caught_up_clock.split(",")):
        if k:
            print()
        run_once(args, mode.strip())


def run_once(args: argparse.Namespace, mode: str) -> None:
    """One paced ``livectr run`` with ``join.caught_up_clock = mode``; prints its figures."""
    work = Path(tempfile.mkdtemp(prefix="livectr-freshness-"))
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        cfg = Config()
        cfg.kafka.bootstrap_servers = broker.bootstrap_servers
        cfg.kafka.topic_prefix = "fresh."
        cfg.kafka.partitions = args.partitions
        cfg.data_dir = work / "data"
        cfg.semantic.enabled = False
        cfg.join.policy = args.policy
        cfg.join.caught_up_clock = mode
        cfg.learner.device = "cpu"
        cfg.learner.delta_every_s = args.delta_every_s
        cfg.simulator.speed = 1.0
        cfg.simulator.impressions_per_s = args.rate
        cfg.simulator.events = int(args.seconds * args.rate * 1.05)  # impressions and ~5 % clicks
        cfg.simulator.progress = False
        config_path = work / "config.json"
        config_path.write_text(json.dumps(to_dict(cfg)))

        remote = Config()
        remote.kafka, remote.learner, remote.semantic = cfg.kafka, cfg.learner, cfg.semantic
        remote.data_dir = work / "no-shared-disk"
        scorer = RecordingScorer(remote.data_dir, cfg=remote, load_now=False)
        follower = UpdateFollower(remote, scorer)
        scorer.attach(follower)
        scorer.start_watcher()

        summary_path = work / "run.json"
        started = time.monotonic()
        cmd = [sys.executable, "-m", "livectr", "run", "--config-json", str(config_path), "--quiet"]
        cmd += ["--summary-json", str(summary_path), "--semantics", "off"]
        proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if proc.returncode != 0 or not summary_path.exists():
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit("livectr run failed")
        elapsed = time.monotonic() - started
        summary = json.loads(summary_path.read_text())
        learn = summary["stages"]["learn"]
        deadline = time.monotonic() + 30
        while scorer.deltas_applied < learn.get("deltas_published", 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        scorer.stop_watcher()
        by_example = event_to_joined(cfg)
        joined = quantiles(by_example.lags())

    served = quantiles(scorer.served)
    trained = quantiles(scorer.trained)
    full = learn.get("last_full_snapshot_bytes", 0)
    delta_bytes = learn.get("mean_delta_bytes", 0)
    print(
        f"paced run: {args.rate:g} impressions/s for ~{args.seconds:g} s ({elapsed:.0f} s wall), policy {args.policy}, "
        f"{args.partitions} partitions, caught-up clock {mode}"
    )
    print(
        f"examples trained {learn['examples_trained']}, deltas published {learn.get('deltas_published')}, "
        f"applied by the Kafka-only scorer {scorer.deltas_applied} (skipped {scorer.deltas_skipped}, "
        f"refused {scorer.update_refusals}), full snapshots on Kafka {learn.get('full_snapshots_on_kafka')}"
    )
    print(f"event → joined (join published the example, n={joined[2]}): p50 {joined[0]:.3f} s  p99 {joined[1]:.3f} s")
    first = float(by_example.decided.min()) if by_example.decided.size else 0.0
    for label, mask in (
        ("fake negatives", by_example.kind == KIND_FAKE_NEGATIVE),
        ("positive copies", by_example.kind == KIND_POSITIVE_COPY),
        (f"decided in the first {args.warm_s:g} s", by_example.decided < first + args.warm_s),
        (f"decided after the first {args.warm_s:g} s", by_example.decided >= first + args.warm_s),
    ):
        part = quantiles(by_example.lags(mask))
        print(f"  event → joined, {label} (n={part[2]}): p50 {part[0]:.3f} s  p99 {part[1]:.3f} s")
    print(f"event → trained (examples in deltas, n={trained[2]}): p50 {trained[0]:.3f} s  p99 {trained[1]:.3f} s")
    print(
        f"event → trained (learner, every example): p50 {learn['freshness_p50_s']:.3f} s  "
        f"p99 {learn['freshness_p99_s']:.3f} s"
    )
    print(f"event → served (n={served[2]}): p50 {served[0]:.3f} s  p99 {served[1]:.3f} s")
    print(f"target trained p99 ≤ 2 s: {'met' if max(trained[1], learn['freshness_p99_s']) <= 2 else 'MISSED'}")
    print(f"target served p99 ≤ 5 s: {'met' if served[1] <= 5 else 'MISSED'}")
    print(
        f"bytes: mean delta {delta_bytes:,.0f}, full snapshot {full:,} "
        f"(a delta is {delta_bytes / full:.2%} of a full snapshot)"
        if full
        else "no full snapshot size reported"
    )


if __name__ == "__main__":
    main()
