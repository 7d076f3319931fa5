"""The student CTR model: id embeddings → DCN-v2 cross + MLP → logit, plus a gated semantic part.

Module boundaries follow TorchRec: sparse id tables (rows grow with the vocabularies and are
trained per example by :mod:`livectr.learner.sparse`, not by autograd optimisers), a dense interaction
part, and the semantic extras, each a small module.

Semantic part (MSD-style distillation, present only when ``sem_dim > 0``):

* **Distillation heads** predict the teacher's reduced item vector from the item embedding and
  the user vector from the user embedding. Trained with a cosine loss on examples that carry
  the teacher's vector, they let the model serve without the teacher: at inference the
  predicted vector stands in for a missing one. The item loss also shapes the item embeddings
  (MSD's point: the ids absorb the semantics). The user loss is off by default
  (``user_distill_weight``): a click profile moves with every click, and a head tied to it
  served worse than a free one, which the branch trains as its own view of users whose
  profile is missing — among them every user at serving time.
* **Semantic branch**: a small MLP over ``[item_vec, user_vec, item_vec ⊙ user_vec]`` (teacher
  vector when present, else the head's prediction) that adds a residual logit.
* **Gate** (DynMM-style dynamic fusion): a tiny MLP on cheap features (detached id embeddings,
  the item's impression count, whether a teacher vector is present) decides per example
  whether the branch runs. Training uses a straight-through relaxed Bernoulli sample so the
  decision is hard in the forward pass but differentiable, and the trainer adds a usage cost;
  inference is hard and the branch (and the heads) run only on the selected rows, which is
  where the compute is saved. The expectation is that it opens for new items (weak id
  embedding) and closes for well-known ones, where the id embedding already says it all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from livectr.core.config import Config
from livectr.learner.sparse import SparseTable

#: Scale of the log-count gate feature: log1p(count) / COUNT_SCALE is ~1 at ~1000 impressions.
COUNT_SCALE = 7.0


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a :class:`StudentCTR`; stored in every snapshot manifest."""

    embedding_dim: int = 16
    context_fields: int = 4
    context_buckets: int = 1 << 18
    #: Hashed user×item first-order weights (VW's ``-q ui``); 0 = none.
    pair_buckets: int = 1 << 20
    #: Hashed user × item-word first-order weights (VW's ``-q ut``); 0 = none (and in snapshots
    #: written before they existed).
    word_buckets: int = 0
    cross_layers: int = 2
    hidden: tuple[int, ...] = (64, 32)
    #: Reduced teacher dimension; 0 = no semantic part (pure id model).
    sem_dim: int = 32
    sem_hidden: int = 32
    gate_hidden: int = 16
    #: Whether the semantic branch reads the user's click profile (the join's teacher vector of
    #: the user) where an example carries one. Off: a scorer has no profiles, so a branch trained
    #: on them serves from the distilled user vector it was not trained with (docs/benchmarks.md,
    #: "What the scorer serves"). Snapshots written before the field existed load it as off.
    user_sem_input: bool = False
    user_capacity: int = 1024
    item_capacity: int = 1024

    @classmethod
    def from_config(cls, cfg: Config, user_capacity: int = 1024, item_capacity: int = 1024) -> ModelConfig:
        lc = cfg.learner
        hidden = tuple(int(h) for h in lc.hidden.split(",") if h.strip())
        return cls(
            embedding_dim=lc.embedding_dim,
            context_fields=lc.context_fields,
            context_buckets=lc.context_buckets,
            pair_buckets=lc.pair_buckets,
            word_buckets=lc.word_buckets,
            cross_layers=lc.cross_layers,
            hidden=hidden,
            sem_dim=cfg.semantic.reduced_dim if cfg.semantic.enabled else 0,
            sem_hidden=lc.sem_hidden,
            user_sem_input=lc.user_profile_input,
            user_capacity=user_capacity,
            item_capacity=item_capacity,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        return cls(**{**d, "hidden": tuple(d["hidden"])})

    @property
    def input_dim(self) -> int:
        return (2 + self.context_fields) * self.embedding_dim


class ModelInputs(NamedTuple):
    """One tensorised mini-batch (see :mod:`livectr.learner.features`)."""

    user: torch.Tensor  # int64 [B]
    item: torch.Tensor  # int64 [B]
    context: torch.Tensor  # int64 [B, K]
    pair: torch.Tensor  # int64 [B], hashed (user row, item row)
    item_count: torch.Tensor  # float32 [B], impressions seen before this batch
    item_sem: torch.Tensor  # float32 [B, S] (zeros where absent)
    item_sem_mask: torch.Tensor  # bool [B]
    user_sem: torch.Tensor
    user_sem_mask: torch.Tensor
    words: torch.Tensor  # int64 [B, W], hashed (user row, item word); padding = the last bucket
    words_mask: torch.Tensor  # float32 [B, W], each word's feature value (1/√W'), 0 on padding


class ModelOutputs(NamedTuple):
    logit: torch.Tensor  # [B]
    #: Predicted teacher vectors (None without semantics or when not computed).
    item_hat: torch.Tensor | None
    user_hat: torch.Tensor | None
    #: Gate probability and the hard decision actually used (None without semantics).
    gate_prob: torch.Tensor | None
    gate: torch.Tensor | None
    #: Training only: the id part's logit and the semantic branch's residual on every example,
    #: whatever the gate chose (the branch is trained on all of them; see the trainer).
    base_logit: torch.Tensor | None = None
    branch_logit: torch.Tensor | None = None


class CrossNetV2(nn.Module):
    """DCN-v2 full-rank cross layers: ``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l``."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        linears = [nn.Linear(dim, dim) for _ in range(layers)]
        for layer in linears:
            nn.init.xavier_uniform_(layer.weight, gain=0.5)
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(linears)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


def mlp(dims: list[int]) -> nn.Sequential:
    """ReLU MLP through ``dims`` (no activation after the last layer)."""
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        mods.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class SemanticPart(nn.Module):
    """Distillation heads, semantic branch and gate (MSD + DynMM); see the module docstring."""

    def __init__(self, mc: ModelConfig) -> None:
        super().__init__()
        d, s = mc.embedding_dim, mc.sem_dim
        self.item_head = mlp([d, 2 * d, s])
        self.user_head = mlp([d, 2 * d, s])
        self.user_sem_input = mc.user_sem_input
        self.branch = mlp([4 * s, mc.sem_hidden, 1])
        # The user's taste in the teacher's space, learned from the user's id embedding: the
        # bilinear term uᵀA·item_vec is what lets a user's clicks on some texts reach items the
        # user (or anyone) has never seen — the cold-start case semantics exist for.
        self.taste = nn.Linear(d, s, bias=False)
        nn.init.zeros_(self.taste.weight)
        self.gate = mlp([2 * d + 2, mc.gate_hidden, 1])
        gate_out = self.gate[-1]
        assert isinstance(gate_out, nn.Linear)
        nn.init.constant_(gate_out.bias, 1.0)  # start open: the branch must first prove itself

    def gate_logit(self, u: torch.Tensor, i: torch.Tensor, inp: ModelInputs) -> torch.Tensor:
        count = torch.log1p(inp.item_count).unsqueeze(1) / COUNT_SCALE
        present = inp.item_sem_mask.to(u.dtype).unsqueeze(1)
        return self.gate(torch.cat([u.detach(), i.detach(), count, present], dim=1)).squeeze(1)

    def branch_logit(
        self, u: torch.Tensor, i: torch.Tensor, inp: ModelInputs, rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual logit for ``rows`` (all when None), plus the predicted item/user vectors."""
        item_sem, item_mask, user_sem, user_mask = inp.item_sem, inp.item_sem_mask, inp.user_sem, inp.user_sem_mask
        if rows is not None:
            u, i = u[rows], i[rows]
            item_sem, item_mask, user_sem, user_mask = item_sem[rows], item_mask[rows], user_sem[rows], user_mask[rows]
        item_hat, user_hat = self.item_head(i), self.user_head(u)
        if not self.user_sem_input:
            user_mask = torch.zeros_like(user_mask)
        iv = torch.where(item_mask.unsqueeze(1), item_sem, F.normalize(item_hat, dim=1))
        uv = torch.where(user_mask.unsqueeze(1), user_sem, F.normalize(user_hat, dim=1))
        taste = self.taste(u) * iv
        logit = self.branch(torch.cat([iv, uv, iv * uv, taste], dim=1)).squeeze(1) + taste.sum(dim=1)
        return logit, item_hat, user_hat


class StudentCTR(nn.Module):
    """The compact student; ``forward(inputs, train=True)`` returns :class:`ModelOutputs`."""

    def __init__(self, mc: ModelConfig) -> None:
        super().__init__()
        self.mc = mc
        d = mc.embedding_dim
        # One extra column per row: the feature's first-order weight (the "wide" part). Online,
        # popularity and context effects are learned from the first batches through these
        # weights, long before the interactions have converged (the gap to FTRL logistic
        # regression early in a stream was this). Keeping it in the same row means it grows,
        # snapshots and cold-starts with the id's embedding.
        self.user_emb = SparseTable(mc.user_capacity, d)
        self.item_emb = SparseTable(mc.item_capacity, d)
        self.context_emb = SparseTable(mc.context_buckets, d)
        # A first-order weight per hashed (user, item) pair: memorises repeated pairs, the one
        # signal a per-example linear learner with -q ui (VW) has that embeddings only approximate.
        self.pair_w = SparseTable(mc.pair_buckets, 0) if mc.pair_buckets else None
        # A first-order weight per hashed (user, item word) (VW's -q ut): a user's clicks on items
        # with a word reach every item with that word, new items included, from the first click.
        # One extra row takes the padding lookups (masked to 0: it never moves).
        self.word_w = SparseTable(mc.word_buckets + 1, 0, padding_row=mc.word_buckets) if mc.word_buckets else None
        self.cross = CrossNetV2(mc.input_dim, mc.cross_layers)
        self.deep = mlp([mc.input_dim, *mc.hidden])
        self.deep.append(nn.ReLU())
        self.out = nn.Linear(mc.input_dim + (mc.hidden[-1] if mc.hidden else mc.input_dim), 1)
        self.semantic = SemanticPart(mc) if mc.sem_dim > 0 else None

    def sparse_tables(self) -> dict[str, SparseTable]:
        """The id tables, trained by :class:`livectr.learner.sparse.RowAdagrad` rather than autograd optimisers."""
        tables = {"user": self.user_emb, "item": self.item_emb, "context": self.context_emb}
        if self.pair_w is not None:
            tables["pair"] = self.pair_w
        if self.word_w is not None:
            tables["words"] = self.word_w
        return tables

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, inp: ModelInputs, train: bool = True) -> ModelOutputs:
        d = self.mc.embedding_dim
        user, item, ctx = self.user_emb(inp.user), self.item_emb(inp.item), self.context_emb(inp.context)
        u, i = user[:, :d], item[:, :d]
        c = ctx[..., :d].flatten(1)
        wide = user[:, d] + item[:, d] + ctx[..., d].sum(dim=1)
        if self.pair_w is not None:
            wide = wide + self.pair_w(inp.pair)[:, 0]
        if self.word_w is not None and inp.words.shape[1]:
            wide = wide + self.word_w.weighted_sum(inp.words, inp.words_mask)
        x0 = torch.cat([u, i, c], dim=1)
        logit = self.out(torch.cat([self.cross(x0), self.deep(x0)], dim=1)).squeeze(1) + _fm(x0, d) + wide
        if self.semantic is None:
            return ModelOutputs(logit, None, None, None, None)
        g_logit = self.semantic.gate_logit(u, i, inp)
        g_prob = torch.sigmoid(g_logit)
        if train:
            gate = _straight_through_bernoulli(g_logit)
            sem_logit, item_hat, user_hat = self.semantic.branch_logit(u, i, inp, None)
            return ModelOutputs(logit + gate * sem_logit, item_hat, user_hat, g_prob, gate, logit, sem_logit)
        gate = (g_logit > 0).to(logit.dtype)
        rows = torch.nonzero(gate, as_tuple=True)[0]
        if rows.numel():
            sem_logit, _, _ = self.semantic.branch_logit(u, i, inp, rows)
            logit = logit.index_add(0, rows, sem_logit)
        return ModelOutputs(logit, None, None, g_prob, gate)

    def predict_vectors(self, item_rows: torch.Tensor, user_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distilled (student-side) item and user vectors, unit-norm."""
        assert self.semantic is not None, "model has no semantic part"
        d = self.mc.embedding_dim
        return (
            F.normalize(self.semantic.item_head(self.item_emb(item_rows)[:, :d]), dim=1),
            F.normalize(self.semantic.user_head(self.user_emb(user_rows)[:, :d]), dim=1),
        )

    def flops_per_example(self) -> dict[str, int]:
        """Multiply-adds per example of each part, to turn the gate's usage into saved compute."""
        mc, d, s = self.mc, self.mc.embedding_dim, self.mc.sem_dim
        n = mc.input_dim
        base = mc.cross_layers * (n * n + n)
        dims = [n, *mc.hidden]
        base += sum(a * b for a, b in zip(dims, dims[1:])) + (n + dims[-1])
        out = {"base": base}
        if s:
            out["semantic_branch"] = 2 * (d * 2 * d + 2 * d * s) + 3 * s * mc.sem_hidden + mc.sem_hidden + 3 * s
            out["gate"] = (2 * d + 2) * mc.gate_hidden + mc.gate_hidden
        return out


def _fm(x0: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of pairwise dot products of the field embeddings (the FM term of DeepFM).

    Why beside the cross network: a user×item affinity is a plain dot product, which an FM
    term learns from the first updates, while cross layers starting near identity need many
    more steps to express it; on a stream, steps to a useful model is what matters.
    """
    e = x0.view(x0.shape[0], -1, dim)
    s = e.sum(dim=1)
    return 0.5 * (s.pow(2).sum(dim=1) - e.pow(2).sum(dim=(1, 2)))


def _straight_through_bernoulli(logit: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Hard 0/1 sample in the forward pass, relaxed-Bernoulli gradient in the backward pass."""
    u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()
