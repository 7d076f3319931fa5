"""A small synthetic example stream with a known user×item signal, for tests and the speed check.

Why here and not in ``simulators/``: the learner's tests and its throughput measurement must
not depend on the join or the simulator. Users and items have latent vectors; the click
probability is ``sigmoid(bias + scale · u·v)``; the teacher's item vector is a fixed random
projection of the item latent (plus noise), so semantic neighbours really are behavioural
neighbours — which is what cold-start initialisation relies on.
"""

from __future__ import annotations

import time

import numpy as np

from livectr.core.events import KIND_FINAL, Example
from livectr.core.words import pack_words
from livectr.semantic_cache.codec import quantize


class ToyWorld:
    """Users, items, their latents and teacher vectors."""

    def __init__(
        self,
        users: int = 200,
        items: int = 100,
        latent: int = 4,
        sem_dim: int = 32,
        bias: float = -1.5,
        scale: float = 2.5,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.user_latent = rng.normal(size=(users, latent)) / np.sqrt(latent) * 1.5
        self.item_latent = rng.normal(size=(items, latent)) / np.sqrt(latent) * 1.5
        self.bias, self.scale, self.sem_dim = bias, scale, sem_dim
        proj = rng.normal(size=(latent, sem_dim))
        self.item_vectors = quantize(self.item_latent @ proj + 0.1 * rng.normal(size=(items, sem_dim)))
        self.user_vectors = quantize(self.user_latent @ proj)
        # Item texts of 8 words from a 500-word vocabulary (their own generator: the examples'
        # draws stay as they were), attached with ``examples(words=True)``.
        word_rng = np.random.default_rng(seed + 1)
        self.item_texts = [" ".join(f"w{w}" for w in word_rng.integers(0, 500, 8)) for _ in range(items)]

    def ctr(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        z = self.bias + self.scale * np.einsum("ij,ij->i", self.user_latent[users], self.item_latent[items])
        return 1 / (1 + np.exp(-z))

    def examples(
        self,
        n: int,
        items: np.ndarray | None = None,
        with_sem: bool = True,
        kind: int = KIND_FINAL,
        decided_at: float | None = None,
        words: bool = False,
    ) -> list[Example]:
        """``n`` labelled examples; ``items`` restricts the items drawn (e.g. only new ones);
        ``words``: with the item's words (:func:`livectr.core.words.pack_words` of its text)."""
        rng = self.rng
        u = rng.integers(0, len(self.user_latent), n)
        pool = np.arange(len(self.item_latent)) if items is None else np.asarray(items)
        i = pool[rng.integers(0, len(pool), n)]
        labels = (rng.random(n) < self.ctr(u, i)).astype(int)
        now = time.time() if decided_at is None else decided_at
        devices = ("ios", "android", "web")
        return [
            Example(
                impression_id=f"imp-{k}-{rng.integers(1 << 62)}",
                ts=now,
                user_id=f"u{u[k]}",
                item_id=f"i{i[k]}",
                context={"device": devices[(u[k] + i[k]) % 3], "hour": int(u[k] % 24)},
                label=int(labels[k]),
                kind=kind,
                decided_at=now,
                item_sem=self.item_vectors[i[k]].tobytes() if with_sem else None,
                user_sem=self.user_vectors[u[k]].tobytes() if with_sem else None,
                item_words=pack_words(self.item_texts[i[k]], 16) if words else None,
            )
            for k in range(n)
        ]
