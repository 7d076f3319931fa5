"""FAISS index over item vectors, keyed by item id.

Why this shape: cold-start initialisation (learner) and ``livectr similar`` both ask "which
known items are nearest to this vector?". Vectors are L2-normalised and searched by inner
product (cosine). Below ``exact_below`` items the index is exact (``IndexFlatIP``); past it
the contents move to HNSW, which keeps incremental ``add`` cheap and needs no training. On a
machine with faiss-gpu and CUDA the flat index runs on the GPU.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np


def gpu_available() -> bool:
    """True when this faiss build has GPU support and a GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


class ItemIndex:
    """Incrementally updated nearest-neighbour index from item id to vector.

    Re-adding an id replaces its vector (the old row is masked out of results).
    """

    def __init__(self, dim: int, exact_below: int = 50_000, hnsw_m: int = 32) -> None:
        self.dim = dim
        self.exact_below = exact_below
        self.hnsw_m = hnsw_m
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._index = self._new_flat()
        self.kind = "flat-gpu" if gpu_available() else "flat"

    def _new_flat(self) -> faiss.Index:
        index: faiss.Index = faiss.IndexFlatIP(self.dim)
        if gpu_available():
            self._gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        return index

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row_of

    @staticmethod
    def _normalise(vectors: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def add(self, item_ids: list[str], vectors: np.ndarray) -> None:
        """Add (or replace) items; switches to HNSW once the size passes ``exact_below``."""
        v = self._normalise(vectors)
        with self._lock:
            start = len(self._ids)
            self._ids.extend(item_ids)
            for offset, item_id in enumerate(item_ids):
                self._row_of[item_id] = start + offset
            self._vectors = np.vstack([self._vectors, v])
            self._index.add(v)
            if self.kind.startswith("flat") and len(self._ids) >= self.exact_below:
                self._rebuild_hnsw()

    def remove(self, item_ids: list[str]) -> int:
        """Drop items (masked out of results at once); returns how many were there.

        The index is rebuilt from the live vectors once the dropped rows outnumber them, so an
        index whose items come and go stays the size of its live items.
        """
        with self._lock:
            gone = [self._row_of.pop(i) for i in item_ids if i in self._row_of]
            if gone and len(self._ids) - len(self._row_of) > max(len(self._row_of), 1024):
                self._compact()
            return len(gone)

    def _compact(self) -> None:
        """Rebuild ids, vectors and the FAISS index from the live rows only (lock held)."""
        live = sorted(self._row_of.items(), key=lambda kv: kv[1])
        self._ids = [k for k, _ in live]
        self._vectors = self._vectors[[r for _, r in live]] if live else np.zeros((0, self.dim), dtype=np.float32)
        self._row_of = {k: i for i, k in enumerate(self._ids)}
        if self.kind == "hnsw" and len(self._ids) >= self.exact_below:
            self._rebuild_hnsw()
        else:
            self._index = self._new_flat()
            self.kind = "flat-gpu" if gpu_available() else "flat"
            if len(self._ids):
                self._index.add(self._vectors)

    def _rebuild_hnsw(self) -> None:
        index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 64
        index.add(self._vectors)
        self._index = index
        self.kind = "hnsw"

    def vector(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised) vector of ``item_id``."""
        row = self._row_of.get(item_id)
        return None if row is None else self._vectors[row]

    def search(self, vector: np.ndarray, k: int, exclude: str | None = None) -> list[tuple[str, float]]:
        """Up to ``k`` nearest live items as ``(item_id, cosine)``, best first."""
        q = self._normalise(vector)
        with self._lock:
            if not self._ids:
                return []
            fetch = min(len(self._ids), max(k * 2 + 1, k + 8))
            scores, rows = self._index.search(q, fetch)
            out: list[tuple[str, float]] = []
            for score, row in zip(scores[0], rows[0]):
                if row < 0:
                    continue
                item_id = self._ids[row]
                if self._row_of.get(item_id) != row or item_id == exclude:
                    continue
                out.append((item_id, float(score)))
                if len(out) == k:
                    break
            return out
