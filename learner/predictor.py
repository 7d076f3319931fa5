"""The read-only model: what scoring needs and nothing more.

A :class:`Predictor` holds the student's weights, its vocabularies and the fast experts'
per-user weights, and turns impressions (or examples) into click probabilities. It has no
optimiser state, metrics or cold-start index: the scorer loads one per snapshot, and the
online learner (:class:`livectr.learner.online.OnlineLearner`) builds on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from livectr.core.config import Config
from livectr.core.events import Example
from livectr.learner.experts import FastExperts
from livectr.learner.features import EncodedBatch, Featurizer
from livectr.learner.model import ModelConfig, ModelInputs, StudentCTR
from livectr.learner.snapshot import LearnerState


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("learner.device=cuda but no CUDA device is available")
    return torch.device(name)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from float64 logits, as float32 (clipped: no overflow warnings)."""
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -30.0, 30.0)))).astype(np.float32)


class Predictor:
    """The student, its vocabularies and fast experts, fresh or restored from a snapshot's state."""

    def __init__(self, cfg: Config, state: LearnerState | None = None, device: str | None = None) -> None:
        self.cfg = cfg
        lc = cfg.learner
        torch.set_num_threads(max(1, lc.threads))
        self.device = resolve_device(device or lc.device)
        # Seeded: the model's initial weights and the gate's samples make a run reproducible
        # (rand_like in the straight-through gate takes no generator, hence the global seed).
        torch.manual_seed(lc.seed)
        if state is None:
            mc = ModelConfig.from_config(cfg)
            self.featurizer = Featurizer.new(
                mc.context_fields,
                mc.context_buckets,
                mc.sem_dim,
                initial_capacity=min(mc.user_capacity, mc.item_capacity),
                pair_buckets=mc.pair_buckets,
                word_buckets=mc.word_buckets,
                max_item_words=lc.max_item_words,
                plain_words=lc.plain_words,
                max_word_share=lc.max_word_share,
            )
        else:
            mc = ModelConfig.from_dict(state.model_config)
            self.featurizer = Featurizer.from_state(state.meta["featurizer"], state.arrays)
        self.model = StudentCTR(mc).to(self.device)
        self.semantic = mc.sem_dim > 0
        self.experts = (
            FastExperts(
                mc.sem_dim,
                lc.user_bias_rate,
                lc.taste_expert_step,
                lc.taste_expert_prior,
                lc.slope_expert_prior,
                lc.population_taste,
                lc.user_session_s,
                lc.expert_mix_lr,
            )
            if lc.fast_experts
            else None
        )
        self.examples_seen = 0
        #: Whether the item head has been distilled from any teacher vector: until then its output
        #: is an untrained projection, not a semantic vector (see :meth:`_item_vectors`).
        self.item_head_distilled = False
        if state is not None:
            self.model.load_state_dict({k: v.to(self.device) for k, v in state.tensors.items()})
            self.examples_seen = int(state.meta.get("examples_seen", 0))
            self.item_head_distilled = bool(state.meta.get("item_head_distilled", True))  # older snapshots: as before
            experts = {k.split(".", 1)[1]: v for k, v in state.arrays.items() if k.startswith("experts.")}
            if self.experts is not None and experts:
                self.experts.load(experts)

    @classmethod
    def for_serving(cls, cfg: Config, state: LearnerState, device: str | None = None) -> Predictor:
        """A predictor for a scorer: unknown ids score as the impression-weighted mean id."""
        predictor = cls(cfg, state=state, device=device)
        predictor.set_unknown_rows_to_mean()
        return predictor

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
        return sigmoid(logits)

    def predict_one(self, record: Any) -> float:
        return float(self.predict_batch([record])[0])

    @torch.no_grad()
    def _student_logits(self, records: Sequence[Any]) -> tuple[EncodedBatch, np.ndarray, np.ndarray | None]:
        """The student's own logits (before the fast experts) and the item vectors the taste expert reads."""
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
        else the student's distilled prediction (what serving has); None without semantics.

        Before the item head has been distilled from any teacher vector (a cold semantic cache:
        the stream starts before the teacher has encoded its items) its prediction is noise in a
        nearly common direction, which the taste expert would turn into one more global bias:
        such examples get no vector (no taste) instead.
        """
        if self.experts is None or not self.semantic:
            return None
        if not self.item_head_distilled:
            fallback = torch.zeros_like(inp.item_sem)
        else:
            if item_hat is None:
                assert self.model.semantic is not None  # self.semantic: the model has a semantic part
                item_hat = self.model.semantic.item_head(
                    self.model.item_emb(inp.item)[:, : self.model.mc.embedding_dim]
                )
            fallback = F.normalize(item_hat, dim=1)
        vec = torch.where(inp.item_sem_mask.unsqueeze(1), F.normalize(inp.item_sem, dim=1), fallback)
        return vec.double().cpu().numpy()

    def set_unknown_rows_to_mean(self) -> None:
        """Make row 0 (unknown ids) the impression-weighted mean of trained rows, for serving.

        Not when the learner admitted ids only after a few impressions: row 0 was then trained
        as the row of rare ids (those not yet admitted, expired ones included when they come
        back), which is what an unknown id is, and it is kept. Free rows count 0 and weigh nothing.
        """
        with torch.no_grad():
            for table, vocab in (
                (self.model.user_emb, self.featurizer.users),
                (self.model.item_emb, self.featurizer.items),
            ):
                if vocab.min_count > 1:
                    continue
                n = vocab.high_water
                counts = torch.from_numpy(vocab.counts[1:n].astype(np.float32)).to(self.device)
                if n > 1 and float(counts.sum()) > 0:
                    table.weight[0] = (counts / counts.sum()) @ table.weight[1:n]
