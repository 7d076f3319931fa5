"""Cold start from semantics: a new item's id row starts as the mean of its trained neighbours'.

The teacher's vector of an item exists before anyone clicks it. A FAISS index over the item
vectors seen so far finds its nearest trained neighbours, and the new row is initialised as
their similarity-weighted mean, so the item scores like items that read like it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from livectr.learner.features import EncodedBatch, Featurizer
from livectr.semantic_cache.index import ItemIndex


class ColdStart:
    """The neighbour index over item vectors and the initialisation of new item rows."""

    def __init__(self, dim: int, exact_below: int, neighbours: int, min_count: int) -> None:
        self.index = ItemIndex(dim, exact_below=exact_below)
        self.neighbours = neighbours
        self.min_count = min_count
        #: Indexed item ids in insertion order (a dict: expired items leave in O(1)).
        self.ids: dict[str, None] = {}
        self._indexed_rows = np.zeros(0, dtype=bool)
        self.initialised = 0

    def __len__(self) -> int:
        return len(self.index)

    @torch.no_grad()
    def initialise(self, featurizer: Featurizer, weight: torch.Tensor, batch: EncodedBatch) -> int:
        """Initialise ``batch``'s new item rows of ``weight``; returns how many were.

        Uses the teacher vector the item's row holds once the batch is encoded (its examples'
        own vectors, :class:`~livectr.learner.item_vectors.ItemVectors`), whatever kind of
        example brought it: under ``defer`` an item's first example is a served copy, which is
        scored from the row as it stood before (without a vector). Neighbours need
        ``min_count`` impressions (a barely trained row is noise).
        """
        if batch.new_items.size == 0 or len(self.index) == 0:
            return 0
        vectors, present = featurizer.item_vectors.lookup(batch.new_items)
        k = self.neighbours
        done = 0
        for row, vector, ok in zip(batch.new_items.tolist(), vectors, present.tolist(), strict=True):
            if not ok:
                continue
            hits = self.index.search(vector, k * 2, exclude=featurizer.items.id_of(row))
            rows, sims = [], []
            for item_id, sim in hits:
                r = featurizer.items.row(item_id)
                if sim > 0 and r and featurizer.items.counts[r] >= self.min_count:
                    rows.append(r)
                    sims.append(sim)
                if len(rows) == k:
                    break
            if not rows:
                continue
            w = torch.tensor(sims, dtype=weight.dtype, device=weight.device)
            weight[row] = (w / w.sum()) @ weight[torch.tensor(rows, device=weight.device)]
            done += 1
        self.initialised += done
        return done

    def add(self, featurizer: Featurizer, batch: EncodedBatch) -> None:
        """Index the batch's items whose row holds a teacher vector for the first time."""
        self._grow(featurizer.items.capacity)
        rows = np.unique(batch.item)
        rows = rows[~self._indexed_rows[rows]]
        if rows.size == 0:
            return
        vectors, present = featurizer.item_vectors.lookup(rows)
        rows, vectors = rows[present], vectors[present]
        if rows.size == 0:
            return
        ids = [featurizer.items.id_of(int(r)) for r in rows]
        self._indexed_rows[rows] = True
        self.index.add(ids, vectors)
        self.ids.update(dict.fromkeys(ids))

    def forget(self, rows: np.ndarray, ids: Sequence[str]) -> None:
        """Drop expired items (``ids``, which held ``rows``) from the index: a reused row starts unindexed."""
        self._indexed_rows[rows[rows < len(self._indexed_rows)]] = False
        gone = [i for i in ids if i in self.ids]
        for i in gone:
            del self.ids[i]
        self.index.remove(gone)

    def _grow(self, capacity: int) -> None:
        if len(self._indexed_rows) < capacity:
            self._indexed_rows = np.r_[self._indexed_rows, np.zeros(capacity - len(self._indexed_rows), dtype=bool)]

    def vectors(self) -> np.ndarray | None:
        """The indexed vectors in :attr:`ids` order (for a snapshot), or None when empty."""
        if not self.ids:
            return None
        rows = []
        for item_id in self.ids:
            v = self.index.vector(item_id)
            assert v is not None, item_id  # every id in self.ids was added to the index
            rows.append(v)
        return np.stack(rows).astype(np.float32)

    def load(self, featurizer: Featurizer, ids: list[str], vectors: np.ndarray) -> None:
        """Restore the index a snapshot saved with :meth:`vectors`."""
        if not ids:
            return
        self.index.add(list(ids), vectors)
        self.ids = dict.fromkeys(ids)
        self._grow(featurizer.items.capacity)
        self._indexed_rows[[featurizer.items.row(i) for i in ids]] = True
