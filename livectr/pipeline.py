"""``livectr run``: the whole pipeline on one machine, each stage in its own process.

Why processes and not threads: the stages are Python and CPU-bound; on the 2-core reference
machine the producer, the join worker and the learner only overlap if the GIL does not
serialise them. Each child is the very command a user would start by hand (``livectr
produce``, ``join``, ``refresh``, ``learn``), given the resolved config as a JSON file, so
what the demo exercises is what a multi-machine deployment runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from livectr.core import bus
from livectr.core import config as config_mod
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config, SupervisorConfig
from livectr.core.metrics_log import assign_ports
from livectr.core.procs import die_with_parent
from livectr.core.status import read_json
from livectr.learner.snapshot import LearnerLock, list_versions
from livectr.simulators.sources import check_source

log = logging.getLogger(__name__)

#: Keys every run summary carries (the issue's contract), in display order.
SUMMARY_KEYS = (
    "serving_auc",
    "serving_logloss",
    "serving_cold_start_auc",
    "serving_auc_impressions",
    "oracle_auc",
    "events_published",
    "impressions",
    "clicks",
    "examples_trained",
    "positives",
    "label_order_auc",
    "label_order_logloss",
    "cold_start_auc",
    "events_per_second",
    "freshness_p50_s",
    "freshness_p99_s",
    "snapshots_published",
    "dead_letters",
)


@dataclass
class Stage:
    """One child process and the files through which it reports."""

    name: str
    args: list[str]
    run_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    ended_at: float | None = None
    log_file: Any = field(default=None, repr=False)
    #: Extra environment of the child (e.g. fault-injection settings of ``livectr chaos``).
    env: dict[str, str] = field(default_factory=dict)
    #: Times the supervisor restarted this stage, the exit codes that made it, and when the
    #: next restart is due (monotonic time; None: not waiting for one).
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    restart_at: float | None = None
    config_path: Path | None = field(default=None, repr=False)
    #: Wall time of the latest start: a status file older than this is an earlier life's.
    started_at: float = 0.0

    @property
    def status_path(self) -> Path:
        return self.run_dir / f"{self.name}.status.json"

    @property
    def summary_path(self) -> Path:
        return self.run_dir / f"{self.name}.summary.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def start(self, config_path: Path) -> None:
        self.close_log()
        # A restarted stage appends to the log of its earlier lives (whose end says why it died).
        self.log_file = open(self.log_path, "ab" if self.restarts else "wb")
        if self.restarts:
            self.log_file.write(f"\n--- restart {self.restarts} (previous exit {self.exit_codes[-1]}) ---\n".encode())
            self.log_file.flush()
        self.ended_at = None
        self.started_at = time.time()
        cmd = [
            sys.executable,
            "-m",
            "livectr",
            *self.args,
            "--config-json",
            str(config_path),
            "--status-file",
            str(self.status_path),
            "--summary-json",
            str(self.summary_path),
        ]
        # A session of its own: a terminal's Ctrl-C reaches only ``livectr run``, which stops the
        # stages in order (:func:`stop_stages`); SIGTERM when the parent dies keeps them from
        # outliving it even if it is killed outright.
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
            env={**os.environ, **self.env} if self.env else None,
        )
        self.config_path = config_path

    @property
    def pid(self) -> int | None:
        """Process id of the running child, else None."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def poll(self) -> int | None:
        code = self.proc.poll() if self.proc is not None else None
        if code is not None and self.ended_at is None:
            self.ended_at = time.time()
        return code

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def wait(self, timeout_s: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.poll()
        self.close_log()

    def close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def status(self) -> dict[str, Any]:
        return read_json(self.status_path)

    def summary(self) -> dict[str, Any]:
        return read_json(self.summary_path)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


#: Seconds the stages get to stop after SIGTERM (commit, last snapshot) before they are killed.
STOP_GRACE_S = 10.0


def stop_stages(stages: list[Stage], grace_s: float = STOP_GRACE_S, hurry: Callable[[], bool] | None = None) -> None:
    """SIGTERM every stage, wait for all of them at most ``grace_s`` in total, SIGKILL the rest.

    ``hurry()`` turning true (a second Ctrl-C) cuts the grace short.
    """
    for stage in stages:
        stage.terminate()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not (hurry is not None and hurry()):
        if all(stage.poll() is not None for stage in stages):
            break
        time.sleep(0.05)
    for stage in stages:
        if stage.poll() is None:
            log.warning("stage %s did not stop within %.0fs of SIGTERM: killing it", stage.name, grace_s)
            stage.kill()
    for stage in stages:
        stage.wait(timeout_s=10)


#: Stages the supervisor restarts when they die: each resumes from its own durable state (join
#: checkpoints and committed offsets, the learner's latest snapshot, the refresher's vector store).
#: The producer is not among them: a second publish of the same traffic would duplicate it.
RESTARTABLE = ("join", "learn", "refresh")
#: Exit code of a usage error (a bad flag or file, a held lock): a restart would fail the same way.
USAGE_EXIT = 2


def restartable(name: str) -> bool:
    """Whether the supervisor may restart stage ``name`` (``join-0``, ``learn``, ``refresh``, …)."""
    return name.split("-", 1)[0] in RESTARTABLE


def restart_delay(policy: SupervisorConfig, restarts: int) -> float:
    """Seconds before restart number ``restarts + 1``: exponential backoff, capped."""
    return min(policy.backoff_s * 2.0**restarts, policy.backoff_max_s)


class Supervisor:
    """Restarts stages that die instead of ending the run (the second line of defence).

    A stage "dies" when it exits with a non-zero code or a signal (``-9`` after SIGKILL). A
    restartable one (:func:`restartable`) is started again with the very same command line after
    :func:`restart_delay`, at most ``policy.max_restarts`` times; it resumes from its own durable
    state. A stage that exits 0 is done, one that exits with :data:`USAGE_EXIT` or runs out of
    restarts fails the run. Non-blocking: :meth:`check` is called from the run's loop.
    """

    def __init__(self, stages: dict[str, Stage], policy: SupervisorConfig) -> None:
        self.stages = stages
        self.policy = policy

    def check(self) -> str | None:
        """Start the restarts that are due, schedule new ones; the name of a stage that failed the run."""
        now = time.monotonic()
        for stage in list(self.stages.values()):
            if stage.restart_at is not None:
                if now >= stage.restart_at and stage.config_path is not None:
                    stage.restart_at = None
                    stage.restarts += 1
                    stage.start(stage.config_path)
                    log.warning("restarted stage %s (restart %d)", stage.name, stage.restarts)
                continue
            code = stage.poll()
            if code in (None, 0):
                continue
            if not restartable(stage.name) or code == USAGE_EXIT or stage.restarts >= self.policy.max_restarts:
                return stage.name
            stage.exit_codes.append(code)
            delay = restart_delay(self.policy, stage.restarts)
            stage.restart_at = now + delay
            log.warning("stage %s died (exit %d): restarting it in %.1fs", stage.name, code, delay)
        return None

    def settled(self, names: list[str]) -> bool:
        """Whether every stage in ``names`` has ended cleanly (exit 0, no restart pending)."""
        return all(self.stages[n].poll() == 0 and self.stages[n].restart_at is None for n in names)

    def restarts(self) -> dict[str, int]:
        """Restarts per stage (the summary's ``restarts``)."""
        return {name: stage.restarts for name, stage in self.stages.items()}


class Drill(Protocol):
    """Something done to a run while it goes (``livectr chaos``: kills, outages), and its report."""

    def stage_env(self) -> dict[str, str]:
        """Extra environment of every stage process."""
        ...

    def started(self, broker: EmbeddedBroker | None, stages: dict[str, Stage]) -> None:
        """The broker and every stage are up."""
        ...

    def tick(self, stages: dict[str, Stage]) -> None:
        """Called from the run's loop about twice a second (may block briefly)."""
        ...

    def report(self, cfg: Config, stages: dict[str, Stage]) -> dict[str, Any]:
        """After the stages stopped, before the broker does: keys merged into the summary."""
        ...


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached ``livectr run``: stop the stages, then the broker, then summarise."""


class _Signals:
    """SIGINT/SIGTERM handling of ``livectr run`` (restored on exit).

    The first signal raises :class:`RunInterrupted` in the main loop; once shutting down
    (``armed`` false) signals only count, and a second one cuts the stages' grace short.
    """

    def __init__(self) -> None:
        self.count = 0
        self.armed = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.armed:
            self.armed = False
            raise RunInterrupted(signal.Signals(signum).name)

    def hurry(self) -> bool:
        return self.count > 1


class DataDirInUse(RuntimeError):
    """``livectr run`` on the embedded broker would discard an earlier run's snapshots or join state."""


def earlier_stream_state(data_dir: Path) -> list[str]:
    """What an earlier stream left in ``data_dir`` that a new one would make meaningless."""
    found = []
    versions = list_versions(data_dir)
    if versions:
        found.append(f"{len(versions)} model snapshot(s) (latest v{versions[-1]:08d})")
    join = data_dir / "join-state"
    if join.is_dir() and any(p.is_file() for p in join.rglob("*")):
        found.append("join checkpoints")
    return found


def reset_stream_state(data_dir: Path) -> None:
    """Forget positions in a previous stream (join checkpoints, snapshots, stage logs, metrics).

    The semantic store is kept: teacher vectors stay valid across streams.
    """
    for name in ("join-state", "snapshots", "run", "metrics"):
        path = data_dir / name
        if path.exists():
            shutil.rmtree(path)


def prepare_embedded_data_dir(data_dir: Path, fresh: bool) -> None:
    """Make ``data_dir`` ready for a new stream on the embedded broker, never losing work silently.

    The embedded broker keeps its log in memory, so every ``livectr run`` without
    ``--bootstrap-servers`` is a new stream whose offsets mean nothing to an earlier run's join
    checkpoints and snapshots. Those are kept, and the run refused (:class:`DataDirInUse`), unless
    ``fresh`` (``--fresh``) says to discard them; a learner still running on the directory
    refuses it either way (:class:`~livectr.learner.snapshot.LearnerLockError`).
    """
    found = earlier_stream_state(data_dir)
    if found and not fresh:
        raise DataDirInUse(
            f"{data_dir} holds {' and '.join(found)} from an earlier run, which a new embedded stream "
            "would make meaningless: pass --fresh to discard them, another --data-dir to keep them, "
            "or --bootstrap-servers to continue that stream on its broker"
        )
    with LearnerLock(data_dir):
        if found:
            log.warning("--fresh: discarding %s in %s", " and ".join(found), data_dir)
        reset_stream_state(data_dir)


class Progress:
    """One live progress line (redrawn in place on a terminal, a line every few seconds otherwise)."""

    def __init__(self, out: TextIO, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet
        self.tty = out.isatty()
        self._last_line = 0.0
        self.started = time.time()

    def show(self, stages: dict[str, Stage]) -> None:
        if self.quiet:
            return
        now = time.time()
        if not self.tty and now - self._last_line < 5.0:
            return
        self._last_line = now
        prod = stages["produce"].status() if "produce" in stages else {}
        joins = [s.status() for n, s in stages.items() if n.startswith("join")]
        learn = stages["learn"].status() if "learn" in stages else {}
        refresh = stages["refresh"].status() if "refresh" in stages else {}
        parts = [
            f"[{now - self.started:6.1f}s]",
            f"published {prod.get('events_published', 0):,} ({prod.get('events_per_second', 0) / 1000:.1f}k/s)",
            f"joined {sum(j.get('examples_out', 0) for j in joins):,}",
            f"trained {learn.get('examples_trained', 0):,} ({learn.get('examples_per_second', 0) / 1000:.1f}k/s)",
            f"AUC {learn.get('serving_auc', float('nan')):.4f} (served, {learn.get('serving_auc_impressions', 0):,} impressions)",
            f"logloss {learn.get('serving_logloss', float('nan')):.4f}",
        ]
        if refresh:
            parts.append(f"teacher {refresh.get('texts_encoded', 0):,} texts")
        dead = prod.get("dead_letters", 0) + sum(j.get("dead_letters", 0) for j in joins) + learn.get("dead_letters", 0)
        parts.append(f"dead letters {dead}")
        line = " | ".join(parts)
        if self.tty:
            self.out.write("\r\033[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and not self.quiet:
            self.out.write("\n")
            self.out.flush()


def _plan(
    cfg: Config, log_path: Path | None, items_path: Path | None, forever: bool, join_workers: int
) -> dict[str, list[str]]:
    """The stage commands, in start order (consumers first, so nothing waits on a producer)."""
    tail = ["--forever"] if forever else []
    plan: dict[str, list[str]] = {}
    if cfg.semantic.enabled:
        plan["refresh"] = ["refresh"]
    for i in range(join_workers):
        plan[f"join-{i}"] = ["join", "--worker-id", f"join-{i}", *tail]
    plan["learn"] = ["learn", *tail]
    produce = ["produce", "--no-progress"]
    if log_path is not None:
        produce += ["--log", str(log_path)]
        if items_path is not None:
            produce += ["--items", str(items_path)]
    plan["produce"] = produce
    assign_ports(plan, cfg.metrics.port)  # --metrics-port BASE: join workers, learn, refresh
    return plan


def _start(stage: Stage, config_path: Path) -> Stage:
    stage.start(config_path)
    return stage


class StageFailed(RuntimeError):
    """A stage exited with an error (or did not get ready) before the pipeline could go on."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


#: ``livectr run`` starts the traffic once the consumers are in place, or at most this long after.
CONSUMERS_READY_S = 60.0


def _fresh_status(stage: Stage) -> dict[str, Any]:
    """The stage's status file if this life of the stage wrote it (not one left by an earlier run)."""
    try:
        if not stage.started_at or stage.status_path.stat().st_mtime < stage.started_at:
            return {}
    except OSError:
        return {}
    return stage.status()


def _wait_for_consumers(stages: dict[str, Stage], cfg: Config, timeout_s: float = CONSUMERS_READY_S) -> None:
    """Hold the producer until every impressions partition has a join worker and the learner runs.

    Why: a join worker's first consumer-group join takes seconds (about half the session
    timeout), and the learner's start (torch) a few more. Traffic published meanwhile waits
    for them, so in a paced run the first seconds' examples were the slowest of the whole run
    (docs/benchmarks.md, "Rollback over Kafka, freshness with the caught-up clock"): a start-up
    cost, not steady state. A stage that fails meanwhile, or the timeout, ends the wait (the
    supervisor then reports or restarts the stage as usual).
    """
    joins = [st for name, st in stages.items() if name.startswith("join-")]
    want = set(range(bus.partition_count(cfg.kafka, cfg.topics.impressions)))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(st.poll() not in (None, 0) for st in stages.values()):
            return  # failed: the supervisor takes it from here
        owned: set[int] = set()
        for st in joins:
            owned.update(int(p) for p in _fresh_status(st).get("partitions") or [])
        if owned >= want and ("learn" not in stages or _fresh_status(stages["learn"])):
            return
        time.sleep(0.1)
    log.warning("starting the traffic: the join workers or the learner were not ready within %.0f s", timeout_s)


def _warm_catalogue(
    stages: dict[str, Stage],
    produce_args: list[str],
    run_dir: Path,
    config_path: Path,
    quiet: bool,
    timeout_s: float = 300.0,
) -> None:
    """Publish the catalogue ahead of the traffic and wait until the teacher has encoded it.

    A deployment's semantic cache is warm for the items that already exist; what the demo
    should exercise asynchronously is the items born during the stream. The refresher's status
    file appears once its teacher is loaded.
    """
    refresh = stages["refresh"]
    catalogue = _start(Stage("catalogue", [*produce_args, "--catalogue-only"], run_dir), config_path)
    stages["catalogue"] = catalogue
    deadline = time.monotonic() + timeout_s
    announced = 0.0
    while time.monotonic() < deadline:
        for stage in (refresh, catalogue):
            code = stage.poll()
            if code not in (None, 0):
                raise StageFailed(stage.name, f"stage {stage.name} failed (exit {code})")
        st, items = refresh.status(), catalogue.summary().get("items")
        if items == 0 and catalogue.poll() == 0:
            return  # no catalogue ahead of the traffic: every item goes through the miss-and-fill path
        if (
            items is not None
            and st.get("reducer_fitted")
            and st.get("items_seen", 0) >= items
            and st.get("queue_depth", 1) == 0
        ):
            return
        if not quiet and time.monotonic() - announced >= 5.0:
            announced = time.monotonic()
            sys.stderr.write(
                f"warming the semantic cache: {st.get('texts_encoded', 0):,} item texts encoded"
                f" of {items if items is not None else '…'}\n"
            )
        time.sleep(0.25)
    raise StageFailed("refresh", f"the semantic cache did not warm up within {timeout_s:.0f}s")


def merge_summaries(stages: dict[str, Stage], cfg: Config, started: float) -> dict[str, Any]:
    """The run summary: the issue's keys first, then per-stage details."""

    def summary_of(name: str) -> dict[str, Any]:
        return stages[name].summary() if name in stages else {}

    prod, learn, refresh = summary_of("produce"), summary_of("learn"), summary_of("refresh")
    joins = {n: s.summary() for n, s in stages.items() if n.startswith("join")}
    first = prod.get("first_publish_wall") or started
    end = (stages["learn"].ended_at if "learn" in stages else None) or time.time()
    dead = (
        prod.get("dead_letters", 0)
        + sum(j.get("dead_letters", 0) for j in joins.values())
        + learn.get("dead_letters", 0)
        + refresh.get("dead_letters", 0)
    )
    summary: dict[str, Any] = {
        "serving_auc": learn.get("serving_auc"),
        "serving_logloss": learn.get("serving_logloss"),
        "serving_cold_start_auc": learn.get("serving_cold_start_auc"),
        "serving_auc_impressions": learn.get("serving_auc_impressions", 0),
        "events_published": prod.get("events_published", 0),
        "impressions": prod.get("impressions", 0),
        "clicks": prod.get("clicks", 0),
        "examples_trained": learn.get("examples_trained", 0),
        "positives": learn.get("positives", 0),
        "real_negatives_left_out": learn.get("real_negatives_left_out", 0),
        "defer_hold_s": learn.get("defer_hold_s", 0.0),
        "defer_negatives_held": learn.get("defer_negatives_held", 0),
        "label_order_auc": learn.get("label_order_auc"),
        "label_order_logloss": learn.get("label_order_logloss"),
        "progressive_auc": learn.get("progressive_auc"),
        "progressive_logloss": learn.get("progressive_logloss"),
        "cold_start_auc": learn.get("cold_start_auc"),
        "events_per_second": prod.get("events_published", 0) / max(end - first, 1e-9),
        "freshness_p50_s": learn.get("freshness_p50_s"),
        "freshness_p99_s": learn.get("freshness_p99_s"),
        "snapshots_published": learn.get("snapshots_published", 0),
        "dead_letters": dead,
        "policy": cfg.join.policy,
        "semantics": cfg.semantic.enabled,
        "elapsed_s": time.time() - started,
        "stages": {name: stage.summary() for name, stage in stages.items()},
    }
    for key in ("oracle_auc", "oracle_logloss"):
        if prod.get(key) is not None:
            summary[key] = prod[key]
    for key in ("semantic_miss_rate", "semantic_staleness_p50_s", "semantic_staleness_p99_s"):
        # A worker without samples reports NaN; it says nothing about the others.
        values = [j[key] for j in joins.values() if key in j and j[key] == j[key]]
        if values:
            summary[key] = sum(values) / len(values)
    for key in ("gate_usage", "distill_loss", "items_cold_started"):
        if key in learn:
            summary[key] = learn[key]
    return summary


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    """Human-readable summary table."""
    out.write("\nlivectr run summary\n")
    keys = [*SUMMARY_KEYS, "policy", "semantic_miss_rate", "gate_usage", "elapsed_s"]
    for key in keys:
        if key not in summary or summary[key] is None:
            continue
        value = summary[key]
        text = f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
        out.write(f"  {key:<24} {text}\n")
    restarted = {name: n for name, n in (summary.get("restarts") or {}).items() if n}
    if restarted:
        out.write(f"  {'restarts':<24} {', '.join(f'{name} {n}' for name, n in restarted.items())}\n")
    out.flush()


def run_pipeline(
    cfg: Config,
    *,
    log_path: Path | None = None,
    items_path: Path | None = None,
    forever: bool = False,
    join_workers: int | None = None,
    quiet: bool = False,
    warm_catalogue: bool = True,
    fresh: bool = False,
    drill: Drill | None = None,
) -> dict[str, Any]:
    """Start the broker if needed, every stage as a child process, show progress, return the summary.

    Checks first, before any broker or stage starts (so a bad command line fails in seconds
    with one clear error, not a child's traceback): the replay files
    (:class:`~livectr.simulators.replay.ReplayInputError`) and, with ``--bootstrap-servers``,
    that a broker answers (:class:`~livectr.core.bus.BrokerUnreachable`); without, that the
    data dir holds no earlier stream's state unless ``fresh`` (:func:`prepare_embedded_data_dir`).

    A stage that dies is restarted (:class:`Supervisor`); ``drill`` (``livectr chaos``) acts on
    the run while it goes and adds its report to the summary.
    """
    check_source(log_path, items_path)
    if cfg.kafka.bootstrap_servers:
        bus.check_reachable(cfg.kafka)
    else:
        prepare_embedded_data_dir(cfg.data_dir, fresh)
    with _Signals() as signals:
        return _run(cfg, log_path, items_path, forever, join_workers, quiet, warm_catalogue, signals, drill)


def _run(
    cfg: Config,
    log_path: Path | None,
    items_path: Path | None,
    forever: bool,
    join_workers: int | None,
    quiet: bool,
    warm_catalogue: bool,
    signals: _Signals,
    drill: Drill | None = None,
) -> dict[str, Any]:
    """The body of :func:`run_pipeline`, with its signal handlers installed.

    However it ends (the stages done, one failed, SIGINT or SIGTERM), the stages are stopped
    (:func:`stop_stages`), then the broker, and the summary is printed.
    """
    started = time.time()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedBroker | None = None
    stages: dict[str, Stage] = {}
    progress = Progress(sys.stderr, quiet)
    supervisor = Supervisor(stages, cfg.supervisor)
    env = drill.stage_env() if drill is not None else {}
    interrupted = False
    try:
        failed: str | None = None
        try:
            if not cfg.kafka.bootstrap_servers:
                broker = EmbeddedBroker(log_path=cfg.data_dir / "broker.log").start()
                cfg.kafka.bootstrap_servers = broker.bootstrap_servers
                log.info("embedded broker (tansu) on %s", broker.bootstrap_servers)
            bus.ensure_topics(cfg)
            run_dir = cfg.data_dir / "run"
            run_dir.mkdir(parents=True, exist_ok=True)
            config_path = run_dir / "config.json"
            config_path.write_text(json.dumps(config_mod.to_dict(cfg), indent=2))
            plan = _plan(cfg, log_path, items_path, forever, join_workers or cfg.join.workers)
            if "refresh" in plan:
                stages["refresh"] = _start(Stage("refresh", plan.pop("refresh"), run_dir, env=env), config_path)
                if warm_catalogue:
                    _warm_catalogue(stages, plan["produce"], run_dir, config_path, quiet)
            for name, args in plan.items():
                if name == "produce":
                    _wait_for_consumers(stages, cfg)
                stages[name] = _start(Stage(name, args, run_dir, env=env), config_path)
            bounded = [n for n in stages if n != "refresh"]
            if drill is not None:
                drill.started(broker, stages)
            while True:
                progress.show(stages)
                failed = supervisor.check()
                if failed or supervisor.settled(bounded):
                    break
                if drill is not None:
                    drill.tick(stages)
                time.sleep(0.5)
        except KeyboardInterrupt as exc:
            interrupted = True
            if not quiet:
                reason = f" ({exc})" if isinstance(exc, RunInterrupted) else ""
                sys.stderr.write(f"\ninterrupted{reason}: stopping the stages\n")
        except StageFailed as exc:
            failed = exc.stage
        finally:
            signals.armed = False  # from here on a signal only hurries the stop
        progress.done()
        stop_stages(list(stages.values()), hurry=signals.hurry)
        summary = merge_summaries(stages, cfg, started)
        summary["ok"] = failed is None
        summary["interrupted"] = interrupted
        summary["restarts"] = supervisor.restarts()
        if drill is not None:
            summary.update(drill.report(cfg, stages))
        if failed:
            summary["failed_stage"] = failed
            sys.stderr.write(
                f"\nstage {failed} failed (exit code {stages[failed].poll()}); the end of its log "
                f"({stages[failed].log_path}):\n{stages[failed].log_tail()}\n"
            )
        print_summary(summary, sys.stdout)
        return summary
    finally:
        stop_stages(list(stages.values()), grace_s=2.0, hurry=signals.hurry)
        if broker is not None:
            broker.stop()
