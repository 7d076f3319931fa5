"""The HTTP scorer (``livectr serve``): Starlette on uvicorn, hot-swapping the latest snapshot.

Why this stack: scoring is a short CPU burst (torch releases the GIL) between JSON decoding and
encoding, so what the server adds per request is what matters. uvicorn (with httptools and
uvloop when installed) parses HTTP/1.1 with keep-alive in C, where the stdlib
``ThreadingHTTPServer`` it replaces spoke HTTP/1.0, spawned a thread per connection and
reconnected on every request; Starlette is a thin routing layer without a validation framework
of its own, so request bodies are still decoded and validated by msgspec at C speed with the
event types every other stage uses (``bench/serve_speed.py`` measures the old and new servers).
A request of up to ``serve.inline_candidates`` candidates is scored on the event loop itself
(half a millisecond for 100): handing it to a worker thread cost more than the scoring, and
concurrent requests in worker threads queued on the model's lock, each hand-off waiting for the
GIL (``docs/design.md``, "Serving under a live learner"). Larger batches run in a worker thread,
so ``/healthz``, ``/readyz`` and ``/metrics`` answer while they score.

Routes:

* ``POST /score`` — ``{"user_id": …, "items": [...], "context": {...}}`` → ``{"model_version": N,
  "scores": [...]}`` (one click probability per item, in order), or the original
  ``{"impressions": [{impression fields}]}`` → the same plus ``"version": N``. 413 for a body over
  ``serve.max_body_bytes`` or more than ``serve.max_candidates`` candidates, 422 with msgspec's
  reason for a malformed body, 503 before the first snapshot, 500 ``{"error": …}`` otherwise.
* ``GET /healthz`` — the process is up (always 200); ``GET /readyz`` — 503 until a model is loaded.
* ``GET /metrics`` — Prometheus text format.

Recorded latency: with ``metrics.record`` (the default) the server appends a sample every
``metrics.interval_s`` to ``DATA_DIR/metrics/serve-PORT.jsonl`` — ``/score`` latency p50/p99/max
over the interval (successful requests), requests and errors, the serving version and deltas
applied — which ``livectr report`` plots next to the run's stages. Percentiles of each interval,
not Prometheus buckets: the report shows latency *over time*, and a bucketed p99 could not
tell 3 ms from 5 ms.

``model_version`` is the version of the model that computed the scores: a request takes the
model reference once and scores with it, while a background thread (:meth:`Scorer.start_watcher`)
loads new snapshots and swaps that reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import msgspec
import numpy as np
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from livectr.core.config import Config, ServeConfig
from livectr.core.events import ContextValue, Impression, one_line, time_problem
from livectr.core.metrics_log import StageRecorder, samples_path
from livectr.learner.scorer import FRESHNESS_BUCKETS, NoSnapshotError, Scorer
from livectr.learner.updates import UpdateFollower

log = logging.getLogger(__name__)

#: Request latency buckets (seconds): scoring 100 candidates takes about a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class ScoreRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Either ``user_id`` + ``items`` (+ ``context``) or the original ``impressions`` list."""

    user_id: str | None = None
    items: list[str] | None = None
    context: dict[str, ContextValue] = {}
    impressions: list[Impression] | None = None


_request_decoder = msgspec.json.Decoder(ScoreRequest)
_encoder = msgspec.json.Encoder()


class Rejected(Exception):
    """A request refused with an HTTP status and a reason (sent as ``{"error": reason}``)."""

    def __init__(self, status: int, reason: str) -> None:
        reason = one_line(reason)  # msgspec quotes the offending key or value, which may be anything
        super().__init__(reason)
        self.status = status
        self.reason = reason


def json_response(status: int, body: dict[str, Any]) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


