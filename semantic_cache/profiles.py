"""Users' click profiles as of any recent event time (MSD's user-level semantics, without an LLM).

A user's profile is the decayed mean of the reduced vectors of the items they clicked:
``Σ decay^age · v / Σ decay^age``, ``age`` counting the user's later clicks, in click event-time
order. The join asks for it *as of the impression's time* — from the clicks made strictly
before it (a click logged in the same second as its own impression must not describe it) —
not as of now.

Why as of a time: the join emits an example when its label is decided, up to a window after
the impression, and in a replay it reads the clicks topic ahead of or behind the impressions
topic by minutes of event time (whichever the consumer fetches first). A profile read "now"
then holds clicks made *after* the impression — clicks of the user's later session, the
future a live scorer never has — or misses clicks made before it. Either way the examples
stop being what a live run produces, and a learner trained on them measures a leak: on the
synthetic benchmark a processing-order profile was worth +0.03 AUC that disappeared once
profiles were read as of the impression. Keeping each user's last clicks with their event
times lets every lookup see exactly the clicks made before the impression.

Memory: per user, the last ``history`` clicks as (time, reference to the item's int8 blob —
shared with the item cache, not copied). ``history`` is where ``decay^history`` falls below
:data:`NEGLIGIBLE_WEIGHT`, so dropping older clicks changes no profile by more than that.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from semantic_cache.codec import dequantize

#: A click whose decayed weight is below this (relative to the newest) is forgotten.
NEGLIGIBLE_WEIGHT = 1e-3
#: Most clicks kept per user (the bound when ``decay`` is close to 1).
MAX_HISTORY = 64


def history_length(decay: float) -> int:
    """Clicks kept per user: enough that older ones weigh less than :data:`NEGLIGIBLE_WEIGHT`."""
    if not 0.0 < decay < 1.0:
        return MAX_HISTORY
    return max(1, min(MAX_HISTORY, math.ceil(math.log(NEGLIGIBLE_WEIGHT) / math.log(decay))))


class ClickProfiles:
    """Per-user recent clicks, sorted by event time; profiles as of any time they cover."""

    def __init__(self, dim: int, decay: float) -> None:
        self.dim = dim
        self.decay = decay
        self.history = history_length(decay)
        self._ts: dict[str, list[float]] = {}
        self._blobs: dict[str, list[bytes]] = {}

    def observe(self, user_id: str, ts: float, blob: bytes) -> None:
        """Add a click at event time ``ts`` on an item whose reduced vector is ``blob``.

        Clicks may arrive out of event-time order (several partitions feed one cache); each is
        inserted at its place, and the oldest is dropped past :attr:`history`.
        """
        times = self._ts.get(user_id)
        if times is None:
            self._ts[user_id] = [ts]
            self._blobs[user_id] = [blob]
            return
        blobs = self._blobs[user_id]
        k = bisect.bisect_right(times, ts)
        times.insert(k, ts)
        blobs.insert(k, blob)
        if len(times) > self.history:
            del times[0], blobs[0]

    def newest(self, user_id: str) -> float | None:
        """Event time of the user's newest click (``None`` without clicks)."""
        times = self._ts.get(user_id)
        return times[-1] if times else None

    def clicks_before(self, user_id: str, at: float | None) -> int:
        """How many of the kept clicks have ``ts < at`` (all of them when ``at`` is None)."""
        times = self._ts.get(user_id)
        if not times:
            return 0
        return len(times) if at is None else bisect.bisect_left(times, at)

    def vector(self, user_id: str, at: float | None = None) -> np.ndarray | None:
        """The profile from the clicks with ``ts < at`` (all when ``at`` is None), or ``None``."""
        k = self.clicks_before(user_id, at)
        if k == 0:
            return None
        blobs = self._blobs[user_id]
        vecs = dequantize(np.frombuffer(b"".join(blobs[:k]), dtype=np.int8).reshape(k, self.dim))
        weights = self.decay ** np.arange(k - 1, -1, -1, dtype=np.float32)
        return (weights @ vecs) / weights.sum()

    def clear(self) -> None:
        self._ts.clear()
        self._blobs.clear()
