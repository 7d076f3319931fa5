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

from livectr.core.events import COPY_KINDS, KIND_DEFER_OBSERVED, KIND_FAKE_NEGATIVE, KIND_SCORE_REQUEST
from livectr.core.words import WORD_DTYPE
from livectr.learner.item_vectors import DATA_KEY, PRESENT_KEY, ItemVectors, last_of_each
from livectr.learner.model import ModelInputs
from livectr.learner.vocab import UNKNOWN_ROW, ContextHasher, GrowingVocab
from livectr.semantic_cache.codec import dequantize_many

_COPY_KINDS = np.asarray(sorted(COPY_KINDS))
#: Kinds scored at their impression's time — what a scorer serves: their semantic inputs are
#: what the scorer has (the item row's stored vector, no user profile), see :meth:`Featurizer.encode`.
_SERVED_KINDS = np.asarray(sorted((KIND_SCORE_REQUEST, KIND_FAKE_NEGATIVE, KIND_DEFER_OBSERVED)))

#: Odd 32-bit multipliers (Knuth's and MurmurHash3's) that spread (user, item) rows over the pair buckets.
_PAIR_MULT_USER = 2_654_435_761
_PAIR_MULT_ITEM = 2_246_822_519
_PAIR_MULT_GEN_USER = 3_266_489_917
_PAIR_MULT_GEN_ITEM = 668_265_263
#: Odd 64-bit multipliers mixing (user row, generation, word hash) into user × word buckets.
_WORD_MULT_USER = np.uint64(0x9E3779B97F4A7C15)
_WORD_MULT_GEN = np.uint64(0xC2B2AE3D27D4EB4F)
_WORD_MULT_MIX = np.uint64(0xFF51AFD7ED558CCD)
#: Key of the uncrossed (plain) word buckets: that of user row 2**40, which no user has.
_PLAIN_WORD_KEY = np.uint64(((1 << 40) * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF)
#: Slots of the per-word item counts behind ``max_word_share``.
WORD_COUNT_SLOTS = 1 << 18
#: Items to count before a word can be too common to keep.
WORD_SHARE_MIN_ITEMS = 100


@dataclass
class EncodedBatch:
    """Numpy view of a mini-batch; ``labels``/``kinds``/``decided_at`` are empty for impressions;
    ``ts`` is each record's event time."""

    user: np.ndarray
    item: np.ndarray
    context: np.ndarray
    pair: np.ndarray
    #: [n, W] user × word buckets (and plain word buckets); padding is the table's last row.
    words: np.ndarray
    #: [n, W] float32 feature values: 1/√(the example's word lookups) for a word, 0 for padding.
    words_mask: np.ndarray
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
            t(self.words),
            t(self.words_mask),
        )


