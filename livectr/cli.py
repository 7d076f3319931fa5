"""The ``livectr`` command line: one command per stage, plus ``run`` that wires them all.

Every stage command (``produce``, ``join``, ``refresh``, ``learn``, ``serve``) is what
``livectr run`` starts as a child process, so a user can scale out by starting the same
commands on several machines against one Kafka cluster. Flags override environment
variables (``LIVECTR_<SECTION>__<FIELD>``), which override defaults (see ``livectr.core.config``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from livectr.chaos import ChaosOptions, run_chaos
from livectr.core import bus
from livectr.core import config as config_mod
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config, ConfigError
from livectr.core.events import DecodeError, Impression, decode_event
from livectr.core.metrics_log import StageRecorder, StatusCallback, open_recorder
from livectr.core.procs import stop_on_signals
from livectr.core.status import StatusFile, write_json_atomic
from livectr.learner import snapshots_cli
from livectr.learner.loop import run_learner
from livectr.learner.online import real_negative_share
from livectr.learner.scorer import Scorer
from livectr.learner.serve import serve
from livectr.learner.snapshot import LearnerLock, LearnerLockError, RollbackRefused, SnapshotError
from livectr.pipeline import DataDirInUse, run_pipeline
from livectr.report import NoMetrics, write_report
from livectr.semantic_cache.client import SemanticCacheClient
from livectr.semantic_cache.refresher import run_refresher
from livectr.semantic_cache.similar import similar
from livectr.simulators.ml100k import convert_ml100k
from livectr.simulators.publish import publish
from livectr.simulators.replay import ReplayInputError
from livectr.simulators.sources import check_source, leading_items, open_source
from livectr.streams.join import POLICIES
from livectr.streams.worker import run_join_worker

log = logging.getLogger("livectr")

#: Errors that mean "fix the command line or the environment": one line on stderr, exit 2.
USAGE_ERRORS: tuple[type[Exception], ...] = (
    ReplayInputError,
    bus.BrokerUnreachable,
    bus.InvalidKafkaOptions,
    ConfigError,
    LearnerLockError,
    DataDirInUse,
)

#: flag → (config key, type, help). Only flags the user actually gives override the config.
CONFIG_FLAGS: dict[str, tuple[str, type, str]] = {
    "--bootstrap-servers": (
        "kafka.bootstrap_servers",
        str,
        "Kafka bootstrap servers HOST:PORT (default: start the embedded broker)",
    ),
    "--topic-prefix": ("kafka.topic_prefix", str, "prefix of every topic name (default livectr.)"),
    "--security-protocol": (
        "kafka.security_protocol",
        str,
        "Kafka security.protocol: PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL (password: env LIVECTR_KAFKA__SASL_PASSWORD)",
    ),
    "--sasl-mechanism": (
        "kafka.sasl_mechanism",
        str,
        "Kafka sasl.mechanism: PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | …",
    ),
    "--sasl-username": ("kafka.sasl_username", str, "Kafka sasl.username"),
    "--ssl-ca-location": ("kafka.ssl_ca_location", str, "Kafka ssl.ca.location: CA certificate file of the brokers"),
    "--partitions": ("kafka.partitions", int, "partitions of the topics livectr creates"),
    "--data-dir": ("data_dir", Path, "snapshots and state (default ./livectr-data)"),
    "--events": ("simulator.events", int, "synthetic events to publish (impressions + clicks)"),
    "--seed": ("simulator.seed", int, "seed of the synthetic world"),
    "--users": ("simulator.users", int, "synthetic users"),
    "--items-count": ("simulator.items", int, "synthetic items"),
    "--speed": (
        "simulator.speed",
        float,
        "replay speed: 0 = as fast as possible, 1 = real time, 60 = a minute per second",
    ),
    "--window-s": ("join.window_s", float, "attribution window in event-time seconds (default 600)"),
    "--policy": ("join.policy", str, "labelling policy: defer (default) | fake-negative | wait"),
    "--defer-wait-s": ("join.defer_wait_s", float, "policy defer: the waiting window before a negative is sent (s)"),
    "--score-sample": (
        "join.score_sample",
        float,
        "fraction of impressions scored at impression time for serving_auc (0-1)",
    ),
    "--group-id": ("join.group_id", str, "consumer group of the join workers"),
    "--repartition": (
        "join.repartition",
        str,
        "on (default) | off: re-key impressions and clicks by impression id, whatever the producers' partitioner",
    ),
    "--caught-up-clock": (
        "join.caught_up_clock",
        str,
        "a join source at the end of its partition runs on with the wall clock: unbounded (default: "
        "live runs) | always (paced bounded runs too) | off",
    ),
    "--user-profile-ttl-s": (
        "semantic.user_profile_ttl_s",
        float,
        "forget a user's click profile after this long without a click (event-time s; 0 = never)",
    ),
    "--batch-size": ("learner.batch_size", int, "learner mini-batch size"),
    "--lr": ("learner.lr", float, "learning rate"),
    "--device": ("learner.device", str, "auto | cpu | cuda"),
    "--real-negatives": (
        "learner.real_negatives",
        str,
        "policy defer: real negatives trained on — score (by the model's click probability) | all | a share 0-1",
    ),
    "--threads": ("learner.threads", int, "torch threads of the learner"),
    "--word-buckets": (
        "learner.word_buckets",
        int,
        "user × item-word weights from item texts, hashed into N buckets (default 1048576; 0 = off)",
    ),
    "--nice": (
        "learner.nice",
        int,
        "run the learner at this CPU niceness, 0-19 (on a host shared with `livectr serve`: requests first)",
    ),
    "--snapshot-every-s": ("learner.snapshot_every_s", float, "publish a snapshot every N seconds"),
    "--snapshot-every-examples": ("learner.snapshot_every_examples", int, "… or every M examples"),
    "--enrich": ("semantic.enrich", str, "LLM enrichment back-end: '' | openai | hf"),
    "--enrich-url": ("semantic.enrich_url", str, "OpenAI-compatible endpoint base URL"),
    "--enrich-model": ("semantic.enrich_model", str, "model name (openai) or local path (hf)"),
    "--delta-every-s": (
        "learner.delta_every_s",
        float,
        "publish the rows touched since the last publish on the model-updates topic every N seconds (0: off)",
    ),
    "--user-ttl-s": (
        "learner.user_ttl_s",
        float,
        "free a user's model row after this long without an example (event-time s; 0 = never)",
    ),
    "--item-ttl-s": (
        "learner.item_ttl_s",
        float,
        "free an item's model row after this long without an example (event-time s; 0 = never)",
    ),
    "--admit-min-count": (
        "learner.admit_min_count",
        int,
        "give an id its own model row only after this many impressions (default 1: at once)",
    ),
    "--reload-ms": ("learner.scorer_reload_ms", int, "check the latest snapshot pointer every N ms (default 500)"),
    "--max-body-bytes": ("serve.max_body_bytes", int, "refuse larger request bodies with 413 (default 8 MiB)"),
    "--max-candidates": ("serve.max_candidates", int, "refuse requests with more candidates with 413 (default 10000)"),
    "--inline-candidates": (
        "serve.inline_candidates",
        int,
        "score requests of up to N candidates on the event loop, larger ones in a worker thread (default 512; 0: always a thread)",
    ),
    "--metrics-port": (
        "metrics.port",
        int,
        "serve Prometheus /metrics on this port (0 = off); `run`: join workers, learner, refresher on PORT, PORT+1, …",
    ),
    "--max-restarts": (
        "supervisor.max_restarts",
        int,
        "restart a stage that dies at most N times before the run fails (default 5; 0 = never)",
    ),
    "--restart-backoff-s": (
        "supervisor.backoff_s",
        float,
        "wait before restarting a dead stage, doubled per restart (default 1 s)",
    ),
}

#: Flags of `livectr serve` only (`livectr run` starts no scorer).
SERVE_FLAGS = ("--reload-ms", "--max-body-bytes", "--max-candidates", "--inline-candidates")


def _add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for flag in names:
        key, typ, help_text = CONFIG_FLAGS[flag]
        parser.add_argument(flag, dest=f"cfg:{key}", type=typ, default=None, help=help_text)


#: Flags of every command that talks to Kafka.
KAFKA_FLAGS = (
    "--bootstrap-servers",
    "--topic-prefix",
    "--security-protocol",
    "--sasl-mechanism",
    "--sasl-username",
    "--ssl-ca-location",
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    _add_config_flags(parser, [*KAFKA_FLAGS, "--partitions", "--data-dir"])
    parser.add_argument(
        "--kafka-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any librdkafka property for every Kafka client (repeatable), e.g. ssl.certificate.location=…; "
        "secrets only via env: LIVECTR_KAFKA__SASL_PASSWORD, LIVECTR_KAFKA__EXTRA='ssl.key.password=…'",
    )
    parser.add_argument(
        "--semantics", choices=["on", "off"], default=None, help="semantic cache and distillation (default on)"
    )
    parser.add_argument("--config-json", type=Path, default=None, help="start from a config written by `livectr run`")
    parser.add_argument("--status-file", type=Path, default=None, help="write live counters here (JSON)")
    parser.add_argument("--summary-json", type=Path, default=None, help="write the final summary here (JSON)")
    parser.add_argument("-v", "--verbose", action="store_true")


def build_config(args: argparse.Namespace) -> Config:
    """Defaults < env < --config-json < flags."""
    if args.config_json is not None:
        cfg = config_mod.from_dict(json.loads(args.config_json.read_text()))
    else:
        cfg = config_mod.from_env()
    overrides = {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    config_mod.apply_overrides(cfg, overrides)
    _add_kafka_options(cfg, getattr(args, "kafka_option", None) or [])
    if getattr(args, "semantics", None) is not None:
        cfg.semantic.enabled = args.semantics == "on"
    config_mod.validate(cfg, flags={key: flag for flag, (key, _, _) in CONFIG_FLAGS.items()})
    if cfg.join.policy not in POLICIES:
        raise SystemExit(f"--policy must be one of {', '.join(POLICIES)}, not {cfg.join.policy!r}")
    if cfg.join.policy == "defer" and not 0 <= cfg.join.defer_wait_s < cfg.join.window_s:
        raise SystemExit(
            f"--defer-wait-s must be at least 0 and below --window-s ({cfg.join.window_s:g}), not {cfg.join.defer_wait_s:g}"
        )
    try:
        real_negative_share(cfg.learner.real_negatives)
    except ValueError:
        raise SystemExit(
            f"--real-negatives must be score, all or a share in [0, 1], not {cfg.learner.real_negatives!r}"
        ) from None
    return cfg


def _add_kafka_options(cfg: Config, given: list[str]) -> None:
    """Append ``--kafka-option KEY=VALUE`` flags to ``kafka.extra``; a secret on the command line
    (visible to every user in the process list) is refused."""
    options = config_mod.parse_options(cfg.kafka.extra)
    for entry in given:
        parsed = config_mod.parse_options(entry) if "=" in entry else {}
        if len(parsed) != 1:
            raise ConfigError(f"--kafka-option wants one KEY=VALUE, not {entry.split('=')[0][:40]!r}")
        key = next(iter(parsed))
        if config_mod.is_secret_option(key):
            raise ConfigError(
                f"--kafka-option {key}=… would show a secret in the process list: "
                f"set it in the environment (LIVECTR_KAFKA__EXTRA='{key}=…'"
                + (" or LIVECTR_KAFKA__SASL_PASSWORD)" if key == "sasl.password" else ")")
            )
        options.update(parsed)
    if given:
        cfg.kafka.extra = config_mod.format_options(options)


def _require_broker(cfg: Config) -> None:
    if not cfg.kafka.bootstrap_servers:
        raise SystemExit(
            "this command needs --bootstrap-servers (or LIVECTR_KAFKA__BOOTSTRAP_SERVERS); "
            "`livectr run` and `livectr broker` start an embedded one"
        )
    bus.check_options(cfg.kafka)


def _stop_on_signals() -> threading.Event:
    """A stop event set by SIGINT/SIGTERM so stages finish their current step and exit cleanly
    (within a bounded time, a second signal at once: :func:`~livectr.core.procs.stop_on_signals`)."""
    return stop_on_signals()


#: Stages that serve /metrics when given a port (the others only record samples).
METRICS_STAGES = ("join", "learn", "refresh")


def _recorder(cfg: Config, args: argparse.Namespace, stage: str) -> StageRecorder:
    """The stage's metrics recorder (:mod:`livectr.core.metrics_log`); a busy port is a usage error."""
    port = None if args.command in METRICS_STAGES else 0
    try:
        return open_recorder(cfg, stage, port)
    except OSError as exc:
        raise SystemExit(
            f"livectr {args.command}: cannot serve /metrics on {cfg.metrics.host}:{cfg.metrics.port}: {exc}"
        ) from None


