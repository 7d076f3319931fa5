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
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
