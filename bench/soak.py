"""Soak of the learner's memory: a long stream over a growing population, expiry on against off.

    python bench/soak.py                                   # 2,000,000 examples, ≥ 1,000,000 users
    python bench/soak.py --events 400000 --ttl-s 600       # a quick look

What is under test is the learner (issue 14: "learner memory is unbounded"), so a generator of
labelled examples is fed straight to :class:`~livectr.learner.online.OnlineLearner` — no broker,
no join. The population grows: new users arrive all the time (``--new-users-per-event``), each
event picks a user among the recent arrivals (an exponential look-back, so a user is active for
a while and then gone for good), and the catalogue grows and churns the same way, with a teacher
vector per item (semantics on: the cold-start index is exercised too). Event time advances at
``--rate`` events per second.

Two runs, each in its own process (peak RSS is per process), started together: expiry at
``--ttl-s`` (users and items) and the baseline with expiry off (``--baseline-events``, by default
the same length). Every ``--every`` events each run records its RSS and peak RSS, the live
vocabulary and table sizes, publishes a snapshot (its size and ``vocab.json``'s) and times a
scorer's load of it. Printed: the curves and the ratios late/early (early: the first checkpoint
after warm-up, i.e. after ``--warmup-ttls`` TTLs of event time). Target: flat after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from livectr.core.config import Config
from livectr.core.events import KIND_FINAL, Example
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor
from livectr.learner.snapshot import load_latest, publish_snapshot
from livectr.semantic_cache.codec import quantize

OUT = Path(__file__).resolve().parent / "out"


def rss_mb() -> tuple[float, float]:
    """Current and peak resident set size of this process (MB)."""
    current = 0.0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Population:
    """The example generator: growing, churning users and items (see the module docstring)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = np.random.default_rng(args.seed)
        self.args = args
        self.item_capacity = int(args.initial_items + args.new_items_per_event * args.events) + 16
        self.item_effect = self.rng.normal(0.0, 0.8, self.item_capacity)
        self.item_vectors = quantize(self.rng.normal(size=(self.item_capacity, args.sem_dim)))
        self.users_born = 0.0
        self.items_born = float(args.initial_items)
        self.devices = ("ios", "android", "web")

    def batch(self, start: int, n: int) -> list[Example]:
        a, rng = self.args, self.rng
        users_born = self.users_born + a.new_users_per_event * np.arange(1, n + 1)
        items_born = self.items_born + a.new_items_per_event * np.arange(1, n + 1)
        self.users_born, self.items_born = float(users_born[-1]), float(items_born[-1])
        u = np.maximum(np.floor(users_born) - 1 - np.floor(rng.exponential(a.user_lookback, n)), 0).astype(np.int64)
        i = np.maximum(np.floor(items_born) - 1 - np.floor(rng.exponential(a.item_lookback, n)), 0).astype(np.int64)
        p = 1.0 / (1.0 + np.exp(-(-3.0 + self.item_effect[i])))
        labels = rng.random(n) < p
        ts = (start + np.arange(n)) / a.rate
        return [
            Example(
                impression_id=f"imp-{start + k}",
                ts=float(ts[k]),
                user_id=f"u{u[k]}",
                item_id=f"i{i[k]}",
                context={"device": self.devices[int(u[k] % 3)]},
                label=int(labels[k]),
                kind=KIND_FINAL,
                decided_at=float(ts[k]),
                item_sem=self.item_vectors[i[k]].tobytes(),
            )
            for k in range(n)
        ]


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def one_run(args: argparse.Namespace) -> None:
    """A single run (the child process): prints one JSON line per checkpoint."""
    cfg = Config()
    cfg.learner.device = "cpu"
    cfg.learner.user_ttl_s = cfg.learner.item_ttl_s = args.ttl_s
    cfg.learner.admit_min_count = args.admit_min_count
    cfg.semantic.reduced_dim = args.sem_dim
    learner = OnlineLearner(cfg)
    pop = Population(args)
    workdir = Path(tempfile.mkdtemp(prefix="livectr-soak-"))
    seen_users: set[str] = set()
    started = time.perf_counter()
    try:
        done, checkpoint = 0, args.every
        while done < args.events:
            n = min(args.batch, args.events - done)
            batch = pop.batch(done, n)
            seen_users.update(ex.user_id for ex in batch)
            learner.learn_batch(batch)
            done += n
            if done >= checkpoint or done == args.events:
                checkpoint += args.every
                _, path = publish_snapshot(workdir, learner.state(), {"examples_seen": learner.examples_seen}, keep=1)
                t = time.perf_counter()
                loaded = load_latest(workdir, with_optimizer=False)
                assert loaded is not None
                Predictor.for_serving(cfg, loaded[1], device="cpu")
                load_s = time.perf_counter() - t
                del loaded
                current, peak = rss_mb()
                users, items = learner.featurizer.users, learner.featurizer.items
                row = {
                    "events": done,
                    "event_time_s": done / args.rate,
                    "distinct_users": len(seen_users),
                    "live_users": len(users) - 1,
                    "user_rows": learner.model.user_emb.num_embeddings,
                    "live_items": len(items) - 1,
                    "item_rows": learner.model.item_emb.num_embeddings,
                    "users_expired": users.expired_total,
                    "rss_mb": current,
                    "peak_rss_mb": peak,
                    "snapshot_mb": dir_mb(path),
                    "vocab_json_mb": (path / "vocab.json").stat().st_size / 1e6,
                    "scorer_load_s": load_s,
                    "wall_s": time.perf_counter() - started,
                }
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def child_args(args: argparse.Namespace, ttl_s: float, events: int) -> list[str]:
    out = [sys.executable, __file__, "--child", "--ttl-s", str(ttl_s), "--events", str(events)]
    for name in (
        "seed",
        "rate",
        "every",
        "batch",
        "new_users_per_event",
        "user_lookback",
        "new_items_per_event",
        "item_lookback",
        "initial_items",
        "sem_dim",
        "admit_min_count",
    ):
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out