def _run_stage(
    args: argparse.Namespace,
    body: Callable[[Config, StatusCallback, threading.Event], dict[str, Any]],
    stage: str | None = None,
) -> int:
    """Common wrapper of a stage command: config, signals, status file and metrics, summary output."""
    cfg = build_config(args)
    _require_broker(cfg)
    stop = _stop_on_signals()
    status = StatusFile(args.status_file)
    recorder = _recorder(cfg, args, stage or args.command)
    try:
        summary = body(cfg, recorder.chain(status), stop)
    finally:
        recorder.close()
    status.close()
    if args.summary_json is not None:
        write_json_atomic(args.summary_json, summary)
    print(json.dumps(summary, indent=2, default=float))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:

    def body(cfg: Config, status: StatusCallback, stop: threading.Event) -> dict[str, Any]:
        check_source(args.log, args.items)  # fail fast: bad files, then an unreachable broker
        bus.check_reachable(cfg.kafka)
        bus.ensure_topics(cfg)
        source = open_source(cfg, log=args.log, items=args.items)
        events = leading_items(source.events) if args.catalogue_only else source.events
        log.info("publishing %s%s", "the catalogue of " if args.catalogue_only else "", source.description)
        summary = publish(
            cfg,
            events,
            producer_id=args.producer_id,
            speed=cfg.simulator.speed,
            progress=cfg.simulator.progress and not args.no_progress,
            on_status=status,
            stop=stop,
            end_markers=not args.catalogue_only,
        )
        if source.truth is not None and not args.catalogue_only and not stop.is_set():
            # The best any model can do on these impressions: the simulator's true probabilities.
            summary.update(source.truth.oracle_scores(cfg.join.window_s))
        return summary

    return _run_stage(args, body, stage="catalogue" if args.catalogue_only else "produce")


