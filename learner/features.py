"""Bulk tensorisation: a list of examples (or impressions) → numpy arrays → one set of tensors.

Why in bulk: at 50k examples/s the budget is ~20 µs per example for everything, so nothing here
touches torch per example. Each field is pulled out with one comprehension, ids go through
the vocabularies in one call, semantic bytes are stacked with ``dequantize_many``, and the
arrays become tensors once per mini-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from livectr.core.events import COPY_KINDS
from livectr.learner.model import ModelInputs
from livectr.learner.vocab import UNKNOWN_ROW, ContextHasher, GrowingVocab
from livectr.semantic_cache.codec import dequantize_many

_COPY_KINDS = np.asarray(sorted(COPY_KINDS))

#: Odd 32-bit multipliers (Knuth's and MurmurHash3's) that spread (user, item) rows over the pair buckets.
_PAIR_MULT_USER = 2_654_435_761
_PAIR_MULT_ITEM = 2_246_822_519
_PAIR_MULT_GEN_USER = 3_266_489_917
_PAIR_MULT_GEN_ITEM = 668_265_263


@dataclass
class EncodedBatch:
    """Numpy view of a mini-batch; ``labels``/``kinds``/``decided_at`` are empty for impressions;
    ``ts`` is each record's event time."""

    user: np.ndarray
    item: np.ndarray
    context: np.ndarray
    pair: np.ndarray
    item_count: np.ndarray
    item_sem: np.ndarray
    item_sem_mask: np.ndarray
    user_sem: np.ndarray
    user_sem_mask: np.ndarray
    new_items: np.ndarray
    labels: np.ndarray
    kinds: np.ndarray
    decided_at: np.ndarray
    ts: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def to_inputs(self, device: torch.device) -> ModelInputs:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        return ModelInputs(
            t(self.user),
            t(self.item),
            t(self.context),
            t(self.pair),
            t(self.item_count),
            t(self.item_sem),
            t(self.item_sem_mask),
            t(self.user_sem),
            t(self.user_sem_mask),
        )