def ratio(rows: list[dict[str, Any]], key: str, early_at: float) -> tuple[float, float, float]:
    early = next((r for r in rows if r["event_time_s"] >= early_at), rows[-1])
    late = rows[-1]
    return early[key], late[key], late[key] / early[key] if early[key] else float("nan")


def print_curve(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {name} ==")
    print(
        f"  {'events':>9} {'users seen':>10} {'live users':>10} {'user rows':>9} {'live items':>10} "
        f"{'RSS MB':>7} {'peak MB':>7} {'snap MB':>7} {'vocab MB':>8} {'load s':>6}"
    )
    for r in rows:
        print(
            f"  {r['events']:>9,} {r['distinct_users']:>10,} {r['live_users']:>10,} {r['user_rows']:>9,} "
            f"{r['live_items']:>10,} {r['rss_mb']:>7.0f} {r['peak_rss_mb']:>7.0f} {r['snapshot_mb']:>7.1f} "
            f"{r['vocab_json_mb']:>8.1f} {r['scorer_load_s']:>6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--baseline-events", type=int, default=0, help="baseline (expiry off) length; 0: --events")
    ap.add_argument("--ttl-s", type=float, default=1800.0, help="user and item TTL of the run with expiry")
    ap.add_argument("--admit-min-count", type=int, default=1)
    ap.add_argument("--rate", type=float, default=200.0, help="events per event-time second")
    ap.add_argument("--every", type=int, default=200_000, help="checkpoint every N events")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--new-users-per-event", type=float, default=0.75)
    ap.add_argument("--user-lookback", type=float, default=20_000.0, help="mean look-back over user arrivals")
    ap.add_argument("--new-items-per-event", type=float, default=0.01)
    ap.add_argument("--item-lookback", type=float, default=3_000.0)
    ap.add_argument("--initial-items", type=int, default=2_000)
    ap.add_argument("--sem-dim", type=int, default=32)
    ap.add_argument("--warmup-ttls", type=float, default=2.0, help="early = first checkpoint after this many TTLs")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", type=Path, default=OUT / "soak.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        one_run(args)
        return 0

    runs = {
        f"expiry on (ttl {args.ttl_s:g} s)": child_args(args, args.ttl_s, args.events),
        "expiry off (baseline)": child_args(args, 0.0, args.baseline_events or args.events),
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for name, cmd in runs.items()}
    results: dict[str, list[dict[str, Any]]] = {}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"{name}: exit {proc.returncode}", file=sys.stderr)
            return 1
        results[name] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    early_at = args.warmup_ttls * args.ttl_s
    summary: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": results}
    for name, rows in results.items():
        print_curve(name, rows)
        for key in ("peak_rss_mb", "rss_mb", "snapshot_mb", "live_users", "user_rows", "scorer_load_s"):
            e, late, r = ratio(rows, key, early_at)
            summary.setdefault("ratios", {}).setdefault(name, {})[key] = {"early": e, "late": late, "ratio": r}
            print(f"  {key:<14} early {e:>10,.2f}  late {late:>10,.2f}  late/early {r:.2f}")
    print(
        f"\n(early: the first checkpoint at or after {early_at:,.0f} s of event time = {args.warmup_ttls:g} TTLs; "
        f"late: the last)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
