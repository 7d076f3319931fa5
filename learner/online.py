"""Online training of the student: River-style ``learn_one``/``predict_one`` and batch forms.

``learn_batch`` is progressive validation: the batch is scored by the current model (the very
forward pass that is then back-propagated), the scores go to the metrics, and only then is the
model updated, so every reported figure is out-of-sample. Id rows are updated per example by
:class:`livectr.learner.sparse.RowOptimizer` (only the rows in the batch move, each at the pace
of its own examples); the dense layers by Adam. Tables grow with the vocabularies.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from livectr.core.config import PRIOR_TABLES, Config, names_of
from livectr.core.events import (
    KIND_DEFER_HELD,
    KIND_DEFER_OBSERVED,
    KIND_DEFER_TRUE,
    KIND_FAKE_NEGATIVE,
    KIND_FINAL,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    Example,
    decision_time,
)
from livectr.learner.cold_start import ColdStart
from livectr.learner.defer_hold import ClickDelays, HeldNegatives, merge_released
from livectr.learner.deltas import TouchedRows
from livectr.learner.features import EncodedBatch
from livectr.learner.metrics import DelayedLabelEvaluator, LearnerMetrics, ServingEvaluator
from livectr.learner.model import ModelInputs
from livectr.learner.predictor import Predictor, sigmoid
from livectr.learner.snapshot import LearnerState
from livectr.learner.sparse import PriorTuner, RowOptimizer
from livectr.semantic_cache.index import ItemIndex


def fake_negative_weights(p: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Per-example loss weights of the fake-negative weighted loss (Ktena et al., RecSys 2019).

    Under the fake-negative policy every impression is first sent as a negative and, on click,
    a positive copy follows; the observed distribution is biased towards negatives. Weighting
    the positive loss by ``1 + p`` and the negative loss by ``(1 - p)(1 + p)`` — with ``p`` the
    model's own prediction, gradient stopped — is the importance weighting that makes the
    model converge to the true CTR. Examples labelled under the ``wait`` policy get weight 1.
    """
    fn = (kinds == KIND_FAKE_NEGATIVE) | (kinds == KIND_POSITIVE_COPY)
    p = p.detach()
    w = torch.where(labels > 0, 1 + p, (1 - p) * (1 + p))
    return torch.where(fn, w, torch.ones_like(w))


def loss_weights(
    p: torch.Tensor,
    labels: torch.Tensor,
    kinds: torch.Tensor,
    delayed_share: float,
    real_negative_rate: float | torch.Tensor = 1.0,
    dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example loss weights: the importance weights of each labelling policy.

    * ``fake-negative`` examples: :func:`fake_negative_weights`.
    * ``defer`` examples (Gu et al., KDD 2021): every impression is ingested as its label
      observed after the waiting window, and again with its true label — at the click, or as a
      *real negative* at the window's end, kept with probability ``r`` (``real_negative_rate``:
      1 in the paper; a tensor gives each example its own). With ``p_dp = p·s`` the probability
      of a click after the waiting window (``s``: the share of clicks that come after it,
      estimated from the stream), the observed mass is ``p(2 − s)`` for positives and
      ``1 − p + p·s + r(1 − p)`` for negatives, of ``Z = 1 + p + r(1 − p)`` in all, so the
      weights ``p/q`` are ``Z / (2 − s)`` and ``(1 − p)·Z / (1 − p + p·s + r(1 − p))``. ``r = 1``
      gives the paper's ``1/(1 − s/2)`` and ``(1 − p)/(1 − p + p·s/2)``; ``r = 0``, ``s = 1``
      fake-negative's. Real negatives left out (``dropped``) weigh 0.
    * score requests: 0 (scored in the batch, never trained on); everything else 1.
    """
    p = p.detach()
    w = fake_negative_weights(p, labels, kinds)
    defer = (kinds == KIND_DEFER_OBSERVED) | (kinds == KIND_DEFER_TRUE) | (kinds == KIND_DEFER_HELD)
    r, s = real_negative_rate, delayed_share
    z = 1 + p + r * (1 - p)
    negative_mass = (1 - p + p * s + r * (1 - p)).clamp(min=1e-12)  # 0 only where p = 1 and s = 0
    w_defer = torch.where(labels > 0, z / (2 - s), (1 - p) * z / negative_mass)
    if dropped is not None:
        w_defer = torch.where(dropped, torch.zeros_like(w_defer), w_defer)
    w = torch.where(defer, w_defer, w)
    return torch.where(kinds == KIND_SCORE_REQUEST, torch.zeros_like(w), w)


def _keep_draw(impression_id: str) -> float:
    """A uniform draw in [0, 1) fixed by the impression id: a replay keeps the same real negatives."""
    return zlib.crc32(impression_id.encode(), 0x5EED) / 2**32


def real_negative_share(spec: str) -> float | None:
    """Parse ``learner.real_negatives``: ``score`` → None (each real negative kept with the
    model's click probability for it), ``all`` → 1.0, or a share in [0, 1]."""
    if spec == "score":
        return None
    if spec == "all":
        return 1.0
    try:
        share = float(spec)
    except ValueError:
        share = math.nan
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"real negatives must be 'score', 'all' or a share in [0, 1], not {spec!r}")
    return share


