"""What an event source yields: valid input events, or bad records to pass on untouched.

Why a separate record type for bad input: a source must never drop or "fix" a record it
cannot turn into an event — the operator needs to see it. A replayed log row that does not
parse goes to the dead-letter topic with its reason; a deliberately malformed synthetic record
goes, raw, to the topic it pretends to belong to so that the join's own validation is
exercised and has to dead-letter it.
"""

from __future__ import annotations

from dataclasses import dataclass

from livectr.core.events import Click, Impression, Item

#: Logical topic names a bad record may claim to belong to (see :class:`BadRecord`).
RAW_TOPICS = ("impressions", "clicks", "items")


@dataclass(frozen=True, slots=True)
class BadRecord:
    """Bytes that are not a valid event.

    ``topic`` is ``None`` when the source itself rejected the record (it goes to the
    dead-letter topic with ``reason``), or one of :data:`RAW_TOPICS` when the record must be
    sent as-is to that topic so that the consuming stage detects it (malformed traffic).
    ``key`` is the record key to use in the latter case.
    """

    raw: bytes
    reason: str
    topic: str | None = None
    key: bytes | None = None

    def __post_init__(self) -> None:
        if self.topic is not None and self.topic not in RAW_TOPICS:
            raise ValueError(f"unknown topic for a raw record: {self.topic!r}")


#: One element of a source's event stream.
SourceRecord = Impression | Click | Item | BadRecord
