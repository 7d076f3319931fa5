"""Turning raw ids into embedding rows without a fixed vocabulary.

Two strategies, chosen per feature by what the feature is worth:

* **Growing tables** (:class:`GrowingVocab`) for ``user_id`` and ``item_id``. These are the
  features the model is about: a collision between two items would make them share a click
  rate, and new items keep arriving in a live stream. Each id gets its own row, assigned in
  arrival order; capacity doubles when exhausted (amortised O(1), and the embedding table and
  its optimiser state grow in the same steps). The caller learns which rows are new, which is
  the hook for cold-start initialisation from semantic neighbours. Row 0 is reserved for
  "unknown" so that serving can score ids the learner never saw.
* **Hashing** (:class:`ContextHasher`) for context features (``field=value``). Their
  cardinality is unbounded (timestamps, free-form values) and each value carries little
  signal, so bounded memory matters more than collisions: every pair hashes into one shared
  table of ``context_buckets`` rows. Field names get slots (first seen, first served) up to a
  fixed count, so the interaction layers see a fixed layout; float values are log-binned so a
  continuous value does not become a fresh, never-trained bucket on every event.

Both are plain Python state, serialisable to JSON-able dicts for snapshots; the hash is
``zlib.crc32`` (stable across processes, unlike Python's salted ``hash``) so the scorer
hashes exactly as the learner did.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

UNKNOWN_ROW = 0
_CACHE_LIMIT = 1 << 20
_ROW_CACHE_LIMIT = 1 << 17
_MISSING_TOKEN = "<missing>"


class GrowingVocab:
    """Id → row map whose capacity doubles; row 0 is the shared row of unknown ids.

    ``counts[row]`` counts the impressions each row has been trained on (positive copies of
    the fake-negative policy excluded, see :mod:`livectr.learner.online`); the gate and the cold-start
    logic use it as the "how well do we know this id" feature.
    """

    def __init__(self, name: str, initial_capacity: int = 1024) -> None:
        self.name = name
        self._row_of: dict[str, int] = {}
        self._ids: list[str] = ["<unk>"]
        self.capacity = max(2, int(initial_capacity))
        self.counts = np.zeros(self.capacity, dtype=np.int64)

    def __len__(self) -> int:
        """Rows in use, including the unknown row."""
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._row_of

    def id_of(self, row: int) -> str:
        return self._ids[row]

    def row(self, key: str) -> int:
        """The row of ``key``, or :data:`UNKNOWN_ROW`."""
        return self._row_of.get(key, UNKNOWN_ROW)

    def lookup(self, keys: Sequence[str], grow: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``keys`` (``int64 [n]``) and the rows created by this call.

        With ``grow=False`` unknown keys map to :data:`UNKNOWN_ROW` (serving). Growing may raise
        :attr:`capacity`; the caller resizes its tables when it does.
        """
        get = self._row_of.get
        rows = np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        missing = np.flatnonzero(rows < 0)
        if missing.size == 0:
            return rows, np.zeros(0, dtype=np.int64)
        if not grow:
            rows[missing] = UNKNOWN_ROW
            return rows, np.zeros(0, dtype=np.int64)
        new_rows: list[int] = []
        for i in missing.tolist():
            key = keys[i]
            r = self._row_of.get(key)
            if r is None:
                r = len(self._ids)
                self._row_of[key] = r
                self._ids.append(key)
                new_rows.append(r)
            rows[i] = r
        self._ensure_capacity(len(self._ids))
        return rows, np.asarray(new_rows, dtype=np.int64)

    def bind(self, key: str, row: int) -> None:
        """Map ``key`` to ``row`` as the learner's vocabulary does (a scorer following deltas).

        Why: a replica must keep the learner's row numbers (the pair buckets hash them), and a
        row can be given to another id after expiry, so whatever id held ``row`` before (and any
        row ``key`` held) is forgotten. Rows skipped over stay unused (never looked up).
        """
        if row <= UNKNOWN_ROW:
            raise ValueError(f"cannot bind {key!r} to row {row}")
        old_row = self._row_of.get(key)
        if old_row == row:
            return
        while len(self._ids) <= row:
            self._ids.append("")
        old_key = self._ids[row]
        if self._row_of.get(old_key) == row:
            del self._row_of[old_key]
        if old_row is not None:
            self._ids[old_row] = ""
        self._ids[row] = key
        self._row_of[key] = row
        self._ensure_capacity(len(self._ids))

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        grown = np.zeros(capacity, dtype=np.int64)
        grown[: self.capacity] = self.counts
        self.counts = grown
        self.capacity = capacity

    def state(self) -> dict[str, Any]:
        """JSON-able state (ids in row order; counts travel separately as an array)."""
        return {"name": self.name, "capacity": self.capacity, "ids": self._ids[1:]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], counts: np.ndarray | None = None) -> GrowingVocab:
        vocab = cls(state["name"], int(state["capacity"]))
        ids = list(state["ids"])
        vocab._ids = ["<unk>", *ids]
        vocab._row_of = {k: i + 1 for i, k in enumerate(ids)}
        vocab._ensure_capacity(len(vocab._ids))
        if counts is not None:
            vocab.counts[: len(counts)] = counts[: vocab.capacity]
        return vocab


