"""``livectr chaos``: SIGKILL the stages of a live run, let the supervisor restart them, audit the labels.

The run is ``livectr run``'s (:func:`livectr.pipeline.run_pipeline`: the embedded broker, every
stage in its own process, the :class:`~livectr.pipeline.Supervisor`) with a :class:`ChaosDrill`
attached. The drill kills the join worker(s), the learner and the refresher ``kills`` times in
total, at random moments and also *mid-write*: the stages linger at their fault points
(:mod:`livectr.core.faults`) while a checkpoint's temp file or a snapshot's temp directory
exists, and the drill, watching for it, kills them right then. Optionally it freezes the broker
(SIGSTOP … SIGCONT) and measures how much CPU the stages burn meanwhile.

At the end the examples topic is read back whole and compared with the synthetic simulator's
ground truth, label by label (:func:`audit`): every impression must have exactly one example of
each kind its policy sends, with the label the join's window rule gives. Anything lost,
repeated, unexpected or mislabelled is counted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import KafkaError, TopicPartition

from livectr.core import bus, faults
from livectr.core import config as config_mod
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.core.events import (
    KIND_DEFER_OBSERVED,
    KIND_DEFER_TRUE,
    KIND_FAKE_NEGATIVE,
    KIND_FINAL,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    DecodeError,
    Example,
    ExampleBatch,
    ExampleEnd,
    decode_example,
)
from livectr.learner.snapshot import MANIFEST, latest_version, snapshots_dir, version_name
from livectr.pipeline import Stage, restartable, run_pipeline
from livectr.simulators.synthetic import GroundTruth, SyntheticTraffic
from livectr.streams.checkpoint import checkpoint_path
from livectr.streams.join import POLICY_DEFER, POLICY_FAKE_NEGATIVE, POLICY_WAIT, request_threshold

log = logging.getLogger(__name__)

#: Stages the drill kills (by name prefix): every stage that keeps state across a crash.
TARGETS = ("join", "learn", "refresh")
#: Where an aimed kill waits for its moment: the join mid-checkpoint, the learner mid-snapshot.
AIM = {"join": faults.CHECKPOINT, "learn": faults.SNAPSHOT}


@dataclass
class ChaosOptions:
    """What the drill does to one run."""

    kills: int = 5
    seed: int = 0
    #: Wall seconds the producer's traffic should last (sets its replay speed unless given).
    stream_s: float = 60.0
    #: Seconds the stages linger at their fault points (so a kill can land mid-write).
    hold_s: float = 0.05
    #: How long an aimed kill waits for a checkpoint or snapshot before killing anyway.
    aim_timeout_s: float = 15.0
    #: Freeze the broker this long (0: no outage), starting at ``outage_at`` of ``stream_s``.
    outage_s: float = 0.0
    outage_at: float = 0.4


@dataclass
class KillRecord:
    """One SIGKILL: whom, when (seconds into the stream), how it was aimed, and what it hit."""

    stage: str
    at_s: float
    aim: str
    hit: str
    pid: int
    examples_seen_before: int | None = None
    resumed_from_examples: int | None = None


def _examples_seen(stage: Stage) -> int | None:
    """The learner's ``examples_seen`` from its status file, if written by its current life."""
    status = stage.status()
    if status.get("updated_at", 0.0) < stage.started_at:
        return None  # an earlier life's file: this one has reported nothing yet
    seen = status.get("examples_seen_total")
    return int(seen) if seen is not None else None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (Linux ``/proc``), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ChaosDrill:
    """Kills (and optionally a broker outage) during a run; implements :class:`livectr.pipeline.Drill`."""

    cfg: Config
    options: ChaosOptions
    kills: list[KillRecord] = field(default_factory=list)
    outage: dict[str, Any] = field(default_factory=dict)
    _rng: random.Random = field(default_factory=random.Random)
    _schedule: list[float] = field(default_factory=list)
    _order: list[str] = field(default_factory=list)
    _t0: float | None = None
    _targets: list[str] = field(default_factory=list)
    _broker: EmbeddedBroker | None = None
    #: (monotonic time, CPU seconds per stage pid) a little before the outage: its baseline.
    _baseline: tuple[float, dict[int, float | None]] | None = None

    def stage_env(self) -> dict[str, str]:
        return {faults.HOLD_ENV: str(self.options.hold_s), faults.POINTS_ENV: f"{faults.CHECKPOINT},{faults.SNAPSHOT}"}

    def started(self, broker: EmbeddedBroker | None, stages: dict[str, Stage]) -> None:
        self._broker = broker
        self._rng = random.Random(self.options.seed)
        self._targets = [p for p in TARGETS if any(n.split("-", 1)[0] == p for n in stages)]

    def _start_clock(self, stages: dict[str, Stage]) -> bool:
        """Start the drill's clock once traffic flows (the producer has published, or is done).

        Then draw the kill times (spread over the stream) and the order of targets (each in
        turn). Timing from the stages' start instead would let a slow start (imports on a busy
        machine) swallow the first kills or the outage.
        """
        if self._t0 is not None:
            return True
        produce = stages.get("produce")
        if produce is not None and produce.poll() is None and not produce.status().get("events_published"):
            return False
        opts = self.options
        self._t0 = time.monotonic()
        lo, hi = 0.1 * opts.stream_s, 0.9 * opts.stream_s
        self._schedule = sorted(self._rng.uniform(lo, hi) for _ in range(opts.kills))
        present = list(self._targets)
        self._rng.shuffle(present)
        self._order = [present[i % len(present)] for i in range(opts.kills)] if present else []
        return True

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0 if self._t0 is not None else 0.0

    def tick(self, stages: dict[str, Stage]) -> None:
        if not self._start_clock(stages):
            return
        now = self._elapsed()
        opts = self.options
        outage_from = opts.outage_at * opts.stream_s
        if opts.outage_s > 0 and not self._baseline and now >= outage_from - opts.outage_s:
            self._baseline = (time.monotonic(), self._cpu_of(stages))
        if opts.outage_s > 0 and not self.outage and now >= outage_from:
            self._freeze_broker(stages)
        if self._schedule and now >= self._schedule[0] and self._order:
            if self._kill(stages, self._order[0]):
                self._schedule.pop(0)
                self._order.pop(0)
                # An aimed kill may have waited past the next times: keep the rest spread out.
                gap = opts.stream_s / (2.0 * (opts.kills + 1))
                done = self._elapsed()
                self._schedule = [max(t, done + gap * (i + 1)) for i, t in enumerate(self._schedule)]

    # -- kills ----------------------------------------------------------------------------------

    def _alive(self, stages: dict[str, Stage], prefix: str) -> list[Stage]:
        return [s for n, s in stages.items() if n.split("-", 1)[0] == prefix and s.pid is not None]

    def _kill(self, stages: dict[str, Stage], prefix: str) -> bool:
        """Kill one live stage of kind ``prefix`` (another kind if none is alive); False: none alive."""
        candidates = self._alive(stages, prefix)
        if not candidates:
            others = [p for p in TARGETS if p != prefix and self._alive(stages, p)]
            if not others:
                return False
            prefix = self._rng.choice(others)
            candidates = self._alive(stages, prefix)
        stage = self._rng.choice(candidates)
        done_before = sum(1 for k in self.kills if k.stage.split("-", 1)[0] == prefix)
        aim = AIM.get(prefix) if done_before % 2 == 0 else None
        hit = "random moment"
        if aim is not None:
            hit = self._wait_for_write(stage, aim)
        seen_before = _examples_seen(stage) if prefix == "learn" else None
        pid = stage.pid
        if pid is None:
            return True  # it ended (or died) while we aimed: the kill is spent on nothing
        os.kill(pid, signal.SIGKILL)
        assert stage.proc is not None
        stage.proc.wait(timeout=10)
        record = KillRecord(stage.name, round(self._elapsed(), 2), aim or "random", hit, pid)
        if prefix == "learn":
            record.examples_seen_before = seen_before
            record.resumed_from_examples = self._snapshot_examples()
        self.kills.append(record)
        log.warning("chaos: SIGKILLed %s (pid %d) at %.1fs, %s", stage.name, pid, record.at_s, hit)
        return True

    def _temp_paths(self, aim: str) -> Iterator[Path]:
        if aim == faults.CHECKPOINT:
            folder = checkpoint_path(self.cfg, 0).parent
            pattern = ".tmp"
        else:
            folder = self.cfg.data_dir / "snapshots"
            pattern = ".tmp-"
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if pattern in entry.name:
                        yield Path(entry.path)
        except OSError:
            return

    def _wait_for_write(self, stage: Stage, aim: str) -> str:
        """Poll for ``stage``'s temp file of ``aim`` (a checkpoint or snapshot being written)."""
        deadline = time.monotonic() + self.options.aim_timeout_s
        while time.monotonic() < deadline and stage.pid is not None:
            # Temp names: ".<checkpoint>.<pid>.tmp" and ".tmp-v<version>-<pid>-<ns>".
            mark = f".{stage.pid}.tmp" if aim == faults.CHECKPOINT else f"-{stage.pid}-"
            for path in self._temp_paths(aim):
                if mark in path.name:
                    return f"mid-{aim} ({path.name})"
            time.sleep(0.002)
        return f"random moment (no {aim} within {self.options.aim_timeout_s:g}s)"

    def _snapshot_examples(self) -> int | None:
        """``examples_seen`` of the snapshot a restarted learner resumes from (the latest)."""
        version = latest_version(self.cfg.data_dir)
        if version is None:
            return 0
        path = snapshots_dir(self.cfg.data_dir) / version_name(version) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # a report, never a reason to stop the drill
            log.warning("chaos: could not read %s: %s", path, exc)
            return None
        return int(manifest.get("examples_seen", 0))

    # -- outage ---------------------------------------------------------------------------------

    @staticmethod
    def _cpu_of(stages: dict[str, Stage]) -> dict[int, float | None]:
        return {pid: _cpu_seconds(pid) for pid in (s.pid for s in stages.values()) if pid is not None}

    def _baseline_share(self, stages: dict[str, Stage], now_cpu: dict[int, float | None]) -> dict[str, float]:
        """Each stage's CPU share between the baseline sample and now (same process throughout)."""
        if self._baseline is None:
            return {}
        at, cpu = self._baseline
        span = time.monotonic() - at
        out = {}
        for name, stage in stages.items():
            pid = stage.pid
            then, now = cpu.get(pid) if pid is not None else None, now_cpu.get(pid) if pid is not None else None
            if then is not None and now is not None and span > 0:
                out[name] = round((now - then) / span, 4)
        return out

    def _freeze_broker(self, stages: dict[str, Stage]) -> None:
        """SIGSTOP the broker for ``outage_s``, recording each stage's CPU seconds meanwhile.

        The baseline is each stage's CPU share over the ``outage_s`` before the freeze (same
        processes), so a stage that merely keeps doing its normal work (the paced producer keeps
        generating traffic into its local queue) can be told from one that spins.
        """
        pid = self._broker.pid if self._broker is not None else None
        if pid is None:
            self.outage = {"outage_s": 0.0, "error": "no embedded broker to freeze"}
            return
        pids = {n: s.pid for n, s in stages.items() if s.pid is not None}
        before = {n: _cpu_seconds(p) for n, p in pids.items()}
        baseline = self._baseline_share(stages, {p: before[n] for n, p in pids.items()})
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            time.sleep(self.options.outage_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        frozen = time.monotonic() - started
        after = {n: _cpu_seconds(p) for n, p in pids.items()}
        cpu = {
            n: round(after[n] - before[n], 3)  # type: ignore[operator]
            for n in pids
            if before.get(n) is not None and after.get(n) is not None
        }
        self.outage = {
            "outage_s": round(frozen, 2),
            "outage_at_s": round(self._elapsed() - frozen, 2),
            "outage_cpu_s": cpu,
            "outage_cpu_share": {n: round(c / frozen, 4) for n, c in cpu.items()},
            "outage_cpu_share_before": baseline,
        }
        log.warning("chaos: broker frozen %.1fs; stage CPU meanwhile %s", frozen, cpu)

    # -- report ---------------------------------------------------------------------------------

    def retrained_examples(self) -> int:
        """Examples the learner trained again after its restarts (before each kill minus the resumed snapshot)."""
        total = 0
        for k in self.kills:
            if k.examples_seen_before is not None and k.resumed_from_examples is not None:
                total += max(0, int(k.examples_seen_before) - k.resumed_from_examples)
        return total

    def report(self, cfg: Config, stages: dict[str, Stage]) -> dict[str, Any]:
        truth = ground_truth(cfg)
        problems: list[str] = []
        labels = audit(cfg, truth, _until_incomplete(read_examples(cfg), problems))
        return {
            **labels,
            "audit_complete": not problems,
            "kills": len(self.kills),
            "kills_requested": self.options.kills,
            "kill_log": [k.__dict__ for k in self.kills],
            "retrained_examples": self.retrained_examples(),
            **self.outage,
        }


# -- ground truth and the audit -------------------------------------------------------------------


def ground_truth(cfg: Config) -> GroundTruth:
    """Generate the run's synthetic stream again (same config and seed) and return its truth."""
    traffic = SyntheticTraffic(cfg.simulator)
    for _ in traffic:
        pass
    return traffic.truth


class IncompleteRead(RuntimeError):
    """The examples topic never carried every end marker (a stage failed before finishing)."""


def read_examples(
    cfg: Config, idle_s: float = 2.0, stall_s: float = 30.0, timeout_s: float = 600.0
) -> Iterator[Example]:
    """Every example on the examples topic (score requests included), from the beginning.

    Done when every partition has carried an end marker of every join input partition, its
    position has reached the high watermark, and nothing more arrived for ``idle_s`` (the
    high watermark alone can stop short of the last batch). Raises :class:`IncompleteRead`
    (after yielding everything there is) when nothing arrives for ``stall_s`` without the
    markers complete, or after ``timeout_s`` in all.
    """
    topic = cfg.topics.examples
    parts = bus.partition_count(cfg.kafka, topic)
    sources = bus.partition_count(cfg.kafka, cfg.topics.impressions)
    cons = bus.consumer(cfg.kafka)
    try:
        cons.assign([TopicPartition(topic, p, -2) for p in range(parts)])
        ends: dict[int, set[int]] = {p: set() for p in range(parts)}
        position = dict.fromkeys(range(parts), 0)
        deadline = time.monotonic() + timeout_s
        last_record = time.monotonic()
        while time.monotonic() < deadline:
            msgs = cons.consume(10_000, 0.2)
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("reading examples: %s", err)
                    continue
                p, offset, raw = msg.partition(), msg.offset(), msg.value()
                assert p is not None and offset is not None
                position[p] = offset + 1
                last_record = time.monotonic()
                if raw is None:
                    continue
                try:
                    rec = decode_example(raw)
                except DecodeError:
                    continue
                if isinstance(rec, ExampleEnd):
                    ends[p].add(rec.source_partition)
                elif isinstance(rec, ExampleBatch):
                    yield from rec.examples
                elif isinstance(rec, Example):
                    yield rec
            quiet = time.monotonic() - last_record
            if msgs or quiet < idle_s:
                continue
            if all(len(e) >= sources for e in ends.values()):
                highs = [cons.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] for p in range(parts)]
                if all(position[p] >= highs[p] for p in range(parts)):
                    return
            elif quiet >= stall_s:
                break
        missing = {p: sorted(set(range(sources)) - e) for p, e in ends.items() if len(e) < sources}
        raise IncompleteRead(f"examples topic read without the end markers of input partitions {missing}")
    finally:
        cons.close()


