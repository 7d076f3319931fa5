"""The model-updates topic: full snapshots and deltas over Kafka, so scorers need no shared disk.

Layout (``{prefix}model-updates``, one partition so updates keep their order): every update is
a blob split into messages of at most ``learner.update_chunk_bytes``, each with headers

* ``livectr.kind`` — ``full`` (a snapshot's serving files) or ``delta`` (:mod:`learner.deltas`);
* ``livectr.version``, ``livectr.seq`` — a full snapshot's version (seq 0), or a delta's base
  version and its place in the chain since that base (1, 2, …);
* ``livectr.chunk`` (``i/n``), ``livectr.sha256`` (of the whole blob: a corrupt update is refused
  before it is parsed, and a full snapshot's files are then checked against its manifest as on
  disk), and ``livectr.since_base`` — how many messages back the first message of the full
  snapshot the update builds on is (the learner is the topic's only writer and its producer is
  idempotent, so its messages are contiguous), so a new scorer reads the last message, jumps
  there and follows on. Nothing waits for the broker: a full snapshot is queued like a delta.
* ``livectr.rollback`` (``1``, on full snapshots only, optional) — the chain restarts here:
  scorers install this snapshot even when they serve a newer version, and deltas of the chains
  before it no longer follow. Sent by a rollback (``livectr snapshots rollback V`` republishes V,
  by the running learner or by the CLI) and by each learner process's first full snapshot (a
  restarted learner resumes from its last snapshot, so deltas its predecessor sent after that
  snapshot are not in its model and must not stay in the scorers').

Why full snapshots are rarer on Kafka than on disk (``learner.update_full_every_s``): a full
snapshot is tens of megabytes (the hashed tables are allocated whole) and the embedded broker
keeps everything in memory without deleting old records, while deltas are a few hundred
kilobytes. Deltas form one chain from the last full snapshot on Kafka, across the disk
snapshots in between: a disk manifest records the chain position it contains
(``delta_chain``), so a scorer that loaded it from disk applies the deltas that follow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from livectr.core import bus
from livectr.core.config import Config
from livectr.learner.deltas import DeltaError, build_delta, parse_delta
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor
from livectr.learner.scorer import Loaded, Scorer
from livectr.learner.snapshot import SnapshotError, read_serving_files, state_from_files

log = logging.getLogger(__name__)

_MAGIC = b"LCTRFULL1\n"


class UpdateError(ValueError):
    """An update message or blob that cannot be used (refused; the scorer keeps serving)."""


def pack_files(files: dict[str, bytes]) -> bytes:
    """One blob of named files: a magic line, a JSON index of sizes, the contents in order."""
    index = json.dumps({name: len(data) for name, data in files.items()}).encode()
    return _MAGIC + len(index).to_bytes(4, "big") + index + b"".join(files.values())


def unpack_files(blob: bytes) -> dict[str, bytes]:
    if not blob.startswith(_MAGIC):
        raise UpdateError("not a full snapshot blob (bad magic)")
    at = len(_MAGIC)
    size = int.from_bytes(blob[at : at + 4], "big")
    try:
        index = json.loads(blob[at + 4 : at + 4 + size])
    except ValueError as exc:
        raise UpdateError(f"full snapshot blob has an unreadable index ({exc})") from exc
    at += 4 + size
    out: dict[str, bytes] = {}
    for name, length in index.items():
        out[name] = blob[at : at + int(length)]
        at += int(length)
    if at != len(blob):
        raise UpdateError(f"full snapshot blob is {len(blob)} bytes, its index says {at}")
    return out


@dataclass
class UpdateHeader:
    kind: str
    version: int
    seq: int
    chunk: int
    chunks: int
    sha256: str
    since_base: int
    rollback: bool = False

    @classmethod
    def of(cls, msg: Message) -> UpdateHeader:
        h: dict[str, str] = {}
        for pair in msg.headers() or []:
            key, value = pair[0], pair[1]
            if value is not None:
                h[str(key)] = value.decode() if isinstance(value, bytes) else str(value)
        try:
            chunk, chunks = (int(x) for x in h["livectr.chunk"].split("/"))
            return cls(
                h["livectr.kind"],
                int(h["livectr.version"]),
                int(h["livectr.seq"]),
                chunk,
                chunks,
                h["livectr.sha256"],
                int(h["livectr.since_base"]),
                h.get("livectr.rollback") == "1",
            )
        except (KeyError, ValueError) as exc:
            raise UpdateError(f"model update at offset {msg.offset()} has bad headers ({exc!r})") from exc

    def headers(self) -> list[tuple[str, bytes]]:
        out = [
            ("livectr.kind", self.kind.encode()),
            ("livectr.version", str(self.version).encode()),
            ("livectr.seq", str(self.seq).encode()),
            ("livectr.chunk", f"{self.chunk}/{self.chunks}".encode()),
            ("livectr.sha256", self.sha256.encode()),
            ("livectr.since_base", str(self.since_base).encode()),
        ]
        if self.rollback:
            out.append(("livectr.rollback", b"1"))
        return out


class UpdatePublisher:
    """The learner's side: full snapshots (from their published files) and deltas, in one chain."""

    def __init__(self, cfg: Config, prod: Producer) -> None:
        self.cfg = cfg
        self.prod = prod
        self.topic = cfg.topics.model_updates
        self.chunk_bytes = max(1024, cfg.learner.update_chunk_bytes)
        self.tracker = bus.DeliveryTracker()
        #: Version of the last full snapshot on Kafka, and messages sent since its first one.
        self.base: int | None = None
        self.since_base = 0
        self.seq = 0
        self.last_full_t = 0.0
        self.last_delta_t = time.monotonic()
        self.fulls = 0
        self.deltas = 0
        self.full_bytes = 0
        self.delta_bytes = 0
        self.delta_bytes_total = 0
        #: Full snapshots sent with the rollback marker (a rollback, or this publisher's first).
        self.rollbacks = 0

    @property
    def chain(self) -> tuple[int, int] | None:
        """The chain position the learner's published state has reached: (base version, seq)."""
        return (self.base, self.seq) if self.base is not None else None

    def full_due(self) -> bool:
        """Whether the next snapshot goes on Kafka too: the first, then every ``update_full_every_s``,
        and after any update that was not delivered (scorers would wait at the gap)."""
        if self.tracker.failed:
            log.warning(
                "%d model updates were not delivered (%s); next: a full snapshot",
                self.tracker.failed,
                self.tracker.last_error,
            )
            self.tracker.failed = 0
            self.base = None
        return self.base is None or time.monotonic() - self.last_full_t >= self.cfg.learner.update_full_every_s

    def publish_full(self, data_dir: Path, version: int, rollback: bool = False) -> int:
        """Send snapshot ``version``'s serving files; deltas from now on build on it. Returns bytes.

        ``rollback`` (and always on this publisher's first full snapshot) marks it as the start
        of a new chain: scorers install it even over a newer version (see the module docstring).
        """
        blob = pack_files(read_serving_files(data_dir, version))
        rollback = rollback or self.fulls == 0
        self.since_base = 0
        self.send(blob, "full", version, 0, rollback)
        self.rollbacks += int(rollback)
        self.base = version
        self.seq = 0
        self.fulls += 1
        self.full_bytes = len(blob)
        self.last_full_t = time.monotonic()
        log.info(
            "model update: full snapshot v%08d on %s (%d bytes%s)",
            version,
            self.topic,
            len(blob),
            ", rollback marker" if rollback else "",
        )
        return len(blob)

    def publish_delta(self, learner: OnlineLearner, snapshot_version: int | None = None) -> dict[str, Any] | None:
        """Send the rows touched since the last publish (None when nothing was trained).

        ``snapshot_version``: the learner's newest snapshot, which the model after this delta
        contains (a scorer names that version once it has applied the delta).
        """
        self.last_delta_t = time.monotonic()
        if self.base is None or learner.touched is None or not learner.touched:
            return None
        blob, meta = build_delta(learner, learner.touched, self.base, self.seq + 1, snapshot_version)
        self.send(blob, "delta", self.base, self.seq + 1)
        self.seq += 1
        self.deltas += 1
        self.delta_bytes = len(blob)
        self.delta_bytes_total += len(blob)
        return {"bytes": len(blob), "seq": self.seq, "examples": meta["examples"]}

    def send(self, blob: bytes, kind: str, version: int, seq: int, rollback: bool = False) -> None:
        """Queue ``blob`` in chunks; nothing waits for the broker (the learner's loop polls the
        delivery reports, and a failure makes the next snapshot a full one on Kafka)."""
        digest = hashlib.sha256(blob).hexdigest()
        n = max(1, -(-len(blob) // self.chunk_bytes))
        key = f"{kind}:{version}:{seq}".encode()
        for i in range(n):
            header = UpdateHeader(kind, version, seq, i, n, digest, self.since_base, rollback)
            chunk = blob[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
            bus.produce(
                self.prod,
                self.topic,
                chunk,
                key=key,
                partition=0,
                on_delivery=self.tracker.callback,
                headers=header.headers(),
            )
            self.since_base += 1
        self.prod.poll(0)


class UpdateFollower:
    """The scorer's side: bootstrap from the latest full snapshot on Kafka, then apply deltas in order.

    A background thread; every refusal (bad headers, checksum, unparsable blob, a delta for
    another model) is logged and counted on the scorer, which keeps serving what it has. A gap
    in a chain (a delta lost or refused) makes the scorer wait for the next full snapshot.
    """

    def __init__(self, cfg: Config, scorer: Scorer) -> None:
        self.cfg = cfg
        self.scorer = scorer
        self.topic = cfg.topics.model_updates
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._parts: list[bytes] = []
        self._assembling: UpdateHeader | None = None
        self._assembling_offset = -1
        #: Highest full snapshot version accepted from Kafka (older ones are never re-installed).
        self.highest_full = 0
        self.fulls_loaded = 0

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="livectr-model-updates", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
                return
            except Exception:  # a broker hiccup must not end the follower: start over
                log.exception("model-updates follower failed; restarting in 1 s")
                self._stop.wait(1.0)

    def _follow(self) -> None:
        fetch: dict[str, object] = {"fetch.message.max.bytes": 4 * self.cfg.learner.update_chunk_bytes}
        cons = bus.consumer(self.cfg.kafka, None, **fetch)
        try:
            while not self._stop.is_set() and bus.partition_count(self.cfg.kafka, self.topic) == 0:
                self._stop.wait(1.0)  # the learner has not created the topic yet
            if self._stop.is_set():
                return
            cons.assign([TopicPartition(self.topic, 0, self._bootstrap_offset(cons))])
            while not self._stop.is_set():
                for msg in cons.consume(num_messages=64, timeout=0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("model-updates consume error: %s", err)
                        continue
                    self.handle(msg)
        finally:
            cons.close()

    def _bootstrap_offset(self, cons: Any) -> int:
        """Where to start: the first message of the full snapshot the last update builds on."""
        tp = TopicPartition(self.topic, 0)
        low, high = cons.get_watermark_offsets(tp, timeout=10, cached=False)
        if high <= low:
            return -2  # empty: from the beginning
        cons.assign([TopicPartition(self.topic, 0, high - 1)])
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline and not self._stop.is_set():
                for msg in cons.consume(num_messages=1, timeout=0.5):
                    if msg.error() is not None:
                        continue
                    try:
                        h = UpdateHeader.of(msg)
                    except UpdateError:
                        return low
                    base = int(msg.offset() or 0) - h.since_base
                    return base if low <= base < high else low
        finally:
            cons.unassign()
        return low

    def handle(self, msg: Message) -> None:
        """One message: add it to the update being assembled; apply the update once complete."""
        try:
            h = UpdateHeader.of(msg)
        except UpdateError as exc:
            self.scorer.refuse(str(exc))
            return
        if h.chunk == 0:
            self._assembling, self._parts, self._assembling_offset = h, [], int(msg.offset() or 0)
        a = self._assembling
        if a is None or (a.kind, a.version, a.seq, a.chunks, a.sha256) != (
            h.kind,
            h.version,
            h.seq,
            h.chunks,
            h.sha256,
        ):
            return  # the tail of an update whose start we did not see (bootstrapping mid-way)
        if h.chunk != len(self._parts):
            self.scorer.refuse(f"model update {h.kind} v{h.version} seq {h.seq}: chunk {h.chunk} out of order")
            self._assembling = None
            return
        self._parts.append(msg.value() or b"")
        if len(self._parts) < h.chunks:
            return
        blob, self._assembling, self._parts = b"".join(self._parts), None, []
        where = f"{self.topic}@{self._assembling_offset}"
        if hashlib.sha256(blob).hexdigest() != h.sha256:
            self.scorer.refuse(
                f"model update {h.kind} v{h.version} seq {h.seq} at {where} is corrupt (sha256 mismatch)"
            )
            return
        if h.kind == "full":
            self._install_full(h, blob, where)
        elif h.kind == "delta":
            try:
                self.scorer.apply_delta(parse_delta(blob))
            except DeltaError as exc:
                self.scorer.refuse(f"delta v{h.version} seq {h.seq} at {where} refused: {exc}")
        else:
            self.scorer.refuse(f"model update at {where} of unknown kind {h.kind!r}")

    def _install_full(self, h: UpdateHeader, blob: bytes, where: str) -> None:
        if h.version <= self.highest_full and not h.rollback:
            return
        try:
            manifest, state = state_from_files(Path(f"kafka:{where}/v{h.version:08d}"), unpack_files(blob), False)
        except (UpdateError, SnapshotError) as exc:
            self.scorer.refuse(str(exc))
            return
        self.highest_full = h.version
        loaded = Loaded(manifest, Predictor.for_serving(self.scorer.cfg, state), chain=(h.version, 0))
        if self.scorer.install(loaded, rollback=h.rollback):
            self.fulls_loaded += 1
            log.info("scorer loaded snapshot v%08d from %s%s", h.version, where, " (rollback)" if h.rollback else "")


def publish_rollback(cfg: Config, version: int, timeout_s: float = bus.FLUSH_S) -> int:
    """Republish snapshot ``version`` (under ``cfg.data_dir``) on the model-updates topic with the
    rollback marker, and wait for the broker to have it; returns the bytes sent.

    For ``livectr snapshots rollback`` when no learner runs (a running learner does this itself,
    :mod:`livectr.learner.loop`): Kafka-only scorers then serve ``version`` within seconds, and a
    learner started later resumes from it and publishes its chain from there.
    """
    bus.ensure_topic(cfg.kafka, cfg.topics.model_updates, 1, config=bus.model_updates_topic_config(cfg))
    prod = bus.producer(cfg.kafka)
    pub = UpdatePublisher(cfg, prod)
    sent = pub.publish_full(cfg.data_dir, version, rollback=True)
    bus.flush_or_raise(prod, pub.tracker, timeout_s)
    return sent
