"""Scorer HTTP latency: the stdlib server livectr used to serve with vs the Starlette/uvicorn one.

``python bench/serve_speed.py [--requests N] [--candidates 100] [--concurrency 1,4] [--rounds 3]``
trains a model on a synthetic stream, publishes one snapshot, then starts each server as its own
process on that snapshot and drives it from this (client) process: N requests of ``candidates``
candidates each, split over ``concurrency`` client threads (one keep-alive connection each; the
old server speaks HTTP/1.0, so it costs a new connection per request, as it did for its users).
The targets are measured in interleaved rounds in the same run, so a load change on the machine
hits them alike; the report gives p50/p99/mean latency (ms) and requests/s per target.

Targets: ``old`` — the stdlib ThreadingHTTPServer exactly as in commit 62235e8 (frozen below,
on today's Scorer), original ``{"impressions": [...]}`` form; ``new`` — ``livectr serve`` with
the same form; ``new-items`` — ``livectr serve`` with ``{"user_id", "items", "context"}``.

``python bench/serve_speed.py --live [--rate 400] [--seconds 60] [--candidates 100]`` is the
issue's serving bench: a broker, a paced stream of examples, the real learner (``livectr learn``,
a snapshot every 5 s, deltas every 2 s) and ``livectr serve`` following its data dir and the
model-updates topic, each its own process; this process sends ``--rate`` requests/s open-loop
(each at its scheduled time, latency counted from then, so a stall is not hidden by the client
waiting) for ``--seconds`` and reports p50/p99/max, errors, and how far each response's
``model_version`` was behind the newest snapshot on disk when it arrived. Then shorter steps at
rising rates find the highest that holds p99 ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

# The synthetic example generator is a test helper (tests/toyworld.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toyworld import ToyWorld  # noqa: E402

from livectr.core.config import Config
from livectr.core.events import Impression
from livectr.learner import snapshot as snap
from livectr.learner.online import OnlineLearner
from livectr.learner.scorer import NoSnapshotError, Scorer

# ---- the old server, frozen as it was before the ASGI one replaced it --------------------------

MAX_REQUEST_BYTES = 8 * 1024 * 1024


class _OldRequest(msgspec.Struct, forbid_unknown_fields=True):
    impressions: list[Impression]


_old_decoder = msgspec.json.Decoder(_OldRequest)


class _OldHandler(BaseHTTPRequestHandler):
    scorer: Scorer

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"no route {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self._reply(400, {"error": "invalid Content-Length"})
            return
        if length <= 0 or length > MAX_REQUEST_BYTES:
            self._reply(400 if length <= 0 else 413, {"error": f"body must be 1..{MAX_REQUEST_BYTES} bytes"})
            return
        body = self.rfile.read(length)
        try:
            request = _old_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._reply(400, {"error": f"invalid request: {exc}"})
            return
        try:
            scores = self.scorer.score(request.impressions)
        except NoSnapshotError as exc:
            self._reply(503, {"error": str(exc)})
            return
        self._reply(200, {"scores": [float(s) for s in scores], "version": self.scorer.version})


def serve_old(data_dir: Path, port: int) -> None:
    cfg = Config()
    cfg.learner.device = "cpu"
    scorer = Scorer(data_dir, reload_ms=cfg.learner.scorer_reload_ms, cfg=cfg)
    handler = type("OldHandler", (_OldHandler,), {"scorer": scorer})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.serve_forever(poll_interval=0.5)


# ---- the client --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, path: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("POST" if path == "/score" else "GET", path, body=b'{"impressions": []}')
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not ready")


def drive(port: int, bodies: list[bytes], concurrency: int) -> tuple[list[float], float]:
    """Latencies (s) of posting every body, split over ``concurrency`` threads, and the wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for body in chunk:
            t0 = time.perf_counter()
            conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            mine.append(time.perf_counter() - t0)
            if resp.status != 200:
                errors.append(f"{resp.status} {data[:200]!r}")
            if resp.getheader("Connection", "").lower() == "close" or resp.version == 10:
                conn.close()
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(bodies[k::concurrency],)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return latencies, wall