def cmd_join(args: argparse.Namespace) -> int:

    def body(cfg: Config, status: StatusCallback, stop: threading.Event) -> dict[str, Any]:
        bus.ensure_topics(cfg)
        semantics = None
        if cfg.semantic.enabled:
            semantics = SemanticCacheClient(cfg)
        try:
            summary = run_join_worker(
                cfg,
                worker_id=args.worker_id,
                semantics=semantics,
                on_status=status if semantics is None else _with_cache_counts(status, semantics),
                stop=stop,
                bounded=not args.forever,
            )
        finally:
            if semantics is not None:
                semantics.close()
        if semantics is not None:
            summary.update({f"semantic_{k}": v for k, v in semantics.stats().items()})
        return summary

    return _run_stage(args, body, stage=args.worker_id)


def _with_cache_counts(status: StatusCallback, semantics: SemanticCacheClient) -> StatusCallback:
    """The join's status plus the semantic cache's lookup counters (its miss rate over time)."""

    def report(counters: dict[str, Any]) -> None:
        lookups, misses = semantics.item_lookups, semantics.item_misses
        status(
            {
                **counters,
                "semantic_lookups": lookups,
                "semantic_misses": misses,
                "semantic_miss_rate": misses / lookups if lookups else 0.0,
            }
        )

    return report


