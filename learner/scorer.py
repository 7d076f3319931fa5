"""Scoring: score impressions with the latest snapshot, hot-reloading when a new one is published.

Why polling a pointer: the learner publishes by atomically swapping ``snapshots/latest``, so
the scorer only needs to compare that pointer with the version it holds (a ``readlink`` — a
few microseconds) at most every ``reload_ms``. A new model is loaded aside and swapped in with
one assignment, so a request never sees a mix: it takes the reference once, scores with it and
reports that model's version. The HTTP server (:mod:`livectr.learner.serve`) runs the polling
in a background thread (:meth:`Scorer.start_watcher`), so requests never wait for a load;
without a watcher (``livectr score``) a request checks the pointer itself. A snapshot that
cannot be loaded is logged and counted, and the previous model keeps serving.

Scorers can also follow the model over Kafka (:mod:`livectr.learner.updates`): full snapshots
are installed with the same one-reference swap, and deltas (:mod:`livectr.learner.deltas`) are
written into the serving model in place, under the lock requests score under (about a
millisecond), so a request sees the model before or after a delta, never half of one. The
version a response names stays the full snapshot's; the delta sequence is in ``/metrics``.
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
from pathlib import Path
from typing import Any

import numpy as np

from livectr.core.config import Config
from livectr.core.events import Impression
from livectr.learner.deltas import Delta
from livectr.learner.deltas import apply_delta as apply_delta_to
from livectr.learner.predictor import Predictor
from livectr.learner.snapshot import (
    MANIFEST,
    SnapshotError,
    latest_version,
    load_newest_good,
    load_version,
    snapshots_dir,
    version_name,
)

log = logging.getLogger(__name__)

#: A version that failed to load is tried again after this long (a snapshot directory is
#: immutable once published, so retrying it every poll would only repeat the failure).
RETRY_FAILED_S = 30.0


class NoSnapshotError(RuntimeError):
    """No snapshot has been published yet under the data directory."""


#: Deltas applied this recently count as live (see :meth:`Scorer._deltas_cover`).
DELTAS_LIVE_S = 10.0
#: Upper bounds (seconds) of the event → served freshness histogram.
FRESHNESS_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Recent event → served values kept for benches (a ring).
FRESHNESS_KEPT = 200_000


class Loaded:
    """One loaded snapshot, swapped as a whole; deltas update it in place under :attr:`lock`."""

    def __init__(self, manifest: dict[str, Any], predictor: Predictor, chain: tuple[int, int] | None = None) -> None:
        self.manifest = manifest
        self.predictor = predictor
        self.version = int(manifest["version"])
        #: Wall-clock time the learner published it (seconds since the epoch).
        self.created_at = float(manifest.get("created_at", 0.0))
        self.lock = threading.Lock()
        #: Position in the learner's delta chain (base version, seq) this model contains: a disk
        #: snapshot records it in its manifest; a full snapshot from Kafka starts one (V, 0).
        recorded = manifest.get("delta_chain")
        self.chain: tuple[int, int] = chain or ((int(recorded[0]), int(recorded[1])) if recorded else (self.version, 0))
        self.deltas_applied = 0
        #: Wall-clock time of the last delta applied (0: none).
        self.delta_at = 0.0

    def score(self, impressions: Sequence[Impression]) -> tuple[np.ndarray, int]:
        """Scores and the version that computed them (read under the lock a delta takes)."""
        with self.lock:
            return self.predictor.predict_batch(list(impressions)), self.version

    def follows(self, base: int, seq: int) -> bool:
        """Whether delta ``(base, seq)`` is the next one for this model."""
        return (base, seq) == (self.chain[0], self.chain[1] + 1) or (base == self.version and seq == 1)


class FreshnessHistogram:
    """Event → served seconds of the examples in the deltas applied (cumulative buckets, a ring)."""

    def __init__(self) -> None:
        self.buckets = [0] * len(FRESHNESS_BUCKETS)
        self.count = 0
        self.sum = 0.0
        self.recent: list[float] = []
        self._next = 0

    def observe(self, values: np.ndarray) -> None:
        if not values.size:
            return
        for i, bound in enumerate(FRESHNESS_BUCKETS):
            self.buckets[i] += int((values <= bound).sum())
        self.count += int(values.size)
        self.sum += float(values.sum())
        for v in values.tolist():
            if len(self.recent) < FRESHNESS_KEPT:
                self.recent.append(v)
            else:
                self.recent[self._next] = v
                self._next = (self._next + 1) % FRESHNESS_KEPT


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
        self.deltas_applied = 0
        #: Deltas skipped: already contained, or after a gap in their chain (waiting for a full snapshot).
        self.deltas_skipped = 0
        #: Model updates from Kafka refused as corrupt or unusable.
        self.update_refusals = 0
        #: Full snapshots installed from Kafka with the rollback marker over a model already serving.
        self.rollbacks = 0
        self.freshness = FreshnessHistogram()
        self._followers: list[Any] = []
        self._gap_logged: tuple[int, int] | None = None
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
            if self._current is not None and pointed > self._current.version and self._deltas_cover(pointed):
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

    def install(self, loaded: Loaded, rollback: bool = False) -> bool:
        """Swap in a model loaded elsewhere (a full snapshot from Kafka) if it is newer than the one
        serving, or whatever it is with ``rollback`` (a chain restarting there: a rollback, a
        learner restarted); False otherwise (e.g. the same version, already loaded from disk)."""
        with self._reload_lock:
            current = self._current
            if current is not None and loaded.version <= current.version and not rollback:
                return False
            if rollback and current is not None:
                self.rollbacks += 1
            self._current = loaded
            self.reloads += 1
            return True

    def apply_delta(self, delta: Delta) -> bool:
        """Apply a :class:`~livectr.learner.deltas.Delta` if it is the next one for the serving model.

        A delta already contained (an older one) is skipped quietly; one after a gap in the
        chain is skipped until a full snapshot arrives. Raises ``DeltaError`` for a delta that
        does not fit the model (the model is left as it was only if the error came first).
        """
        current = self._current
        base, seq = delta.base_version, delta.seq
        if current is None or not current.follows(base, seq):
            self.deltas_skipped += 1
            if current is not None and base == current.chain[0] and seq > current.chain[1] + 1:
                if self._gap_logged != (base, current.chain[1]):
                    self._gap_logged = (base, current.chain[1])
                    log.warning(
                        "delta chain of v%08d has a gap (have seq %d, got %d): waiting for the next full snapshot",
                        base,
                        current.chain[1],
                        seq,
                    )
            return False
        with current.lock:
            apply_delta_to(current.predictor, delta)
            current.chain = (base, seq)
            current.deltas_applied += 1
            current.delta_at = time.time()
            # Published after that snapshot, the delta brings the model past it: name it so.
            current.version = max(current.version, int(delta.meta.get("snapshot_version") or 0))
        self.deltas_applied += 1
        decided = delta.arrays.get("freshness.decided_at")
        if decided is not None:
            self.freshness.observe(np.maximum(current.delta_at - decided, 0.0))
        return True

    def refuse(self, reason: str) -> None:
        """Count and log a model update that could not be used; the serving model stays."""
        self.update_refusals += 1
        log.error("%s; keeping v%s", reason, self.version)

    def attach(self, follower: Any) -> None:
        """Start ``follower`` (an object with ``start()``/``stop()``) with the watcher, stop it with it."""
        self._followers.append(follower)

    def _deltas_cover(self, version: int) -> bool:
        """Whether live deltas will bring the serving model past disk snapshot ``version`` anyway.

        Why: a scorer that also follows Kafka would otherwise load every full snapshot (tens of
        MB, a few hundred ms of CPU) only to get rows the deltas of the same chain deliver within
        seconds; it names that version once a delta published after it is applied. A snapshot of
        another chain (a rollback, a learner restarted) or deltas gone quiet: loaded as usual.
        """
        current = self._current
        if not self._followers or current is None or time.time() - current.delta_at > DELTAS_LIVE_S:
            return False
        try:
            manifest = json.loads((snapshots_dir(self.data_dir) / version_name(version) / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        chain = manifest.get("delta_chain") if isinstance(manifest, dict) else None
        return isinstance(chain, list) and bool(chain) and int(chain[0]) == current.chain[0]

    def start_watcher(self) -> None:
        """Poll the ``latest`` pointer every ``reload_ms`` in a background thread (idempotent),
        and start the attached followers (the Kafka model-updates follower)."""
        for follower in self._followers:
            follower.start()
        if self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="livectr-snapshot-watcher", daemon=True)
        self._watcher.start()

    def stop_watcher(self) -> None:
        for follower in self._followers:
            follower.stop()
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
        return current.score(impressions)

    def score(self, impressions: Sequence[Impression]) -> np.ndarray:
        """Click probabilities for ``impressions``; raises :class:`NoSnapshotError` before the first snapshot."""
        return self.score_versioned(impressions)[0]
