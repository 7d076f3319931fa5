"""The learner process: examples topic → mini-batches → online updates → snapshots.

Design points:

* **No consumer group.** The learner ``assign()``s every examples partition at the offsets
  stored in its latest snapshot (else the beginning): it starts instantly (no group join), and
  its position is the snapshot's, so a restart resumes exactly where the published model left
  off — model and offsets are saved together, atomically.
* **Offsets only cover trained examples.** A snapshot is only written with an empty buffer,
  so every offset in its manifest is of a record whose examples are all in the weights.
* **Freshness.** Full mini-batches are trained as soon as they fill; a partial batch is
  trained when its oldest example has waited ``partial_batch_ms`` (the stream paused), so a
  quiet stream does not leave examples waiting for company.
* **Bad records** (undecodable bytes, impossible labels or kinds, non-finite times) go to the
  dead-letter topic with a reason and are counted; they never stop the loop.
* **Bounded runs** end when every examples partition has carried an ``ExampleEnd`` for each
  of the ``source_partitions`` join inputs; the markers seen are kept in the manifest so a
  resumed learner still knows which ones it already consumed.
* **Event-time alignment.** Examples pass through :class:`livectr.learner.align.EventTimeMerge`
  before training, so partitions that run ahead in a replay wait for the others (and stop
  being fetched past ``align_max_buffered``); score requests are scored as they leave it. The
  snapshot's offsets stop at the first record the merge still holds, and the manifest lists
  how many examples of each partly trained record to skip on resume, so the guarantee above
  holds with examples waiting in the merge.
* **Warm-up.** Under ``wait`` the first window of a stream decides only clicks (a negative
  leaves when its window closes, W after its impression). Trained as they come — a live stream,
  or stages started before the producer, deliver them in batches of clicks alone — they set the
  output bias from a click rate of 1 and drive the model to predict 1, and it then swings for
  minutes of stream. So a fresh learner trains nothing until the negatives released cover at
  least half the impression time the positives cover (:class:`WarmUp`; at a stream's start,
  once 2 W of it are decided), then trains what waited, shuffled so that every mini-batch mixes
  clicks and negatives. Score requests are scored as they come meanwhile (the model does not
  change). Only under ``wait``: a learner under ``fake-negative``/``defer``, or one that starts
  mid-stream, meets both labels at once.
* **Rollback while running.** ``livectr snapshots rollback V`` hands a running learner a request
  (:func:`livectr.learner.snapshot.request_rollback`); between two polls the learner moves
  ``latest`` to V, drops everything it holds, resumes from V exactly as a restarted learner
  would (weights, optimiser, offsets: the examples after V are trained again), republishes V on
  the model-updates topic with the rollback marker (Kafka-only scorers serve V within seconds)
  and answers. Its next snapshot still numbers above the highest existing version.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from livectr.core import bus
from livectr.core.config import Config, config_hash
from livectr.core.events import (
    KIND_DEFER_TRUE,
    KIND_FINAL,
    KIND_SCORE_REQUEST,
    DecodeError,
    Example,
    ExampleBatch,
    ExampleEnd,
    decode_example,
    encode_example,
    one_line,
)
from livectr.learner import snapshot as snap
from livectr.learner.align import EventTimeMerge
from livectr.learner.deltas import TouchedRows
from livectr.learner.live_metrics import RecentLearnerMetrics
from livectr.learner.model import ModelConfig
from livectr.learner.online import OnlineLearner
from livectr.learner.snapshot import (
    LearnerLock,
    SnapshotError,
    clean_temp,
    load_newest_good,
    load_version,
    manifest_offsets,
    publish_snapshot,
)
from livectr.learner.updates import UpdatePublisher

log = logging.getLogger(__name__)

StatusCallback = Callable[[dict[str, Any]], None]


class WarmUp:
    """When a fresh learner may start training (see "Warm-up" in the module docstring).

    Tracks the impression times spanned by the positives and by the negatives released so far;
    warm once the negatives cover at least half of the positives' span, or once the positives
    span ``3 W`` without a negative (a stream without negatives must still be learned).
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.pos = [math.inf, -math.inf]
        self.neg = [math.inf, -math.inf]

    def observe(self, examples: list[Example]) -> bool:
        """Take labelled examples (no score requests); whether training may start."""
        for ex in examples:
            span = self.pos if ex.label else self.neg
            span[0], span[1] = min(span[0], ex.ts), max(span[1], ex.ts)
        pos = max(self.pos[1] - self.pos[0], 0.0)
        neg = self.neg[1] - self.neg[0]
        return (neg >= 0 and neg >= 0.5 * pos) or pos >= 3 * self.window_s


