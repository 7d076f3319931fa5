"""``livectr similar ITEM_ID``: an item's nearest neighbours by teacher vector, with their texts.

Why full vectors, not the reduced ones: this is the human check that the teacher's space makes
sense ("is a near-duplicate ice cream next to this one?"), so it uses the 384-d vectors from
the persisted store, exact below ``faiss_exact_below`` items and HNSW above (see
:class:`livectr.semantic_cache.index.ItemIndex`). It reads the store, so it works while (or after)
the refresher runs, from another process, without a broker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from livectr.core.config import Config
from livectr.semantic_cache.index import ItemIndex
from livectr.semantic_cache.store import StoredVector, VectorStore


def build_index(rows: list[StoredVector], exact_below: int = 50_000) -> ItemIndex:
    """An :class:`ItemIndex` over the full vectors of ``rows`` (all of one teacher version)."""
    if not rows:
        raise ValueError("no vectors to index")
    vectors = np.stack([r.full.astype(np.float32) for r in rows])
    index = ItemIndex(vectors.shape[1], exact_below=exact_below)
    index.add([r.id for r in rows], vectors)
    return index


def similar(cfg: Config, item_id: str, k: int = 10) -> list[tuple[str, float, str]]:
    """Up to ``k`` nearest other items as ``(item_id, cosine, text)``, best first.

    Uses the teacher version of the item's most recent vector; an item with no stored
    vector gives ``[]``.
    """
    directory = Path(cfg.data_dir) / "semantic"
    if not (directory / VectorStore.FILE).exists():
        return []
    store = VectorStore(directory)
    try:
        anchor = store.latest_for("item", item_id)
        if anchor is None:
            return []
        rows = store.rows("item", anchor.teacher_version)
    finally:
        store.close()
    index = build_index(rows, cfg.semantic.faiss_exact_below)
    texts = {r.id: r.text for r in rows}
    return [
        (other, score, texts[other])
        for other, score in index.search(anchor.full.astype(np.float32), k, exclude=item_id)
    ]
