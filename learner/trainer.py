"""Online training of the student: River-style ``learn_one``/``predict_one`` and batch forms.

``learn_batch`` is progressive validation: the batch is scored by the current model (the very
forward pass that is then back-propagated), the scores go to the metrics and are returned,
and only then is the model updated. So every reported figure is out-of-sample.

Optimisers respect sparsity: the id tables are updated by :class:`learner.sparse.RowOptimizer`
(only the rows in the batch move, each at the pace of its own examples, as under per-example
Adagrad/FTRL; see that module for why); the dense layers use ``Adam``. When a vocabulary
outgrows its table, the table is re-allocated (capacity doubling) and the optimiser's per-row
accumulators are padded, so existing rows keep their state.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from learner.experts import FastExperts
from learner.features import EncodedBatch, Featurizer
from learner.metrics import DelayedLabelEvaluator, LearnerMetrics, ServingEvaluator
from learner.model import ModelConfig, ModelInputs, StudentCTR
from learner.sparse import RowOptimizer
from livectr.config import Config
from livectr.events import KIND_FAKE_NEGATIVE, KIND_FINAL, KIND_POSITIVE_COPY, Example
from semantic_cache.index import ItemIndex

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("learner.device=cuda but no CUDA device is available")
    return torch.device(name)


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


def cosine_distill_loss(pred: torch.Tensor, teacher: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos(pred, teacher)`` over rows that carry a teacher vector (0 when none do).

    Masked arithmetic rather than boolean indexing: no host sync and no gather in the hot loop.
    """
    mask = present.to(pred.dtype)
    cos = F.cosine_similarity(pred, teacher, dim=1, eps=1e-6)
    return ((1 - cos) * mask).sum() / mask.sum().clamp(min=1.0)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))).astype(np.float32)


@dataclass
class LearnerState:
    """Everything needed to resume a learner or serve its model (what a snapshot stores)."""

    model_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


