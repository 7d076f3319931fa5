"""What the join worker needs from the semantic cache, and nothing more.

Why a protocol: the join worker must never wait on the teacher. It asks for a vector, gets
bytes or ``None`` at once, and on ``None`` the cache records a miss and arranges a refresh
in the background. Keeping the contract this small lets the join be tested without a teacher
and lets the cache change (in-process, Kafka-fed, remote) without touching the join.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class SemanticLookup(Protocol):
    """Non-blocking access to reduced (int8, see :mod:`livectr.semantic_cache.codec`) teacher vectors."""

    #: Teacher + reduction version the vectors belong to (copied into each example).
    version: str

    def item(self, item_id: str) -> bytes | None:
        """The item's reduced vector, or ``None`` on a miss (which is recorded and queued)."""
        ...

    def item_words(self, item_id: str) -> bytes | None:
        """The item's words (:func:`livectr.core.words.pack_words`), or ``None`` when unknown
        (no miss is counted: :meth:`item` already did)."""
        ...

    def user(self, user_id: str, at: float | None = None) -> bytes | None:
        """The user's reduced vector (decayed mean of the items clicked up to event time ``at``;
        all clicks when None), or ``None``."""
        ...

    def observe_click(self, user_id: str, item_id: str, ts: float) -> None:
        """Add a click on ``item_id`` at event time ``ts`` to the user's profile."""
        ...

    def expire_users(self, before: float) -> int:
        """Forget the profiles of users whose newest click is older than event time ``before``;
        returns how many were forgotten."""
        ...

    def stats(self) -> dict[str, float]:
        """Counters for the summary: lookups, misses, miss_rate, staleness_p50_s, …"""
        ...

    def close(self) -> None:
        """Stop background work and flush pending miss reports."""
        ...