class _ScorerCollector:
    """Model gauges and snapshot-load counters, read from the scorer at scrape time."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer

    def collect(self) -> Iterable[Metric]:
        current = self.scorer.current
        yield GaugeMetricFamily(
            "livectr_serve_model_version",
            "Version of the snapshot serving now (0: none loaded)",
            value=current.version if current else 0,
        )
        yield GaugeMetricFamily(
            "livectr_serve_snapshot_age_seconds",
            "Seconds since the serving snapshot was published (NaN: none)",
            value=time.time() - current.created_at if current else float("nan"),
        )
        yield CounterMetricFamily(
            "livectr_serve_snapshot_loads", "Snapshots loaded and swapped in", value=self.scorer.reloads
        )
        yield CounterMetricFamily(
            "livectr_serve_snapshot_load_failures",
            "Snapshots that failed to load (the previous model kept serving)",
            value=self.scorer.load_failures,
        )
        yield CounterMetricFamily(
            "livectr_serve_deltas_applied",
            "Deltas (rows touched since the last publish) applied",
            value=self.scorer.deltas_applied,
        )
        yield CounterMetricFamily(
            "livectr_serve_deltas_skipped",
            "Deltas skipped: already contained, or after a gap in their chain (waiting for a full snapshot)",
            value=self.scorer.deltas_skipped,
        )
        yield CounterMetricFamily(
            "livectr_serve_update_refusals",
            "Model updates from Kafka refused as corrupt or unusable (the model serving kept serving)",
            value=self.scorer.update_refusals,
        )
        yield CounterMetricFamily(
            "livectr_serve_rollbacks",
            "Full snapshots from Kafka with the rollback marker installed over a model already serving",
            value=self.scorer.rollbacks,
        )
        yield GaugeMetricFamily(
            "livectr_serve_delta_seq",
            "Position of the serving model in its delta chain (0: none applied since its full snapshot)",
            value=current.chain[1] if current else 0,
        )
        yield GaugeMetricFamily(
            "livectr_serve_delta_age_seconds",
            "Seconds since the last delta was applied (NaN: none)",
            value=time.time() - current.delta_at if current and current.delta_at else float("nan"),
        )
        fresh = self.scorer.freshness
        yield HistogramMetricFamily(
            "livectr_serve_freshness_seconds",
            "Event → served: from an example's decision to the scorer applying the delta that trained it",
            buckets=[(str(b), c) for b, c in zip(FRESHNESS_BUCKETS, fresh.buckets, strict=True)]
            + [("+Inf", fresh.count)],
            sum_value=fresh.sum,
        )


#: Latencies kept per recording interval at most (a uniform thinning beyond: every other one).
LATENCY_WINDOW_MAX = 100_000


class LatencyWindow:
    """``/score`` latencies since the last :meth:`drain`, for the recorded p50/p99 over time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: list[float] = []
        self.served = 0
        self.errors = 0

    def add(self, seconds: float, ok: bool) -> None:
        with self._lock:
            if not ok:
                self.errors += 1
                return
            self.served += 1
            self._values.append(seconds)
            if len(self._values) >= LATENCY_WINDOW_MAX:
                self._values = self._values[::2]

    def drain(self) -> dict[str, float]:
        """Counters so far and the interval's latency percentiles (ms; absent without requests)."""
        with self._lock:
            values, self._values = self._values, []
            out: dict[str, float] = {"requests_served": self.served, "request_errors": self.errors}
        if values:
            ms = np.asarray(values) * 1000.0
            p50, p99 = np.percentile(ms, [50, 99])
            out.update(latency_p50_ms=float(p50), latency_p99_ms=float(p99), latency_max_ms=float(ms.max()))
            out["interval_requests"] = len(values)
        return out


def serve_status(scorer: Scorer, window: LatencyWindow) -> dict[str, Any]:
    """One recorded sample of the scorer: the latency window drained, plus the model it serves."""
    current = scorer.current
    status: dict[str, Any] = window.drain()
    status.update(deltas_applied=scorer.deltas_applied, snapshot_loads=scorer.reloads)
    if current is not None:
        status["snapshot_version"] = current.version
    return status