class Featurizer:
    """The learner's vocabularies and the one place records become arrays."""

    def __init__(
        self, users: GrowingVocab, items: GrowingVocab, context: ContextHasher, sem_dim: int, pair_buckets: int = 0
    ) -> None:
        self.users = users
        self.items = items
        self.context = context
        self.sem_dim = sem_dim
        self.pair_buckets = pair_buckets

    @classmethod
    def new(
        cls,
        context_fields: int,
        context_buckets: int,
        sem_dim: int,
        initial_capacity: int = 1024,
        pair_buckets: int = 0,
    ) -> Featurizer:
        return cls(
            GrowingVocab("user_id", initial_capacity),
            GrowingVocab("item_id", initial_capacity),
            ContextHasher(context_fields, context_buckets),
            sem_dim,
            pair_buckets,
        )

    def pairs(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Bucket of each (user row, item row) pair.

        A row's :attr:`~livectr.learner.vocab.GrowingVocab.generation` (how often it was
        reassigned after expiry) is mixed in, so an id that inherits a freed row does not inherit
        its predecessor's pair weights; with no reuse (generation 0) buckets are the plain
        row hash, as in snapshots written before expiry existed.
        """
        if not self.pair_buckets:
            return np.zeros(len(users), dtype=np.int64)
        mixed = (users.astype(np.int64) * _PAIR_MULT_USER) ^ (items.astype(np.int64) * _PAIR_MULT_ITEM)
        gen_u, gen_i = self.users.generation[users], self.items.generation[items]
        if gen_u.any() or gen_i.any():
            mixed ^= (gen_u * _PAIR_MULT_GEN_USER) ^ (gen_i * _PAIR_MULT_GEN_ITEM)
        return mixed % self.pair_buckets

    def encode(self, records: Sequence[Any], grow: bool = True, labelled: bool = True) -> EncodedBatch:
        """Arrays for ``records`` (Examples when ``labelled``, else Impressions).

        ``item_count`` is each item's impression count *before* this batch (the gate's input and
        what the cold-start metric looks at).
        """
        n, s = len(records), self.sem_dim
        ts = np.fromiter((r.ts for r in records), dtype=np.float64, count=n)
        kinds = np.fromiter((r.kind for r in records), dtype=np.int64, count=n) if labelled else None
        countable = ~np.isin(kinds, _COPY_KINDS) if kinds is not None else None
        users, _ = self.users.lookup([r.user_id for r in records], grow=grow, ts=ts, countable=countable)
        items, new_items = self.items.lookup([r.item_id for r in records], grow=grow, ts=ts, countable=countable)
        context = self.context.encode([r.context for r in records], grow=grow)
        if s and labelled:
            item_sem, item_mask = dequantize_many([r.item_sem for r in records], s)
            user_sem, user_mask = dequantize_many([r.user_sem for r in records], s)
        else:
            item_sem = user_sem = np.zeros((n, s), dtype=np.float32)
            item_mask = user_mask = np.zeros(n, dtype=bool)
        if labelled:
            assert kinds is not None
            labels = np.fromiter((r.label for r in records), dtype=np.float32, count=n)
            decided = np.fromiter((r.decided_at for r in records), dtype=np.float64, count=n)
        else:
            labels, kinds, decided = np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float64)
        return EncodedBatch(
            users,
            items,
            context,
            self.pairs(users, items),
            self.items.counts[items].astype(np.float32),  # 0 on the unknown row (never counted)
            item_sem,
            item_mask,
            user_sem,
            user_mask,
            new_items,
            labels,
            kinds,
            decided,
            ts,
        )

    def cold_mask(self, batch: EncodedBatch, first_n: int, count: bool = False) -> np.ndarray:
        """Mark examples among their item's first ``first_n`` impressions (and, with ``count``,
        count this batch's impressions in).

        Impressions are counted in arrival order within the batch. A second copy of an impression
        (a positive copy, ``defer``'s true copy, a score request: :data:`COPY_KINDS`) does not
        advance the count, and it is marked cold when its item had at most ``first_n``
        impressions, i.e. its impression was plausibly one of them.
        """
        impression = ~np.isin(batch.kinds, _COPY_KINDS)
        rows = batch.item
        if rows.size == 0:
            return np.zeros(0, dtype=bool)
        order = np.argsort(rows, kind="stable")
        sorted_rows, imp = rows[order], impression[order].astype(np.int64)
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
        group_start = np.repeat(starts, np.diff(np.r_[starts, sorted_rows.size]))
        cum = np.cumsum(imp)
        before = cum - imp - (cum[group_start] - imp[group_start])  # impressions of the item earlier in the batch
        ordinal = self.items.counts[rows].copy()
        ordinal[order] += before
        ordinal[rows == UNKNOWN_ROW] = 0  # unknown or not yet admitted: among its first impressions
        cold = np.where(impression, ordinal < first_n, ordinal <= first_n)
        if count:
            counted = impression & (rows != UNKNOWN_ROW)  # the shared row of unknown / not yet admitted ids
            np.add.at(self.items.counts, rows[counted], 1)
        return cold

    def cold_mask_and_count(self, batch: EncodedBatch, first_n: int) -> np.ndarray:
        """:meth:`cold_mask`, counting the batch's impressions in."""
        return self.cold_mask(batch, first_n, count=True)

    def count_users(self, batch: EncodedBatch) -> None:
        counted = ~np.isin(batch.kinds, _COPY_KINDS) & (batch.user != UNKNOWN_ROW)
        np.add.at(self.users.counts, batch.user[counted], 1)

    def state(self) -> dict[str, Any]:
        return {
            "users": self.users.state(),
            "items": self.items.state(),
            "context": self.context.state(),
            "sem_dim": self.sem_dim,
            "pair_buckets": self.pair_buckets,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The vocabularies' per-row arrays, keyed ``user_counts``, ``item_last_seen``, … (snapshots)."""
        out: dict[str, np.ndarray] = {}
        for prefix, vocab in (("user", self.users), ("item", self.items)):
            out.update({f"{prefix}_{k}": v for k, v in vocab.arrays().items()})
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> Featurizer:
        """Inverse of :meth:`state` and :meth:`arrays`."""
        arrays = arrays or {}

        def of(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) + 1 :]: v for k, v in arrays.items() if k.startswith(f"{prefix}_")}

        return cls(
            GrowingVocab.from_state(state["users"], arrays=of("user")),
            GrowingVocab.from_state(state["items"], arrays=of("item")),
            ContextHasher.from_state(state["context"]),
            int(state["sem_dim"]),
            int(state.get("pair_buckets", 0)),
        )
