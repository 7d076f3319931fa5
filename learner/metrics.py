"""Streaming evaluation with constant memory: progressive AUC, log loss, cold-start AUC, freshness.

Progressive validation (Blum et al.; what online learners such as VW and River report): each
example is scored by the model *before* it is trained on, so the running metrics are honest
out-of-sample estimates on a stream without a hold-out set.

AUC without storing scores: predictions are counted in a fine histogram per label, in logit
space (CTR predictions crowd near 0 in probability space; 2^16 bins over logits in [-16, 16]
give ~5e-4 logit resolution). AUC is then exact except for positive/negative pairs that fall
in the same bin, which count ½ — the same convention as exact ties — so the error is bounded
by the share of such pairs (~1e-4 in practice). Scores beyond the range (p < 1e-7 or
p > 1 - 1e-7) share the edge bins and count as ties.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from livectr.core.events import KIND_FAKE_NEGATIVE, KIND_POSITIVE_COPY, Example

_LOGIT_RANGE = 16.0
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


class HistogramAUC:
    """AUC over everything ever added, in ``O(bins)`` memory."""

    def __init__(self, bins: int = 1 << 16) -> None:
        self.bins = bins
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)

    def _bin(self, probs: np.ndarray) -> np.ndarray:
        z = (_logit(probs) + _LOGIT_RANGE) / (2 * _LOGIT_RANGE)
        return np.clip((z * self.bins).astype(np.int64), 0, self.bins - 1)

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        if len(probs) == 0:
            return
        b = self._bin(probs)
        labels = np.asarray(labels) > 0
        np.add.at(self.pos, b[labels], 1)
        np.add.at(self.neg, b[~labels], 1)

    @property
    def positives(self) -> int:
        return int(self.pos.sum())

    @property
    def negatives(self) -> int:
        return int(self.neg.sum())

    def value(self) -> float:
        """AUC, or NaN while one of the classes is still empty."""
        n_pos, n_neg = self.positives, self.negatives
        if n_pos == 0 or n_neg == 0:
            return math.nan
        neg_below = np.cumsum(self.neg) - self.neg
        wins = float(np.dot(self.pos, neg_below + 0.5 * self.neg))
        return wins / (n_pos * n_neg)

    def state(self) -> dict[str, np.ndarray]:
        return {"pos": self.pos, "neg": self.neg}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.pos = np.asarray(state["pos"], dtype=np.int64).copy()
        self.neg = np.asarray(state["neg"], dtype=np.int64).copy()
        self.bins = len(self.pos)


def exact_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based (Mann–Whitney) AUC with ½ for ties; the reference the histogram is tested against."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels) > 0
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(probs, kind="mergesort")
    sorted_p = probs[order]
    ranks = np.empty(len(probs), dtype=np.float64)
    _, start, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, counts)
    return (ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


class WindowAUC:
    """Exact AUC of the last ``size`` examples (a ring buffer), for live progress."""

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self.probs = np.zeros(size, dtype=np.float32)
        self.labels = np.zeros(size, dtype=np.int8)
        self.n = 0

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        probs, labels = np.asarray(probs)[-self.size :], np.asarray(labels)[-self.size :]
        idx = (self.n + np.arange(len(probs))) % self.size
        self.probs[idx] = probs
        self.labels[idx] = labels
        self.n += len(probs)

    def value(self) -> float:
        k = min(self.n, self.size)
        return exact_auc(self.probs[:k], self.labels[:k])


class LogQuantiles:
    """Quantiles of positive durations from a log-spaced histogram (1 ms … ~1 day, ~2% bins)."""

    def __init__(self, lo: float = 1e-3, hi: float = 1e5, bins: int = 1000) -> None:
        self.lo, self.hi, self.bins = lo, hi, bins
        self._scale = bins / math.log(hi / lo)
        self.counts = np.zeros(bins + 1, dtype=np.int64)  # last bin: below lo

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        idx = np.where(
            v < self.lo,
            self.bins,
            np.clip((np.log(np.maximum(v, self.lo) / self.lo) * self._scale).astype(np.int64), 0, self.bins - 1),
        )
        np.add.at(self.counts, idx, 1)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        total = self.count
        if total == 0:
            return math.nan
        ordered = np.concatenate([self.counts[-1:], self.counts[:-1]])
        k = int(np.searchsorted(np.cumsum(ordered), q * total, side="left"))
        if k == 0:
            return 0.0
        return self.lo * math.exp((k - 1 + 0.5) / self._scale)

    def state(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts}

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()


class LearnerMetrics:
    """Everything the learner reports, updated once per trained mini-batch."""

    def __init__(self, window: int = 20_000) -> None:
        self.auc = HistogramAUC()
        self.cold_auc = HistogramAUC()
        self.window = WindowAUC(window)
        self.freshness = LogQuantiles()
        self.examples = 0
        self.positives = 0
        self.logloss_sum = 0.0
        self.distill_sum = 0.0
        self.distill_batches = 0
        self.gate_used = 0.0
        self.gate_seen = 0
        self.serving_auc = HistogramAUC()
        self.serving_cold_auc = HistogramAUC()
        self.serving_logloss_sum = 0.0

    def update(self, probs: np.ndarray, labels: np.ndarray, cold: np.ndarray) -> None:
        """Record pre-update predictions; ``cold`` marks examples counted by cold-start AUC."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels)
        self.auc.add(probs, labels)
        self.cold_auc.add(probs[cold], labels[cold])
        self.window.add(probs, labels)
        p = np.clip(probs, _EPS, 1 - _EPS)
        self.logloss_sum += float(-(labels * np.log(p) + (1 - labels) * np.log1p(-p)).sum())
        self.examples += len(probs)
        self.positives += int(labels.sum())

    def update_serving(self, probs: np.ndarray, labels: np.ndarray, cold: np.ndarray) -> None:
        """Record scores given at impression time against the labels that came later."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels)
        cold = np.asarray(cold, dtype=bool)
        self.serving_auc.add(probs, labels)
        self.serving_cold_auc.add(probs[cold], labels[cold])
        p = np.clip(probs, _EPS, 1 - _EPS)
        self.serving_logloss_sum += float(-(labels * np.log(p) + (1 - labels) * np.log1p(-p)).sum())

    def update_semantic(self, distill_loss: float | None, gate_used: float, gate_seen: int) -> None:
        if distill_loss is not None:
            self.distill_sum += distill_loss
            self.distill_batches += 1
        self.gate_used += gate_used
        self.gate_seen += gate_seen

    def summary(self) -> dict[str, Any]:
        served = self.serving_auc.positives + self.serving_auc.negatives
        label_order_auc = self.auc.value()
        label_order_logloss = self.logloss_sum / self.examples if self.examples else math.nan
        return {
            "serving_auc": self.serving_auc.value(),
            "serving_logloss": self.serving_logloss_sum / served if served else math.nan,
            "serving_cold_start_auc": self.serving_cold_auc.value(),
            "serving_auc_impressions": served,
            "label_order_auc": label_order_auc,
            "label_order_logloss": label_order_logloss,
            # The same figures under their former names (kept for scripts that read them).
            "progressive_auc": label_order_auc,
            "progressive_logloss": label_order_logloss,
            "windowed_auc": self.window.value(),
            "cold_start_auc": self.cold_auc.value(),
            "cold_start_examples": self.cold_auc.positives + self.cold_auc.negatives,
            "freshness_p50_s": self.freshness.quantile(0.5),
            "freshness_p99_s": self.freshness.quantile(0.99),
            "gate_usage": self.gate_used / self.gate_seen if self.gate_seen else math.nan,
            "distill_loss": self.distill_sum / self.distill_batches if self.distill_batches else math.nan,
        }

    def state(self) -> dict[str, np.ndarray]:
        """Arrays for the snapshot, so a resumed learner keeps cumulative metrics."""
        scalars = np.array(
            [
                self.examples,
                self.positives,
                self.logloss_sum,
                self.distill_sum,
                self.distill_batches,
                self.gate_used,
                self.gate_seen,
                self.serving_logloss_sum,
            ],
            dtype=np.float64,
        )
        return {
            "auc.pos": self.auc.pos,
            "auc.neg": self.auc.neg,
            "cold.pos": self.cold_auc.pos,
            "cold.neg": self.cold_auc.neg,
            "fresh": self.freshness.counts,
            "scalars": scalars,
            "serving.pos": self.serving_auc.pos,
            "serving.neg": self.serving_auc.neg,
            "serving_cold.pos": self.serving_cold_auc.pos,
            "serving_cold.neg": self.serving_cold_auc.neg,
        }

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.auc.load({"pos": state["auc.pos"], "neg": state["auc.neg"]})
        self.cold_auc.load({"pos": state["cold.pos"], "neg": state["cold.neg"]})
        self.freshness.load({"counts": state["fresh"]})
        if "serving.pos" in state:  # absent from snapshots that predate score requests
            self.serving_auc.load({"pos": state["serving.pos"], "neg": state["serving.neg"]})
        if "serving_cold.pos" in state:
            self.serving_cold_auc.load({"pos": state["serving_cold.pos"], "neg": state["serving_cold.neg"]})
        s = state["scalars"]
        self.examples, self.positives = int(s[0]), int(s[1])
        self.logloss_sum, self.distill_sum, self.distill_batches = float(s[2]), float(s[3]), int(s[4])
        self.gate_used, self.gate_seen = float(s[5]), int(s[6])
        self.serving_logloss_sum = float(s[7]) if s.size > 7 else 0.0


class ServingEvaluator:
    """Scores given to score requests at impression time, paired with the labels that follow.

    Why: the progressive AUC scores an example when its label *arrives*; under ``wait`` a
    positive arrives seconds after its impression and a negative a whole window later, so the
    model that scores a negative has already learned from the user's later clicks, and the
    figure rewards reacting to label order (a per-example learner even beats the oracle that
    way). A score request is scored in event-time order at its impression's time (see
    :mod:`livectr.learner.align`), as a server would have scored it; the AUC of those scores against
    the labels is the serving AUC. Pending scores are bounded (oldest dropped) and in memory
    only: requests scored before a restart are not evaluated.
    """

    def __init__(self, max_pending: int = 1_000_000) -> None:
        self.max_pending = max_pending
        #: Impression id → (served probability, what it was served from, or None).
        self._pending: dict[str, tuple[float, Any, bool]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def scored(
        self,
        ids: list[str],
        probs: np.ndarray,
        served_from: Sequence[Any] | np.ndarray | None = None,
        cold: np.ndarray | None = None,
    ) -> None:
        """Remember the scores of score requests until their labels arrive; ``served_from``
        (one entry per request) is handed back with the label, for learners fitted to outcomes;
        ``cold`` marks requests among their item's first impressions (serving cold-start AUC)."""
        pending = self._pending
        extras = served_from if served_from is not None else [None] * len(ids)
        colds = cold.tolist() if cold is not None else [False] * len(ids)
        for iid, p, extra, c in zip(ids, probs.tolist(), extras, colds):
            pending[iid] = (p, extra, c)
        while len(pending) > self.max_pending:
            del pending[next(iter(pending))]

    def served(self, impression_id: str) -> float | None:
        """The score served for ``impression_id`` while its label is pending (None if none is)."""
        entry = self._pending.get(impression_id)
        return None if entry is None else entry[0]

    def labelled(
        self, metrics: LearnerMetrics, examples: Sequence[Example], labels: np.ndarray
    ) -> tuple[list[Any], list[float]]:
        """Pair the final labels of ``examples`` with their requests' scores (if any) into
        ``metrics``; returns the ``served_from`` entries of the requests labelled now, with their labels."""
        pending = self._pending
        served: list[Any] = []
        served_labels: list[float] = []
        if not pending:
            return served, served_labels
        probs, ys, colds = [], [], []
        for ex, y in zip(examples, labels.tolist()):
            entry = pending.pop(ex.impression_id, None)
            if entry is not None:
                probs.append(entry[0])
                ys.append(y)
                colds.append(entry[2])
                if entry[1] is not None:
                    served.append(entry[1])
                    served_labels.append(y)
        if probs:
            metrics.update_serving(np.asarray(probs), np.asarray(ys), np.asarray(colds, dtype=bool))
        return served, served_labels


