"""Serving: score impressions with the latest snapshot, hot-reloading when a new one is published.

Why polling a pointer: the learner publishes by atomically swapping ``snapshots/latest``, so
the scorer only needs to compare that pointer with the version it holds (a ``readlink`` — a
few microseconds) at most every ``reload_ms``; a new model is loaded outside the scoring lock
and swapped in with one assignment, so requests never wait for a load and never see a mix.
The scorer never calls the teacher: the semantic branch runs on the student's distilled
vectors, and ids the learner never saw use the shared unknown row (the impression-weighted
mean embedding).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from livectr.core.config import Config
from livectr.core.events import Impression
from livectr.learner.predictor import Predictor
from livectr.learner.snapshot import SnapshotError, latest_version, load_latest, load_newest_good, version_name

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 1024 * 1024


class NoSnapshotError(RuntimeError):
    """No snapshot has been published yet under the data directory."""


class _Loaded:
    """One loaded snapshot: immutable once built, swapped as a whole."""

    def __init__(self, manifest: dict[str, Any], predictor: Predictor) -> None:
        self.manifest = manifest
        self.predictor = predictor
        self.version = int(manifest["version"])
        self.lock = threading.Lock()


class Scorer:
    """Scores ``list[Impression]`` with the newest published model."""

    def __init__(self, data_dir: Path | str, reload_ms: int = 500, cfg: Config | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.reload_s = reload_ms / 1000.0
        if cfg is None:
            cfg = Config()
            cfg.learner.device = "cpu"
        self.cfg = cfg
        self._current: _Loaded | None = None
        self._checked = 0.0
        self._reload_lock = threading.Lock()
        self.reloads = 0
        #: The latest version last refused as corrupt (not retried until ``latest`` moves on).
        self.refused_version: int | None = None
        self.maybe_reload(force=True)

    @property
    def version(self) -> int | None:
        return self._current.version if self._current else None

    @property
    def examples_seen(self) -> int | None:
        return int(self._current.manifest.get("examples_seen", 0)) if self._current else None

    def maybe_reload(self, force: bool = False) -> bool:
        """Load the snapshot ``latest`` points to if it changed; True when a new model was loaded.

        A corrupt snapshot (:class:`SnapshotError`) is refused: the current model keeps serving,
        or, before the first one, the newest snapshot that verifies is loaded instead.
        """
        now = time.monotonic()
        if not force and now - self._checked < self.reload_s:
            return False
        if not self._reload_lock.acquire(blocking=False):
            return False  # another thread is already loading
        try:
            self._checked = now
            pointed = latest_version(self.data_dir)
            if pointed is None or pointed == self.refused_version:
                return False
            if self._current is not None and pointed == self._current.version:
                return False
            refused: list[SnapshotError] = []
            if self._current is None:
                loaded, refused = load_newest_good(self.data_dir, with_optimizer=False)
            else:
                try:
                    loaded = load_latest(self.data_dir, with_optimizer=False)
                except SnapshotError as exc:
                    loaded, refused = None, [exc]
            for bad in refused:
                if bad.path.name == version_name(pointed):
                    self.refused_version = pointed
                keeping = f"keeping v{self.version:08d}" if self.version is not None else "trying an older one"
                log.error("%s; %s", bad, keeping)
            if loaded is None:
                return False
            manifest, state = loaded
            self._current = _Loaded(manifest, Predictor.for_serving(self.cfg, state))
            self.reloads += 1
            log.info("scorer loaded snapshot v%08d", self._current.version)
            return True
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("snapshot reload failed, keeping v%s: %s", self.version, exc)
            return False
        finally:
            self._reload_lock.release()

    def score(self, impressions: Sequence[Impression]) -> np.ndarray:
        """Click probabilities for ``impressions``; raises :class:`NoSnapshotError` before the first snapshot."""
        self.maybe_reload()
        current = self._current
        if current is None:
            raise NoSnapshotError(f"no snapshot under {self.data_dir / 'snapshots'} yet")
        with current.lock:
            return current.predictor.predict_batch(list(impressions))


class ScoreRequest(msgspec.Struct, forbid_unknown_fields=True):
    impressions: list[Impression]


_request_decoder = msgspec.json.Decoder(ScoreRequest)


class _Handler(BaseHTTPRequestHandler):
    scorer: Scorer  # set on the subclass made by make_server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/healthz":
            self.scorer.maybe_reload()
            self._reply(200, {"version": self.scorer.version, "examples_seen": self.scorer.examples_seen})
        else:
            self._reply(404, {"error": f"no route {self.path}"})

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
            request = _request_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._reply(400, {"error": f"invalid request: {exc}"})
            return
        try:
            scores = self.scorer.score(request.impressions)
        except NoSnapshotError as exc:
            self._reply(503, {"error": str(exc)})
            return
        self._reply(200, {"scores": [float(s) for s in scores], "version": self.scorer.version})


def make_server(scorer: Scorer, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server bound to ``host:port`` (0 = any free port) serving ``scorer``."""
    handler = type("ScorerHandler", (_Handler,), {"scorer": scorer})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(cfg: Config, host: str, port: int) -> None:
    """Serve ``POST /score`` and ``GET /healthz`` until interrupted."""
    scorer = Scorer(cfg.data_dir, reload_ms=cfg.learner.scorer_reload_ms, cfg=cfg)
    server = make_server(scorer, host, port)
    log.info("scoring on http://%s:%d (snapshot v%s)", host, server.server_address[1], scorer.version)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