def cosine_distill_loss(pred: torch.Tensor, teacher: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos(pred, teacher)`` over rows that carry a teacher vector (0 when none do).

    Masked arithmetic rather than boolean indexing: no host sync and no gather in the hot loop.
    """
    mask = present.to(pred.dtype)
    cos = F.cosine_similarity(pred, teacher, dim=1, eps=1e-6)
    return ((1 - cos) * mask).sum() / mask.sum().clamp(min=1.0)


class OnlineLearner(Predictor):
    """A :class:`Predictor` that learns: optimisers, metrics and the cold-start index on top."""

    def __init__(self, cfg: Config, state: LearnerState | None = None, device: str | None = None) -> None:
        super().__init__(cfg, state=state, device=device)
        lc = cfg.learner
        # Expiry and admission are training behaviour: the config wins over what a snapshot says.
        self.featurizer.users.configure(lc.user_ttl_s, lc.admit_min_count)
        self.featurizer.items.configure(lc.item_ttl_s, lc.admit_min_count)
        self.sparse_opt = RowOptimizer(
            self.model.sparse_tables(),
            lr=lc.embedding_lr,
            initial_accumulator=lc.embedding_init_accumulator,
            wide_prior=lc.wide_prior,
            wide_lr=lc.wide_lr,
            wide_max_step=lc.wide_max_step,
            wide_priors={"words": lc.word_prior or lc.wide_prior},
        )
        self.dense_opt = torch.optim.Adam(self.model.dense_parameters(), lr=lc.lr, fused=True)
        tuned = [name for name in names_of(lc.wide_prior_tune) if name in PRIOR_TABLES]
        self.prior_tuner = (
            PriorTuner(self.sparse_opt, tuned, lc.wide_prior_tune_rate, lc.wide_prior, lc.wide_prior_max)
            if tuned and lc.wide_prior_tune_rate > 0
            else None
        )
        self.metrics = LearnerMetrics()
        self.delayed = DelayedLabelEvaluator(cfg.join.window_s)
        self.serving_eval = ServingEvaluator()
        #: ``defer``: the true labels' click rate and delays, and the observed negatives the learner
        #: holds for its own waiting window (learner.defer_hold; ``hold_wait``: the window now).
        self.click_delays = ClickDelays(cfg.join.window_s)
        self.held = HeldNegatives()
        self.hold_wait = 0.0
        #: The hold is on: ``defer`` without a waiting window in the join, and an error above 0.
        self._holding = lc.defer_hold_error > 0 and cfg.join.defer_wait_s <= 0
        #: ``defer``: the fixed share of real negatives trained on (None: by the model's score).
        self.real_negative_share = real_negative_share(lc.real_negatives)
        #: Real negatives left out before the model (counted, not trained; see learn_batch).
        self.real_negatives_left_out = 0
        self.cold_start = (
            ColdStart(
                self.model.mc.sem_dim, cfg.semantic.faiss_exact_below, cfg.semantic.neighbours, lc.cold_start_min_count
            )
            if self.semantic
            else None
        )
        #: Rows trained since the last delta, when the learner publishes deltas (learner.deltas).
        self.touched: TouchedRows | None = None
        if state is not None:
            self._load(state)

    @property
    def index(self) -> ItemIndex | None:
        """The cold-start neighbour index over item vectors (None without semantics)."""
        return self.cold_start.index if self.cold_start is not None else None

    @property
    def items_cold_started(self) -> int:
        return self.cold_start.initialised if self.cold_start is not None else 0

    def score_requests(self, requests: Sequence[Example]) -> np.ndarray:
        """Score :data:`~livectr.core.events.KIND_SCORE_REQUEST` examples now; their labels come later.

        Not trained on: the scores wait in :attr:`serving_eval` for the final examples of the
        same impressions (see :class:`livectr.learner.metrics.ServingEvaluator`).
        """
        if not requests:
            return np.zeros(0, dtype=np.float32)
        ids = [ex.impression_id for ex in requests]
        batch, logits, vectors = self._student_logits(requests)
        served_from = None
        if self.experts is not None:
            served_from = self.experts.components(batch.user, vectors, logits, batch.ts)
            logits = self.experts.mixed(served_from)
        probs = sigmoid(logits)
        cold = self.featurizer.cold_mask(batch, self.cfg.learner.cold_start_impressions)
        self.serving_eval.scored(ids, probs, served_from, cold)
        return probs

    # -- learning ---------------------------------------------------------------------------

    def learn_batch(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Score ``examples`` with the current model, record the scores, then train on them.

        Each example is scored with what the examples before it in the batch taught the fast
        parts (the in-batch replay and the experts), so a batch in decision-time order scores
        every example with every label decided before it. Score requests may ride in the batch
        at their impression's place: scored like the others, never trained on (weight 0), their
        scores kept for the serving metrics. Returns ``predictions`` (the pre-update
        probabilities, requests included) and the batch's losses.
        """
        if not examples:
            return {"predictions": np.zeros(0, dtype=np.float32), "loss": math.nan}
        self.click_delays.observe(examples)
        placed = self._place_held(examples)
        if placed is None:
            return self._learn_batch(examples, None)
        merged, own, held_back = placed
        result = self._learn_batch(merged, held_back)
        result["predictions"] = result["predictions"][own]
        return result

    def _place_held(self, examples: Sequence[Example]) -> tuple[list[Example], np.ndarray, np.ndarray] | None:
        """``defer``'s hold (:mod:`livectr.learner.defer_hold`): hold this batch's observed
        negatives, note its clicks, and place the copies due by its end at their due times.
        Returns the merged examples, the positions of ``examples`` in them and the mask of the
        copies held now; None when nothing is or was held."""
        lc = self.cfg.learner
        if not self._holding:
            return None
        self.hold_wait = wait = self.click_delays.wait(lc.defer_hold_error, lc.defer_hold_max_s)
        if wait <= 0 and not len(self.held):
            return None
        held_now = np.zeros(len(examples), dtype=bool)
        for k, ex in enumerate(examples):
            if ex.kind == KIND_DEFER_OBSERVED and not ex.label and wait > 0:
                self.held.hold(ex, ex.ts + wait)
                held_now[k] = True
            elif ex.kind == KIND_DEFER_TRUE and ex.label and len(self.held):
                self.held.click(ex.impression_id, ex.ts + max(ex.click_delay, 0.0))
        window = self.cfg.join.window_s
        decided = np.maximum.accumulate(np.fromiter((decision_time(ex, window) for ex in examples), np.float64))
        released = self.held.release(float(decided[-1]), lc.defer_hold_max_examples)
        merged, own = merge_released(examples, decided, released)
        held_back = np.zeros(len(merged), dtype=bool)
        held_back[own] = held_now
        return merged, own, held_back

    def _learn_batch(self, examples: Sequence[Example], held_back: np.ndarray | None) -> dict[str, Any]:
        """:meth:`learn_batch` once the held negatives are in place; ``held_back`` marks the observed
        copies held now: scored where they are, trained on release."""
        if not examples:
            return {"predictions": np.zeros(0, dtype=np.float32), "loss": math.nan}
        skipped = self._skipped_real_negatives(examples) if self.real_negative_share is None else {}
        if not skipped:
            return self._learn(examples, held_back)
        at = np.fromiter(sorted(skipped), np.int64, len(skipped))
        keep = np.ones(len(examples), dtype=bool)
        keep[at] = False
        kept = [ex for k, ex in enumerate(examples) if k not in skipped]
        result: dict[str, Any] = (
            self._learn(kept, None if held_back is None else held_back[keep])
            if kept
            else {"predictions": np.zeros(0, dtype=np.float32), "loss": math.nan}
        )
        predictions = np.empty(len(examples), dtype=np.float32)
        predictions[keep] = result["predictions"]
        predictions[at] = [skipped[k] for k in at.tolist()]
        result["predictions"] = predictions
        result["left_out"] = len(skipped)
        self.real_negatives_left_out += len(skipped)
        left_out = [examples[k] for k in at.tolist()]
        served_from, served_labels = self.serving_eval.labelled(self.metrics, left_out, np.zeros(len(left_out)))
        if self.experts is not None:
            self.experts.fit_to_served(served_from, served_labels)
        return result

    def _skipped_real_negatives(self, examples: Sequence[Example]) -> dict[int, float]:
        """``real_negatives = score``: the real negatives left out before the model, by their
        served score (position → score). Kept with the probability of a click served for the
        impression, chosen by a hash of its id; only their label is recorded (serving metrics,
        the experts' mix). Real negatives whose served score is unknown (before a restart) are
        decided in the model by its current score (:meth:`_dropped_real_negatives`)."""
        out: dict[int, float] = {}
        served = self.serving_eval.served
        for k, ex in enumerate(examples):
            if ex.kind != KIND_DEFER_TRUE or ex.label:
                continue
            p = served(ex.impression_id)
            if p is not None and _keep_draw(ex.impression_id) >= p:
                out[k] = p
        return out

    def _learn(self, examples: Sequence[Example], held_back: np.ndarray | None = None) -> dict[str, Any]:
        self.expire_rows(float(np.median(np.fromiter((ex.ts for ex in examples), np.float64, len(examples)))))
        batch = self.featurizer.encode(examples, grow=True, labelled=True)
        observed = batch.kinds == KIND_DEFER_OBSERVED
        if observed.any():
            self.click_delays.observe_users(batch.user[observed], batch.ts[observed])
        idle = batch.kinds == KIND_SCORE_REQUEST
        if held_back is not None:
            idle = idle | held_back
        trained = int(len(examples) - idle.sum())
        if self.examples_seen == 0 and trained:
            self._init_base_rate(batch.labels[~idle])
        self._sync_capacity()
        cold_started = (
            self.cold_start.initialise(self.featurizer, self.model.item_emb.weight, batch)
            if self.cold_start is not None
            else 0
        )
        inp = batch.to_inputs(self.device)
        labels = torch.from_numpy(batch.labels).to(self.device)
        kinds = torch.from_numpy(batch.kinds).to(self.device)
        share = self.click_delays.share_after(self.cfg.join.defer_wait_s or self.hold_wait)

        if not self.model.training:
            self.model.train()
        out = self.model(inp, train=True)
        fixed = self.real_negative_share
        rate: float | torch.Tensor = 1.0  # only defer's examples are weighed by it
        if fixed is not None:
            rate = fixed
        elif ((batch.kinds == KIND_DEFER_OBSERVED) | (batch.kinds == KIND_DEFER_TRUE)).any():
            rate = self._keep_rates(examples, out.logit)
        dropped = self._dropped_real_negatives(examples, batch.kinds, batch.labels, rate)
        if held_back is not None and held_back.any():  # scored here, trained on release
            held = torch.from_numpy(held_back).to(self.device)
            dropped = held if dropped is None else dropped | held
        shifts = self._in_batch_shifts(inp, out.logit, labels, kinds, share, rate, dropped)
        shift = sum(shifts.values(), torch.zeros_like(out.logit))
        logit = out.logit + shift
        p = torch.sigmoid(logit)
        weights = loss_weights(p, labels, kinds, share, rate, dropped)
        scale = 1.0 / max(trained, 1)  # a mean over the trained examples (requests weigh nothing)
        ctr_loss = (weights * F.binary_cross_entropy_with_logits(logit, labels, reduction="none")).sum() * scale
        loss = ctr_loss
        distill_value: float | None = None
        gate_used = 0.0
        if self.semantic:
            if batch.item_sem_mask.any() or batch.user_sem_mask.any():
                taught = torch.from_numpy(~idle).to(self.device)  # a request teaches nothing, not even semantics
                distill = cosine_distill_loss(out.item_hat, inp.item_sem, inp.item_sem_mask & taught)
                user_weight = self.cfg.learner.user_distill_weight
                if user_weight:
                    distill = distill + user_weight * cosine_distill_loss(
                        out.user_hat, inp.user_sem, inp.user_sem_mask & taught
                    )
                loss = loss + self.cfg.learner.distill_weight * distill
                distill_value = float(distill.detach())
                self.item_head_distilled = self.item_head_distilled or bool((batch.item_sem_mask & ~idle).any())
            # The branch learns on every example, from the id part's logit (held fixed), not only
            # where the gate is open: a closed gate would otherwise starve the branch, which then
            # never becomes worth opening for (DynMM trains its experts before its gate for this).
            branch_loss = (
                weights
                * F.binary_cross_entropy_with_logits(
                    out.base_logit.detach() + shift + out.branch_logit, labels, reduction="none"
                )
            ).sum() * scale
            loss = loss + branch_loss + self.cfg.learner.gate_cost * out.gate_prob.mean()
            gate_used = float(out.gate.detach().sum())
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.prior_tuner is not None:  # before the step: the gradient of the out-of-sample loss
            sensitivities = self.prior_tuner.sensitivities({"user": inp.user, "item": inp.item}, shifts)
            self.prior_tuner.step(sensitivities, (weights * (p - labels)).detach(), trained)
        self.sparse_opt.step((weights * p * (1 - p)).detach(), loss_scale=max(trained, 1))
        self.dense_opt.step()
        components = None
        if self.experts is not None:
            components, mixed = self.experts.learn_components(
                batch.user,
                self._item_vectors(inp, out.item_hat),
                logit.detach().double().cpu().numpy(),
                batch.labels,
                weights.detach().double().cpu().numpy(),
                batch.ts,
            )
            probs = sigmoid(mixed)
        else:
            probs = p.detach().cpu().numpy()
        finished = time.time()
        if self.touched is not None:
            self.touched.add(batch, finished)

        self._record(batch, probs, finished, distill_value, gate_used, examples, components)
        if self.cold_start is not None:
            self.cold_start.add(self.featurizer, batch)
        return {
            "predictions": probs,
            "loss": float(loss.detach()),
            "ctr_loss": float(ctr_loss.detach()),
            "distill_loss": distill_value,
            "gate_usage": gate_used / len(examples) if self.semantic else None,
            "cold_started": cold_started,
        }

    @torch.no_grad()
    def _in_batch_shifts(
        self,
        inp: ModelInputs,
        logit: torch.Tensor,
        labels: torch.Tensor,
        kinds: torch.Tensor,
        share: float,
        rate: float | torch.Tensor = 1.0,
        dropped: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example first-order updates of the user, item and words within the batch (see
        RowOptimizer), by table (none when ``in_batch_wide`` is off).

        Why: with mini-batches, every example of a user in one batch is scored before anything
        is learned from any of them; per-example learners (VW, FTRL) learn a bursty user's bias
        from their first few examples. The residuals are taken at the batch-start prediction.
        """
        if not self.cfg.learner.in_batch_wide:
            return {}
        p = torch.sigmoid(logit)
        w = loss_weights(p, labels, kinds, share, rate, dropped)
        grad, curvature = w * (p - labels), w * p * (1 - p)
        shifts = {
            name: self.sparse_opt.in_batch_wide_shift(name, rows, grad, curvature)
            for name, rows in (("user", inp.user), ("item", inp.item))
        }
        if self.model.word_w is not None:
            shifts["words"] = self.sparse_opt.in_batch_multi_shift("words", inp.words, inp.words_mask, grad, curvature)
        return shifts

    def _dropped_real_negatives(
        self, examples: Sequence[Example], kinds: np.ndarray, labels: np.ndarray, rate: float | torch.Tensor
    ) -> torch.Tensor | None:
        """``defer`` real negatives left out of training (kept with probability ``rate``, by a
        hash of the impression id so that a replay drops the same ones)."""
        if isinstance(rate, float) and rate >= 1.0:
            return None
        real = np.flatnonzero((kinds == KIND_DEFER_TRUE) & (labels == 0))
        if not real.size:
            return None
        u = np.full(len(examples), -1.0)
        for k in real.tolist():
            u[k] = _keep_draw(examples[k].impression_id)
        return torch.from_numpy(u).to(self.device) >= rate

    def _keep_rates(self, examples: Sequence[Example], logit: torch.Tensor) -> torch.Tensor:
        """Per example, the probability its real negative is kept: the score served for its
        impression where it is pending, else the model's current score."""
        served = self.serving_eval.served
        known = np.fromiter(
            (math.nan if (s := served(ex.impression_id)) is None else s for ex in examples), np.float64, len(examples)
        )
        current = torch.sigmoid(logit.detach())
        return torch.where(
            torch.from_numpy(np.isnan(known)).to(self.device), current, torch.from_numpy(known).to(current)
        )

    @torch.no_grad()
    def _init_base_rate(self, labels: np.ndarray) -> None:
        """Start the output bias at the logit of the first batch's click rate.

        Why: CTRs are a few percent; from a 0.5 start, the first hundreds of steps of every
        parameter go into learning the base rate alone, which on a stream is lost accuracy.
        """
        rate = float(np.clip(labels.mean() if len(labels) else 0.05, 1e-3, 0.5))
        self.model.out.bias.fill_(math.log(rate / (1 - rate)))

    def learn_one(self, example: Example) -> float:
        """Train on one example; returns its pre-update prediction."""
        return float(self.learn_batch([example])["predictions"][0])

    def _record(
        self,
        batch: EncodedBatch,
        probs: np.ndarray,
        finished: float,
        distill: float | None,
        gate_used: float,
        examples: Sequence[Example],
        components: np.ndarray | None,
    ) -> None:
        """Route a trained batch's pre-update scores to the metrics by kind.

        Score requests wait for their final labels (serving metrics); final labels (``wait``,
        ``defer``'s true copies) count for the label-order metrics and pair with their requests;
        fake-negative examples go through :class:`DelayedLabelEvaluator` (scored once, at the
        fake negative); ``defer``'s observed copies count for nothing.
        """
        kinds = batch.kinds
        cold = self.featurizer.cold_mask_and_count(batch, self.cfg.learner.cold_start_impressions)
        self.featurizer.count_users(batch)
        requests = kinds == KIND_SCORE_REQUEST
        if self.cfg.join.defer_wait_s <= 0:
            # ``defer`` without a waiting window: the observed copy is scored at its impression's
            # place, so it is the served score (the join sends no separate request, see its docs).
            requests = requests | (kinds == KIND_DEFER_OBSERVED)
        if requests.any():
            at = np.flatnonzero(requests)
            self.serving_eval.scored(
                [examples[k].impression_id for k in at.tolist()],
                probs[at],
                components[at] if components is not None else None,
                cold[at],
            )
        final = (kinds == KIND_FINAL) | (kinds == KIND_DEFER_TRUE)
        if final.any():
            at = np.flatnonzero(final)
            labels = batch.labels[at]
            self.metrics.update(probs[at], labels, cold[at])
            served_from, served_labels = self.serving_eval.labelled(
                self.metrics, [examples[k] for k in at.tolist()], labels
            )
            if self.experts is not None:
                self.experts.fit_to_served(served_from, served_labels)
        fake = (kinds == KIND_FAKE_NEGATIVE) | (kinds == KIND_POSITIVE_COPY)
        if fake.any():
            at = np.flatnonzero(fake)
            self.delayed.observe(
                self.metrics,
                [examples[k].impression_id for k in at.tolist()],
                np.fromiter((examples[k].ts for k in at.tolist()), np.float64, at.size),
                probs[at],
                batch.labels[at],
                kinds[at],
                cold[at],
            )
        trained = ~requests
        valid = (batch.decided_at > 0) & trained
        self.metrics.freshness.add(np.maximum(finished - batch.decided_at[valid], 0.0))
        if self.semantic:
            self.metrics.update_semantic(distill, gate_used, len(batch))
        self.examples_seen += int(trained.sum())

    # -- growing tables ---------------------------------------------------------------------

    def expire_rows(self, now: float, force: bool = False) -> int:
        """Free the user and item rows unseen for their TTL at event time ``now``; how many were.

        A freed row is reset everywhere it has state — embedding and first-order weight, its
        optimiser accumulators, the user's fast experts, the item's place in the cold-start
        index — so the id that reuses it starts like any new id (and the snapshot holds nothing
        of the expired one). The vocabularies sweep at most every 1/16 of their TTL.
        """
        freed = 0
        for name, vocab, table in (
            ("user", self.featurizer.users, self.model.user_emb),
            ("item", self.featurizer.items, self.model.item_emb),
        ):
            rows, ids = vocab.expire(now, force=force)
            if not rows.size:
                continue
            if self.touched is not None:
                self.touched.expire(name, rows)  # the next delta frees them on replicas too
            t = torch.from_numpy(rows)
            table.reset_rows(t[t < table.num_embeddings])
            self.sparse_opt.reset_rows(name, t[t < table.num_embeddings])
            if name == "user":
                self.click_delays.forget_users(rows)
            if name == "user" and self.experts is not None:
                self.experts.reset_rows(rows)
            if name == "item":
                self.featurizer.clear_items(rows)
            if name == "item" and self.cold_start is not None:
                self.cold_start.forget(rows, ids)
            freed += int(rows.size)
        return freed

    def _sync_capacity(self) -> None:
        """Grow id tables to the vocabularies' capacities (the optimiser pads its state on its next step)."""
        for table, vocab in (
            (self.model.user_emb, self.featurizer.users),
            (self.model.item_emb, self.featurizer.items),
        ):
            table.grow(vocab.capacity)

    # -- state ------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Metrics plus model/semantic figures (gate compute saving, tables, cold starts)."""
        out = self.metrics.summary()
        out.update(
            examples_seen=self.examples_seen,
            positives=self.metrics.positives,
            users=len(self.featurizer.users) - 1,
            items=len(self.featurizer.items) - 1,
            user_rows=self.featurizer.users.capacity,
            item_rows=self.featurizer.items.capacity,
            users_expired=self.featurizer.users.expired_total,
            items_expired=self.featurizer.items.expired_total,
            context_fields=list(self.featurizer.context.slots),
            context_fields_dropped=self.featurizer.context.dropped,
            defer_hold_s=self.hold_wait,
            defer_negatives_held=self.held.holds,
        )
        if self.experts is not None:
            out.update(
                expert_mix_bias=self.experts.mix,
                expert_mix_taste=self.experts.mix_taste,
                expert_mix_slope=self.experts.mix_slope,
                expert_mix_fitted_to="served outcomes" if self.experts.serving_feedback else "training stream",
            )
        if self.semantic:
            flops = self.model.flops_per_example()
            usage = out["gate_usage"]
            full = flops["base"] + flops["gate"] + flops["semantic_branch"]
            used = flops["base"] + flops["gate"] + (usage if usage == usage else 1.0) * flops["semantic_branch"]
            out.update(
                items_cold_started=self.items_cold_started,
                semantic_index_items=len(self.index or ()),
                model_macs_per_example=flops,
                gate_compute_saved=1 - used / full,
            )
        return out

    def state(self) -> LearnerState:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        optimizer = {f"sparse/{name}/accum": acc.cpu() for name, acc in self.sparse_opt.state().items()}
        if self.prior_tuner is not None:
            optimizer.update({f"sparse/{name}/prior": t for name, t in self.prior_tuner.state().items()})
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in self.dense_opt.state.items():
            for key, value in st.items():
                optimizer[f"dense/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        mc = self.model.mc
        mc_dict = {
            **mc.to_dict(),
            "user_capacity": self.model.user_emb.num_embeddings,
            "item_capacity": self.model.item_emb.num_embeddings,
        }
        arrays = self.featurizer.arrays()
        arrays.update({f"metrics.{k}": np.asarray(v).copy() for k, v in self.metrics.state().items()})
        arrays.update({f"defer.delays.{k}": v for k, v in self.click_delays.state().items()})
        if self.experts is not None:
            arrays.update({f"experts.{k}": v for k, v in self.experts.state().items()})
        index_ids = list(self.cold_start.ids) if self.cold_start is not None else []
        vectors = self.cold_start.vectors() if self.cold_start is not None else None
        if vectors is not None:
            arrays["index.vectors"] = vectors
        meta = {
            "featurizer": self.featurizer.state(),
            "examples_seen": self.examples_seen,
            "item_head_distilled": self.item_head_distilled,
            "items_cold_started": self.items_cold_started,
            "index_ids": index_ids,
        }
        return LearnerState(mc_dict, tensors, optimizer, arrays, meta)

    def _load(self, state: LearnerState) -> None:
        """Restore what training needs beyond the predictor: optimiser moments, metrics, the index."""
        if self.cold_start is not None:
            self.cold_start.initialised = int(state.meta.get("items_cold_started", 0))
        self.sparse_opt.load(
            {
                key.split("/")[1]: t
                for key, t in state.optimizer.items()
                if key.startswith("sparse/") and key.endswith("/accum")
            }
        )
        if self.prior_tuner is not None:
            self.prior_tuner.load(
                {
                    key.split("/")[1]: t
                    for key, t in state.optimizer.items()
                    if key.startswith("sparse/") and key.endswith("/prior")
                }
            )
        for name, p in self.model.named_parameters():
            st = {key.rsplit("/", 1)[1]: t for key, t in state.optimizer.items() if key.startswith(f"dense/{name}/")}
            if st:
                self.dense_opt.state[p] = {k: (v.to(self.device) if v.dim() else v) for k, v in st.items()}
        delays = {k.split(".", 2)[2]: v for k, v in state.arrays.items() if k.startswith("defer.delays.")}
        if delays:
            self.click_delays.load(delays)
        metrics = {k.split(".", 1)[1]: v for k, v in state.arrays.items() if k.startswith("metrics.")}
        if metrics:
            self.metrics.load(metrics)
        ids = state.meta.get("index_ids") or []
        if self.cold_start is not None and ids:
            self.cold_start.load(self.featurizer, list(ids), state.arrays["index.vectors"])