def example_problem(ex: Example) -> str | None:
    """Why ``ex`` cannot be trained on, or None. (msgspec already checked the types.)"""
    if ex.label not in (0, 1):
        return f"invalid example: label {ex.label!r} is not 0 or 1"
    if not KIND_FINAL <= ex.kind <= KIND_DEFER_TRUE or ex.kind == KIND_SCORE_REQUEST:
        return f"invalid example: unknown kind {ex.kind!r}"
    if not (math.isfinite(ex.ts) and math.isfinite(ex.decided_at)):
        return "invalid example: non-finite ts or decided_at"
    if ex.item_words is not None and len(ex.item_words) % 4:
        return f"invalid example: item_words of {len(ex.item_words)} bytes, not a multiple of 4"
    return None


@dataclass
class EndTracker:
    """Which join-input partitions have been declared finished on which examples partition."""

    seen: dict[int, set[int]] = field(default_factory=dict)
    source_partitions: int = 0
    examples_announced: int = 0

    def add(self, partition: int, end: ExampleEnd) -> None:
        sources = self.seen.setdefault(partition, set())
        if end.source_partition not in sources:
            sources.add(end.source_partition)
            self.examples_announced += end.examples
        self.source_partitions = max(self.source_partitions, end.source_partitions)

    def complete(self, partitions: int) -> bool:
        if self.source_partitions <= 0 or partitions <= 0:
            return False
        return all(len(self.seen.get(p, ())) >= self.source_partitions for p in range(partitions))

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": {str(p): sorted(s) for p, s in self.seen.items()},
            "source_partitions": self.source_partitions,
            "examples_announced": self.examples_announced,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> EndTracker:
        if not d:
            return cls()
        return cls(
            {int(p): set(s) for p, s in d.get("seen", {}).items()},
            int(d.get("source_partitions", 0)),
            int(d.get("examples_announced", 0)),
        )


def _resume(cfg: Config) -> tuple[dict[str, Any] | None, OnlineLearner]:
    """Learner from the latest compatible snapshot, else a fresh one.

    Compatibility is the model's shape (not the whole config hash): changing, say, the snapshot
    interval must not throw the model away, but toggling semantics or the embedding size must.
    A corrupt snapshot is skipped with a warning for the newest one that verifies (its offsets
    are where training resumes), else the learner starts fresh.
    """
    clean_temp(cfg.data_dir)
    loaded, refused = load_newest_good(cfg.data_dir)
    for exc in refused:
        log.warning("%s; falling back to %s", exc, "an older snapshot" if loaded is not None else "a fresh model")
    if loaded is not None:
        manifest, state = loaded
        wanted = ModelConfig.from_config(cfg).to_dict()
        have = dict(state.model_config)
        shape_keys = [k for k in wanted if not k.endswith("_capacity")]
        if all(wanted[k] == have.get(k) for k in shape_keys):
            log.info("resuming from snapshot v%08d (%d examples seen)", manifest["version"], manifest["examples_seen"])
            return manifest, OnlineLearner(cfg, state=state)
        log.warning("latest snapshot has another model shape; starting a fresh model from the beginning")
    return None, OnlineLearner(cfg)