def cmd_refresh(args: argparse.Namespace) -> int:

    def body(cfg: Config, status: StatusCallback, stop: threading.Event) -> dict[str, Any]:
        bus.ensure_topics(cfg)
        return run_refresher(cfg, on_status=status, stop=stop)

    return _run_stage(args, body)


def cmd_learn(args: argparse.Namespace) -> int:

    def body(cfg: Config, status: StatusCallback, stop: threading.Event) -> dict[str, Any]:
        LearnerLock(cfg.data_dir).acquire().release()  # fail at once, before any broker call
        if cfg.learner.nice:
            os.nice(cfg.learner.nice)  # this stage's process only (never a test's, which calls run_learner)
        bus.ensure_topics(cfg)
        return run_learner(cfg, on_status=status, stop=stop, bounded=not args.forever)

    return _run_stage(args, body)


def cmd_run(args: argparse.Namespace) -> int:

    cfg = build_config(args)
    bus.check_options(cfg.kafka)
    if args.fresh and cfg.kafka.bootstrap_servers:
        raise SystemExit("livectr run: --fresh only applies to the embedded broker (a run without --bootstrap-servers)")
    summary = run_pipeline(
        cfg,
        log_path=args.log,
        items_path=args.items,
        forever=args.forever,
        join_workers=args.join_workers,
        quiet=args.quiet,
        warm_catalogue=not args.cold_cache,
        fresh=args.fresh,
    )
    if args.summary_json is not None:
        write_json_atomic(args.summary_json, summary)
    return 0 if summary.get("ok", False) else 1


