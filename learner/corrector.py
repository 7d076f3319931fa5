"""A per-example residual corrector of the student's user and item biases, mixed in by a learned weight.

Why: the student updates its first-order (bias) weights once per mini-batch, at the online-Newton
pace of a Bayesian logistic regression. On streams where a user's or an item's click rate moves
within a session — MovieLens users rate dozens of films in one sitting, in moods — a learner
that keeps adapting faster does better: a per-example logistic regression with twice the
Newton step scored 0.7606 against 0.7541 on MovieLens 100K. On the synthetic stream, where
biases are stable, the same faster steps cost 0.010. No single step size serves both.

So the corrector runs *beside* the student, as a second expert in the sense of online
learning-rate ensembles (MetaGrad, van Erven & Koolen 2016):

* per user row and per item row a fast weight ``f``, trained **example by example** in arrival
  order (a sequential scan of the mini-batch; example *i* is scored before it updates anything,
  so progressive validation stays out of sample) by online Newton on the residual of the
  student's logit ``z``: its own prediction is ``σ(z + f_u + f_i)``, its step ``step × g / H``
  with the precision ``H`` growing by ``p(1 − p)`` from a prior;
* the served logit is ``z + a · (f_u + f_i)``, where the mixing weight ``a ∈ [0, 1]`` starts at 0
  and is learned online by gradient descent on the log loss of the mixed prediction — the
  stream decides how much of the fast expert to trust.

What ``a`` is fitted to matters under the ``wait`` policy: there a session's clicks reach the
learner ten minutes before its non-clicks, a fast expert rides that order, and a mix fitted to
the training stream trusts it more than serving warrants (MovieLens 100K, serving order: 0.6883
→ 0.6817). So once *score requests* come back labelled — impressions scored at their own time,
as a server scores them (``learner.metrics.ServingEvaluator``) — ``a`` is fitted to those
outcomes instead, and the training stream no longer moves it.

Measured on the student's progressive scores (3 seeds in the bench): MovieLens 100K 0.7539 →
0.760 (``a`` settles near 0.8); the synthetic stream unchanged (``a`` stays near 0).

Cost: one Python loop step per example (the scan cannot be vectorised: example *i*'s step
depends on every earlier example of its user and item in the batch), ~1 µs.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

#: Logits are clipped here before ``exp`` (beyond it the probability is 0 or 1 in float64 anyway).
_CLIP = 30.0


class BiasCorrector:
    """Fast per-user and per-item residual weights and their mixing weight (see the module docstring)."""

    def __init__(self, step: float = 2.0, prior: float = 2.5, mix_lr: float = 0.01, capacity: int = 1024) -> None:
        if step <= 0 or prior <= 0 or mix_lr < 0:
            raise ValueError(f"step and prior must be > 0 and mix_lr >= 0, not {step!r}, {prior!r}, {mix_lr!r}")
        self.step = float(step)
        self.prior = float(prior)
        self.mix_lr = float(mix_lr)
        self.mix = 0.0
        #: Labelled score requests that have trained ``a`` (from the first one on, only they do).
        self.serving_feedback = 0
        #: Score requests awaiting their label: impression id → (student logit, correction).
        self._requests: dict[str, tuple[float, float]] = {}
        self.max_requests = 1_000_000
        self.user_w = np.zeros(capacity)
        self.user_h = np.full(capacity, self.prior)
        self.item_w = np.zeros(capacity)
        self.item_h = np.full(capacity, self.prior)

    def _grow(self, users: np.ndarray, items: np.ndarray) -> None:
        for name, rows in (("user", users), ("item", items)):
            w: np.ndarray = getattr(self, f"{name}_w")
            need = int(rows.max()) + 1 if rows.size else 0
            if need > w.size:
                size = max(need, 2 * w.size)
                setattr(self, f"{name}_w", np.r_[w, np.zeros(size - w.size)])
                setattr(self, f"{name}_h", np.r_[getattr(self, f"{name}_h"), np.full(size - w.size, self.prior)])

    def correct(self, users: np.ndarray, items: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Served logits ``z + a · (f_u + f_i)`` (no learning; ids beyond the tables get no correction)."""
        u = np.where(users < self.user_w.size, users, 0)
        i = np.where(items < self.item_w.size, items, 0)
        return logits + self.mix * (self.user_w[u] + self.item_w[i])

    def scored(self, ids: list[str], users: np.ndarray, items: np.ndarray, logits: np.ndarray) -> None:
        """Remember what score requests were served from, until their labels arrive."""
        u = np.where(users < self.user_w.size, users, 0)
        i = np.where(items < self.item_w.size, items, 0)
        corrections = self.user_w[u] + self.item_w[i]
        pending = self._requests
        for iid, z, f in zip(ids, logits.tolist(), corrections.tolist()):
            pending[iid] = (z, f)
        while len(pending) > self.max_requests:
            del pending[next(iter(pending))]

    def serving_labelled(self, ids: list[str], labels: np.ndarray) -> None:
        """Fit ``a`` to the served scores of requests whose final labels are in."""
        pending = self._requests
        if not pending:
            return
        a, lr, exp = self.mix, self.mix_lr, math.exp
        for iid, y in zip(ids, labels.tolist()):
            served = pending.pop(iid, None)
            if served is None:
                continue
            z, f = served
            pm = 1.0 / (1.0 + exp(-min(_CLIP, max(-_CLIP, z + a * f))))
            a = min(1.0, max(0.0, a - lr * (pm - y) * f))
            self.serving_feedback += 1
        self.mix = a

    def learn(self, users: np.ndarray, items: np.ndarray, logits: np.ndarray, labels: np.ndarray,
              weights: np.ndarray) -> np.ndarray:
        """Score each example with the corrections of everything before it, then learn from it.

        ``logits`` are the student's (already out of sample) logits, ``weights`` the per-example
        loss weights (fake-negative weighting, 1 otherwise). Returns the mixed logits, each
        computed before its own example was learned.
        """
        self._grow(users, items)
        # The scan runs on Python lists of the batch's distinct rows (gathered and scattered
        # once): indexing numpy arrays one scalar at a time would cost several times more.
        user_rows, u_at = np.unique(users, return_inverse=True)
        item_rows, i_at = np.unique(items, return_inverse=True)
        uw, uh = self.user_w[user_rows].tolist(), self.user_h[user_rows].tolist()
        iw, ih = self.item_w[item_rows].tolist(), self.item_h[item_rows].tolist()
        step, a = self.step, self.mix
        mix_lr = 0.0 if self.serving_feedback else self.mix_lr
        out = []
        exp = math.exp
        for u, i, z, y, w in zip(u_at.tolist(), i_at.tolist(), logits.tolist(), labels.tolist(), weights.tolist()):
            f = uw[u] + iw[i]
            zm = z + a * f
            out.append(zm)
            if mix_lr:
                pm = 1.0 / (1.0 + exp(-min(_CLIP, max(-_CLIP, zm))))
                a -= mix_lr * w * (pm - y) * f
                a = 0.0 if a < 0.0 else 1.0 if a > 1.0 else a
            p = 1.0 / (1.0 + exp(-min(_CLIP, max(-_CLIP, z + f))))
            g, h = w * (p - y), w * p * (1.0 - p)
            uh[u] += h
            ih[i] += h
            uw[u] -= step * g / uh[u]
            iw[i] -= step * g / ih[i]
        self.user_w[user_rows], self.user_h[user_rows] = uw, uh
        self.item_w[item_rows], self.item_h[item_rows] = iw, ih
        self.mix = a
        return np.asarray(out)

    def state(self) -> dict[str, np.ndarray]:
        return {"user_w": self.user_w.copy(), "user_h": self.user_h.copy(), "item_w": self.item_w.copy(),
                "item_h": self.item_h.copy(), "mix": np.asarray([self.mix]),
                "serving_feedback": np.asarray([self.serving_feedback])}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        self.user_w, self.user_h = np.asarray(state["user_w"], float).copy(), np.asarray(state["user_h"], float).copy()
        self.item_w, self.item_h = np.asarray(state["item_w"], float).copy(), np.asarray(state["item_h"], float).copy()
        self.mix = float(np.asarray(state["mix"]).reshape(-1)[0])
        self.serving_feedback = int(np.asarray(state.get("serving_feedback", [0])).reshape(-1)[0])