async def record_every(recorder: StageRecorder, scorer: Scorer, window: LatencyWindow, interval_s: float) -> None:
    """Hand the recorder a sample every ``interval_s`` until cancelled (then one last one)."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            recorder(serve_status(scorer, window))
    finally:
        recorder(serve_status(scorer, window))
        recorder.close()


class ServeMetrics:
    """The server's Prometheus registry (one per app, so several apps can live in one process)."""

    def __init__(self, scorer: Scorer) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "livectr_serve_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "livectr_serve_requests", "Requests by route and status", ["route", "status"], registry=self.registry
        )
        self.registry.register(_ScorerCollector(scorer))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.latency.labels(route).observe(seconds)
        self.requests.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Rejected(400, "invalid Content-Length") from None
        if size > limit:
            raise Rejected(413, f"body of {size} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise Rejected(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def to_impressions(req: ScoreRequest, max_candidates: int, request_no: int) -> tuple[list[Impression], bool]:
    """The impressions a request asks to score, and whether it used the original form."""
    if req.impressions is not None:
        if req.user_id is not None or req.items is not None:
            raise Rejected(422, "invalid request: give either `impressions` or `user_id` and `items`, not both")
        if len(req.impressions) > max_candidates:
            raise Rejected(413, f"{len(req.impressions)} impressions exceed the limit of {max_candidates}")
        for i, imp in enumerate(req.impressions):
            problem = time_problem(imp.ts)
            if problem is not None:
                raise Rejected(422, f"invalid request: {problem} - at `$.impressions[{i}].ts`")
        return req.impressions, True
    if req.user_id is None:
        raise Rejected(422, "invalid request: Object missing required field `user_id`")
    if req.items is None:
        raise Rejected(422, "invalid request: Object missing required field `items`")
    if len(req.items) > max_candidates:
        raise Rejected(413, f"{len(req.items)} items exceed the limit of {max_candidates}")
    now = time.time()
    user, context = req.user_id, req.context
    return [
        Impression(impression_id=f"serve-{request_no}-{i}", ts=now, user_id=user, item_id=item, context=context)
        for i, item in enumerate(req.items)
    ], False


def decode_score_request(body: bytes, cfg: ServeConfig, request_no: int) -> tuple[list[Impression], bool]:
    """The impressions a ``POST /score`` body asks to score, and whether it used the original form.

    Raises :class:`Rejected` (422 with msgspec's reason for a malformed body, 413 for too many
    candidates) for any body that is not a valid request; never another exception.
    """
    try:
        req = _request_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise Rejected(422, f"invalid request: {exc}") from None
    return to_impressions(req, cfg.max_candidates, request_no)


def make_app(
    scorer: Scorer,
    cfg: ServeConfig | None = None,
    watch: bool = True,
    recorder: StageRecorder | None = None,
    record_interval_s: float = 1.0,
) -> Starlette:
    """The ASGI app serving ``scorer``; with ``watch`` its lifespan runs the snapshot watcher, with
    ``recorder`` it records a latency sample every ``record_interval_s`` (see the module docstring)."""
    cfg = cfg or ServeConfig()
    metrics = ServeMetrics(scorer)
    window = LatencyWindow()
    requests_seen = itertools.count()

    def endpoint(route: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except Rejected as exc:
                response = json_response(exc.status, {"error": exc.reason})
            except Exception as exc:  # a JSON 500, never a dropped connection
                log.exception("%s failed", route)
                response = json_response(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
            took = time.perf_counter() - start
            metrics.observe(route, response.status_code, took)
            if route == "/score":
                window.add(took, response.status_code == 200)
            return response

        return wrapped

    async def score(request: Request) -> Response:
        body = await read_body(request, cfg.max_body_bytes)
        impressions, original_form = decode_score_request(body, cfg, next(requests_seen))
        try:
            if len(impressions) <= cfg.inline_candidates:
                scores, version = scorer.score_versioned(impressions)
            else:
                scores, version = await run_in_threadpool(scorer.score_versioned, impressions)
        except NoSnapshotError as exc:
            raise Rejected(503, str(exc)) from None
        reply: dict[str, Any] = {"model_version": version, "scores": scores.tolist()}
        if original_form:
            reply["version"] = version
        return json_response(200, reply)

    async def healthz(request: Request) -> Response:
        return json_response(200, {"version": scorer.version, "examples_seen": scorer.examples_seen})

    async def readyz(request: Request) -> Response:
        current = scorer.current
        if current is None:
            return json_response(503, {"ready": False, "error": "no model loaded yet"})
        return json_response(200, {"ready": True, "model_version": current.version})

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        reason = f"no route {request.method} {request.url.path}" if status in (404, 405) else str(exc)
        metrics.observe("other", status, 0.0)
        return json_response(status, {"error": reason})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if watch:
            scorer.start_watcher()
        task = None
        if recorder is not None:
            task = asyncio.create_task(record_every(recorder, scorer, window, record_interval_s))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if watch:
                scorer.stop_watcher()

    routes = [
        Route("/score", endpoint("/score", score), methods=["POST"]),
        Route("/healthz", endpoint("/healthz", healthz), methods=["GET"]),
        Route("/readyz", endpoint("/readyz", readyz), methods=["GET"]),
        Route("/metrics", endpoint("/metrics", metrics_route), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.scorer = scorer
    app.state.metrics = metrics
    app.state.latency_window = window
    return app


def make_scorer(cfg: Config) -> Scorer:
    """The scorer ``livectr serve`` runs: it follows ``data_dir/snapshots`` and, with a broker
    (``--bootstrap-servers``), the model-updates topic too (full snapshots and deltas), so it
    needs no shared disk. Nothing loads until the app starts."""
    scorer = Scorer(cfg.data_dir, reload_ms=cfg.learner.scorer_reload_ms, cfg=cfg, load_now=False)
    if cfg.kafka.bootstrap_servers:
        scorer.attach(UpdateFollower(cfg, scorer))
    return scorer


def serve(cfg: Config, host: str, port: int) -> None:
    """Serve the scorer on ``host:port`` until interrupted; the first snapshot loads in the background."""
    # Background threads (the Kafka follower applying a delta, the snapshot watcher) hand the GIL
    # back to the request loop after this long instead of CPython's 5 ms.
    sys.setswitchinterval(cfg.serve.switch_interval_s)
    scorer = make_scorer(cfg)
    stage = f"serve-{port}"
    recorder = StageRecorder(stage, cfg.metrics, samples_path(cfg.data_dir, stage)) if cfg.metrics.record else None
    app = make_app(scorer, cfg.serve, recorder=recorder, record_interval_s=cfg.metrics.interval_s)
    source = f" and {cfg.topics.model_updates} on {cfg.kafka.bootstrap_servers}" if cfg.kafka.bootstrap_servers else ""
    log.info("scoring on http://%s:%d (snapshots under %s%s)", host, port, cfg.data_dir / "snapshots", source)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)
