"""Scoring: score impressions with the latest snapshot, hot-reloading when a new one is published.

Why polling a pointer: the learner publishes by atomically swapping ``snapshots/latest``, so
the scorer only needs to compare that pointer with the version it holds (a ``readlink`` — a
few microseconds) at most every ``reload_ms``. A new model is loaded aside and swapped in with
one assignment, so a request never sees a mix: it takes the reference once, scores with it and
reports that model's version. The HTTP server (:mod:`livectr.learner.serve`) runs the polling
in a background thread (:meth:`Scorer.start_watcher`), so requests never wait for a load;
without a watcher (``livectr score``) a request checks the pointer itself. A snapshot that
cannot be loaded is logged and counted, and the previous model keeps serving.
The scorer never calls the teacher: the semantic branch runs on the student's distilled
vectors, and ids the learner never saw use the shared unknown row (the impression-weighted
mean embedding).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from livectr.core.config import Config
from livectr.core.events import Impression
from livectr.learner.predictor import Predictor
from livectr.learner.snapshot import SnapshotError, latest_version, load_newest_good, load_version, version_name

log = logging.getLogger(__name__)

#: A version that failed to load is tried again after this long (a snapshot directory is
#: immutable once published, so retrying it every poll would only repeat the failure).
RETRY_FAILED_S = 30.0


class NoSnapshotError(RuntimeError):
    """No snapshot has been published yet under the data directory."""


class Loaded:
    """One loaded snapshot: immutable once built, swapped as a whole."""

    def __init__(self, manifest: dict[str, Any], predictor: Predictor) -> None:
        self.manifest = manifest
        self.predictor = predictor
        self.version = int(manifest["version"])
        #: Wall-clock time the learner published it (seconds since the epoch).
        self.created_at = float(manifest.get("created_at", 0.0))
        self.lock = threading.Lock()

    def score(self, impressions: Sequence[Impression]) -> np.ndarray:
        with self.lock:
            return self.predictor.predict_batch(list(impressions))


class Scorer:
    """Scores ``list[Impression]`` with the newest published model."""

    def __init__(
        self, data_dir: Path | str, reload_ms: int = 500, cfg: Config | None = None, load_now: bool = True
    ) -> None:
        self.data_dir = Path(data_dir)
        self.reload_s = reload_ms / 1000.0
        if cfg is None:
            cfg = Config()
            cfg.learner.device = "cpu"
        self.cfg = cfg
        self._current: Loaded | None = None
        self._checked = 0.0
        self._reload_lock = threading.Lock()
        self._failed: tuple[int, float] | None = None  # (version, monotonic time) of the last failed load
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.reloads = 0
        self.load_failures = 0
        #: The latest version last refused as corrupt (not retried until ``latest`` moves on).
        self.refused_version: int | None = None
        if load_now:
            self.maybe_reload(force=True)

    @property
    def current(self) -> Loaded | None:
        """The model serving now (take it once per request: it may be swapped at any time)."""
        return self._current

    @property
    def version(self) -> int | None:
        current = self._current
        return current.version if current else None

    @property
    def examples_seen(self) -> int | None:
        current = self._current
        return int(current.manifest.get("examples_seen", 0)) if current else None

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
        pointed: int | None = None
        try:
            self._checked = now
            pointed = latest_version(self.data_dir)
            if pointed is None or pointed == self.refused_version:
                return False
            if self._current is not None and pointed == self._current.version:
                return False
            if self._failed is not None and self._failed[0] == pointed and now - self._failed[1] < RETRY_FAILED_S:
                return False
            refused: list[SnapshotError] = []
            if self._current is None:  # nothing served yet: the newest snapshot that verifies
                found, refused = load_newest_good(self.data_dir, with_optimizer=False)
            else:
                try:
                    found = load_version(self.data_dir, pointed, with_optimizer=False)
                except SnapshotError as exc:
                    found, refused = None, [exc]
            for bad in refused:
                if bad.path.name == version_name(pointed):
                    self.refused_version = pointed
                self.load_failures += 1
                keeping = f"keeping v{self.version:08d}" if self.version is not None else "trying an older one"
                log.error("%s; %s", bad, keeping)
            if found is None:
                return False
            manifest, state = found
            loaded = Loaded(manifest, Predictor.for_serving(self.cfg, state))
            self._current = loaded  # the swap: one reference assignment
            self._failed = None
            self.reloads += 1
            log.info("scorer loaded snapshot v%08d", loaded.version)
            return True
        except Exception as exc:  # a corrupt snapshot must never take the serving model down
            if pointed is not None and latest_version(self.data_dir) != pointed:
                return False  # pruned or superseded while loading: the next poll takes the new one
            self.load_failures += 1
            self._failed = (pointed, now) if pointed is not None else None
            log.warning("snapshot v%s failed to load, keeping v%s: %r", pointed, self.version, exc)
            return False
        finally:
            self._reload_lock.release()

    def start_watcher(self) -> None:
        """Poll the ``latest`` pointer every ``reload_ms`` in a background thread (idempotent)."""
        if self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="livectr-snapshot-watcher", daemon=True)
        self._watcher.start()

    def stop_watcher(self) -> None:
        if self._watcher is None:
            return
        self._stop.set()
        self._watcher.join(timeout=30)
        self._watcher = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.maybe_reload(force=True)
            self._stop.wait(max(0.01, self.reload_s))

    def score_versioned(self, impressions: Sequence[Impression]) -> tuple[np.ndarray, int]:
        """Click probabilities and the version of the model that computed them.

        Raises :class:`NoSnapshotError` before the first snapshot.
        """
        if self._watcher is None:
            self.maybe_reload()
        current = self._current  # one reference for the whole request
        if current is None:
            raise NoSnapshotError(f"no snapshot under {self.data_dir / 'snapshots'} yet")
        return current.score(impressions), current.version

    def score(self, impressions: Sequence[Impression]) -> np.ndarray:
        """Click probabilities for ``impressions``; raises :class:`NoSnapshotError` before the first snapshot."""
        return self.score_versioned(impressions)[0]
