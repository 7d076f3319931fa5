"""Per item row, the teacher's item vector as the learner last saw it: what every score reads.

Why: a training example carries its item's teacher vector (from the semantic cache), but a
scorer sees bare impressions. Scored with the student's distilled vector instead of the one the
model was trained with, the served model is not the one measured: on the serving bench that
train/serve skew cost up to 0.008 AUC (docs/benchmarks.md, "What the scorer serves"). So the
learner keeps the last teacher vector of each item row (int8, as on the wire), ships it in
snapshots and deltas like the item's words, and every score — the scorer's, and the learner's
own serving-order score requests — reads the vector from the row, never from the request.
An item the learner has not yet seen with a vector is scored from the distilled one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from livectr.learner.vocab import UNKNOWN_ROW
from livectr.semantic_cache.codec import dequantize

#: Snapshot / delta array names.
DATA_KEY = "item.vectors"
PRESENT_KEY = "item.vectors_present"


class ItemVectors:
    """``[rows, dim]`` int8 teacher vectors and a ``present`` flag per item row."""

    def __init__(self, dim: int, data: np.ndarray | None = None, present: np.ndarray | None = None) -> None:
        self.dim = dim
        self.data = np.zeros((0, dim), dtype=np.int8)
        self.present = np.zeros(0, dtype=bool)
        if data is not None and present is not None and data.ndim == 2 and data.shape[1] == dim:
            self.data = np.ascontiguousarray(data, dtype=np.int8)
            self.present = np.asarray(present, dtype=bool)[: len(self.data)].copy()
            if self.present.size < len(self.data):
                self.present = np.r_[self.present, np.zeros(len(self.data) - self.present.size, dtype=bool)]

    def grow(self, rows: int) -> None:
        """Make room for ``rows`` item rows (capacity doubling, as the vocabularies grow)."""
        if len(self.data) >= rows:
            return
        size = max(rows, 2 * len(self.data))
        data = np.zeros((size, self.dim), dtype=np.int8)
        data[: len(self.data)] = self.data
        present = np.zeros(size, dtype=bool)
        present[: self.present.size] = self.present
        self.data, self.present = data, present

    def store(self, items: np.ndarray, blobs: Sequence[bytes | None]) -> None:
        """Keep the vectors of records that carry one (the last record of a row wins).

        Blobs of another length than ``dim`` and the unknown row (it stands for many items) are
        ignored. In bulk: one ``frombuffer`` per batch.
        """
        ok = np.fromiter((b is not None and len(b) == self.dim for b in blobs), dtype=bool, count=len(blobs))
        ok &= items != UNKNOWN_ROW
        at = np.flatnonzero(ok)
        if not at.size:
            return
        rows_rev, last = last_of_each(items[at], at)
        q = np.frombuffer(b"".join([blobs[k] for k in last.tolist()]), dtype=np.int8)
        self.grow(int(rows_rev.max()) + 1)
        self.data[rows_rev] = q.reshape(len(last), self.dim)
        self.present[rows_rev] = True

    def lookup(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(float32 vectors [n, dim], present [n])`` of item rows; rows without one are zeros."""
        inside = items < len(self.data)
        rows = np.where(inside, items, 0)
        present = inside & (self.present[rows] if len(self.data) else np.zeros(len(items), dtype=bool))
        q = self.data[rows] if len(self.data) else np.zeros((len(items), self.dim), dtype=np.int8)
        vectors = dequantize(np.where(present[:, None], q, np.int8(0)), self.dim).reshape(len(items), self.dim)
        return vectors.astype(np.float32, copy=False), present

    def clear(self, rows: np.ndarray) -> None:
        """Forget the vectors of item rows freed by expiry (the next id on the row brings its own)."""
        rows = rows[rows < len(self.data)]
        self.data[rows] = 0
        self.present[rows] = False

    def rows(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """The vectors of ``items`` as delta arrays (rows beyond the table: absent)."""
        self.grow(int(items.max()) + 1 if items.size else 0)
        return {DATA_KEY: self.data[items].copy(), PRESENT_KEY: self.present[items].copy()}

    def apply_rows(self, items: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """Inverse of :meth:`rows`: set the vectors of ``items`` from a delta."""
        if not items.size:
            return
        self.grow(int(items.max()) + 1)
        self.data[items] = arrays[DATA_KEY]
        self.present[items] = arrays[PRESENT_KEY]

    def arrays(self, rows: int) -> dict[str, np.ndarray]:
        """The first ``rows`` rows, for a snapshot."""
        self.grow(rows)
        return {DATA_KEY: self.data[:rows].copy(), PRESENT_KEY: self.present[:rows].copy()}


def last_of_each(rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``rows`` (sorted) and, for each, the ``positions`` entry of its last
    occurrence: ``np.unique(rows[::-1], return_index=True)`` in one sort of packed
    (row, index) keys (rows are non-negative and far below 2**40)."""
    bits = max(int(rows.size).bit_length(), 1)
    keys = np.sort((rows.astype(np.int64) << bits) | np.arange(rows.size))
    sorted_rows = keys >> bits
    last = np.empty(rows.size, dtype=bool)
    last[-1:] = True
    last[:-1] = sorted_rows[1:] != sorted_rows[:-1]
    return sorted_rows[last], positions[keys[last] & ((1 << bits) - 1)]