def request_bodies(world: ToyWorld, n: int, candidates: int, form: str, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    users = len(world.user_latent)
    items = len(world.item_latent)
    out = []
    for r in range(n):
        user = f"u{rng.integers(users)}"
        cands = [f"i{k}" for k in rng.integers(0, items + items // 10, candidates)]  # ~10 % never seen
        context = {"device": ("ios", "android", "web")[r % 3], "hour": int(r % 24)}
        if form == "items":
            out.append(json.dumps({"user_id": user, "items": cands, "context": context}).encode())
        else:
            now = time.time()
            imps = [
                {"impression_id": f"b{r}-{k}", "ts": now, "user_id": user, "item_id": c, "context": context}
                for k, c in enumerate(cands)
            ]
            out.append(json.dumps({"impressions": imps}).encode())
    return out


# ---- the live bench: learner snapshotting and publishing deltas while the server is driven -------


def paced_examples(cfg: Config, world: ToyWorld, rate: float, stop: threading.Event) -> None:
    """Produce ``rate`` labelled examples/s (batches of 50, round-robin partitions) until ``stop``."""
    from livectr.core import bus
    from livectr.core.events import ExampleBatch, encode_example

    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    batch, k = 50, 0
    start = time.monotonic()
    while not stop.is_set():
        due = start + k * batch / rate
        delay = due - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        record = encode_example(ExampleBatch(world.examples(batch)))
        bus.produce(prod, cfg.topics.examples, record, partition=k % cfg.kafka.partitions, on_delivery=tracker.callback)
        prod.poll(0)
        k += 1
    prod.flush(5)


def paced_drive(port: int, bodies: list[bytes], rate: float, data_dir: Path, threads: int = 8) -> dict[str, Any]:
    """Send ``bodies`` open-loop at ``rate``/s over ``threads`` keep-alive connections."""
    from livectr.learner.snapshot import latest_version

    n = len(bodies)
    latencies = np.full(n, np.nan)
    behind = np.zeros(n, dtype=np.int64)
    versions = np.zeros(n, dtype=np.int64)
    errors: list[str] = []
    start = time.perf_counter() + 0.2

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(k, n, threads):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                conn.request("POST", "/score", body=bodies[i], headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            latencies[i] = time.perf_counter() - due
            if resp.status != 200:
                errors.append(f"{resp.status} {data[:200]!r}")
                continue
            version = int(json.loads(data)["model_version"])
            versions[i] = version
            behind[i] = (latest_version(data_dir) or version) - version
        conn.close()

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    ms = latencies[~np.isnan(latencies)] * 1000
    return {
        "rate": rate,
        "requests": n,
        "errors": len(errors),
        "error_example": errors[0] if errors else "",
        "p50_ms": round(float(np.percentile(ms, 50)), 3) if ms.size else float("nan"),
        "p99_ms": round(float(np.percentile(ms, 99)), 3) if ms.size else float("nan"),
        "max_ms": round(float(ms.max()), 3) if ms.size else float("nan"),
        "versions_seen": sorted({int(v) for v in versions if v}),
        "max_snapshots_behind": int(behind.max()) if n else 0,
        "responses_more_than_one_behind": int((behind > 1).sum()),
    }


def scrape(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("livectr_serve_") and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def score_buckets(port: int) -> dict[float, float]:
    """The server's own ``/score`` latency histogram: cumulative count per upper bound (seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("livectr_serve_request_seconds_bucket") and 'route="/score"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def server_side(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """Share of requests the server itself took over 10 ms, and its p99 as a bucket bound (ms)."""
    counts = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    if not total:
        return {"over_10ms": float("nan"), "p99_bucket_ms": float("nan")}
    p99 = next(b for b, c in counts.items() if c >= 0.99 * total)
    return {"over_10ms": 1 - counts.get(0.01, 0.0) / total, "p99_bucket_ms": p99 * 1000}


def live(args: argparse.Namespace) -> None:
    """The issue's serving bench (see the module docstring)."""
    from livectr.core import bus
    from livectr.core.broker import EmbeddedBroker

    tmp = Path(tempfile.mkdtemp(prefix="livectr-serve-live-"))
    with EmbeddedBroker(log_path=tmp / "tansu.log") as broker:
        cfg = Config()
        cfg.kafka.bootstrap_servers = broker.bootstrap_servers
        cfg.kafka.topic_prefix = "live."
        cfg.learner.device = "cpu"
        cfg.data_dir = tmp / "data"
        bus.ensure_topics(cfg)
        world = ToyWorld(users=5000, items=2000, sem_dim=cfg.semantic.reduced_dim, seed=1)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "LIVECTR_LEARNER__DEVICE": "cpu",
            "LIVECTR_KAFKA__TOPIC_PREFIX": cfg.kafka.topic_prefix,
            "LIVECTR_LEARNER__SNAPSHOT_EVERY_S": "5",
            "LIVECTR_LEARNER__DELTA_EVERY_S": "2",
        }
        common = ["--bootstrap-servers", broker.bootstrap_servers, "--data-dir", str(cfg.data_dir)]
        stop = threading.Event()
        feeder = threading.Thread(target=paced_examples, args=(cfg, world, args.examples_per_s, stop), daemon=True)
        feeder.start()
        port = free_port()
        nice = ["--nice", str(args.learner_nice)] if args.learner_nice else []
        learner = subprocess.Popen(
            [sys.executable, "-m", "livectr", "learn", "--forever", *common, *nice],
            env=env,
            stderr=(tmp / "learn.log").open("w"),
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "livectr", "serve", *common, "--port", str(port)],
            env=env,
            stderr=(tmp / "serve.log").open("w"),
        )
        results: list[dict[str, Any]] = []
        try:
            wait_ready(port, "/readyz", timeout_s=120)
            drive(port, request_bodies(world, 200, args.candidates, "items", seed=99), 4)  # warm-up
            before, hist_before = scrape(port), score_buckets(port)
            bodies = request_bodies(world, int(args.rate * args.seconds), args.candidates, "items", seed=1)
            main_run = paced_drive(port, bodies, args.rate, cfg.data_dir)
            after = scrape(port)
            main_run["server_side"] = server_side(hist_before, score_buckets(port))
            main_run["snapshots_loaded"] = int(
                after.get("livectr_serve_snapshot_loads_total", 0) - before.get("livectr_serve_snapshot_loads_total", 0)
            )
            main_run["deltas_applied"] = int(
                after.get("livectr_serve_deltas_applied_total", 0) - before.get("livectr_serve_deltas_applied_total", 0)
            )
            results.append(main_run)
            # Baseline in the same run: the same rate with the learner stopped (no snapshots, no
            # deltas), so what the machine's other load costs is told apart from live updates.
            learner.send_signal(signal.SIGSTOP)
            try:
                bodies = request_bodies(world, int(args.rate * args.baseline_seconds), args.candidates, "items", seed=2)
                hist_before = score_buckets(port)
                baseline = paced_drive(port, bodies, args.rate, cfg.data_dir)
                baseline["server_side"] = server_side(hist_before, score_buckets(port))
            finally:
                learner.send_signal(signal.SIGCONT)
            for rate in (float(r) for r in args.step_rates.split(",")):
                bodies = request_bodies(world, int(rate * args.step_seconds), args.candidates, "items", seed=int(rate))
                results.append(paced_drive(port, bodies, rate, cfg.data_dir))
        finally:
            stop.set()
            for p in (server, learner):
                p.terminate()
            for p in (server, learner):
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
    head = results[0]
    print(
        f"live: {args.rate:g} requests/s of {args.candidates} candidates for {args.seconds:g} s; learner on "
        f"{args.examples_per_s:g} examples/s (niceness {args.learner_nice}), a snapshot every 5 s, deltas every 2 s; "
        f"{os.cpu_count()} cores"
    )
    print(
        f"p50 {head['p50_ms']} ms  p99 {head['p99_ms']} ms  max {head['max_ms']} ms  errors {head['errors']}  "
        f"snapshots loaded {head['snapshots_loaded']}  deltas applied {head['deltas_applied']}  "
        f"max snapshots behind {head['max_snapshots_behind']} ({head['responses_more_than_one_behind']} responses > 1)"
    )
    print(
        f"baseline, learner stopped ({args.baseline_seconds:g} s at {args.rate:g}/s): p50 {baseline['p50_ms']} ms  "
        f"p99 {baseline['p99_ms']} ms  max {baseline['max_ms']} ms  errors {baseline['errors']}; "
        f"p99 ratio live/baseline {head['p99_ms'] / baseline['p99_ms']:.2f}"
    )
    for name, r in (("live", head), ("baseline", baseline)):
        side = r["server_side"]
        print(
            f"{name}: in the server (its /score histogram) {side['over_10ms']:.2%} of requests over 10 ms, "
            f"p99 ≤ {side['p99_bucket_ms']:g} ms"
        )
    print(
        f"target p99 ≤ 10 ms: {'met' if head['p99_ms'] <= 10 else 'MISSED'}; zero errors: {'met' if not head['errors'] else 'MISSED'}"
    )
    print(f"{'rate/s':>8}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
    for r in results:
        print(f"{r['rate']:>8g}{r['requests']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['max_ms']:>9}{r['errors']:>8}")
    held = [r["rate"] for r in results if r["p99_ms"] <= 10 and not r["errors"]]
    print(f"highest rate holding p99 ≤ 10 ms: {max(held) if held else 'none'} requests/s")
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": results, "baseline": baseline}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="the serving bench under a live learner (see above)")
    parser.add_argument("--rate", type=float, default=400.0, help="--live: requests/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="--live: seconds at --rate")
    parser.add_argument("--step-rates", default="100,200,300,600", help="--live: rates tried after")
    parser.add_argument("--baseline-seconds", type=float, default=30.0, help="--live: seconds with the learner stopped")
    parser.add_argument("--step-seconds", type=float, default=15.0, help="--live: seconds per step rate")
    parser.add_argument(
        "--learner-nice", type=int, default=0, help="--live: the learner's --nice (0: default priority)"
    )
    parser.add_argument("--examples-per-s", type=float, default=1000.0, help="--live: examples/s for the learner")
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per target and concurrency")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--concurrency", default="1,4", help="client threads, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds the requests are split into")
    parser.add_argument("--examples", type=int, default=50_000, help="training examples behind the snapshot")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--serve-old", type=Path, default=None, help=argparse.SUPPRESS)  # internal: data dir
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_old is not None:
        serve_old(args.serve_old, args.port)
        return
    if args.live:
        live(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="livectr-serve-bench-"))
    cfg = Config()
    cfg.learner.device = "cpu"
    cfg.data_dir = tmp / "data"
    world = ToyWorld(users=5000, items=2000, sem_dim=cfg.semantic.reduced_dim, seed=1)
    learner = OnlineLearner(cfg)
    data = world.examples(args.examples)
    for k in range(0, len(data), cfg.learner.batch_size):
        learner.learn_batch(data[k : k + cfg.learner.batch_size])
    snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": learner.examples_seen})

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIVECTR_LEARNER__DEVICE": "cpu"}
    ports = {"old": free_port(), "new": free_port()}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve-old", str(cfg.data_dir), "--port", str(ports["old"])], env=env
        ),
        subprocess.Popen(
            [sys.executable, "-m", "livectr", "serve", "--data-dir", str(cfg.data_dir), "--port", str(ports["new"])],
            env=env,
            stderr=subprocess.DEVNULL,
        ),
    ]
    targets = {"old": (ports["old"], "impressions"), "new": (ports["new"], "impressions")}
    targets["new-items"] = (ports["new"], "items")
    results: dict[str, dict[str, Any]] = {}
    try:
        wait_ready(ports["old"], "/score")
        wait_ready(ports["new"], "/readyz")
        per_round = max(1, args.requests // args.rounds)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            lat: dict[str, list[float]] = {t: [] for t in targets}
            wall: dict[str, float] = dict.fromkeys(targets, 0.0)
            for port, form in targets.values():  # warm-up
                drive(port, request_bodies(world, 100, args.candidates, form, seed=99), concurrency)
            for rnd in range(args.rounds):
                for name, (port, form) in targets.items():
                    bodies = request_bodies(world, per_round, args.candidates, form, seed=rnd)
                    got, seconds = drive(port, bodies, concurrency)
                    lat[name].extend(got)
                    wall[name] += seconds
            for name in targets:
                ms = np.array(lat[name]) * 1000
                results[f"{name} c={concurrency}"] = {
                    "requests": len(ms),
                    "p50_ms": round(float(np.percentile(ms, 50)), 3),
                    "p99_ms": round(float(np.percentile(ms, 99)), 3),
                    "mean_ms": round(float(ms.mean()), 3),
                    "req_per_s": round(len(ms) / wall[name], 1),
                }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    print(f"{args.candidates} candidates per request, {os.cpu_count()} cores")
    print(f"{'target':<20}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'req/s':>9}")
    for name, r in results.items():
        print(f"{name:<20}{r['requests']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['mean_ms']:>9}{r['req_per_s']:>9}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
