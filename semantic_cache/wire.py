"""Records on the semantic topics (MessagePack, validated by msgspec).

* ``semantic`` topic, key ``f"{kind}:{id}"``: :class:`SemanticVector` — one reduced vector.
  Keyed so that a compacted topic keeps the latest vector per item.
* ``semantic-misses`` topic (the refresher's requests): :class:`MissReport` — ids a join worker
  asked for and did not have, batched and deduplicated by the client; and, when LLM enrichment
  is on, :class:`UserClicks` — which items a user clicked, for the LLM's user summaries.

Times: ``requested_at`` is the wall-clock time at which the vector was asked for (the Kafka
timestamp of the Item record that introduced/changed the text, or of the miss report that
asked again); ``computed_at`` when the refresher produced it; ``source_ts`` the Item's event
time (for a user summary: of the newest click it covers, so a join never attaches it to an
earlier impression). The client's staleness is measured from ``requested_at``.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from livectr.core.events import DecodeError


def _finite(*times: float) -> None:
    """Raised from ``__post_init__``, msgspec turns this into a ValidationError (a dead letter)."""
    if not all(math.isfinite(t) for t in times):
        raise ValueError("non-finite time")


class SemanticVector(msgspec.Struct, frozen=True, tag="vec", array_like=True):
    kind: str
    id: str
    version: str
    reduced: bytes
    computed_at: float
    source_ts: float
    requested_at: float
    #: The item's words (:func:`livectr.core.words.pack_words`), computed once from its text
    #: here; None for users, and in records written before words existed.
    words: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("item", "user"):
            raise ValueError(f"kind must be item or user, not {self.kind[:20]!r}")
        _finite(self.computed_at, self.source_ts, self.requested_at)
        if self.words is not None and len(self.words) % 4:
            raise ValueError(f"words of {len(self.words)} bytes: not a multiple of 4")


class MissReport(msgspec.Struct, frozen=True, tag="miss", array_like=True):
    kind: str
    ids: list[str]
    ts: float
    reporter: str = ""

    def __post_init__(self) -> None:
        _finite(self.ts)


class UserClicks(msgspec.Struct, frozen=True, tag="clicks", array_like=True):
    """Items a user clicked (oldest first), for the user-level LLM summary (MSD's user semantics)."""

    user_id: str
    item_ids: list[str]
    ts: float
    reporter: str = ""
    #: Event time of the newest of these clicks: a summary covering them is valid from then on.
    event_ts: float = 0.0

    def __post_init__(self) -> None:
        _finite(self.ts, self.event_ts)


_encoder = msgspec.msgpack.Encoder()
_vector_decoder = msgspec.msgpack.Decoder(SemanticVector)
_request_decoder = msgspec.msgpack.Decoder(MissReport | UserClicks)


def encode(record: SemanticVector | MissReport | UserClicks) -> bytes:
    return _encoder.encode(record)


def vector_key(kind: str, id: str) -> bytes:
    return f"{kind}:{id}".encode()


def _decode(decoder: msgspec.msgpack.Decoder, raw: bytes | None, what: str) -> Any:
    """One record through ``decoder``; every failure becomes a :class:`DecodeError` reason."""
    if raw is None:
        raise DecodeError("empty message (null value)")
    try:
        return decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"invalid {what}: {exc}") from None


def decode_vector(raw: bytes | None) -> SemanticVector:
    """Decode a semantic-topic record, raising :class:`DecodeError` with a reason."""
    return _decode(_vector_decoder, raw, "semantic vector")


def decode_request(raw: bytes | None) -> MissReport | UserClicks:
    """Decode a record of the misses topic, raising :class:`DecodeError` with a reason."""
    return _decode(_request_decoder, raw, "miss report")
