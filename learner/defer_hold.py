"""``defer``'s observed negatives held in the learner until a fake negative is likely to be right.

Why: with no waiting window (the join's default), ``defer`` trains every impression at once as
a negative and corrects it when its click comes. Where few impressions are clicked that negative
is nearly always right; on a stream where most are (a ratings log: 55 %), most of them are
wrong for a click delay, and the model serves from them in between. The learner estimates the
click rate ``p`` and the click-delay distribution ``F`` from the true labels and holds each
observed negative for the shortest wait ``W`` after which a still-unclicked impression is a
click with probability ``p(1 − F(W)) / (1 − p·F(W)) ≤ ε``; where ``p ≤ ε``, ``W`` is 0 and
nothing is held. Released at ``ts + W``, the copy carries the label observed by then (1 if its
click came within ``W``) and trains with ``defer``'s importance weights for a waiting window
``W`` — the paper's method with its window chosen from the stream. The served score does not
change: the observed copy is still scored where it arrives. Measured: docs/benchmarks.md,
"A waiting window chosen from the stream".

Held copies live in memory only: after a restart the copies held then are not trained (their
true labels still are).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from livectr.core.events import KIND_DEFER_HELD, KIND_DEFER_OBSERVED, KIND_DEFER_TRUE, Example

#: Clicks seen before a wait is chosen from their delays.
MIN_CLICKS = 200


class ClickDelays:
    """Click rate and click-delay distribution of the true labels (``defer``'s true copies), and
    how often a user comes back within the median click delay.

    Delays are counted in bins whose upper edges are the candidate waits: 0, then 48 steps from
    1 s to the attribution window, evenly spaced in log time. A wrong fake negative only harms
    the scores served while it stands: those of the same user's next impressions within a click
    delay. On a stream where users come back that soon (a ratings log: 85 % of impressions) it
    is served from; where they rarely do (23 % on a stationary stream of 600 users over 100
    minutes), waiting costs more freshness than it saves.
    """

    def __init__(self, window_s: float) -> None:
        self.edges = np.r_[0.0, np.geomspace(1.0, max(window_s, 1.0), 48)]
        self.counts = np.zeros(self.edges.size + 1)  # the last bin: beyond the window (never, in practice)
        #: Impressions (their observed copies): the click rate is clicks over impressions, not
        #: over final labels, whose negatives come a whole window after the clicks.
        self.impressions = 0.0
        #: Impressions whose user had one within the median click delay before, of those counted.
        self.returns = 0.0
        self.visits = 0.0
        self._last_visit = np.zeros(0)

    @property
    def clicks(self) -> float:
        return float(self.counts.sum())

    def observe(self, examples: Sequence[Example]) -> None:
        """Count the impressions (observed copies) and the clicks (true positives) among ``examples``."""
        delays: list[float] = []
        for ex in examples:
            if ex.kind == KIND_DEFER_OBSERVED:
                self.impressions += 1.0
            elif ex.kind == KIND_DEFER_TRUE and ex.label:
                delays.append(ex.click_delay)
        if delays:
            at = np.searchsorted(self.edges, np.maximum(np.asarray(delays, np.float64), 0.0), side="left")
            np.add.at(self.counts, at, 1.0)

    def median_delay(self) -> float:
        """The median click delay (the upper edge of its bin; the window before any click)."""
        clicks = self.clicks
        if not clicks:
            return float(self.edges[-1])
        at = int(np.searchsorted(np.cumsum(self.counts[:-1]), clicks / 2.0, side="left"))
        return float(self.edges[min(at, self.edges.size - 1)])

    def observe_users(self, rows: np.ndarray, ts: np.ndarray) -> None:
        """Impressions of user ``rows`` at ``ts``: count those whose user had one within the
        median click delay before (row 0, unknown users, is not counted)."""
        keep = rows > 0
        rows, ts = rows[keep], ts[keep]
        if not rows.size:
            return
        if rows.max() >= self._last_visit.size:
            grown = np.full(max(int(rows.max()) + 1, 2 * self._last_visit.size), -np.inf)
            grown[: self._last_visit.size] = self._last_visit
            self._last_visit = grown
        order = np.lexsort((ts, rows))
        r, t = rows[order], ts[order]
        first = np.r_[True, r[1:] != r[:-1]]
        before = np.where(first, self._last_visit[r], np.r_[-np.inf, t[:-1]])
        self.returns += float((t - before <= self.median_delay()).sum())
        self.visits += float(r.size)
        np.maximum.at(self._last_visit, r, t)

    def forget_users(self, rows: np.ndarray) -> None:
        """User rows freed by expiry (a new user will take them)."""
        rows = rows[rows < self._last_visit.size]
        self._last_visit[rows] = -np.inf

    @property
    def return_share(self) -> float:
        """Share of impressions whose user had one within the median click delay before (1 before any)."""
        return (self.returns + 1.0) / (self.visits + 1.0)

    def share_after(self, wait_s: float) -> float:
        """Share of clicks that come after ``wait_s`` (a Beta(1, 3) prior: 1/4 before any click)."""
        late = float(self.counts[np.searchsorted(self.edges, wait_s, side="right") :].sum())
        return (1.0 + late) / (4.0 + self.clicks)

    def wait(self, error: float, max_wait_s: float) -> float:
        """The shortest candidate wait ``W`` after which an impression served soon after one of its
        user's is likely to be served from a wrong fake negative at most ``error`` of the time:
        ``R · p(1 − F(W)) / (1 − p·F(W))``, ``R`` the :attr:`return_share`. 0 while fewer than
        :data:`MIN_CLICKS` clicks are known, or where ``R·p`` itself is at most ``error``; at most
        ``max_wait_s``."""
        clicks = self.clicks
        if clicks < MIN_CLICKS:
            return 0.0
        p = min(clicks / max(self.impressions, 1.0), 1.0)
        served = self.return_share
        if served * p <= error:
            return 0.0
        within = np.cumsum(self.counts[:-1]) / clicks  # F at each edge
        wrong = served * p * (1.0 - within) / np.maximum(1.0 - p * within, 1e-12)
        ok = np.flatnonzero((wrong <= error) & (self.edges <= max_wait_s))
        return float(self.edges[ok[0]]) if ok.size else float(self.edges[self.edges <= max_wait_s][-1])

    def state(self) -> dict[str, np.ndarray]:
        return {
            "edges": self.edges.copy(),
            "counts": self.counts.copy(),
            "impressions": np.asarray([self.impressions]),
            "returns": np.asarray([self.returns, self.visits]),
        }

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state` (kept fresh if it was written for another window)."""
        if np.array_equal(np.asarray(state["edges"]), self.edges):
            self.counts = np.asarray(state["counts"], np.float64).copy()
            self.impressions = float(np.asarray(state["impressions"]).reshape(-1)[0])
            self.returns, self.visits = (float(x) for x in np.asarray(state["returns"]).reshape(-1)[:2])


class HeldNegatives:
    """Observed negatives waiting for their release time, and the clicks that came meanwhile."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, str]] = []
        self._held: dict[str, tuple[Example, float]] = {}
        self._clicked: set[str] = set()
        self._seq = 0
        #: Observed negatives held so far (a status figure).
        self.holds = 0

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, example: Example, due: float) -> None:
        """Hold ``example`` (an observed negative) until event time ``due`` (a repeat is ignored)."""
        if example.impression_id in self._held:
            return
        self._held[example.impression_id] = (example, due)
        heapq.heappush(self._due, (due, self._seq, example.impression_id))
        self._seq += 1
        self.holds += 1

    def click(self, impression_id: str, clicked_at: float) -> None:
        """A click for ``impression_id`` at ``clicked_at``: its held copy, if due later, is a positive."""
        entry = self._held.get(impression_id)
        if entry is not None and clicked_at <= entry[1]:
            self._clicked.add(impression_id)

    def release(self, now: float, keep_at_most: int | None = None) -> list[tuple[float, Example]]:
        """The held copies due by ``now``, as ``(due, example)`` in due order, labelled; then, while
        more than ``keep_at_most`` are held, the earliest due ones too (a fast stream with a long
        wait would otherwise hold more than memory allows: their wait is cut short)."""
        out: list[tuple[float, Example]] = []
        while self._due and (self._due[0][0] <= now or (keep_at_most is not None and len(self._held) > keep_at_most)):
            due, _, iid = heapq.heappop(self._due)
            example, _ = self._held.pop(iid)
            label = int(iid in self._clicked)
            self._clicked.discard(iid)
            out.append((due, msgspec.structs.replace(example, kind=KIND_DEFER_HELD, label=label)))
        return out


def merge_released(
    examples: Sequence[Example], decided: np.ndarray, released: list[tuple[float, Example]]
) -> tuple[list[Example], np.ndarray]:
    """``examples`` (decided at ``decided``, non-decreasing) with the released copies placed at
    their due times; returns the merged list and the positions of ``examples`` in it."""
    if not released:
        return list(examples), np.arange(len(examples))
    due = np.fromiter((d for d, _ in released), np.float64, len(released))
    slot = np.searchsorted(decided, due, side="left")  # before the first example decided at or after
    merged: list[Example] = []
    own = np.empty(len(examples), dtype=np.int64)
    r = 0
    for k, ex in enumerate(examples):
        while r < len(released) and slot[r] <= k:
            merged.append(released[r][1])
            r += 1
        own[k] = len(merged)
        merged.append(ex)
    merged.extend(ex for _, ex in released[r:])
    return merged, own