class OnlineLearner:
    """The student, its vocabularies, optimisers, metrics and cold-start index."""

    def __init__(self, cfg: Config, state: LearnerState | None = None, device: str | None = None,
                 serving: bool = False) -> None:
        """A fresh learner, or one restored from ``state``.

        ``serving=True`` restores only what scoring needs (weights and vocabularies), not the
        optimiser moments, metrics or the cold-start index.
        """
        self.cfg = cfg
        self.serving = serving
        lc = cfg.learner
        torch.set_num_threads(max(1, lc.threads))
        self.device = resolve_device(device or lc.device)
        # torch's global generator: a learner owns its process (one per `livectr learn`), and the
        # straight-through gate samples with rand_like, which takes no generator.
        torch.manual_seed(lc.seed)
        if state is None:
            mc = ModelConfig.from_config(cfg)
            self.featurizer = Featurizer.new(mc.context_fields, mc.context_buckets, mc.sem_dim,
                                             initial_capacity=min(mc.user_capacity, mc.item_capacity),
                                             pair_buckets=mc.pair_buckets)
        else:
            mc = ModelConfig.from_dict(state.model_config)
            self.featurizer = Featurizer.from_state(state.meta["featurizer"], state.arrays.get("user_counts"),
                                                    state.arrays.get("item_counts"))
        self.model = StudentCTR(mc).to(self.device)
        self.sparse_opt = RowOptimizer(self.model.sparse_tables(), lr=lc.embedding_lr,
                                       initial_accumulator=lc.embedding_init_accumulator,
                                       wide_prior=lc.wide_prior, wide_lr=lc.wide_lr)
        self.dense_opt = torch.optim.Adam(self.model.dense_parameters(), lr=lc.lr, fused=True)
        self.experts = (FastExperts(mc.sem_dim, lc.user_bias_rate, lc.taste_expert_step, lc.taste_expert_prior,
                                    lc.slope_expert_prior, lc.population_taste, lc.user_session_s, lc.expert_mix_lr)
                        if lc.fast_experts else None)
        self.metrics = LearnerMetrics()
        self.delayed = DelayedLabelEvaluator(cfg.join.window_s)
        self.serving_eval = ServingEvaluator()
        self.semantic = mc.sem_dim > 0
        self.index = (ItemIndex(mc.sem_dim, exact_below=cfg.semantic.faiss_exact_below)
                      if self.semantic and not serving else None)
        self._indexed_ids: list[str] = []
        self._indexed_rows = np.zeros(0, dtype=bool)
        self.examples_seen = 0
        self.items_cold_started = 0
        if state is not None:
            self._load(state)

    # -- prediction -------------------------------------------------------------------------

    @torch.no_grad()
    def predict_batch(self, records: Sequence[Any]) -> np.ndarray:
        """Probabilities for Examples or Impressions; unknown ids use the shared unknown row.

        Examples contribute their teacher vectors when present; Impressions (serving) rely on
        the distilled vectors. The gate is hard: the semantic branch runs only where it opens.
        """
        if not records:
            return np.zeros(0, dtype=np.float32)
        batch, logits, vectors = self._student_logits(records)
        if self.experts is not None:
            logits = self.experts.correct(batch.user, vectors, logits, batch.ts)
        return _sigmoid(logits)

    @torch.no_grad()
    def _student_logits(self, records: Sequence[Any]) -> tuple[EncodedBatch, np.ndarray, np.ndarray | None]:
        """The student's own logits (before the fast experts) for Examples or Impressions, and
        the item vectors the taste expert reads."""
        labelled = isinstance(records[0], Example)
        batch = self.featurizer.encode(records, grow=False, labelled=labelled)
        if self.model.training:  # switching walks every submodule: only when the mode changes
            self.model.eval()
        inp = batch.to_inputs(self.device)
        out = self.model(inp, train=False)
        return batch, out.logit.double().cpu().numpy(), self._item_vectors(inp, None)

    @torch.no_grad()
    def _item_vectors(self, inp: ModelInputs, item_hat: torch.Tensor | None) -> np.ndarray | None:
        """Unit item vectors for the taste expert: the teacher's where the example carries one,
        else the student's distilled prediction (what serving has); None without semantics."""
        if self.experts is None or not self.semantic:
            return None
        if item_hat is None:
            item_hat = self.model.semantic.item_head(self.model.item_emb(inp.item)[:, : self.model.mc.embedding_dim])
        vec = torch.where(inp.item_sem_mask.unsqueeze(1), F.normalize(inp.item_sem, dim=1), F.normalize(item_hat, dim=1))
        return vec.double().cpu().numpy()

    def predict_one(self, record: Any) -> float:
        return float(self.predict_batch([record])[0])

    def score_requests(self, requests: Sequence[Example]) -> np.ndarray:
        """Score :data:`~livectr.events.KIND_SCORE_REQUEST` examples now; their labels come later.

        Not trained on: the scores wait in :attr:`serving_eval` for the final examples of the
        same impressions (see :class:`learner.metrics.ServingEvaluator`).
        """
        if not requests:
            return np.zeros(0, dtype=np.float32)
        ids = [ex.impression_id for ex in requests]
        batch, logits, vectors = self._student_logits(requests)
        served_from = None
        if self.experts is not None:
            served_from = self.experts.components(batch.user, vectors, logits, batch.ts)
            logits = self.experts.mixed(served_from)
        probs = _sigmoid(logits)
        self.serving_eval.scored(ids, probs, served_from)
        return probs

    # -- learning ---------------------------------------------------------------------------

    def learn_batch(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Score ``examples`` with the current model, record the scores, then train on them.

        Returns ``predictions`` (the pre-update probabilities) and the batch's losses.
        """
        if not examples:
            return {"predictions": np.zeros(0, dtype=np.float32), "loss": math.nan}
        batch = self.featurizer.encode(examples, grow=True, labelled=True)
        if self.examples_seen == 0:
            self._init_base_rate(batch.labels)
        self._sync_capacity()
        cold_started = self._cold_start(batch, examples)
        inp = batch.to_inputs(self.device)
        labels = torch.from_numpy(batch.labels).to(self.device)
        kinds = torch.from_numpy(batch.kinds).to(self.device)

        if not self.model.training:
            self.model.train()
        out = self.model(inp, train=True)
        shift = self._in_batch_shift(inp, out.logit, labels, kinds)
        logit = out.logit + shift
        p = torch.sigmoid(logit)
        weights = fake_negative_weights(p, labels, kinds)
        ctr_loss = (weights * F.binary_cross_entropy_with_logits(logit, labels, reduction="none")).mean()
        loss = ctr_loss
        distill_value: float | None = None
        gate_used = 0.0
        if self.semantic:
            if batch.item_sem_mask.any() or batch.user_sem_mask.any():
                distill = cosine_distill_loss(out.item_hat, inp.item_sem, inp.item_sem_mask)
                user_weight = self.cfg.learner.user_distill_weight
                if user_weight:
                    distill = distill + user_weight * cosine_distill_loss(out.user_hat, inp.user_sem, inp.user_sem_mask)
                loss = loss + self.cfg.learner.distill_weight * distill
                distill_value = float(distill.detach())
            # The branch learns on every example, from the id part's logit (held fixed), not only
            # where the gate is open: a closed gate would otherwise starve the branch, which then
            # never becomes worth opening for (DynMM trains its experts before its gate for this).
            branch_loss = (weights * F.binary_cross_entropy_with_logits(
                out.base_logit.detach() + shift + out.branch_logit, labels, reduction="none")).mean()
            loss = loss + branch_loss + self.cfg.learner.gate_cost * out.gate_prob.mean()
            gate_used = float(out.gate.detach().sum())
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse_opt.step((weights * p * (1 - p)).detach(), loss_scale=len(examples))
        self.dense_opt.step()
        if self.experts is not None:
            mixed = self.experts.learn(batch.user, self._item_vectors(inp, out.item_hat),
                                       logit.detach().double().cpu().numpy(), batch.labels,
                                       weights.detach().double().cpu().numpy(), batch.ts)
            probs = _sigmoid(mixed)
        else:
            probs = p.detach().cpu().numpy()
        finished = time.time()

        self._record(batch, probs, finished, distill_value, gate_used, examples)
        self._index_vectors(batch, examples)
        return {"predictions": probs, "loss": float(loss.detach()), "ctr_loss": float(ctr_loss.detach()),
                "distill_loss": distill_value, "gate_usage": gate_used / len(examples) if self.semantic else None,
                "cold_started": cold_started}

    @torch.no_grad()
    def _in_batch_shift(self, inp: ModelInputs, logit: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """Per-example first-order updates of the user and item within the batch (see RowOptimizer).

        Why: with mini-batches, every example of a user in one batch is scored before anything
        is learned from any of them; per-example learners (VW, FTRL) learn a bursty user's bias
        from their first few examples. The residuals are taken at the batch-start prediction.
        """
        if not self.cfg.learner.in_batch_wide:
            return torch.zeros_like(logit)
        p = torch.sigmoid(logit)
        w = fake_negative_weights(p, labels, kinds)
        grad, curvature = w * (p - labels), w * p * (1 - p)
        return (self.sparse_opt.in_batch_wide_shift("user", inp.user, grad, curvature)
                + self.sparse_opt.in_batch_wide_shift("item", inp.item, grad, curvature))

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

    def _record(self, batch: EncodedBatch, probs: np.ndarray, finished: float, distill: float | None,
                gate_used: float, examples: Sequence[Example]) -> None:
        cold = self.featurizer.cold_mask_and_count(batch, self.cfg.learner.cold_start_impressions)
        self.featurizer.count_users(batch)
        if (batch.kinds == KIND_FINAL).all():
            self.metrics.update(probs, batch.labels, cold)
            served_from, served_labels = self.serving_eval.labelled(self.metrics, examples, batch.labels)
            if self.experts is not None:
                self.experts.fit_to_served(served_from, served_labels)
        else:
            self.delayed.observe(self.metrics, [ex.impression_id for ex in examples],
                                 np.fromiter((ex.ts for ex in examples), np.float64, len(examples)),
                                 probs, batch.labels, batch.kinds, cold)
        valid = batch.decided_at > 0
        self.metrics.freshness.add(np.maximum(finished - batch.decided_at[valid], 0.0))
        if self.semantic:
            self.metrics.update_semantic(distill, gate_used, len(batch))
        self.examples_seen += len(batch)

    # -- growing tables ---------------------------------------------------------------------

    def _sync_capacity(self) -> None:
        """Grow id tables to the vocabularies' capacities (the optimiser pads its state on its next step)."""
        for table, vocab in ((self.model.user_emb, self.featurizer.users), (self.model.item_emb, self.featurizer.items)):
            table.grow(vocab.capacity)

    # -- cold start -------------------------------------------------------------------------

    @torch.no_grad()
    def _cold_start(self, batch: EncodedBatch, examples: Sequence[Example]) -> int:
        """Initialise new item rows as the similarity-weighted mean of trained neighbours' rows.

        Uses the teacher vector carried by the item's first example in the batch; neighbours
        must have at least ``cold_start_min_count`` impressions (a barely trained row is noise).
        """
        if not self.semantic or batch.new_items.size == 0 or self.index is None or len(self.index) == 0:
            return 0
        first_pos = {}
        for pos in np.flatnonzero(batch.item_sem_mask):
            first_pos.setdefault(int(batch.item[pos]), pos)
        weight = self.model.item_emb.weight
        k = self.cfg.semantic.neighbours
        min_count = self.cfg.learner.cold_start_min_count
        done = 0
        for row in batch.new_items.tolist():
            pos = first_pos.get(row)
            if pos is None:
                continue
            hits = self.index.search(batch.item_sem[pos], k * 2, exclude=examples[pos].item_id)
            rows, sims = [], []
            for item_id, sim in hits:
                r = self.featurizer.items.row(item_id)
                if sim > 0 and r and self.featurizer.items.counts[r] >= min_count:
                    rows.append(r)
                    sims.append(sim)
                if len(rows) == k:
                    break
            if not rows:
                continue
            w = torch.tensor(sims, dtype=weight.dtype, device=weight.device)
            weight[row] = (w / w.sum()) @ weight[torch.tensor(rows, device=weight.device)]
            done += 1
        self.items_cold_started += done
        return done

    def _index_vectors(self, batch: EncodedBatch, examples: Sequence[Example]) -> None:
        """Add items whose teacher vector we see for the first time to the neighbour index."""
        if self.index is None:
            return
        self._grow_indexed_rows()
        fresh = np.flatnonzero(batch.item_sem_mask & ~self._indexed_rows[batch.item])
        if fresh.size == 0:
            return
        rows, first = np.unique(batch.item[fresh], return_index=True)
        ids = [self.featurizer.items.id_of(int(r)) for r in rows]
        vecs = batch.item_sem[fresh[first]]
        self._indexed_rows[rows] = True
        if ids:
            self.index.add(ids, vecs)
            self._indexed_ids.extend(ids)

    def _grow_indexed_rows(self) -> None:
        capacity = self.featurizer.items.capacity
        if len(self._indexed_rows) < capacity:
            self._indexed_rows = np.r_[self._indexed_rows, np.zeros(capacity - len(self._indexed_rows), dtype=bool)]

    # -- state ------------------------------------------------------------------------------

    def set_unknown_rows_to_mean(self) -> None:
        """Make row 0 (unknown ids) the impression-weighted mean of trained rows, for serving."""
        with torch.no_grad():
            for table, vocab in ((self.model.user_emb, self.featurizer.users), (self.model.item_emb, self.featurizer.items)):
                n = len(vocab)
                counts = torch.from_numpy(vocab.counts[1:n].astype(np.float32)).to(self.device)
                if n > 1 and float(counts.sum()) > 0:
                    table.weight[0] = (counts / counts.sum()) @ table.weight[1:n]

    def summary(self) -> dict[str, Any]:
        """Metrics plus model/semantic figures (gate compute saving, tables, cold starts)."""
        out = self.metrics.summary()
        out.update(examples_seen=self.examples_seen, positives=self.metrics.positives,
                   users=len(self.featurizer.users) - 1, items=len(self.featurizer.items) - 1,
                   context_fields=list(self.featurizer.context.slots),
                   context_fields_dropped=self.featurizer.context.dropped)
        if self.experts is not None:
            out.update(expert_mix_bias=self.experts.mix, expert_mix_taste=self.experts.mix_taste,
                       expert_mix_slope=self.experts.mix_slope,
                       expert_mix_fitted_to="served outcomes" if self.experts.serving_feedback else "training stream")
        if self.semantic:
            flops = self.model.flops_per_example()
            usage = out["gate_usage"]
            full = flops["base"] + flops["gate"] + flops["semantic_branch"]
            used = flops["base"] + flops["gate"] + (usage if usage == usage else 1.0) * flops["semantic_branch"]
            out.update(items_cold_started=self.items_cold_started, semantic_index_items=len(self.index or ()),
                       model_macs_per_example=flops, gate_compute_saved=1 - used / full)
        return out

    def state(self) -> LearnerState:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        optimizer = {f"sparse/{name}/accum": acc.cpu() for name, acc in self.sparse_opt.state().items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in self.dense_opt.state.items():
            for key, value in st.items():
                optimizer[f"dense/{names[id(p)]}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        mc = self.model.mc
        mc_dict = {**mc.to_dict(), "user_capacity": self.model.user_emb.num_embeddings,
                   "item_capacity": self.model.item_emb.num_embeddings}
        arrays = {"user_counts": self.featurizer.users.counts.copy(), "item_counts": self.featurizer.items.counts.copy()}
        arrays.update({f"metrics.{k}": np.asarray(v).copy() for k, v in self.metrics.state().items()})
        if self.experts is not None:
            arrays.update({f"experts.{k}": v for k, v in self.experts.state().items()})
        index_ids = list(self._indexed_ids)
        if self.index is not None and index_ids:
            arrays["index.vectors"] = np.stack([self.index.vector(i) for i in index_ids]).astype(np.float32)
        meta = {"featurizer": self.featurizer.state(), "examples_seen": self.examples_seen,
                "items_cold_started": self.items_cold_started, "index_ids": index_ids}
        return LearnerState(mc_dict, tensors, optimizer, arrays, meta)

    def _load(self, state: LearnerState) -> None:
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.tensors.items()})
        self.examples_seen = int(state.meta.get("examples_seen", 0))
        self.items_cold_started = int(state.meta.get("items_cold_started", 0))
        experts = {k.split(".", 1)[1]: v for k, v in state.arrays.items() if k.startswith("experts.")}
        if self.experts is not None and experts:
            self.experts.load(experts)
        if self.serving:
            return
        self.sparse_opt.load({key.split("/")[1]: t for key, t in state.optimizer.items()
                              if key.startswith("sparse/") and key.endswith("/accum")})
        for name, p in self.model.named_parameters():
            st = {key.rsplit("/", 1)[1]: t for key, t in state.optimizer.items() if key.startswith(f"dense/{name}/")}
            if st:
                self.dense_opt.state[p] = {k: (v.to(self.device) if v.dim() else v) for k, v in st.items()}
        metrics = {k.split(".", 1)[1]: v for k, v in state.arrays.items() if k.startswith("metrics.")}
        if metrics:
            self.metrics.load(metrics)
        ids = state.meta.get("index_ids") or []
        if self.index is not None and ids:
            self.index.add(list(ids), state.arrays["index.vectors"])
            self._indexed_ids = list(ids)
            self._grow_indexed_rows()
            self._indexed_rows[[self.featurizer.items.row(i) for i in ids]] = True