def cmd_chaos(args: argparse.Namespace) -> int:
    """``livectr chaos``: drilled runs (kills, an optional broker outage), audited against the truth."""
    cfg = build_config(args)
    policies = [p.strip() for p in (args.policies or cfg.join.policy).split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"--policies: unknown policy {', '.join(unknown)}; expected {', '.join(POLICIES)}")
    if cfg.kafka.bootstrap_servers:
        raise SystemExit("livectr chaos starts its own embedded broker: leave out --bootstrap-servers")
    if args.kills < 0:
        raise SystemExit(f"--kills must be 0 or more, not {args.kills}")
    options = ChaosOptions(
        kills=args.kills,
        seed=cfg.simulator.seed if args.kill_seed is None else args.kill_seed,
        stream_s=args.stream_s,
        hold_s=args.hold_s,
        aim_timeout_s=args.aim_timeout_s,
        outage_s=args.outage_s,
        outage_at=args.outage_at,
    )
    speed_given = getattr(args, "cfg:simulator.speed") is not None
    report = run_chaos(
        cfg, options, policies, quiet=args.quiet, speed_given=speed_given, join_workers=args.join_workers
    )
    if args.summary_json is not None:
        write_json_atomic(args.summary_json, report)
    keys = ("expected_impressions", "final_examples", "lost", "duplicates", "unexpected", "wrong_labels", "kills")
    for policy, r in report["policies"].items():
        line = ", ".join(f"{k} {r.get(k)}" for k in keys)
        print(f"chaos {policy}: {line}, restarts {r.get('restarts')}, retrained {r.get('retrained_examples')}")
    print(f"chaos: {'ok' if report['ok'] else 'FAILED'} (lost {report['lost']}, duplicates {report['duplicates']})")
    return 0 if report["ok"] else 1


def cmd_broker(args: argparse.Namespace) -> int:

    stop = _stop_on_signals()
    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded Kafka broker (tansu, in memory) on {broker.bootstrap_servers}; Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