def _until_incomplete(examples: Iterator[Example], problems: list[str]) -> Iterator[Example]:
    """``examples`` until :class:`IncompleteRead`, which is logged and noted in ``problems``."""
    try:
        yield from examples
    except IncompleteRead as exc:
        log.error("chaos: %s; auditing what was delivered", exc)
        problems.append(str(exc))


def expected_kinds(cfg: Config, truth: GroundTruth) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per example kind the policy sends: (which impressions get one, the label each must carry).

    The join's window rule: an impression is positive when its (first) click came at most
    ``window_s`` after it; under ``defer`` the observed label is 1 when the click came within
    ``defer_wait_s``.
    """
    delay = truth.click_delay()
    positive = delay <= cfg.join.window_s  # NaN (no click) compares false
    everyone = np.ones(len(delay), dtype=bool)
    policy = cfg.join.policy
    if policy == POLICY_WAIT:
        return {KIND_FINAL: (everyone, positive)}
    if policy == POLICY_FAKE_NEGATIVE:
        return {KIND_FAKE_NEGATIVE: (everyone, ~everyone), KIND_POSITIVE_COPY: (positive, positive)}
    if policy == POLICY_DEFER:
        early = delay <= cfg.join.defer_wait_s
        return {KIND_DEFER_OBSERVED: (everyone, early), KIND_DEFER_TRUE: (everyone, positive)}
    raise ValueError(f"unknown policy {policy!r}")


#: The kind that carries each policy's final label (fake-negative: the fake negative, turned
#: into a positive by its positive copy).
FINAL_KIND = {POLICY_WAIT: KIND_FINAL, POLICY_FAKE_NEGATIVE: KIND_FAKE_NEGATIVE, POLICY_DEFER: KIND_DEFER_TRUE}


def expected_requests(cfg: Config, truth: GroundTruth) -> np.ndarray:
    """Which impressions the join samples as score requests (none under fake-negative)."""
    n = truth.impressions
    if cfg.join.policy == POLICY_FAKE_NEGATIVE:
        return np.zeros(n, dtype=bool)
    below = request_threshold(cfg.join.score_sample)
    return np.array([zlib.crc32(f"{truth.id_prefix}{i}".encode()) < below for i in range(n)], dtype=bool)


def audit(cfg: Config, truth: GroundTruth, examples: Iterator[Example]) -> dict[str, Any]:
    """Compare the examples read back with the truth: counts of lost, repeated, unexpected, mislabelled.

    ``lost``: an (impression, kind) the policy sends that never arrived; ``duplicates``: extra
    copies of one that did; ``unexpected``: an example the policy should not have sent (say a
    positive copy of an unclicked impression, or an unknown id); ``wrong_labels``: copies whose
    label differs from the truth's.
    """
    n = truth.impressions
    want = expected_kinds(cfg, truth)
    counts = {kind: np.zeros(n, dtype=np.int32) for kind in want}
    wrong = 0
    foreign = 0
    requests = np.zeros(n, dtype=np.int32)
    read = 0
    prefix, cut = truth.id_prefix, len(truth.id_prefix)
    for ex in examples:
        iid = ex.impression_id
        idx = int(iid[cut:]) if iid.startswith(prefix) and iid[cut:].isdigit() else -1
        if not 0 <= idx < n:
            foreign += ex.kind != KIND_SCORE_REQUEST
            continue
        if ex.kind == KIND_SCORE_REQUEST:
            requests[idx] += 1
            continue
        read += 1
        if ex.kind not in counts:
            foreign += 1
            continue
        counts[ex.kind][idx] += 1
        if bool(ex.label) != bool(want[ex.kind][1][idx]):
            wrong += 1
    lost = duplicates = unexpected = 0
    per_kind: dict[str, dict[str, int]] = {}
    for kind, (expected, _) in want.items():
        c = counts[kind]
        k_lost = int(np.sum(expected & (c == 0)))
        k_dup = int(np.sum(np.maximum(c - 1, 0)))
        k_unexp = int(np.sum(~expected & (c > 0)))
        per_kind[str(kind)] = {"expected": int(expected.sum()), "lost": k_lost, "duplicates": k_dup}
        lost, duplicates, unexpected = lost + k_lost, duplicates + k_dup, unexpected + k_unexp
    wanted_requests = expected_requests(cfg, truth)
    final = counts[FINAL_KIND[cfg.join.policy]]
    return {
        "policy": cfg.join.policy,
        "expected_impressions": n,
        "expected_positives": truth.clicks_within(cfg.join.window_s),
        "final_examples": int(np.sum(final > 0)),
        "examples_read": read,
        "lost": lost,
        "duplicates": duplicates,
        "unexpected": unexpected + foreign,
        "wrong_labels": wrong,
        "per_kind": per_kind,
        "score_requests_lost": int(np.sum(wanted_requests & (requests == 0))),
        "score_requests_duplicated": int(np.sum(np.maximum(requests - 1, 0))),
    }


# -- the command ----------------------------------------------------------------------------------

#: Keys summed over policies into the top level of a multi-policy report.
SUMMED = (
    "expected_impressions",
    "final_examples",
    "examples_read",
    "lost",
    "duplicates",
    "unexpected",
    "wrong_labels",
    "kills",
    "retrained_examples",
)


def chaos_speed(cfg: Config, stream_s: float) -> float:
    """Replay speed at which the synthetic traffic lasts about ``stream_s`` wall seconds."""
    sim = cfg.simulator
    impressions = sim.events / (1.0 + sim.base_ctr)
    return max(1.0, impressions / sim.impressions_per_s / max(stream_s, 1.0))


def run_chaos(
    cfg: Config,
    options: ChaosOptions,
    policies: list[str],
    *,
    quiet: bool = False,
    speed_given: bool = False,
    join_workers: int | None = None,
) -> dict[str, Any]:
    """One drilled run per policy (each on a fresh embedded broker, in ``data_dir/chaos-<policy>``).

    Returns the report: per policy under ``policies`` and, summed over them, at the top level
    (``restarts`` per stage there too); ``ok`` is true when every run ended ok with nothing lost,
    repeated, unexpected or mislabelled.
    """
    if cfg.kafka.bootstrap_servers:
        raise ValueError("livectr chaos runs on its own embedded broker: leave out --bootstrap-servers")
    base_dir = cfg.data_dir
    results: dict[str, dict[str, Any]] = {}
    for policy in policies:
        run_cfg = _for_policy(cfg, policy, base_dir / f"chaos-{policy}")
        if not speed_given:
            run_cfg.simulator.speed = chaos_speed(run_cfg, options.stream_s)
        drill = ChaosDrill(run_cfg, options)
        summary = run_pipeline(run_cfg, quiet=quiet, fresh=True, drill=drill, join_workers=join_workers)
        results[policy] = _policy_result(summary)
    return combine(results)


def _for_policy(cfg: Config, policy: str, data_dir: Path) -> Config:
    copy = config_mod.from_dict(json.loads(json.dumps(config_mod.to_dict(cfg))))
    copy.join.policy = policy
    copy.data_dir = data_dir
    return copy


def _policy_result(summary: dict[str, Any]) -> dict[str, Any]:
    keep = (
        *SUMMED,
        "policy",
        "ok",
        "audit_complete",
        "failed_stage",
        "restarts",
        "kills_requested",
        "kill_log",
        "per_kind",
        "expected_positives",
        "score_requests_lost",
        "score_requests_duplicated",
        "outage_s",
        "outage_at_s",
        "outage_cpu_s",
        "outage_cpu_share",
        "outage_cpu_share_before",
        "events_published",
        "examples_trained",
        "serving_auc",
        "elapsed_s",
    )
    out = {k: summary[k] for k in keep if k in summary}
    out["restarts"] = {stage: n for stage, n in (out.get("restarts") or {}).items() if restartable(stage)}
    out["clean"] = bool(
        summary.get("ok")
        and summary.get("audit_complete")
        and summary.get("lost", 1) == 0
        and summary.get("duplicates", 1) == 0
        and summary.get("unexpected", 1) == 0
        and summary.get("wrong_labels", 1) == 0
    )
    return out


def combine(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's top level: sums over the policies, restarts per stage, and ``ok``."""
    top: dict[str, Any] = {key: sum(int(r.get(key, 0) or 0) for r in results.values()) for key in SUMMED}
    restarts: dict[str, int] = {}
    for r in results.values():
        for stage, n in (r.get("restarts") or {}).items():
            restarts[stage] = restarts.get(stage, 0) + n
    top["restarts"] = {stage: n for stage, n in restarts.items() if restartable(stage)}
    top["restarts_total"] = sum(restarts.values())
    top["ok"] = all(r["clean"] for r in results.values())
    top["policies"] = results
    return top