class _Run:
    """State of one ``run_learner`` call (kept out of the function to keep each step small)."""

    def __init__(self, cfg: Config, on_status: StatusCallback | None, partitions: int = 1, sources: int = 0) -> None:
        self.cfg = cfg
        self.on_status = on_status
        self.topic = cfg.topics.examples
        self.partitions = max(1, partitions)
        self.manifest, self.learner = _resume(cfg)
        self.offsets: dict[int, int] = manifest_offsets(self.manifest or {}, self.topic)
        self.merge = EventTimeMerge(cfg.join.window_s, cfg.learner.align_idle_s, cfg.join.defer_wait_s)
        #: Records of the snapshot we resumed from that were partly trained: (partition, offset) → examples to skip.
        self.skip: dict[tuple[int, int], int] = {
            (int(q), int(o)): int(n) for q, o, n in (self.manifest or {}).get("partly_trained", [])
        }
        self.requests_scored = 0
        #: Join sources (impressions partitions) the merge waits for once the first record is in.
        self.sources = sources
        self.source_count = sources
        self.ends = EndTracker.from_dict((self.manifest or {}).get("end_markers"))
        self.snapshots = 0
        self.last_version = (self.manifest or {}).get("version")
        self.buffer: list[Example] = []
        self.buffer_since = 0.0
        self.trained = 0
        self.positives = 0
        self.train_s = 0.0
        self.busy_s = 0.0
        self.started = time.monotonic()
        self.last_snapshot_t = time.monotonic()
        self.trained_at_snapshot = 0
        self.records_at_snapshot = 0
        self.last_status_t = 0.0
        self.trained_at_status = 0
        self.records = 0
        #: A fresh model waits before training (see "Warm-up" above); meanwhile the labelled
        #: examples released wait in ``held``.
        fresh = self.learner.examples_seen == 0
        self.warm_up: WarmUp | None = WarmUp(cfg.join.window_s) if fresh and cfg.join.policy == "wait" else None
        self.held: list[Example] = []
        self.recent = RecentLearnerMetrics()
        #: Full snapshots and deltas on the model-updates topic (None: not published).
        self.updates: UpdatePublisher | None = None

    def publish_updates(self, prod: Producer) -> None:
        """Publish full snapshots and, every ``delta_every_s``, deltas on the model-updates topic."""
        self.updates = UpdatePublisher(self.cfg, prod)
        if self.cfg.learner.delta_every_s > 0:
            self.learner.touched = TouchedRows()

    @property
    def warming(self) -> bool:
        return self.warm_up is not None

    # -- input --------------------------------------------------------------------------------

    def handle(self, msg: Message, dlq: bus.DeadLetterSink) -> None:
        self.records += 1
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None  # the caller passes records without error
        raw = msg.value()
        try:
            if raw is None:
                raise DecodeError("empty message (null value)")
            rec = decode_example(raw)
        except DecodeError as exc:
            dlq.send(raw, exc.reason, source=msg)
            self.merge.note_record(partition, offset)
            return
        source = msg.key() or f"partition:{partition}".encode()
        if self.sources and source.isdigit():  # keyed by a join worker: its siblings will follow
            now = time.monotonic()
            for p in range(self.sources):
                self.merge.expect(str(p).encode(), now)
            self.sources = 0
        if isinstance(rec, ExampleEnd):
            self.ends.add(partition, rec)
            if rec.source_partition % self.partitions == partition:  # after the source's last example
                self.merge.end(source)
            self.merge.note_record(partition, offset)
            return
        examples = rec.examples if isinstance(rec, ExampleBatch) else [rec]
        valid = []
        for ex in examples:
            problem = None if ex.kind == KIND_SCORE_REQUEST else example_problem(ex)
            if problem is None:
                valid.append(ex)
            else:
                dlq.send(raw if len(examples) == 1 else encode_example(ex), problem, source=msg)
        skip = self.skip.pop((partition, offset), 0)
        self.merge.add(source, partition, offset, valid[skip:], time.monotonic())
        self.release(self.merge.release(time.monotonic()))

    def release(self, examples: list[Example]) -> None:
        """Buffer the examples the merge released, in decision-time order, score requests included."""
        if self.warm_up is not None:
            examples = self._warming(examples)
        if not examples:
            return
        self.recent.released(examples)
        if not self.buffer:
            self.buffer_since = time.monotonic()
        self.buffer.extend(examples)

    def _warming(self, examples: list[Example]) -> list[Example]:
        """While warming up: score requests now, hold labelled examples; once warm, return what
        waited (shuffled) followed by the rest of ``examples`` in order."""
        assert self.warm_up is not None
        for i, ex in enumerate(examples):
            if ex.kind == KIND_SCORE_REQUEST:
                continue
            self.held.append(ex)
            if self.warm_up.observe([ex]):
                self._score_now([e for e in examples[:i] if e.kind == KIND_SCORE_REQUEST])
                return self.end_warm_up() + examples[i + 1 :]
        self._score_now([e for e in examples if e.kind == KIND_SCORE_REQUEST])
        return []

    def _score_now(self, requests: list[Example]) -> None:
        if requests:
            self.learner.score_requests(requests)
            self.requests_scored += len(requests)

    def end_warm_up(self) -> list[Example]:
        """Stop warming up; the held examples, shuffled (in decision order they are the clicks
        first, then the negatives: every mini-batch cut from them would hold one label)."""
        held, self.held, self.warm_up = self.held, [], None
        order = np.random.default_rng(self.cfg.learner.seed).permutation(len(held))
        return [held[k] for k in order.tolist()]

    # -- training -----------------------------------------------------------------------------

    def train(self, force: bool) -> None:
        """Train the oldest ``shuffle_buffer`` examples once that many wait; with ``force`` (or a
        stale buffer) everything.

        Batches are cut in decision-time order, score requests included: each request rides in
        its batch at its impression's place, so it is scored with every label decided before it
        (the in-batch replay and the fast experts learn example by example) and with none after.
        That is the served score. (The buffer was once shuffled to break the clumps of labels
        under ``wait``; in serving order, scoring in place is worth far more: docs/benchmarks.md.)

        Why only one buffer's worth per call: the event-time merge can release hundreds of
        thousands of examples at once (when a lagging partition catches up); training them in
        one call would stop consuming, status reports and snapshots for seconds.
        """
        size = self.cfg.learner.batch_size
        cap = max(size, self.cfg.learner.shuffle_buffer)
        full = len(self.buffer) >= cap
        stale = self.buffer and (time.monotonic() - self.buffer_since) * 1000 >= self.cfg.learner.partial_batch_ms
        if not (force or stale or full):
            return
        n = len(self.buffer) if force or not full else cap - cap % size
        head, self.buffer = self.buffer[:n], self.buffer[n:]
        for start in range(0, n, size):
            batch = head[start : start + size]
            t = time.perf_counter()
            left_out = self.learner.learn_batch(batch).get("left_out", 0)
            self.train_s += time.perf_counter() - t
            requests = sum(ex.kind == KIND_SCORE_REQUEST for ex in batch)
            self.requests_scored += requests
            self.trained += len(batch) - requests - left_out
            self.positives += sum(ex.label for ex in batch)
        if self.buffer:
            self.buffer_since = time.monotonic()  # the remainder arrived with the batches just trained

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_due(self) -> bool:
        lc = self.cfg.learner
        new = self.trained - self.trained_at_snapshot
        return new > 0 and (
            new >= lc.snapshot_every_examples or time.monotonic() - self.last_snapshot_t >= lc.snapshot_every_s
        )

    def snapshot(self, dlq: bus.DeadLetterSink, flush_timeout_s: float = bus.FLUSH_S) -> None:
        """Publish a snapshot; the buffer must be empty so offsets only cover trained records."""
        self.train(force=True)
        # Dead letters count as handled in these offsets: make sure they reached the broker first.
        bus.flush_or_raise(dlq.prod, dlq.tracker, flush_timeout_s)
        summary = self.learner.summary()
        offsets = {**self.offsets, **self.merge.safe_offsets()}
        manifest = {
            "examples_seen": self.learner.examples_seen,
            "offsets_topic": self.topic,
            "offsets": {str(p): o for p, o in sorted(offsets.items())},
            "partly_trained": [list(r) for r in self.merge.partly_released()],
            "end_markers": self.ends.to_dict(),
            "metrics": {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "config_hash": config_hash(self.cfg),
            "semantics": self.cfg.semantic.enabled,
        }
        if self.updates is not None and self.updates.chain is not None:
            manifest["delta_chain"] = list(self.updates.chain)  # the deltas this snapshot contains
        version, _ = publish_snapshot(
            self.cfg.data_dir, self.learner.state(), manifest, self.cfg.learner.keep_snapshots
        )
        if self.updates is not None and self.updates.full_due():
            self.updates.publish_full(self.cfg.data_dir, version)
            if self.learner.touched is not None:
                self.learner.touched.take()  # all in the full snapshot
        self.snapshots += 1
        self.last_version = version
        self.last_snapshot_t = time.monotonic()
        self.trained_at_snapshot = self.trained
        self.records_at_snapshot = self.records

    def delta_due(self) -> bool:
        every = self.cfg.learner.delta_every_s
        touched = self.learner.touched
        return (
            self.updates is not None
            and not self.warming  # a delta may take the first snapshot: never over held examples
            and touched is not None
            and bool(touched)
            and time.monotonic() - self.updates.last_delta_t >= every
        )

    def publish_delta(self, dlq: bus.DeadLetterSink) -> None:
        """Publish the rows touched since the last publish; without a full snapshot on Kafka yet,
        first the one resumed from (or a new one: a delta needs a base)."""
        assert self.updates is not None
        if self.updates.base is None:
            if self.last_version is None:
                self.snapshot(dlq)  # publishes the full snapshot on Kafka too
                return
            try:
                self.updates.publish_full(self.cfg.data_dir, int(self.last_version))
            except OSError as exc:
                log.warning(
                    "snapshot v%08d to publish on Kafka is unreadable (%s); taking a new one", self.last_version, exc
                )
                self.snapshot(dlq)
                return
        self.updates.publish_delta(self.learner, self.last_version)

    # -- rollback -----------------------------------------------------------------------------

    def rolled_back(self, version: int) -> _Run:
        """A run resumed from snapshot ``version`` after moving ``latest`` to it (see "Rollback
        while running" above); this one's buffers are dropped, its model-updates chain carried
        on with ``version`` republished as a rollback. Raises ``OSError``/``SnapshotError``
        (nothing changed) when ``version`` is missing or does not verify."""
        load_version(self.cfg.data_dir, version, with_optimizer=True)  # refuse before touching anything
        snap.point_latest(self.cfg.data_dir, version)
        run = _Run(self.cfg, self.on_status, self.partitions, self.source_count)
        run.snapshots = self.snapshots
        run.updates = self.updates
        if run.updates is not None:
            if self.cfg.learner.delta_every_s > 0:
                run.learner.touched = TouchedRows()
            run.updates.publish_full(self.cfg.data_dir, version, rollback=True)
        return run

    # -- reporting ----------------------------------------------------------------------------

    def status(self, dlq: bus.DeadLetterSink, force: bool = False) -> dict[str, Any] | None:
        now = time.monotonic()
        if not force and now - self.last_status_t < 1.0:
            return None
        rate = (
            (self.trained - self.trained_at_status) / max(now - self.last_status_t, 1e-9) if self.last_status_t else 0.0
        )
        self.last_status_t, self.trained_at_status = now, self.trained
        m = self.learner.metrics.summary()
        status = {
            "examples_trained": self.trained,
            "examples_per_second": rate,
            "serving_auc": m["serving_auc"],
            "serving_logloss": m["serving_logloss"],
            "serving_auc_impressions": m["serving_auc_impressions"],
            "label_order_auc": m["label_order_auc"],
            "progressive_auc": m["progressive_auc"],
            "windowed_auc": m["windowed_auc"],
            "logloss": m["serving_logloss"],
            "progressive_logloss": m["progressive_logloss"],
            "snapshots": self.snapshots,
            "snapshot_version": self.last_version,
            "gate_usage": m["gate_usage"],
            "dead_letters": dlq.count,
            "buffered": len(self.buffer) + len(self.merge) + len(self.held),
            "warming_up": self.warming,
            "real_negatives_left_out": self.learner.real_negatives_left_out,
            "defer_hold_s": self.learner.hold_wait,
            # For `livectr chaos`: the model's total, and where this process resumed it from.
            "examples_seen_total": self.learner.examples_seen,
            "resumed_examples_seen": (self.manifest or {}).get("examples_seen", 0),
        }
        status.update(self.recent.sample(self.learner.metrics))  # recent AUC, freshness, event time
        if self.on_status is not None:
            self.on_status(status)
        return status

    def summary(self, dlq: bus.DeadLetterSink) -> dict[str, Any]:
        s = self.learner.summary()
        elapsed = time.monotonic() - self.started
        out = {
            "serving_auc": s["serving_auc"],
            "serving_logloss": s["serving_logloss"],
            "serving_cold_start_auc": s["serving_cold_start_auc"],
            "serving_auc_impressions": s["serving_auc_impressions"],
            "examples_trained": self.trained,
            "positives": self.positives,
            "real_negatives_left_out": self.learner.real_negatives_left_out,
            # ``defer``: the learner's own waiting window now, and the observed negatives it held.
            "defer_hold_s": s["defer_hold_s"],
            "defer_negatives_held": s["defer_negatives_held"],
            "label_order_auc": s["label_order_auc"],
            "label_order_logloss": s["label_order_logloss"],
            "progressive_auc": s["progressive_auc"],
            "score_requests_scored": self.requests_scored,
            # fake-negative: examples that came after their impression was evaluated (not evaluated again)
            "late_labels": self.learner.delayed.late,
            "progressive_logloss": s["progressive_logloss"],
            "windowed_auc": s["windowed_auc"],
            "cold_start_auc": s["cold_start_auc"],
            "cold_start_examples": s["cold_start_examples"],
            "freshness_p50_s": s["freshness_p50_s"],
            "freshness_p99_s": s["freshness_p99_s"],
            "snapshots_published": self.snapshots,
            "snapshot_version": self.last_version,
            "dead_letters": dlq.count,
            "dead_letter_reasons": dict(dlq.reasons),
            "records_consumed": self.records,
            "examples_seen_total": self.learner.examples_seen,
            "resumed_from_version": (self.manifest or {}).get("version"),
            "examples_announced": self.ends.examples_announced,
            "elapsed_s": elapsed,
            "examples_per_second": self.trained / elapsed if elapsed > 0 else 0.0,
            "train_examples_per_second": self.trained / self.train_s if self.train_s > 0 else 0.0,
            "busy_examples_per_second": self.trained / self.busy_s if self.busy_s > 0 else 0.0,
            "users": s["users"],
            "items": s["items"],
            "context_fields": s["context_fields"],
            "context_fields_dropped": s["context_fields_dropped"],
            "device": str(self.learner.device),
        }
        if self.updates is not None:
            out.update(
                deltas_published=self.updates.deltas,
                full_snapshots_on_kafka=self.updates.fulls,
                last_delta_bytes=self.updates.delta_bytes,
                mean_delta_bytes=self.updates.delta_bytes_total / self.updates.deltas if self.updates.deltas else 0,
                last_full_snapshot_bytes=self.updates.full_bytes,
            )
        out.update(
            {
                k: s[k]
                for k in ("expert_mix_bias", "expert_mix_taste", "expert_mix_slope", "expert_mix_fitted_to")
                if k in s
            }
        )
        if self.learner.semantic:
            out.update(
                gate_usage=s["gate_usage"],
                gate_compute_saved=s["gate_compute_saved"],
                distill_loss=s["distill_loss"],
                items_cold_started=s["items_cold_started"],
                model_macs_per_example=s["model_macs_per_example"],
            )
        return out


def _throttle(cons: Any, run: _Run, paused: set[int]) -> set[int]:
    """Stop fetching partitions whose examples pile up in the merge; resume them at half the cap."""
    cap = run.cfg.learner.align_max_buffered
    for p in range(run.partitions):
        held = run.merge.buffered(p)
        if p not in paused and held > cap:
            cons.pause([TopicPartition(run.topic, p)])
            paused.add(p)
        elif p in paused and held <= cap // 2:
            cons.resume([TopicPartition(run.topic, p)])
            paused.discard(p)
    return paused


def run_learner(
    cfg: Config, *, on_status: StatusCallback | None = None, stop: threading.Event | None = None, bounded: bool = True
) -> dict[str, Any]:
    """Train on the examples topic until the end markers (``bounded``) or ``stop``; returns a summary.

    Holds :class:`LearnerLock` on the data dir for its whole run: a second learner on the same
    data dir fails at once with :class:`LearnerLockError` instead of overwriting snapshots.
    """
    with LearnerLock(cfg.data_dir) as lock:
        lock.accept_rollbacks()
        return _learn(cfg, on_status, stop or threading.Event(), bounded)


#: How often the loop looks for a rollback request (a stat of one file).
ROLLBACK_POLL_S = 0.2


def _roll_back_if_asked(run: _Run, cons: Any, paused: set[int]) -> _Run:
    """Do a pending rollback request (and answer it): the run to continue with."""
    request = snap.take_rollback_request(run.cfg.data_dir)
    if request is None:
        return run
    before = snap.latest_version(run.cfg.data_dir)
    try:
        version = int(request["version"])
        new = run.rolled_back(version)
    except (KeyError, TypeError, ValueError, OSError, SnapshotError) as exc:
        log.error("rollback request %s refused: %s", request, exc)
        snap.answer_rollback(run.cfg.data_dir, request, {"error": one_line(str(exc)) or type(exc).__name__})
        return run
    offsets = {(new.topic, p): o for p, o in new.offsets.items()}
    bus.assign_all(cons, new.cfg.kafka, [new.topic], offsets)  # replaces the assignment, paused ones too
    paused.clear()
    log.info("rolled back: latest v%s -> v%08d; training resumes from its offsets %s", before, version, new.offsets)
    snap.answer_rollback(
        run.cfg.data_dir,
        request,
        {"version": version, "previous": before, "published_on_kafka": new.updates is not None},
    )
    return new


def _learn(cfg: Config, on_status: StatusCallback | None, stop: threading.Event, bounded: bool) -> dict[str, Any]:
    partitions = bus.partition_count(cfg.kafka, cfg.topics.examples)
    run = _Run(cfg, on_status, partitions, bus.partition_count(cfg.kafka, cfg.topics.impressions))
    cons = bus.consumer(cfg.kafka)
    prod = bus.producer(cfg.kafka)
    dlq = bus.DeadLetterSink(prod, cfg.topics.dead_letters, stage="learner")
    if cfg.learner.publish_updates:
        # One partition: updates apply in order.
        bus.ensure_topic(cfg.kafka, cfg.topics.model_updates, 1, config=bus.model_updates_topic_config(cfg))
        run.publish_updates(prod)
    bus.assign_all(cons, cfg.kafka, [run.topic], {(run.topic, p): o for p, o in run.offsets.items()})
    paused: set[int] = set()
    next_rollback_check = 0.0
    try:
        while not stop.is_set():
            if bounded and run.ends.complete(partitions):
                break
            if time.monotonic() >= next_rollback_check:
                next_rollback_check = time.monotonic() + ROLLBACK_POLL_S
                run = _roll_back_if_asked(run, cons, paused)
            msgs = cons.consume(num_messages=500, timeout=0.1)
            t = time.perf_counter()
            for msg in msgs:
                if stop.is_set():  # far behind, a poll's worth of training can outlast the stop grace;
                    break  # the records not handled are read again after a restart
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consume error: %s", err)
                    continue
                run.handle(msg, dlq)
                run.train(force=False)
                if run.snapshot_due():  # per record, so a large poll cannot postpone a snapshot
                    run.snapshot(dlq)
                elif run.delta_due():
                    run.publish_delta(dlq)
                run.status(dlq)  # likewise for status (rate-limited inside)
            run.release(run.merge.release(time.monotonic()))  # a source may have gone idle
            run.train(force=not msgs)
            if run.snapshot_due():
                run.snapshot(dlq)
            elif run.delta_due():
                run.publish_delta(dlq)
            paused = _throttle(cons, run, paused)
            prod.poll(0)
            run.busy_s += time.perf_counter() - t
            run.status(dlq)
        complete = bounded and run.ends.complete(partitions)
        if complete:
            run.release(run.merge.flush())
            if run.warming:  # a bounded stream too short to warm up: train what it held
                run.release(run.end_warm_up())
        run.train(force=True)
        if complete:
            run.learner.delayed.flush(run.learner.metrics)
        # Stopped while warming up: nothing was trained and no snapshot moves the offsets, so a
        # restart reads the held examples again.
        if run.records > run.records_at_snapshot and not run.warming:
            run.snapshot(dlq, bus.flush_timeout(stop))
        if run.updates is not None and run.learner.touched and not run.warming:
            run.publish_delta(dlq)  # scorers following Kafka get the last rows too
        bus.flush_or_raise(prod, dlq.tracker, bus.flush_timeout(stop))
        run.status(dlq, force=True)
        return run.summary(dlq)
    finally:
        cons.close()
