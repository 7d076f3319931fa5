"""Users' semantic profiles as of any recent event time (MSD's user-level semantics, without an LLM).

A user's profile is the decayed mean of the reduced vectors of the items they clicked,
``Σ decay^age · v / Σ decay^age`` (``age`` counts the user's later clicks), folded from the
clicks the join keeps (:class:`livectr.streams.profiles.ClickHistory`) made strictly *before*
the asked event time. Why as of a time, not now: the join emits an example up to a window
after its impression and a replay reads clicks ahead of or behind impressions, so a profile
read "now" would hold the user's future clicks (a leak; see docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from livectr.semantic_cache.codec import dequantize
from livectr.streams.profiles import ClickHistory, history_length


def decayed_mean(blobs: list[bytes | None], dim: int, decay: float) -> np.ndarray | None:
    """``Σ decay^age · v / Σ decay^age`` over the present blobs, oldest first (``None`` if none).

    ``age`` counts all later clicks, present or not: a click whose vector is missing weighs
    nothing but still ages the clicks before it, as it will once its vector arrives.
    """
    k = len(blobs)
    weights = decay ** np.arange(k - 1, -1, -1, dtype=np.float32)
    present = [j for j, blob in enumerate(blobs) if blob is not None]
    if not present:
        return None
    if len(present) < k:
        weights = weights[present]
        blobs = [blobs[j] for j in present]
    vecs = dequantize(np.frombuffer(b"".join(blobs), dtype=np.int8).reshape(len(blobs), dim))  # type: ignore[arg-type]
    return (weights @ vecs) / weights.sum()


class Profile(NamedTuple):
    """A folded profile and how many of its clicks had no vector to fold."""

    vector: np.ndarray | None
    missing: int


class ClickProfiles:
    """Profiles as of any time the kept clicks cover, folded from the vectors ``vector_of`` returns.

    ``vector_of`` is the cache's item lookup (int8 blob or ``None``), asked at fold time.
    """

    def __init__(self, dim: int, decay: float, vector_of: Callable[[str], bytes | None]) -> None:
        self.dim = dim
        self.decay = decay
        self.clicks = ClickHistory(history_length(decay))
        self._vector_of = vector_of

    @property
    def history(self) -> int:
        return self.clicks.history

    def observe(self, user_id: str, ts: float, item_id: str) -> bool:
        """Add a click at event time ``ts`` on ``item_id``; ``False`` if it is not kept (see ClickHistory)."""
        return self.clicks.observe(user_id, ts, item_id)

    def newest(self, user_id: str) -> float | None:
        return self.clicks.newest(user_id)

    def expire(self, before: float) -> list[str]:
        """Forget users whose newest click is older than ``before`` (see :meth:`ClickHistory.expire`)."""
        return self.clicks.expire(before)

    def clicks_before(self, user_id: str, at: float | None) -> int:
        return self.clicks.clicks_before(user_id, at)

    def profile(self, user_id: str, at: float | None = None) -> Profile:
        """The profile from the clicks with ``ts < at`` (all when ``at`` is None).

        ``missing`` counts the clicks it folds whose item has no vector yet: the caller may keep
        a complete answer, and must re-fold an incomplete one once vectors arrive.
        """
        k = self.clicks.clicks_before(user_id, at)
        if k == 0:
            return Profile(None, 0)
        vector_of = self._vector_of
        blobs = [vector_of(item) for item in self.clicks.items(user_id, k)]
        return Profile(decayed_mean(blobs, self.dim, self.decay), sum(blob is None for blob in blobs))
