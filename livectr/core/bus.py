"""Kafka plumbing shared by every stage: clients, topics, dead letters, end markers.

Why confluent-kafka: measured on this 2-core machine (README), consume + decode runs at
≈136k msg/s with confluent-kafka against ≈18.5k msg/s with kafka-python, and produce at
≈380k/s against ≈17k/s. The join and the learner are on the hot path, so every stage uses
confluent-kafka through these helpers, with explicit delivery reports and explicit commits
(as in confluent-kafka's own examples).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from livectr.core.config import Config, KafkaConfig, Topics
from livectr.core.events import EndOfStream, encode_event, one_line

log = logging.getLogger(__name__)

#: Receives librdkafka's statistics JSON of every consumer created from here on (consumer lag
#: for the stage's metrics: :mod:`livectr.core.metrics_log`); set by :func:`watch_consumers`.
_consumer_stats: tuple[Callable[[str], None], int] | None = None


def watch_consumers(listener: Callable[[str], None] | None, interval_ms: int = 1000) -> None:
    """Hand the statistics of every consumer this process creates to ``listener`` (None: stop)."""
    global _consumer_stats
    _consumer_stats = (listener, interval_ms) if listener is not None else None


# Every Kafka client livectr creates is built here, from ``KafkaConfig.client_properties()``
# (bootstrap servers, security settings, extra options): tests/test_kafka_security.py checks
# that no other module constructs one.


def producer_config(kafka: KafkaConfig, **overrides: object) -> dict[str, object]:
    """Properties of :func:`producer`."""
    props: dict[str, object] = {
        **kafka.client_properties(),
        "enable.idempotence": True,
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "compression.type": "none",
    }
    props.update(overrides)
    return props


def producer(kafka: KafkaConfig, **overrides: object) -> Producer:
    """A producer tuned for throughput, idempotent so broker retries do not duplicate records."""
    return Producer(producer_config(kafka, **overrides))


def admin_config(kafka: KafkaConfig, **overrides: str | int | float | bool) -> dict[str, str | int | float | bool]:
    """Properties of :func:`admin`."""
    return {**kafka.client_properties(), **overrides}


def admin(
    kafka: KafkaConfig, logger: logging.Logger | None = None, **overrides: str | int | float | bool
) -> AdminClient:
    """An admin client (topics, metadata); librdkafka's log lines go to ``logger`` when given."""
    extra: dict[str, Any] = {"logger": logger} if logger is not None else {}
    return AdminClient(admin_config(kafka, **overrides), **extra)


class InvalidKafkaOptions(ValueError):
    """librdkafka refused a property given by the config (a misspelt key, an invalid value)."""


def check_options(kafka: KafkaConfig) -> None:
    """Fail in one line, before any stage starts, when librdkafka refuses the configured
    properties (say ``--kafka-option sasl.mechanism=SCRAM``); raises :class:`InvalidKafkaOptions`.

    Building a client is librdkafka's own validation (it checks names, enumerations, files
    such as ``ssl.ca.location``); without bootstrap servers it connects to nothing. The error
    names the property; librdkafka does not echo secret values.
    """
    quiet = logging.getLogger("livectr.bus.options")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    try:
        # No bootstrap servers: librdkafka then connects to nothing.
        client = Producer(producer_config(kafka, **{"bootstrap.servers": "", "logger": quiet}))
    except (KafkaException, ValueError, TypeError) as exc:
        err = exc.args[0] if exc.args else exc
        reason = err.str() if isinstance(err, KafkaError) else str(err)
        first_line = (reason or type(exc).__name__).splitlines()[0]
        raise InvalidKafkaOptions(f"invalid Kafka client settings: {first_line}") from None
    client.flush(0)