def cmd_topics(args: argparse.Namespace) -> int:

    cfg = build_config(args)
    _require_broker(cfg)
    topics = bus.ensure_topics(cfg)
    print(json.dumps(topics.__dict__, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:

    cfg = build_config(args)
    serve(cfg, args.host, args.port)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score impressions (JSON lines on stdin) with the latest snapshot; one probability per line."""

    cfg = build_config(args)
    scorer = Scorer(cfg.data_dir, reload_ms=cfg.learner.scorer_reload_ms, cfg=cfg)
    for line in sys.stdin.buffer:
        line = line.strip()
        if not line:
            continue
        try:
            event = decode_event(line)
            if not isinstance(event, Impression):
                raise DecodeError(f"expected an impression, got {type(event).__name__.lower()}")
        except DecodeError as exc:
            print(json.dumps({"error": exc.reason}), flush=True)
            continue
        scores, version = scorer.score_versioned([event])
        print(
            json.dumps({"impression_id": event.impression_id, "score": float(scores[0]), "version": version}),
            flush=True,
        )
    return 0


def cmd_similar(args: argparse.Namespace) -> int:

    cfg = build_config(args)
    neighbours = similar(cfg, args.item_id, k=args.k)
    if not neighbours:
        print(f"no vector stored for item {args.item_id!r} under {cfg.data_dir / 'semantic'}", file=sys.stderr)
        return 1
    for item_id, score, text in neighbours:
        print(f"{score:6.3f}  {item_id:>10}  {text}")
    return 0


def cmd_convert_ml100k(args: argparse.Namespace) -> int:

    events, items = convert_ml100k(args.src, args.out)
    print(f"events: {events}\nitems:  {items}\nrun:    livectr run --log {events} --items {items}")
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    """``snapshots list | show | diff | rollback``: read-only except rollback (the ``latest`` pointer)."""

    data_dir = args.data_dir if args.data_dir is not None else config_mod.from_env().data_dir
    action = args.snapshots_command
    try:
        if action == "list":
            report = snapshots_cli.list_report(data_dir)
            text = snapshots_cli.format_list(report)
        elif action == "show":
            report = snapshots_cli.show_report(data_dir, args.version)
            text = snapshots_cli.format_show(report)
        elif action == "diff":
            report = snapshots_cli.diff_report(data_dir, args.v1, args.v2)
            text = snapshots_cli.format_diff(report)
        else:
            cfg = build_config(args)
            data_dir = args.data_dir if args.data_dir is not None else cfg.data_dir  # --config-json's too
            cfg.data_dir = Path(data_dir)
            if cfg.kafka.bootstrap_servers:
                bus.check_options(cfg.kafka)
            report = snapshots_cli.rollback_report(cfg, args.version, force=args.force, wait_s=args.wait_s)
            text = snapshots_cli.rollback_message(data_dir, report)
    except (RollbackRefused, SnapshotError, FileNotFoundError) as exc:
        print(f"livectr snapshots {action}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if getattr(args, "json", False) else text)
    return 0 if action != "show" or report["verified"] else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Write the run's HTML report (plots of the metrics its stages recorded)."""

    data_dir = args.data_dir if args.data_dir is not None else config_mod.from_env().data_dir
    try:
        path = write_report(data_dir, args.out)
    except NoMetrics as exc:
        print(f"livectr report: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


def _add_snapshots_parser(sub: Any) -> None:
    snaps = sub.add_parser("snapshots", help="list, inspect, compare published snapshots; roll back latest")
    snaps.set_defaults(func=cmd_snapshots)
    actions = snaps.add_subparsers(dest="snapshots_command", required=True)

    def action(name: str, help_text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--data-dir", type=Path, default=None, help="data dir (default ./livectr-data)")
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("-v", "--verbose", action="store_true")
        return p

    action("list", "one line per version; * marks the one latest points to")
    show = action("show", "a version's manifest, file sizes and checksum verification (exit 1 if corrupt)")
    show.add_argument("version", type=int)
    diff = action("diff", "what changed between two versions: examples, metrics, config, tensors, vocabulary")
    diff.add_argument("v1", type=int)
    diff.add_argument("v2", type=int)
    rb = action(
        "rollback",
        "point latest at VERSION (verified); scorers and the learner (running or next) follow; with "
        "--bootstrap-servers Kafka-only scorers too, within seconds",
    )
    rb.add_argument("version", type=int)
    rb.add_argument(
        "--force",
        action="store_true",
        help="move latest even while a learner that takes no rollback requests holds the data dir's lock",
    )
    rb.add_argument(
        "--wait-s", type=float, default=30.0, help="wait this long for a running learner to roll back (default 30)"
    )
    _add_config_flags(rb, list(KAFKA_FLAGS))
    rb.add_argument("--kafka-option", action="append", default=[], metavar="KEY=VALUE", help="a librdkafka property")
    rb.add_argument("--config-json", type=Path, default=None, help="start from a config written by `livectr run`")


def _add_chaos_parser(sub: Any) -> None:
    chaos = sub.add_parser(
        "chaos",
        help="SIGKILL the join, learner and refresher during a run (and optionally freeze the broker); "
        "audit every label against the simulator's truth (exit 1 if any is lost or repeated)",
    )
    _add_common(chaos)
    _add_config_flags(
        chaos,
        [
            "--events",
            "--seed",
            "--users",
            "--items-count",
            "--speed",
            "--window-s",
            "--policy",
            "--defer-wait-s",
            "--snapshot-every-s",
            "--max-restarts",
            "--restart-backoff-s",
        ],
    )
    chaos.add_argument("--kills", type=int, default=5, help="SIGKILLs in total, spread over the stream (default 5)")
    chaos.add_argument(
        "--policies", default=None, help="comma-separated policies, one drilled run each (default: --policy)"
    )
    chaos.add_argument("--kill-seed", type=int, default=None, help="seed of kill times and targets (default --seed)")
    chaos.add_argument(
        "--stream-s", type=float, default=60.0, help="wall seconds the traffic lasts (sets --speed unless given)"
    )
    chaos.add_argument(
        "--hold-s", type=float, default=0.05, help="stages linger this long mid-checkpoint/mid-snapshot (aimed kills)"
    )
    chaos.add_argument("--aim-timeout-s", type=float, default=15.0, help="an aimed kill waits this long for its write")
    chaos.add_argument("--outage-s", type=float, default=0.0, help="freeze the broker (SIGSTOP) this long mid-run")
    chaos.add_argument(
        "--outage-at", type=float, default=0.4, help="start the outage at this fraction of --stream-s (default 0.4)"
    )
    chaos.add_argument("--join-workers", type=int, default=None, help="join worker processes (one consumer group)")
    chaos.add_argument("--quiet", action="store_true", help="no live progress line")
    chaos.set_defaults(func=cmd_chaos)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livectr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="the whole pipeline: broker (embedded by default) → simulator/replay → join → learner"
    )
    _add_common(run)
    _add_config_flags(
        run,
        [f for f in CONFIG_FLAGS if f not in {*KAFKA_FLAGS, "--partitions", "--data-dir", *SERVE_FLAGS}],
    )
    run.add_argument(
        "--log", type=Path, default=None, help="replay this recorded events log instead of synthetic traffic"
    )
    run.add_argument("--items", type=Path, default=None, help="items file of the recorded log")
    run.add_argument("--forever", action="store_true", help="run until stopped instead of a bounded demo")
    run.add_argument("--join-workers", type=int, default=None, help="join worker processes (one consumer group)")
    run.add_argument("--quiet", action="store_true", help="no live progress line")
    run.add_argument(
        "--fresh",
        action="store_true",
        help="embedded broker only: discard the snapshots and join state an earlier run left in --data-dir "
        "(without it such a run is refused; the semantic store is always kept)",
    )
    run.add_argument(
        "--cold-cache",
        action="store_true",
        help="start traffic without first letting the teacher encode the existing catalogue",
    )
    run.set_defaults(func=cmd_run)

    _add_chaos_parser(sub)

    produce = sub.add_parser("produce", help="publish synthetic traffic or replay a recorded log")
    _add_common(produce)
    _add_config_flags(produce, ["--events", "--seed", "--users", "--items-count", "--speed"])
    produce.add_argument("--log", type=Path, default=None)
    produce.add_argument("--items", type=Path, default=None)
    produce.add_argument("--producer-id", default="producer-0")
    produce.add_argument("--no-progress", action="store_true")
    produce.add_argument(
        "--catalogue-only",
        action="store_true",
        help="publish only the items that precede the traffic (no end markers): warms the semantic cache",
    )
    produce.set_defaults(func=cmd_produce)

    join = sub.add_parser(
        "join", help="join worker: impressions × clicks → training examples (scale out: same --group-id)"
    )
    _add_common(join)
    _add_config_flags(
        join,
        [
            "--window-s",
            "--policy",
            "--defer-wait-s",
            "--group-id",
            "--repartition",
            "--score-sample",
            "--user-profile-ttl-s",
            "--caught-up-clock",
            "--metrics-port",
        ],
    )
    join.add_argument("--worker-id", default=f"join-{socket.gethostname()}-{os.getpid()}")
    join.add_argument("--forever", action="store_true", help="keep running after end-of-stream markers")
    join.set_defaults(func=cmd_join)

    refresh = sub.add_parser("refresh", help="semantic refresher: encode item texts with the teacher, publish vectors")
    _add_common(refresh)
    _add_config_flags(refresh, ["--enrich", "--enrich-url", "--enrich-model", "--metrics-port"])
    refresh.set_defaults(func=cmd_refresh)

    learn = sub.add_parser("learn", help="learner: train the student online and publish snapshots")
    _add_common(learn)
    _add_config_flags(
        learn,
        [
            "--batch-size",
            "--lr",
            "--device",
            "--threads",
            "--nice",
            "--word-buckets",
            "--snapshot-every-s",
            "--snapshot-every-examples",
            "--delta-every-s",
            "--real-negatives",
            "--metrics-port",
            "--user-ttl-s",
            "--item-ttl-s",
            "--admit-min-count",
        ],
    )
    learn.add_argument("--forever", action="store_true", help="keep running after end-of-stream markers")
    learn.set_defaults(func=cmd_learn)

    serve = sub.add_parser(
        "serve",
        help="HTTP scorer that hot-reloads the latest snapshot (POST /score); with --bootstrap-servers it "
        "also follows the model-updates topic (full snapshots and deltas) and needs no shared disk",
    )
    _add_common(serve)
    _add_config_flags(serve, SERVE_FLAGS)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    score = sub.add_parser("score", help="score impressions given as JSON lines on stdin")
    _add_common(score)
    score.set_defaults(func=cmd_score)

    similar = sub.add_parser("similar", help="an item's nearest semantic neighbours, with their texts")
    _add_common(similar)
    similar.add_argument("item_id")
    similar.add_argument("-k", type=int, default=10)
    similar.set_defaults(func=cmd_similar)

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (tansu) in the foreground")
    broker.add_argument("--port", type=int, default=9092)
    broker.set_defaults(func=cmd_broker)

    topics = sub.add_parser("topics", help="create livectr's topics on a cluster")
    _add_common(topics)
    topics.set_defaults(func=cmd_topics)

    conv = sub.add_parser("convert-ml100k", help="convert MovieLens 100K into a replayable log")
    conv.add_argument("--src", type=Path, default=Path("../shared/data/ml-100k"))
    conv.add_argument("--out", type=Path, default=Path("./livectr-data/ml-100k"))
    conv.set_defaults(func=cmd_convert_ml100k)

    _add_snapshots_parser(sub)

    report = sub.add_parser("report", help="one self-contained HTML page with plots of a run's recorded metrics")
    report.add_argument("--data-dir", type=Path, default=None, help="data dir of the run (default ./livectr-data)")
    report.add_argument("--out", type=Path, default=None, help="HTML file to write (default DATA_DIR/report.html)")
    report.add_argument("-v", "--verbose", action="store_true")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``livectr`` script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except USAGE_ERRORS as exc:
        # A bad command line or environment: one clear line, no traceback.
        print(f"livectr {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
