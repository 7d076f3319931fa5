"""The event types every stage shares, and their wire codecs.

Why one module: the simulator, the join worker, the semantic refresher and the learner all
exchange these records over Kafka. Defining them once (as ``msgspec`` structs, which validate
while they decode at C speed) means a schema change is one edit and a malformed record is
rejected identically everywhere.

Wire formats:

* Input events (impressions, clicks, items, end markers) are JSON objects tagged by a
  ``"type"`` field, so producers in any language can write them by hand.
* Joined examples travel as MessagePack (compact; they carry int8 semantic vectors as raw
  bytes) between the join worker and the learner.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Final

import msgspec

#: Feature ints are bounded to int64: larger ones decode as Python ints that no MessagePack
#: encoder can write, so one such impression crashed the join when it sent the example.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
ContextValue = str | Int64 | float | bool
#: Ids are non-empty: an empty id joins nothing and keys nothing.
Id = Annotated[str, msgspec.Meta(min_length=1)]
#: Counts and partition numbers of markers.
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

#: Largest accepted encoded event. Anything bigger is dead-lettered as "oversized" before
#: decoding so one absurd record cannot blow up a stage's memory.
MAX_EVENT_BYTES: Final[int] = 64 * 1024


class Impression(msgspec.Struct, tag="impression", tag_field="type", frozen=True):
    """An item shown to a user; the unit that gets a label."""

    impression_id: Id
    ts: float
    user_id: Id
    item_id: Id
    context: dict[str, ContextValue] = {}


class Click(msgspec.Struct, tag="click", tag_field="type", frozen=True):
    """A click on an impression; only the impression id and the event time are needed."""

    impression_id: Id
    ts: float


class Item(msgspec.Struct, tag="item", tag_field="type", frozen=True):
    """An item's description, new or changed; the semantic teacher encodes ``text``."""

    item_id: Id
    ts: float
    text: str
    attributes: dict[str, ContextValue] = {}


class EndOfStream(msgspec.Struct, tag="end", tag_field="type", frozen=True):
    """Marks the end of a bounded stream on one partition.

    Watermarks of a real broker can lag the last batch (see README), so a bounded run never
    decides it is finished from watermarks: every producer writes one marker per partition
    with the number of data records it wrote there, and consumers count.

    ``partition`` is the partition the marker describes; ``count`` how many records precede
    it there (from this producer); ``producer`` identifies the writer so that several
    producers on one topic are counted separately.
    """

    producer: str
    partition: NonNegative
    count: NonNegative
    ts: float = 0.0


InputEvent = Impression | Click | Item | EndOfStream


class Example(msgspec.Struct, tag="ex", array_like=True, frozen=True, gc=False):
    """A labelled training example produced by the join worker.

    ``gc=False``: examples never form reference cycles, and the learner holds hundreds of
    thousands of them while it aligns partitions; tracked by the garbage collector, every
    collection walked them all (measured: ~10 % of the learner's time).

    ``kind`` says how the label was decided (see :data:`KIND_FINAL` and friends);
    ``decided_at`` is the wall-clock time (unix seconds) at which the producer published the
    event that decided the label: the click, or the event whose event time closed the
    attribution window. The learner measures freshness against it.

    ``item_sem``/``user_sem`` are the teacher's reduced vectors (int8, raw bytes) when the
    semantic cache had them; ``sem_flags`` records misses (see ``SEM_*``) so the learner can
    tell a fallback from a real vector. ``item_words`` are the item's word hashes, likewise from
    the cache.
    """

    impression_id: str
    ts: float
    user_id: str
    item_id: str
    context: dict[str, ContextValue]
    label: int
    kind: int
    decided_at: float
    click_delay: float = -1.0
    item_sem: bytes | None = None
    user_sem: bytes | None = None
    sem_flags: int = 0
    sem_version: str = ""
    #: The item's words (:func:`livectr.core.words.pack_words`: uint32 hashes) when the
    #: semantic cache had them; the learner keeps them per item row for its user × word weights.
    item_words: bytes | None = None


class ExampleBatch(msgspec.Struct, tag="batch", array_like=True, frozen=True):
    """Several examples in one Kafka record.

    Why: one ``produce`` call and one record header per example dominate the join's cost in
    Python; packing the examples a poll produced (per input partition) into one record
    multiplies throughput while keeping commit-after-delivery exact.
    """

    examples: list[Example]


class ExampleEnd(msgspec.Struct, tag="end", array_like=True, frozen=True):
    """End marker on the examples topic: input partition ``source_partition`` is fully joined.

    A join worker writes one to every examples partition after it has delivered every example
    of that input partition, so a learner that has seen markers for all input partitions on all
    examples partitions has consumed everything.
    """

    source_partition: NonNegative
    source_partitions: Annotated[int, msgspec.Meta(ge=1, le=2**31)]
    examples: NonNegative
    worker: str
    ts: float = 0.0

    def __post_init__(self) -> None:
        # A marker the learner would count toward "everything consumed" must be coherent.
        if self.source_partition >= self.source_partitions:
            raise ValueError(f"source_partition {self.source_partition} >= source_partitions {self.source_partitions}")
        if not math.isfinite(self.ts):
            raise ValueError("non-finite ts")