def _value_key(value: object) -> object:
    """Categorical values stay as they are; floats are log-binned (4 bins per e-fold)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nonfinite"
        magnitude = round(math.log1p(abs(value)) * 4)
        return f"~{'-' if value < 0 else ''}{magnitude}"
    return value


def stable_bucket(field: str, value: object, buckets: int) -> int:
    """Process-independent bucket of ``field=value`` (after float binning)."""
    return zlib.crc32(f"{field}\x1f{_value_key(value)!r}".encode()) % buckets


class ContextHasher:
    """Maps a context dict to ``fields`` hashed bucket ids, one per field slot.

    A slot whose field is absent from an example gets the bucket of ``field=<missing>``
    (learned like any other value); an example with no slot assigned yet gets the bucket of
    the empty slot. Occurrences of fields beyond the slot count are counted in
    :attr:`dropped` (the first few names are kept in :attr:`dropped_names` for diagnosis).
    """

    def __init__(self, fields: int, buckets: int, slots: Iterable[str] = ()) -> None:
        self.fields = int(fields)
        self.buckets = int(buckets)
        self.slots: list[str] = list(slots)[: self.fields]
        self._slot_of = {f: i for i, f in enumerate(self.slots)}
        self.dropped = 0
        self.dropped_names: set[str] = set()
        self._cache: dict[tuple[str, object], int] = {}
        #: Whole-context memo (contexts repeat a lot); cleared whenever a slot is assigned.
        self._rows: dict[tuple[tuple[str, object], ...], np.ndarray] = {}
        self._missing_row = np.array(
            [stable_bucket(self._slot_name(i), _MISSING_TOKEN, buckets) for i in range(self.fields)], dtype=np.int64
        )

    def _slot_name(self, i: int) -> str:
        return self.slots[i] if i < len(self.slots) else f"<slot{i}>"

    def _bucket(self, field: str, value: object) -> int:
        key = (field, value)
        b = self._cache.get(key)
        if b is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            b = stable_bucket(field, value, self.buckets)
            self._cache[key] = b
        return b

    def _assign_slot(self, field: str) -> int | None:
        if len(self.slots) >= self.fields:
            self.dropped += 1
            if len(self.dropped_names) < 32:
                self.dropped_names.add(field)
            return None
        i = len(self.slots)
        self.slots.append(field)
        self._slot_of[field] = i
        self._missing_row[i] = stable_bucket(field, _MISSING_TOKEN, self.buckets)
        return i

    def encode(self, contexts: Sequence[Mapping[str, object]], grow: bool = True) -> np.ndarray:
        """``int64 [n, fields]`` bucket ids; with ``grow=False`` new field names are ignored."""
        out = np.tile(self._missing_row, (len(contexts), 1))
        if self.fields == 0:
            return out
        slot_of = self._slot_of
        bucket = self._bucket
        rows = self._rows
        for i, ctx in enumerate(contexts):
            key = tuple(ctx.items())
            row = rows.get(key)
            if row is not None:
                out[i] = row
                continue
            complete = True
            for field, value in ctx.items():
                s = slot_of.get(field)
                if s is None:
                    if not grow:
                        complete = False
                        continue
                    s = self._assign_slot(field)
                    if s is None:
                        complete = False
                        continue
                    out[:, s] = self._missing_row[s]  # rows before and after i saw the placeholder
                    rows.clear()
                out[i, s] = bucket(field, value)
            if complete:
                if len(rows) >= _ROW_CACHE_LIMIT:
                    rows.clear()
                rows[key] = out[i].copy()
        return out

    def state(self) -> dict[str, Any]:
        return {"fields": self.fields, "buckets": self.buckets, "slots": list(self.slots)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ContextHasher:
        return cls(int(state["fields"]), int(state["buckets"]), state["slots"])
