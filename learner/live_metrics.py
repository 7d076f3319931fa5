"""The learner's figures over its latest impressions, for its status and the run's metrics.

Why: :class:`~livectr.learner.metrics.LearnerMetrics` is cumulative (what a run summary
reports), so after an hour a cumulative AUC hardly moves whatever the model does now. A
report over event time wants the serving AUC, log loss and freshness of the *latest*
impressions. Differences of the cumulative histograms give exactly that: every status keeps
a coarse copy of them, and "recent" is measured since the newest copy at least
``min_impressions`` (or ``min_examples``) ago, so the figure is neither noise nor history.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from livectr.core.events import Example
from livectr.learner.metrics import LearnerMetrics


def histogram_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin counts of positives and negatives (bins in ascending score order); NaN
    while a class is empty. Pairs in one bin count half."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos <= 0 or n_neg <= 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg
    return float(np.dot(pos, neg_below + 0.5 * neg)) / (n_pos * n_neg)


def histogram_quantile(counts: np.ndarray, q: float, lo: float, scale: float) -> float:
    """Quantile of a :class:`~livectr.learner.metrics.LogQuantiles` histogram (last bin: below ``lo``)."""
    total = int(counts.sum())
    if total <= 0:
        return math.nan
    ordered = np.concatenate([counts[-1:], counts[:-1]])
    k = int(np.searchsorted(np.cumsum(ordered), q * total, side="left"))
    return 0.0 if k == 0 else lo * math.exp((k - 1 + 0.5) / scale)


@dataclass
class _Mark:
    """Cumulative counts at one status."""

    pos: np.ndarray
    neg: np.ndarray
    logloss_sum: float
    fresh: np.ndarray

    @property
    def served(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    @property
    def trained(self) -> int:
        return int(self.fresh.sum())


class RecentLearnerMetrics:
    """Serving AUC, log loss and freshness over the latest impressions; the newest event time.

    Call :meth:`released` with the examples the learner is about to train, and merge
    :meth:`sample` into each status.
    """

    def __init__(
        self, min_impressions: int = 5_000, min_examples: int = 5_000, max_marks: int = 300, bins: int = 256
    ) -> None:
        self.min_impressions = min_impressions
        self.min_examples = min_examples
        self.bins = bins
        self._marks: deque[_Mark] = deque(maxlen=max_marks)
        #: Newest impression time (event-time seconds) of the batches released before a status.
        self.event_time = -math.inf
        self._latest: Sequence[Example] = ()

    def released(self, examples: Sequence[Example]) -> None:
        """Note a batch released for training: O(1) on the learner's hot path; its impression
        times are read at the next :meth:`sample` (only the latest batch before each status:
        batches come in decision-time order, so the newest impression times are in it)."""
        if examples:
            self._latest = examples

    def _mark(self, m: LearnerMetrics) -> _Mark:
        pos, neg = m.serving_auc.pos, m.serving_auc.neg
        if pos.size % self.bins == 0:
            pos, neg = pos.reshape(self.bins, -1).sum(axis=1), neg.reshape(self.bins, -1).sum(axis=1)
        return _Mark(pos.copy(), neg.copy(), float(m.serving_logloss_sum), m.freshness.counts.copy())

    def sample(self, m: LearnerMetrics) -> dict[str, Any]:
        """The recent figures (only those with data), plus ``event_time`` once anything was released."""
        now = self._mark(m)
        out: dict[str, Any] = {}
        if self._latest:
            self.event_time = max(self.event_time, max(ex.ts for ex in self._latest))
            self._latest = ()
        if math.isfinite(self.event_time):
            out["event_time"] = self.event_time
        if self._marks:
            base = next((k for k in reversed(self._marks) if now.served - k.served >= self.min_impressions), None)
            base = base if base is not None else self._marks[0]
            served = now.served - base.served
            if served > 0:
                out["serving_auc_recent"] = histogram_auc(now.pos - base.pos, now.neg - base.neg)
                out["serving_logloss_recent"] = (now.logloss_sum - base.logloss_sum) / served
                out["serving_impressions_recent"] = served
            base = next((k for k in reversed(self._marks) if now.trained - k.trained >= self.min_examples), None)
            base = base if base is not None else self._marks[0]
            fresh = now.fresh - base.fresh
            if fresh.sum() > 0:
                lo, scale = m.freshness.lo, m.freshness._scale
                out["freshness_p50_s"] = histogram_quantile(fresh, 0.5, lo, scale)
                out["freshness_p99_s"] = histogram_quantile(fresh, 0.99, lo, scale)
        self._marks.append(now)
        return out