class Featurizer:
    """The learner's vocabularies and the one place records become arrays."""

    def __init__(
        self,
        users: GrowingVocab,
        items: GrowingVocab,
        context: ContextHasher,
        sem_dim: int,
        pair_buckets: int = 0,
        word_buckets: int = 0,
        max_item_words: int = 16,
        plain_words: bool = False,
        item_words: np.ndarray | None = None,
        max_word_share: float = 1.0,
        word_counts: np.ndarray | None = None,
    ) -> None:
        self.users = users
        self.items = items
        self.context = context
        self.sem_dim = sem_dim
        self.pair_buckets = pair_buckets
        self.word_buckets = word_buckets
        self.max_item_words = max_item_words
        self.plain_words = plain_words
        #: Per item row, the item's word hashes (uint32, 0 = padding): the scorer, which sees
        #: impressions and not examples, reads an item's words here.
        self.item_words = np.zeros((0, max_item_words), dtype=np.uint32)
        if item_words is not None:
            self.item_words = np.ascontiguousarray(item_words, dtype=np.uint32)
        #: Words on more than this share of the items seen are left out (see :meth:`store_words`).
        self.max_word_share = max_word_share
        #: Item rows whose words are counted (not in snapshots: after a restart an item seen
        #: again counts once more, a small overcount of a share that only filters).
        self._counted = np.zeros(self.item_words.shape[0], dtype=bool)
        #: Items counted per (hashed) word and in all, for that share; the last slot is the total.
        self.word_counts = np.zeros(0, dtype=np.int64)
        if word_counts is not None and word_counts.size == WORD_COUNT_SLOTS + 1:
            self.word_counts = word_counts.astype(np.int64)
        #: Per item row, the teacher's vector as last trained (livectr.learner.item_vectors).
        self.item_vectors = ItemVectors(sem_dim)

    @classmethod
    def new(
        cls,
        context_fields: int,
        context_buckets: int,
        sem_dim: int,
        initial_capacity: int = 1024,
        pair_buckets: int = 0,
        word_buckets: int = 0,
        max_item_words: int = 16,
        plain_words: bool = False,
        max_word_share: float = 1.0,
    ) -> Featurizer:
        return cls(
            GrowingVocab("user_id", initial_capacity),
            GrowingVocab("item_id", initial_capacity),
            ContextHasher(context_fields, context_buckets),
            sem_dim,
            pair_buckets,
            word_buckets,
            max_item_words,
            plain_words,
            max_word_share=max_word_share,
        )

    @property
    def word_columns(self) -> int:
        """Word lookups per example: the item's words, twice with plain words."""
        return self.max_item_words * (2 if self.plain_words else 1) if self.word_buckets else 0

    def words_capacity(self, rows: int) -> None:
        """Make room for the words of ``rows`` item rows."""
        if self.item_words.shape[0] < rows:
            grown = np.zeros((max(rows, 2 * self.item_words.shape[0]), self.max_item_words), dtype=np.uint32)
            grown[: self.item_words.shape[0]] = self.item_words
            self.item_words = grown
        if self._counted.size < self.item_words.shape[0]:
            self._counted = np.r_[self._counted, np.zeros(self.item_words.shape[0] - self._counted.size, dtype=bool)]

    def store_words(self, items: np.ndarray, records: Sequence[Any]) -> None:
        """Keep the words of records that carry them (``item_words``) on their item rows.

        Words on more than ``max_word_share`` of the items counted so far (once
        :data:`WORD_SHARE_MIN_ITEMS` have been; a batch's new items are counted first) are left
        out, like a vectoriser's ``max_df``: a word on every item ("a", "and" in templated texts)
        crossed with the user is one more copy of the user's bias, which then takes two Newton
        steps per example (it cost the synthetic stream 0.0014 AUC). An item is counted once,
        when its row first gets words. Left-out words leave a 0 (padding) in place.

        The unknown row keeps none: it stands for many items. Word fields whose length is not
        a multiple of 4 are ignored here (the learner loop dead-letters such examples first).
        In bulk (one ``frombuffer`` per batch): this runs on every training batch.
        """
        if not self.word_buckets:
            return
        try:
            datas = [r.item_words or b"" for r in records]
        except AttributeError:  # records of another type
            datas = [getattr(r, "item_words", None) or b"" for r in records]
        sizes = np.fromiter(map(len, datas), dtype=np.int64, count=len(datas))
        at = np.flatnonzero((sizes > 0) & (sizes % 4 == 0) & (items != UNKNOWN_ROW))
        if not at.size:
            return
        k = self.max_item_words
        # The last record of each row wins (its item's newest words).
        rev_rows, last = last_of_each(items[at], at)
        chunks = list(map(datas.__getitem__, last.tolist()))
        lengths = sizes[last] // 4
        flat = np.frombuffer(b"".join(chunks), dtype=WORD_DTYPE)
        owner = np.repeat(np.arange(len(chunks)), lengths)
        position = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = position < k
        words = np.zeros((len(chunks), k), dtype=np.uint32)
        words[owner[keep], position[keep]] = flat[keep]
        self.words_capacity(int(rev_rows.max()) + 1)
        if self.max_word_share < 1.0:
            words = self._common_words_left_out(rev_rows, words)
        self.item_words[rev_rows] = words

    def _common_words_left_out(self, rows: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Count the words of rows not counted yet, then zero words on too many items (see :meth:`store_words`)."""
        if not self.word_counts.size:
            self.word_counts = np.zeros(WORD_COUNT_SLOTS + 1, dtype=np.int64)
        counts = self.word_counts
        slots = (words & np.uint32(WORD_COUNT_SLOTS - 1)).astype(np.intp)  # words % the slots (a power of two)
        new = ~self._counted[rows]
        if new.any():
            self._counted[rows[new]] = True
            present = words[new] != 0
            np.add.at(counts, slots[new][present], 1)
            counts[-1] += int(new.sum())
        if counts[-1] < WORD_SHARE_MIN_ITEMS:
            return words
        return np.where(counts[slots] > self.max_word_share * counts[-1], np.uint32(0), words)

    def clear_items(self, rows: np.ndarray) -> None:
        """Forget the words (and teacher vectors) of item rows freed by expiry (the next id on the
        row brings its own)."""
        self.item_vectors.clear(rows)
        rows = rows[rows < self.item_words.shape[0]]
        self.item_words[rows] = 0
        self._counted[rows[rows < self._counted.size]] = False

    def words(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """User × word buckets ``[n, W]`` of each (user row, item row) and their feature values.

        The bucket mixes the user's row, its :attr:`~GrowingVocab.generation` (an id inheriting
        a freed row does not inherit its predecessor's word weights) and the word hash, in
        wrapping uint64 arithmetic (deterministic everywhere). Padding maps to the table's
        last row (``word_buckets``) with value 0: it adds nothing and learns nothing. A word's
        value is 1/√n for the example's n word lookups: the optimiser gives each lookup the
        example's curvature, so the n Newton steps move the logit by one (docs/design.md).
        """
        n, w = len(users), self.word_columns
        if not w:
            return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
        self.words_capacity(self.items.capacity)
        hashes = self.item_words[items]  # [n, K]
        present = hashes != 0
        # Only as many columns as the batch's wordiest item needs (words first in each row):
        # every lookup, padding included, costs in the optimiser and the in-batch replay.
        n_words = present.sum(axis=1)
        width = int(n_words.max()) if n else 0
        if width < hashes.shape[1]:
            if not _left_aligned(present):  # words left out by max_word_share leave gaps
                hashes = np.take_along_axis(hashes, np.argsort(~present, axis=1, kind="stable"), axis=1)
            hashes = hashes[:, :width]
            present = hashes != 0
        hashes = hashes.astype(np.uint64)
        user_key = users.astype(np.uint64) * _WORD_MULT_USER
        gen = self.users.generation[users]
        if gen.any():
            user_key = user_key + gen.astype(np.uint64) * _WORD_MULT_GEN
        keys = [user_key[:, None] ^ hashes]
        if self.plain_words:
            keys.append(hashes ^ _PLAIN_WORD_KEY)
        h = np.concatenate(keys, axis=1) * _WORD_MULT_MIX
        h ^= h >> np.uint64(31)
        if self.word_buckets & (self.word_buckets - 1):
            h %= np.uint64(self.word_buckets)
        else:  # a power of two (the default): the same buckets without a 64-bit division
            h &= np.uint64(self.word_buckets - 1)
        buckets = h.astype(np.int64)
        mask = np.concatenate([present] * len(keys), axis=1)
        buckets[~mask] = self.word_buckets
        value = mask.astype(np.float32)
        count = (n_words * len(keys)).astype(np.float32)[:, None]  # the lookups per example
        value /= np.sqrt(np.maximum(count, 1.0))
        return buckets, value

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
        if labelled:
            self.store_words(items, records)
        words, words_mask = self.words(users, items)
        if s and labelled:
            assert kinds is not None
            blobs = [r.item_sem for r in records]
            item_sem, item_mask = dequantize_many(blobs, s)
            user_sem, user_mask = dequantize_many([r.user_sem for r in records], s)
            served = np.isin(kinds, _SERVED_KINDS)
            if served.any():
                # Scored as the scorer scores them: the item row's vector as it stood before this
                # batch, and no user profile (profiles live in the join, not in the scorer).
                item_sem[served], item_mask[served] = self.item_vectors.lookup(items[served])
                user_sem[served], user_mask[served] = 0.0, False
            if grow:  # training: scoring alone changes nothing
                self.item_vectors.store(items, blobs)
        elif s:
            item_sem, item_mask = self.item_vectors.lookup(items)
            user_sem, user_mask = np.zeros((n, s), dtype=np.float32), np.zeros(n, dtype=bool)
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
            words,
            words_mask,
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
            "word_buckets": self.word_buckets,
            "max_item_words": self.max_item_words,
            "plain_words": self.plain_words,
            "max_word_share": self.max_word_share,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The vocabularies' per-row arrays, keyed ``user_counts``, ``item_last_seen``, … (snapshots)."""
        out: dict[str, np.ndarray] = {}
        for prefix, vocab in (("user", self.users), ("item", self.items)):
            out.update({f"{prefix}_{k}": v for k, v in vocab.arrays().items()})
        if self.word_buckets:
            out["words.items"] = self.item_words[: self.items.capacity].copy()
        if self.word_counts.size:
            out["words.counts"] = self.word_counts.copy()
        if self.sem_dim:
            out.update(self.item_vectors.arrays(self.items.capacity))
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> Featurizer:
        """Inverse of :meth:`state` and :meth:`arrays`."""
        arrays = arrays or {}

        def of(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix) + 1 :]: v for k, v in arrays.items() if k.startswith(f"{prefix}_")}

        feat = cls(
            GrowingVocab.from_state(state["users"], arrays=of("user")),
            GrowingVocab.from_state(state["items"], arrays=of("item")),
            ContextHasher.from_state(state["context"]),
            int(state["sem_dim"]),
            int(state.get("pair_buckets", 0)),
            int(state.get("word_buckets", 0)),
            int(state.get("max_item_words", 16)),
            bool(state.get("plain_words", False)),
            arrays.get("words.items"),
            float(state.get("max_word_share", 1.0)),
            arrays.get("words.counts"),
        )
        feat.item_vectors = ItemVectors(feat.sem_dim, arrays.get(DATA_KEY), arrays.get(PRESENT_KEY))
        return feat


def _left_aligned(present: np.ndarray) -> bool:
    """Whether every row's True entries come before its False ones."""
    return bool((present[:, 1:] <= present[:, :-1]).all())
