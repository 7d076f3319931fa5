"""A join partition's checkpoint: its file format, where it lives, and the restore re-read.

The worker (:mod:`livectr.streams.worker`) writes one checkpoint per input partition before each
commit: the join state, the consumed positions it reflects, a sequence number and the
examples-topic offset reached; Kafka's commit carries the same sequence number in its metadata
(:class:`CommitMeta`), so a restore can tell whether the file is at least as new as the commit.
After a crash, the examples delivered after the checkpoint are re-read from the examples topic
(:func:`delivered_after`) and suppressed when the replay produces them again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import msgspec
from confluent_kafka import KafkaError, TopicPartition

from livectr.core import bus, faults
from livectr.core.config import Config
from livectr.core.events import DecodeError, Example, ExampleBatch, decode_example
from livectr.streams.join import PartitionState
from livectr.streams.repartition import join_inputs

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class Checkpoint(msgspec.Struct):
    """One input partition's checkpoint file."""

    version: int
    group_id: str
    partition: int
    seq: int
    #: Next offsets to read from impressions p / clicks p (what ``state`` reflects).
    impressions_position: int
    clicks_position: int
    #: Examples partition this input partition writes to, and the next offset there after
    #: this worker's last delivered record when the checkpoint was taken (-1: unknown).
    out_partition: int
    out_offset: int
    state: PartitionState


_ckpt_encoder = msgspec.msgpack.Encoder()
_ckpt_decoder = msgspec.msgpack.Decoder(Checkpoint)


class CommitMeta(msgspec.Struct):
    """What the worker stores in Kafka's commit metadata (survives a lost checkpoint)."""

    seq: int = 0
    finished: bool = False
    examples: int = 0

    def encode(self) -> str:
        return f"seq={self.seq};fin={int(self.finished)};ex={self.examples}"

    @classmethod
    def parse(cls, text: str | None) -> CommitMeta:
        """Parse :meth:`encode` output; anything else (or nothing) is the empty metadata."""
        fields = dict(part.split("=", 1) for part in (text or "").split(";") if "=" in part)
        try:
            return cls(int(fields.get("seq", 0)), fields.get("fin", "0") == "1", int(fields.get("ex", 0)))
        except ValueError:
            return cls()


def checkpoint_path(cfg: Config, partition: int) -> Path:
    """File of input partition ``partition``'s checkpoint (per group and impressions topic)."""
    safe = re.compile(r"[^A-Za-z0-9._-]")
    group = safe.sub("_", cfg.join.group_id)
    topic = safe.sub("_", join_inputs(cfg)[0])
    return cfg.data_dir / "join-state" / group / f"{topic}-{partition}.ckpt"


def profile_store_path(cfg: Config, partition: int) -> Path:
    """File of input partition ``partition``'s kept user clicks (next to its checkpoint)."""
    ckpt = checkpoint_path(cfg, partition)
    return ckpt.with_name(ckpt.stem + ".profiles.sqlite")


def write_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Atomically and durably replace ``path``.

    Temp file + rename, so readers see old or new, never half; the temp file is fsynced before
    the rename and the directory after it, so a power loss after the Kafka commit that follows
    cannot leave an empty or old checkpoint behind a newer commit (as ``learner/snapshot.py``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(_ckpt_encoder.encode(ckpt))
        fh.flush()
        os.fsync(fh.fileno())
    faults.hold(faults.CHECKPOINT)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(path: Path) -> int:
    """Remove temp files of ``path`` left by writers that died mid-write (their pid is gone); how many."""
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -len(".tmp")]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or ``None`` when absent or unreadable (then Kafka's commit rules).

    Temp files of writers killed mid-write are removed on the way (:func:`remove_stale_temps`).
    """
    remove_stale_temps(path)
    try:
        ckpt = _ckpt_decoder.decode(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("ignoring unreadable join checkpoint %s: %s", path, exc)
        return None
    return ckpt if ckpt.version == CHECKPOINT_VERSION else None


def delivered_after(cfg: Config, p: int, out_partition: int, start: int) -> set[tuple[str, int]]:
    """(impression_id, kind) of the examples input partition ``p`` delivered after ``start``.

    These were produced after the checkpoint being restored; the replay will produce them
    again and the join drops them once each.

    Read to the partition's end as the fetches find it (the partition-EOF event), not to the
    high watermark: the broker may report that at the start of the last record batch, and a
    batch of examples left unread is a batch delivered twice. The watermark only says whether
    anything at all follows ``start`` (a batch starting there or later raises it past ``start``).
    """
    props: dict[str, object] = {"enable.partition.eof": True}
    reader = bus.consumer(cfg.kafka, None, **props)
    tp = TopicPartition(cfg.topics.examples, out_partition, start)
    try:
        _, high = reader.get_watermark_offsets(tp, timeout=10)
        seen: set[tuple[str, int]] = set()
        if high <= start:
            return seen
        reader.assign([tp])
        key = str(p).encode()
        position = start
        at_end = False
        deadline = time.monotonic() + 30
        while not at_end and time.monotonic() < deadline:
            for msg in reader.consume(10_000, 0.1):
                err = msg.error()
                if err is not None:
                    eof = err.code() == KafkaError._PARTITION_EOF
                    at_end = at_end or (eof and max(position, msg.offset() or 0) >= high)
                    continue
                offset, raw = msg.offset(), msg.value()
                assert offset is not None  # a consumed record without error has an offset
                position = offset + 1
                if msg.key() != key or raw is None:  # a null value is no example of ours, like an undecodable one
                    continue
                try:
                    record = decode_example(raw)
                except DecodeError:
                    continue
                examples = (
                    record.examples
                    if isinstance(record, ExampleBatch)
                    else ([record] if isinstance(record, Example) else [])
                )
                seen.update((ex.impression_id, ex.kind) for ex in examples)
        if not at_end:
            log.warning("partition %d: could not re-read delivered examples; duplicates possible", p)
        if seen:
            log.info("partition %d: %d examples delivered after the checkpoint will not be resent", p, len(seen))
        return seen
    finally:
        reader.close()
