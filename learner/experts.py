"""Fast per-example experts beside the student, mixed in by weights the stream learns.

The student learns at the pace of mini-batches; a user's click rate and taste can move within a
session. Per user, a session bias (constant step, fading between sessions), a slope on the
student's logit and, with semantics, a taste over the item's teacher vector (plus one shared
population taste) are trained example by example on the student's residual and mixed in by
weights in [0, 1] that start at 0 (as learning-rate ensembles choose among step sizes). Why
and what was measured: docs/design.md, "Fast experts".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: Logits are clipped here before ``exp`` (beyond it the probability is 0 or 1 in float64 anyway).
_CLIP = 30.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -_CLIP, _CLIP)))


def _occurrences(rows: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same row (0 for a row's first)."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first = np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]
    starts = np.maximum.accumulate(np.where(first, np.arange(rows.size), 0))
    occ = np.empty(rows.size, dtype=np.int64)
    occ[order] = np.arange(rows.size) - starts
    return occ


class FastExperts:
    """The session-bias and user experts and their mixing weights (see the module docstring).

    ``dim`` is the item vectors' dimension (0: no taste, the user expert is the slope alone).
    """

    def __init__(
        self,
        dim: int = 0,
        user_rate: float = 0.5,
        taste_step: float = 1.5,
        taste_prior: float = 2.0,
        slope_prior: float = 5.5,
        population_taste: bool = True,
        session_s: float = 300.0,
        mix_lr: float = 0.005,
        capacity: int = 1024,
    ) -> None:
        if min(user_rate, taste_step, taste_prior, slope_prior) <= 0 or mix_lr < 0 or session_s < 0:
            raise ValueError("steps, rates and priors must be > 0, session_s and mix_lr >= 0")
        self.dim = int(dim)
        self.user_rate, self.session_s = float(user_rate), float(session_s)
        self.taste_step, self.taste_prior, self.slope_prior = float(taste_step), float(taste_prior), float(slope_prior)
        self.population_taste = bool(population_taste) and self.dim > 0
        self.mix_lr = float(mix_lr)
        #: Mixing weights of the session bias, the user expert's taste and its slope.
        self.mix = 0.0
        self.mix_taste = 0.0
        self.mix_slope = 0.0
        #: Labelled score requests that have fitted the mix (from the first one on, only they do).
        self.serving_feedback = 0
        self.user_w = np.zeros(capacity)
        #: Event time of each user's last update (the session bias fades from there; −inf: never).
        self.user_ts = np.full(capacity, -np.inf)
        self.slope_w = np.zeros(capacity)
        self.slope_h = np.full(capacity, self.slope_prior)
        self.taste_w = np.zeros((capacity if self.dim else 0, self.dim))
        self.taste_h = np.full((capacity if self.dim else 0, self.dim), self.taste_prior)
        self.taste_w0 = np.zeros(self.dim)
        self.taste_h0 = np.full(self.dim, self.taste_prior)

    # -- tables ---------------------------------------------------------------------------------

    def _grow(self, users: np.ndarray) -> None:
        def grown(a: np.ndarray, need: int, fill: float) -> np.ndarray:
            if need <= a.shape[0]:
                return a
            size = max(need, 2 * a.shape[0])
            return np.concatenate([a, np.full((size - a.shape[0], *a.shape[1:]), fill)])

        need = int(users.max()) + 1 if users.size else 0
        self.user_w, self.user_ts = grown(self.user_w, need, 0.0), grown(self.user_ts, need, -np.inf)
        self.slope_w, self.slope_h = grown(self.slope_w, need, 0.0), grown(self.slope_h, need, self.slope_prior)
        if self.dim:
            self.taste_w = grown(self.taste_w, need, 0.0)
            self.taste_h = grown(self.taste_h, need, self.taste_prior)

    def grow_users(self, rows: int) -> None:
        """Make room for user rows below ``rows`` (a replica applying a delta: learner.deltas)."""
        if rows > 0:
            self._grow(np.asarray([rows - 1]))

    def _fade(self, last: np.ndarray, now: np.ndarray | None) -> np.ndarray:
        """Factor by which a session bias last updated at ``last`` has faded at ``now`` (1: no clock)."""
        if not self.session_s or now is None:
            return np.ones(len(last))
        return np.exp(-np.maximum(now - last, 0.0) / self.session_s)

    def _values(
        self, users: np.ndarray, vectors: np.ndarray | None, logits: np.ndarray, ts: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Current session bias, slope and taste values (rows beyond the tables count as unknown: 0)."""

        def at(table: np.ndarray) -> np.ndarray:
            return table[np.where(users < table.shape[0], users, 0)]

        bias = at(self.user_w) * self._fade(at(self.user_ts), ts)
        slope = at(self.slope_w) * logits
        if not self.dim or vectors is None:
            return bias, slope, np.zeros(len(users))
        return bias, slope, np.einsum("nd,nd->n", at(self.taste_w) + self.taste_w0, vectors)

    # -- serving --------------------------------------------------------------------------------

    def components(
        self, users: np.ndarray, vectors: np.ndarray | None, logits: np.ndarray, ts: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows ``(student logit, bias, taste, slope)`` at event times ``ts``: what a score is served from."""
        bias, slope, taste = self._values(users, vectors, logits, ts)
        return np.stack([logits, bias, taste, slope], axis=1)

    def mixed(self, components: np.ndarray) -> np.ndarray:
        """Served logits ``z + a·bias + b·taste + c·slope`` of :meth:`components` rows."""
        return (
            components[:, 0]
            + self.mix * components[:, 1]
            + self.mix_taste * components[:, 2]
            + self.mix_slope * components[:, 3]
        )

    def correct(
        self, users: np.ndarray, vectors: np.ndarray | None, logits: np.ndarray, ts: np.ndarray | None = None
    ) -> np.ndarray:
        """Served logits (no learning)."""
        return self.mixed(self.components(users, vectors, logits, ts))

    def fit_to_served(self, components: Sequence[np.ndarray], labels: Sequence[float]) -> None:
        """Fit the mix to served scores (:meth:`components` rows) whose final labels are in."""
        if not len(labels):
            return
        self._mix_step(np.asarray(components), np.asarray(labels, dtype=np.float64), np.ones(len(labels)))
        self.serving_feedback += len(labels)

    def _mix_step(self, components: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        """One gradient step of the mixing weights on the log loss of the mixed predictions."""
        residual = weights * (_sigmoid(self.mixed(components)) - labels)
        grad = residual @ components[:, 1:]
        self.mix = float(np.clip(self.mix - self.mix_lr * grad[0], 0.0, 1.0))
        self.mix_taste = float(np.clip(self.mix_taste - self.mix_lr * grad[1], 0.0, 1.0))
        self.mix_slope = float(np.clip(self.mix_slope - self.mix_lr * grad[2], 0.0, 1.0))

    # -- learning -------------------------------------------------------------------------------

    def learn(
        self,
        users: np.ndarray,
        vectors: np.ndarray | None,
        logits: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray,
        ts: np.ndarray | None = None,
    ) -> np.ndarray:
        """Score each example with the experts as they stood before it, learn from it; mixed logits.

        ``logits`` are the student's (already out of sample), ``vectors`` the items' unit vectors
        (None without semantics), ``weights`` the per-example loss weights (0: score only),
        ``ts`` the event times (None: the session biases do not fade).
        """
        return self.learn_components(users, vectors, logits, labels, weights, ts)[1]

    def learn_components(
        self,
        users: np.ndarray,
        vectors: np.ndarray | None,
        logits: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray,
        ts: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`learn`, also returning the :meth:`components` rows each example was scored from."""
        self._grow(users)
        labels, weights = labels.astype(np.float64), weights.astype(np.float64)
        components = self._rounds(users, vectors if self.dim else None, logits, labels, weights, ts)
        mixed = self.mixed(components)
        if not self.serving_feedback:
            self._mix_step(components, labels, weights)
        return components, mixed

    def _rounds(
        self,
        users: np.ndarray,
        vectors: np.ndarray | None,
        logits: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray,
        ts: np.ndarray | None,
    ) -> np.ndarray:
        """Per-user online learning of the session bias, slope and taste, one round per occurrence
        of a user in the batch; :meth:`components` rows of each example before its update.

        The session bias fades by ``exp(−Δt / session_s)`` when its user's clock moves forward
        (the clock never runs backwards, so an example older than its user's last one fades
        nothing), then takes a constant step on its own prediction ``σ(z + b_u)``. Slope and
        taste take diagonal online-Newton steps on ``σ(z + b_u + s_u·z + (t_u + t)·v)``.
        """
        occ = _occurrences(users)
        out = np.zeros((len(users), 4))
        out[:, 0] = logits
        fade_ts = ts if self.session_s else None  # None: the session biases do not fade
        pop_g, pop_h = np.zeros(self.dim), np.zeros(self.dim)
        bw, bt, sw, sh, tw, th = self.user_w, self.user_ts, self.slope_w, self.slope_h, self.taste_w, self.taste_h
        for r in range(int(occ.max()) + 1 if occ.size else 0):
            at = np.flatnonzero(occ == r)
            rows, z, y, w = users[at], logits[at], labels[at], weights[at]
            if fade_ts is not None:
                now = fade_ts[at]
                bw[rows] *= self._fade(bt[rows], now)
                bt[rows] = np.maximum(bt[rows], now)
            b, s = bw[rows], sw[rows] * z
            out[at, 1], out[at, 3] = b, s
            x = z + b + s
            if vectors is not None:
                v = vectors[at]
                t = np.einsum("nd,nd->n", tw[rows] + self.taste_w0, v)
                out[at, 2] = t
                x = x + t
            bw[rows] = b - self.user_rate * w * (_sigmoid(z + b) - y)
            p = _sigmoid(x)
            g, h = w * (p - y), w * p * (1.0 - p)
            sh[rows] += h * z * z
            sw[rows] -= self.taste_step * g * z / sh[rows]
            if vectors is not None:
                th[rows] += h[:, None] * v * v
                tw[rows] -= self.taste_step * g[:, None] * v / th[rows]
                pop_g += g @ v
                pop_h += h @ (v * v)
        if self.population_taste and vectors is not None:
            self.taste_h0 += pop_h
            self.taste_w0 -= self.taste_step * pop_g / self.taste_h0
        return out

    # -- state ----------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        return {
            "user_w": self.user_w.copy(),
            "user_ts": self.user_ts.copy(),
            "slope_w": self.slope_w.copy(),
            "slope_h": self.slope_h.copy(),
            "taste_w": self.taste_w.copy(),
            "taste_h": self.taste_h.copy(),
            "taste_w0": self.taste_w0.copy(),
            "taste_h0": self.taste_h0.copy(),
            "mix": np.asarray([self.mix, self.mix_taste, self.mix_slope]),
            "serving_feedback": np.asarray([self.serving_feedback]),
        }

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state`; parts a snapshot lacks (written by an older version) start fresh.

        An older version's user biases have no session clock: they count as from a past session.
        """
        self.user_w = np.asarray(state["user_w"], float).copy()
        self.user_ts = (
            np.asarray(state["user_ts"], float).copy() if "user_ts" in state else np.full(self.user_w.shape, -np.inf)
        )
        if "slope_w" in state:
            self.slope_w, self.slope_h = (
                np.asarray(state["slope_w"], float).copy(),
                np.asarray(state["slope_h"], float).copy(),
            )
        if self.dim and "taste_w" in state and np.asarray(state["taste_w"]).shape[1:] == (self.dim,):
            self.taste_w = np.asarray(state["taste_w"], float).copy()
            self.taste_h = np.asarray(state["taste_h"], float).copy()
            if "taste_w0" in state:
                self.taste_w0 = np.asarray(state["taste_w0"], float).copy()
                self.taste_h0 = np.asarray(state["taste_h0"], float).copy()
        mix = np.asarray(state["mix"], float).reshape(-1)
        self.mix = float(mix[0])
        self.mix_taste = float(mix[1]) if mix.size > 1 else 0.0
        self.mix_slope = float(mix[2]) if mix.size > 2 else 0.0
        self.serving_feedback = int(np.asarray(state.get("serving_feedback", [0])).reshape(-1)[0])