def consumer_config(kafka: KafkaConfig, group_id: str | None = None, **overrides: object) -> dict[str, object]:
    """Properties of :func:`consumer`."""
    props: dict[str, object] = {
        **kafka.client_properties(),
        "group.id": group_id or f"livectr-assign-{time.monotonic_ns()}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": max(500, kafka.session_timeout_ms // 3),
        "fetch.wait.max.ms": 50,
        "queued.min.messages": 200_000,
        # Range assignment keeps partition p of impressions and of clicks on the same worker.
        "partition.assignment.strategy": "range",
    }
    if _consumer_stats is not None:
        props["stats_cb"], props["statistics.interval.ms"] = _consumer_stats
    props.update(overrides)
    return props


def consumer(kafka: KafkaConfig, group_id: str | None = None, **overrides: object) -> Consumer:
    """A consumer with auto-commit off: stages commit only what they have fully handled.

    Without ``group_id`` the consumer is meant for ``assign()`` (no group join, instant start);
    a throwaway group id is set because librdkafka requires one.
    """
    return Consumer(consumer_config(kafka, group_id, **overrides))


class BrokerUnreachable(ConnectionError):
    """No broker answered a metadata request at the configured bootstrap servers."""


def check_reachable(kafka: KafkaConfig, timeout_s: float = 5.0) -> None:
    """One short metadata request, so a wrong ``--bootstrap-servers`` fails in seconds with one clear
    message instead of stages retrying for a long time; raises :class:`BrokerUnreachable`.

    librdkafka's own connection errors go to a silent logger: the exception says it all.
    """
    quiet = logging.getLogger("livectr.bus.probe")
    quiet.propagate = False
    quiet.addHandler(logging.NullHandler())
    client = admin(kafka, logger=quiet, **{"socket.connection.setup.timeout.ms": 3000})
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else exc
        reason = err.str() if isinstance(err, KafkaError) else str(err)
        raise BrokerUnreachable(
            f"no Kafka broker reachable at {kafka.bootstrap_servers} within {timeout_s:g}s ({reason})"
        ) from None


def ensure_topics(cfg: Config, timeout_s: float = 15.0) -> Topics:
    """Create every livectr topic that does not exist yet; check co-partitioning of the join inputs."""
    topics = cfg.topics
    client = admin(cfg.kafka)
    existing = client.list_topics(timeout=timeout_s).topics
    wanted = {
        topics.impressions: cfg.kafka.partitions,
        topics.clicks: cfg.kafka.partitions,
        topics.items: cfg.kafka.partitions,
        topics.examples: cfg.kafka.partitions,
        topics.dead_letters: 1,
        topics.semantic: cfg.kafka.partitions,
        topics.semantic_misses: 1,
        topics.model_updates: 1,  # one partition: updates apply in order
    }
    configs = {topics.model_updates: model_updates_topic_config(cfg)}
    new = [
        NewTopic(name, num_partitions=n, replication_factor=cfg.kafka.replication_factor, config=configs.get(name, {}))
        for name, n in wanted.items()
        if name not in existing
    ]
    if new:
        for fut in client.create_topics(new, request_timeout=timeout_s).values():
            try:
                fut.result(timeout=timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    _wait_for_topics(client, list(wanted), timeout_s)
    imp, clk = partition_count(cfg.kafka, topics.impressions), partition_count(cfg.kafka, topics.clicks)
    if imp != clk and not cfg.join.repartition:
        raise RuntimeError(
            f"{topics.impressions} has {imp} partitions but {topics.clicks} has {clk}: "
            "without join.repartition the join needs them co-partitioned (same count, same key)"
        )
    return topics


def model_updates_topic_config(cfg: Config) -> dict[str, str]:
    """Retention of the model-updates topic: three full-snapshot intervals (at least 10 minutes),
    so the newest full snapshot a new scorer bootstraps from is always kept, and the deltas
    (hundreds of kB every few seconds) do not pile up. (The embedded broker keeps everything.)"""
    lc = cfg.learner
    keep_s = max(600.0, 3 * lc.update_full_every_s, 3 * lc.snapshot_every_s)
    return {"retention.ms": str(int(keep_s * 1000))}


def ensure_topic(
    kafka: KafkaConfig, name: str, partitions: int, timeout_s: float = 15.0, config: dict[str, str] | None = None
) -> None:
    """Create one topic if it does not exist yet (a stage that adds a topic to an existing set)."""
    client = admin(kafka)
    if name not in client.list_topics(timeout=timeout_s).topics:
        new = NewTopic(
            name, num_partitions=partitions, replication_factor=kafka.replication_factor, config=config or {}
        )
        for fut in client.create_topics([new], request_timeout=timeout_s).values():
            try:
                fut.result(timeout=timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    _wait_for_topics(client, [name], timeout_s)


def _wait_for_topics(client: AdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = client.list_topics(timeout=timeout_s).topics
        if all(n in md and md[n].error is None and md[n].partitions for n in names):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics not ready: {names}")


def partition_count(kafka: KafkaConfig, topic: str, timeout_s: float = 10.0) -> int:
    """Number of partitions of ``topic`` (0 when it does not exist)."""
    md = admin(kafka).list_topics(topic, timeout=timeout_s)
    t = md.topics.get(topic)
    return len(t.partitions) if t is not None and t.error is None else 0


@dataclass
class DeliveryTracker:
    """Counts delivery reports so a stage can prove everything it produced was written.

    Pass :meth:`callback` as ``on_delivery``; after ``producer.flush()`` ``failed`` must be 0
    before offsets are committed.
    """

    delivered: int = 0
    failed: int = 0
    last_error: str = ""

    def callback(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            self.last_error = str(err)


class DeliveryFailed(RuntimeError):
    """A produced record was not acknowledged by the broker."""


#: How long a flush may wait for acknowledgements, normally and once a stage was asked to stop
#: (when the broker may be gone: a stop must end within seconds, see ``livectr.core.procs``).
FLUSH_S = 60.0
STOP_FLUSH_S = 3.0


def flush_timeout(stop: threading.Event | None) -> float:
    """:data:`STOP_FLUSH_S` once ``stop`` is set, else :data:`FLUSH_S`."""
    return STOP_FLUSH_S if stop is not None and stop.is_set() else FLUSH_S


def flush_or_raise(prod: Producer, tracker: DeliveryTracker, timeout_s: float = FLUSH_S) -> None:
    """Flush and fail loudly if any record was not delivered (never commit past a lost record)."""
    remaining = prod.flush(timeout_s)
    if remaining:
        raise DeliveryFailed(f"{remaining} records still undelivered after {timeout_s}s")
    if tracker.failed:
        raise DeliveryFailed(f"{tracker.failed} records failed delivery: {tracker.last_error}")


def produce(
    prod: Producer,
    topic: str,
    value: bytes,
    key: bytes | str | None = None,
    partition: int | None = None,
    on_delivery: object = None,
    headers: list[tuple[str, bytes]] | None = None,
    timestamp: int = 0,
) -> None:
    """``Producer.produce`` that waits (polling delivery reports) when the local queue is full.

    ``timestamp``: the record's timestamp in ms (0: the producer's clock).
    """
    kwargs: dict[str, Any] = {"value": value}
    if key is not None:
        kwargs["key"] = key
    if partition is not None:
        kwargs["partition"] = partition
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    if headers:
        kwargs["headers"] = headers
    if timestamp > 0:
        kwargs["timestamp"] = timestamp
    while True:
        try:
            prod.produce(topic, **kwargs)
            return
        except BufferError:
            prod.poll(0.05)


#: Commit errors that mean "no longer a member of this generation" (session expired during a
#: pause, a broker freeze, a slow disk), a rebalance under way, or transient coordinator trouble:
#: routine in Kafka, so a stage rejoins and resumes from its last durable state instead of dying.
FENCED_COMMIT_ERRORS = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._WAIT_COORD,
    }
)


def is_fenced(exc: KafkaException) -> bool:
    """Whether a failed commit is one of :data:`FENCED_COMMIT_ERRORS` (rejoin, do not die)."""
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and err.code() in FENCED_COMMIT_ERRORS


class Provenance(Protocol):
    """Where a dead letter came from: a consumed :class:`~confluent_kafka.Message`, or an object
    carrying the same facts for a record whose message is gone (the join's orphan clicks)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...


#: Largest value and key a dead letter carries (see :class:`DeadLetterSink`).
DEAD_LETTER_MAX_VALUE = 256 * 1024
DEAD_LETTER_MAX_KEY = 1024


@dataclass
class DeadLetterSink:
    """Sends rejected records to the dead-letter topic, never raising into the hot path.

    The record value is the original bytes, untouched; the reason and provenance travel in
    headers (``livectr.reason``, ``livectr.stage``, ``livectr.topic``, ``livectr.partition``,
    ``livectr.offset``), the convention Kafka Connect uses for its DLQs.

    Except for a record near the broker's size limit: with the headers its dead letter would
    be refused (``MSG_SIZE_TOO_LARGE``, raised by ``produce``), the stage would die, restart
    and meet the same record — a poison record blocking its partition. Values over
    :data:`DEAD_LETTER_MAX_VALUE` (keys over :data:`DEAD_LETTER_MAX_KEY`) are cut to that size
    and ``livectr.truncated`` gives the original's (the original stays in its topic, at the
    offset the headers name).
    """

    prod: Producer
    topic: str
    stage: str
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    tracker: DeliveryTracker = field(default_factory=DeliveryTracker)

    def send(
        self, value: bytes | None, reason: str, source: Provenance | None = None, key: bytes | None = None
    ) -> None:
        reason = one_line(reason)
        headers = [("livectr.reason", reason.encode()), ("livectr.stage", self.stage.encode())]
        if source is not None:
            headers += [
                ("livectr.topic", (source.topic() or "").encode()),
                ("livectr.partition", str(source.partition()).encode()),
                ("livectr.offset", str(source.offset()).encode()),
            ]
            key = key if key is not None else source.key()
        value = value or b""
        if len(value) > DEAD_LETTER_MAX_VALUE or (key is not None and len(key) > DEAD_LETTER_MAX_KEY):
            size = f"value={len(value)}" + (f",key={len(key)}" if key is not None else "")
            headers.append(("livectr.truncated", size.encode()))
            value = value[:DEAD_LETTER_MAX_VALUE]
            key = key[:DEAD_LETTER_MAX_KEY] if key is not None else None
        produce(self.prod, self.topic, value, key=key, on_delivery=self.tracker.callback, headers=headers)
        self.count += 1
        short = reason.split(":", 1)[0]
        self.reasons[short] = self.reasons.get(short, 0) + 1


def write_end_markers(
    prod: Producer, topic: str, producer_id: str, counts: dict[int, int], on_delivery: object = None
) -> None:
    """Write one :class:`EndOfStream` to every partition of ``topic`` with its record count."""
    for partition, count in sorted(counts.items()):
        marker = EndOfStream(producer=producer_id, partition=partition, count=count, ts=time.time())
        produce(prod, topic, encode_event(marker), partition=partition, on_delivery=on_delivery)


def assign_all(
    cons: Consumer, kafka: KafkaConfig, topics: Iterable[str], offsets: dict[tuple[str, int], int] | None = None
) -> list[TopicPartition]:
    """Assign every partition of ``topics`` to ``cons``, at ``offsets`` where given, else the start."""
    offsets = offsets or {}
    tps = []
    for topic in topics:
        for p in range(partition_count(kafka, topic)):
            tps.append(TopicPartition(topic, p, offsets.get((topic, p), -2)))  # -2 = OFFSET_BEGINNING
    cons.assign(tps)
    return tps