class DelayedLabelEvaluator:
    """Progressive validation for the ``fake-negative`` policy: score once, label when known.

    Why: under fake-negative labelling every impression is first trained on as a negative and a
    clicked one comes back later as a positive copy. Scoring both copies would count a clicked
    impression once as a negative and once as a positive — and the positive copy is scored by a
    model that has just been pushed down on that very example, so AUC falls below 0.5 however
    good the model is. What matters is the score the model gave when the impression was shown:
    this keeps the fake negative's score (and its cold-start flag), attaches label 1 when the
    positive copy arrives and label 0 once the attribution window (plus slack) has passed in
    event time, and feeds each impression to the metrics exactly once.

    The clock that closes impressions is the largest impression time observed, so the
    examples must come in decision-time order (the join emits them so, and the learner trains
    them in that order). Should a positive copy still reach the learner *before* its fake
    negative (a restart, disorder between join sources), it waits (``_early``) for its fake
    negative, whose score it then takes. Each impression is evaluated at most once, whatever the
    order: the ids closed by the clock are remembered — the newest ``memory`` as strings, then
    ``old_generations`` more generations as sorted 64-bit hashes (8 bytes an id; a run whose
    partitions lagged ~1,000 s of event time outran two generations of strings) — and an
    example of one of them that comes after its close is counted in :attr:`late`, not evaluated
    again. Only an example whose impression is past the horizon can have been closed, so only
    those are looked up in the older generations.

    Pending scores live in memory only: after a restart, a positive copy of an impression scored
    before it is evaluated with the current model's score.
    """

    def __init__(
        self, window_s: float, slack_s: float | None = None, memory: int = 100_000, old_generations: int = 20
    ) -> None:
        self.horizon_s = window_s + (slack_s if slack_s is not None else 0.1 * window_s)
        self._pending: dict[str, tuple[float, bool]] = {}
        self._early: dict[str, tuple[float, bool]] = {}
        self._order: deque[tuple[float, str]] = deque()
        self._max_ts = -math.inf
        self._memory = max(1, memory)
        self._closed_now: set[str] = set()
        #: Older generations of closed ids, as sorted 64-bit hashes (8 bytes an id): consulted only
        #: for examples whose impression is already past the horizon — no other can be closed.
        self._closed_old: deque[np.ndarray] = deque(maxlen=max(1, old_generations))
        #: Examples that came after their impression had been closed (not evaluated again).
        self.late = 0

    def __len__(self) -> int:
        return len(self._pending) + len(self._early)

    def observe(
        self,
        metrics: LearnerMetrics,
        ids: list[str],
        ts: np.ndarray,
        probs: np.ndarray,
        labels: np.ndarray,
        kinds: np.ndarray,
        cold: np.ndarray,
    ) -> None:
        """Route a trained batch's pre-update scores to ``metrics`` by example kind."""
        out_p: list[float] = []
        out_y: list[int] = []
        out_c: list[bool] = []
        closed_now, past = self._closed_now, self._max_ts - self.horizon_s
        for i, kind in enumerate(kinds.tolist()):
            if kind == KIND_FAKE_NEGATIVE or kind == KIND_POSITIVE_COPY:
                if ids[i] in closed_now or (ts[i] < past and self._closed_before(ids[i])):  # evaluated already
                    self.late += 1
                    continue
            if kind == KIND_FAKE_NEGATIVE:
                if self._early.pop(ids[i], None) is not None:  # its click is already known
                    out_p.append(float(probs[i]))
                    out_y.append(1)
                    out_c.append(bool(cold[i]))
                    continue
                self._pending[ids[i]] = (float(probs[i]), bool(cold[i]))
                self._order.append((float(ts[i]), ids[i]))
            elif kind == KIND_POSITIVE_COPY:
                entry = self._pending.pop(ids[i], None)
                if entry is None:
                    self._early[ids[i]] = (float(probs[i]), bool(cold[i]))
                    self._order.append((float(ts[i]), ids[i]))
                    continue
                out_p.append(entry[0])
                out_y.append(1)
                out_c.append(entry[1])
            else:
                out_p.append(float(probs[i]))
                out_y.append(int(labels[i]))
                out_c.append(bool(cold[i]))
        if len(ts):
            self._max_ts = max(self._max_ts, float(np.max(ts)))
        self._expire(self._max_ts - self.horizon_s, out_p, out_y, out_c)
        _evaluated(metrics, out_p, out_y, out_c)

    def flush(self, metrics: LearnerMetrics) -> None:
        """End of a bounded stream: every impression still waiting was not clicked."""
        out_p: list[float] = []
        out_y: list[int] = []
        out_c: list[bool] = []
        self._expire(math.inf, out_p, out_y, out_c)
        _evaluated(metrics, out_p, out_y, out_c)

    def _expire(self, horizon: float, out_p: list[float], out_y: list[int], out_c: list[bool]) -> None:
        while self._order and self._order[0][0] < horizon:
            _, impression_id = self._order.popleft()
            entry = self._pending.pop(impression_id, None)
            if entry is not None:
                out_p.append(entry[0])
                out_y.append(0)
                out_c.append(entry[1])
                self._remember_closed(impression_id)
                continue
            early = self._early.pop(impression_id, None)
            if early is not None:  # its fake negative never came (trained before a restart)
                out_p.append(early[0])
                out_y.append(1)
                out_c.append(early[1])
                self._remember_closed(impression_id)

    def _remember_closed(self, impression_id: str) -> None:
        self._closed_now.add(impression_id)
        if len(self._closed_now) >= self._memory:
            hashes = np.fromiter((hash(i) for i in self._closed_now), np.int64, len(self._closed_now))
            self._closed_old.append(np.sort(hashes))
            self._closed_now = set()

    def _closed_before(self, impression_id: str) -> bool:
        """Whether ``impression_id`` is in an older generation of closed ids (by its hash)."""
        h = hash(impression_id)
        for hashes in self._closed_old:
            at = int(np.searchsorted(hashes, h))
            if at < hashes.size and hashes[at] == h:
                return True
        return False


def _evaluated(metrics: LearnerMetrics, probs: list[float], labels: list[int], cold: list[bool]) -> None:
    """Impressions whose fake-negative score just got its final label.

    They count for the progressive metrics and for the serving AUC alike: a fake negative is
    scored when its impression arrives, which is what the serving AUC measures under ``wait``
    with score requests, so the two policies report comparable serving figures.
    """
    if not probs:
        return
    p, y, c = np.asarray(probs), np.asarray(labels, dtype=np.float32), np.asarray(cold, dtype=bool)
    metrics.update(p, y, c)
    metrics.update_serving(p, y, c)
