"""Cold start from semantics: a new item's id row starts as the mean of its trained neighbours'.

The teacher's vector of an item exists before anyone clicks it. A FAISS index over the item
vectors seen so far finds its nearest trained neighbours, and the new row is initialised as
their similarity-weighted mean, so the item scores like items that read like it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from livectr.core.events import Example
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
    def initialise(
        self, featurizer: Featurizer, weight: torch.Tensor, batch: EncodedBatch, examples: Sequence[Example]
    ) -> int:
        """Initialise ``batch``'s new item rows of ``weight``; returns how many were.

        Uses the teacher vector carried by the item's first example in the batch; neighbours
        need ``min_count`` impressions (a barely trained row is noise).
        """
        if batch.new_items.size == 0 or len(self.index) == 0:
            return 0
        first_pos: dict[int, int] = {}
        for i in np.flatnonzero(batch.item_sem_mask):
            first_pos.setdefault(int(batch.item[i]), int(i))
        k = self.neighbours
        done = 0
        for row in batch.new_items.tolist():
            pos = first_pos.get(row)
            if pos is None:
                continue
            hits = self.index.search(batch.item_sem[pos], k * 2, exclude=examples[pos].item_id)
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
        """Index the items whose teacher vector ``batch`` shows for the first time."""
        self._grow(featurizer.items.capacity)
        fresh = np.flatnonzero(batch.item_sem_mask & ~self._indexed_rows[batch.item])
        if fresh.size == 0:
            return
        rows, first = np.unique(batch.item[fresh], return_index=True)
        ids = [featurizer.items.id_of(int(r)) for r in rows]
        self._indexed_rows[rows] = True
        if ids:
            self.index.add(ids, batch.item_sem[fresh[first]])
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