#: ``Example.kind``: label decided once (click within the window, or window closed) — policy ``wait``.
KIND_FINAL: Final[int] = 0
#: ``Example.kind``: the at-once negative of policy ``fake-negative``.
KIND_FAKE_NEGATIVE: Final[int] = 1
#: ``Example.kind``: the positive copy sent on click under policy ``fake-negative``.
KIND_POSITIVE_COPY: Final[int] = 2
#: ``Example.kind``: not a training example but a *score request*: a sampled impression, sent by
#: the join when its watermark reaches the impression's time (label 0, meaningless). The learner
#: scores it with the model as it stands at that event time and pairs the score with the label
#: that arrives later: the serving AUC, free of the label-arrival order (see README).
KIND_SCORE_REQUEST: Final[int] = 3
#: ``Example.kind``, policy ``defer`` (Gu et al., KDD 2021): the label observed when the short
#: waiting window closes — 1 if clicked within it (sent at the click), else 0 (maybe a fake negative).
KIND_DEFER_OBSERVED: Final[int] = 4
#: ``Example.kind``, policy ``defer``: the duplicate carrying the true label — 1 at the click (also
#: for a click within the waiting window), 0 when the attribution window closes (a real negative).
#: It is the impression's final label.
KIND_DEFER_TRUE: Final[int] = 5
#: ``Example.kind``, policy ``defer``, inside the learner only (never on a topic): an observed
#: negative the learner held for its own waiting window and trains on release
#: (:mod:`livectr.learner.defer_hold`); its label is 1 if the click came within that window.
KIND_DEFER_HELD: Final[int] = 6
#: Kinds that carry an impression's final label (what evaluation pairs scores with).
FINAL_KINDS: Final[frozenset[int]] = frozenset({KIND_FINAL, KIND_DEFER_TRUE})
#: Kinds that are a second copy of an impression already counted (not a new impression).
COPY_KINDS: Final[frozenset[int]] = frozenset(
    {KIND_POSITIVE_COPY, KIND_DEFER_TRUE, KIND_SCORE_REQUEST, KIND_DEFER_HELD}
)


def decision_time(ex: Example, window_s: float, wait_s: float = 0.0) -> float:
    """Event time at which ``ex``'s label became known (what the join orders its output by).

    A score request's is its impression time; a positive's, its click; a ``wait`` or real
    negative's, the close of its window; a fake negative's, its impression; a ``defer``
    observed negative's, the close of its waiting window ``wait_s``.
    """
    if ex.kind == KIND_SCORE_REQUEST or ex.kind == KIND_FAKE_NEGATIVE:
        return ex.ts
    if ex.label:
        return ex.ts + max(ex.click_delay, 0.0)
    if ex.kind == KIND_DEFER_OBSERVED:
        return ex.ts + wait_s
    return ex.ts + window_s


#: ``Example.sem_flags`` bits.
SEM_ITEM_MISS: Final[int] = 1
SEM_USER_MISS: Final[int] = 2


#: Longest dead-letter reason: msgspec quotes the offending value, which can be the whole record.
MAX_REASON_CHARS: Final[int] = 300


def one_line(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """``reason`` as one printable line of at most ``limit`` characters (it travels as a header).

    Control characters (a newline inside a quoted value) are escaped, lone surrogates replaced.
    """
    if reason.isprintable() and len(reason) <= limit:
        return reason
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason[: limit * 2])
    text = text.encode("utf-8", "replace").decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DecodeError(ValueError):
    """An event could not be accepted; ``reason`` (one line, see :func:`one_line`) is what goes to
    the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        reason = one_line(reason)
        super().__init__(reason)
        self.reason = reason


_input_decoder = msgspec.json.Decoder(InputEvent)
_json_encoder = msgspec.json.Encoder()
_example_decoder = msgspec.msgpack.Decoder(Example | ExampleBatch | ExampleEnd)
_msgpack_encoder = msgspec.msgpack.Encoder()


def decode_event(raw: bytes | None) -> InputEvent:
    """Decode and validate one input event, raising :class:`DecodeError` with a reason."""
    if raw is None:
        raise DecodeError("empty message (null value)")
    if len(raw) > MAX_EVENT_BYTES:
        raise DecodeError(f"oversized event: {len(raw)} bytes > {MAX_EVENT_BYTES}")
    try:
        event = _input_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"invalid event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DecodeError(f"malformed JSON: {exc}") from None
    if type(event) is not EndOfStream:
        problem = time_problem(event.ts)
        if problem is not None:
            raise DecodeError(f"invalid event: {problem}")
    return event


#: Largest accepted event time (unix seconds; year ~5138): anything beyond is a unit error or junk.
MAX_TS: Final[float] = 1e11
#: Event times further ahead of this machine's clock are refused. One impression and one click
#: stamped in the far future (a unit error, a broken producer clock) moved their partition's
#: watermark there: every open window closed at once and every later click on the partition was
#: dead-lettered as late — measured, 37 of 50 positives turned negative after one such pair.
MAX_FUTURE_S: Final[float] = 7 * 86400.0


def time_problem(ts: float, now: float | None = None) -> str | None:
    """Why ``ts`` is not a usable event time, or None: NaN, ±inf, ``abs(ts) >= MAX_TS`` (not unix
    seconds), or more than :data:`MAX_FUTURE_S` ahead of ``now`` (default: the wall clock)."""
    if not (ts == ts and abs(ts) < MAX_TS):
        return f"ts {ts!r} is not a unix time in seconds"
    if ts > (time.time() if now is None else now) + MAX_FUTURE_S:
        return f"ts {ts!r} is more than {MAX_FUTURE_S / 86400:g} days ahead of the clock"
    return None


def encode_event(event: InputEvent) -> bytes:
    """Encode an input event as tagged JSON."""
    return _json_encoder.encode(event)


def encode_example(example: Example | ExampleBatch | ExampleEnd) -> bytes:
    """Encode a joined example (or a batch of them, or an end marker) as MessagePack."""
    return _msgpack_encoder.encode(example)


def decode_example(raw: bytes) -> Example | ExampleBatch | ExampleEnd:
    """Decode a joined example, batch or end marker; raises :class:`DecodeError`."""
    try:
        return _example_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"invalid example: {exc}") from None
