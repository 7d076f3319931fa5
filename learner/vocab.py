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
from dataclasses import dataclass
from typing import Any

import numpy as np

UNKNOWN_ROW = 0
_CACHE_LIMIT = 1 << 20
_ROW_CACHE_LIMIT = 1 << 17
_MISSING_TOKEN = "<missing>"


class AdmissionFilter:
    """Approximate per-id impression counts in fixed memory, for admission (Monolith's filter).

    Why a sketch and not a dict: the ids waiting for admission are the long tail — most are seen
    once — so an exact count per id would grow with every id ever seen, the very thing admission
    is for. This is a count-min sketch (two ``zlib.crc32`` hashes into ``uint16`` counters, the
    estimate is the smaller) aged like TinyLFU: every ``slots`` increments all counters halve,
    so an id must gather its count within a bounded stretch of the stream, and collisions only
    ever over-count (an id is admitted early, never late). Deterministic across processes.
    """

    def __init__(self, slots: int = 1 << 20, counters: np.ndarray | None = None, added: int = 0) -> None:
        self.slots = max(16, int(slots))
        self.counters = np.zeros((2, self.slots), dtype=np.uint16) if counters is None else counters.astype(np.uint16)
        self.added = int(added)

    def _positions(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        a = np.fromiter((zlib.crc32(k.encode()) for k in keys), dtype=np.int64, count=len(keys))
        b = np.fromiter((zlib.crc32(k.encode(), 0x9E3779B9) for k in keys), dtype=np.int64, count=len(keys))
        return a % self.slots, b % self.slots

    def add(self, keys: Sequence[str], times: np.ndarray) -> np.ndarray:
        """Count ``times[i]`` more impressions of ``keys[i]``; returns each key's estimate after."""
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        a, b = self._positions(keys)
        c0, c1 = self.counters
        np.add.at(c0, a, times.astype(np.uint16))
        np.add.at(c1, b, times.astype(np.uint16))
        estimate = np.minimum(c0[a], c1[b]).astype(np.int64)
        self.added += int(times.sum())
        if self.added >= self.slots:  # age: halve every counter (TinyLFU's reset)
            self.counters >>= 1
            self.added //= 2
        return estimate


@dataclass(frozen=True)
class RowChanges:
    """Rows changed since a :meth:`GrowingVocab.marker`: newly assigned (with their ids), freed
    by expiry (now reset and empty), and touched (looked up by training, so their parameters may
    have moved; assigned rows included). A row freed and reassigned since the marker is only in
    ``assigned``: whoever mirrors the table overwrites it either way."""

    assigned: np.ndarray
    assigned_ids: list[str]
    freed: np.ndarray
    touched: np.ndarray


class GrowingVocab:
    """Id → row map whose capacity doubles; row 0 is the shared row of unknown ids.

    ``counts[row]`` counts the impressions each row has been trained on (positive copies of
    the fake-negative policy excluded, see :mod:`livectr.learner.online`); the gate and the cold-start
    logic use it as the "how well do we know this id" feature.

    Bounded memory (issue 14), both off by default in this class (the learner turns them on from
    its config):

    * **Expiry** (``ttl_s`` > 0): a row not looked up for ``ttl_s`` of event time (the clock:
      the largest median ``ts`` of a :meth:`lookup`) is freed by :meth:`expire`: its id is
      forgotten (it then maps to the unknown row, exactly like an id never seen) and the row
      goes on a free list that the next new ids take before the table grows. The caller resets the row's
      parameters (:meth:`expire` returns the rows); :attr:`generation` counts reassignments so
      hashed features keyed by row (the user×item pair weights) change with the id.
    * **Admission** (``min_count`` > 1): a new id gets a row only once it has had ``min_count``
      impressions (counted by an :class:`AdmissionFilter`); until then it maps to the shared
      unknown row, which the learner then trains as the row of rare ids.
    """

    def __init__(self, name: str, initial_capacity: int = 1024, ttl_s: float = 0.0, min_count: int = 1) -> None:
        self.name = name
        self._row_of: dict[str, int] = {}
        #: Row → id; ``None`` marks a free row (expired, waiting on :attr:`_free`).
        self._ids: list[str | None] = ["<unk>"]
        self._free: list[int] = []
        self.capacity = max(2, int(initial_capacity))
        self.counts = np.zeros(self.capacity, dtype=np.int64)
        #: Event time each row was last looked up (+inf on free rows, so they never expire again).
        self.last_seen = np.full(self.capacity, np.inf)
        self.generation = np.zeros(self.capacity, dtype=np.int64)
        self._stamp = np.zeros(self.capacity, dtype=np.int64)
        self._touched = np.zeros(self.capacity, dtype=np.int64)
        self._seq = 1
        #: The expiry clock: the largest median event time of a lookup (robust to one wild timestamp).
        self.clock = -np.inf
        self._next_sweep = -np.inf
        self.ttl_s = 0.0
        self.min_count = 1
        self.admission: AdmissionFilter | None = None
        self.expired_total = 0
        self.configure(ttl_s, min_count)

    def configure(self, ttl_s: float, min_count: int, admission_slots: int = 1 << 20) -> None:
        """Set (or change, e.g. on a restart with new settings) the expiry and admission policy."""
        if ttl_s < 0 or min_count < 1:
            raise ValueError(f"{self.name}: ttl_s must be >= 0 and min_count >= 1, not {ttl_s}, {min_count}")
        self.ttl_s = float(ttl_s)
        self.min_count = int(min_count)
        if self.min_count > 1 and self.admission is None:
            self.admission = AdmissionFilter(admission_slots)
        elif self.min_count <= 1:
            self.admission = None

    def __len__(self) -> int:
        """Rows in use, including the unknown row."""
        return len(self._row_of) + 1

    @property
    def high_water(self) -> int:
        """Rows ever handed out, plus one: every live row is below it (free rows may be too)."""
        return len(self._ids)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def __contains__(self, key: object) -> bool:
        return key in self._row_of

    def id_of(self, row: int) -> str:
        key = self._ids[row]
        if key is None:
            raise KeyError(f"{self.name}: row {row} is free")
        return key

    def row(self, key: str) -> int:
        """The row of ``key``, or :data:`UNKNOWN_ROW`."""
        return self._row_of.get(key, UNKNOWN_ROW)

    def items(self) -> list[tuple[str, int]]:
        """Every live ``(id, row)``."""
        return list(self._row_of.items())

    def lookup(
        self,
        keys: Sequence[str],
        grow: bool = True,
        ts: np.ndarray | None = None,
        countable: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``keys`` (``int64 [n]``) and the rows assigned by this call.

        With ``grow=False`` unknown keys map to :data:`UNKNOWN_ROW` (serving) and nothing
        changes. Growing takes free rows first, then new ones (which may raise
        :attr:`capacity`; the caller resizes its tables when it does). ``ts`` (event times)
        refreshes the rows' :attr:`last_seen` and advances the clock (to the batch's median
        event time, robust to an outlier); ``countable`` marks the
        keys that count as impressions for admission (default: all).
        """
        get = self._row_of.get
        rows = np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        missing = np.flatnonzero(rows < 0)
        new_rows: list[int] = []
        if missing.size and not grow:
            rows[missing] = UNKNOWN_ROW
            return rows, np.zeros(0, dtype=np.int64)
        if missing.size:
            admit = self._admitted([keys[i] for i in missing.tolist()], countable, missing)
            for i, ok in zip(missing.tolist(), admit.tolist()):
                if not ok:
                    rows[i] = UNKNOWN_ROW
                    continue
                key = keys[i]
                r = self._row_of.get(key)
                if r is None:
                    r = self._assign(key)
                    new_rows.append(r)
                rows[i] = r
        if grow:
            self._touch(rows, ts)
            self._touched[rows[rows > UNKNOWN_ROW]] = self._seq
        return rows, np.asarray(new_rows, dtype=np.int64)

    def bind(self, key: str, row: int, generation: int | None = None) -> None:
        """Map ``key`` to ``row`` as the learner's vocabulary does (a scorer following deltas).

        Why: a replica must keep the learner's row numbers and their ``generation`` (the pair
        buckets hash both), and a row can be given to another id after expiry, so whatever id
        held ``row`` before (and any row ``key`` held) is forgotten. Rows skipped over stay free
        and are never looked up. A replica only binds; it never assigns or expires rows itself.
        """
        if row <= UNKNOWN_ROW:
            raise ValueError(f"cannot bind {key!r} to row {row}")
        old_row = self._row_of.get(key)
        if old_row != row:
            while len(self._ids) <= row:
                self._ids.append(None)
            self._ensure_capacity(len(self._ids))
            old_key = self._ids[row]
            if old_key is not None and self._row_of.get(old_key) == row:
                del self._row_of[old_key]
            if old_row is not None:
                self._ids[old_row] = None
            self._ids[row] = key
            self._row_of[key] = row
        if generation is not None:
            self.generation[row] = generation

    def unbind(self, row: int, generation: int | None = None) -> str | None:
        """Free ``row`` as the learner's expiry did (a replica following deltas); the id it held.

        Why: a replica only binds, so without this an id the learner expired would keep its row
        (and its old weights) on the replica until the row was reused. Its id now maps to the
        unknown row, its count is 0 (it weighs nothing in the unknown row's mean) and it takes
        the learner's ``generation``. A row the replica never saw is recorded as free.
        """
        if row <= UNKNOWN_ROW:
            raise ValueError(f"cannot free row {row}")
        while len(self._ids) <= row:
            self._ids.append(None)
        self._ensure_capacity(len(self._ids))
        key = self._ids[row]
        if key is not None and self._row_of.get(key) == row:
            del self._row_of[key]
        self._ids[row] = None
        self.counts[row] = 0
        if generation is not None:
            self.generation[row] = generation
        return key

    def live(self, rows: np.ndarray) -> np.ndarray:
        """Which of ``rows`` hold an id now (row 0, the shared unknown row, does not)."""
        ids, n = self._ids, len(self._ids)
        return np.fromiter(
            (UNKNOWN_ROW < r < n and ids[r] is not None for r in rows.tolist()), dtype=bool, count=len(rows)
        )

    def _admitted(self, keys: list[str], countable: np.ndarray | None, at: np.ndarray) -> np.ndarray:
        """Which of the unknown ``keys`` (positions ``at`` of the lookup) get a row now."""
        if self.admission is None:
            return np.ones(len(keys), dtype=bool)
        times = np.ones(len(keys), dtype=np.int64) if countable is None else countable[at].astype(np.int64)
        # An id's occurrences in this call are counted together; every one of them is admitted
        # once their total reaches the threshold.
        uniq, inverse = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
        totals = np.zeros(len(uniq), dtype=np.int64)
        np.add.at(totals, inverse, times)
        estimate = self.admission.add(list(uniq), totals)
        return (estimate >= self.min_count)[inverse]

    def _assign(self, key: str) -> int:
        if self._free:
            r = self._free.pop()
            self._ids[r] = key
        else:
            r = len(self._ids)
            self._ids.append(key)
            self._ensure_capacity(r + 1)
        self._row_of[key] = r
        self.counts[r] = 0
        self.last_seen[r] = self.clock
        self._stamp[r] = self._seq
        return r

    def _touch(self, rows: np.ndarray, ts: np.ndarray | None) -> None:
        known = rows[rows > UNKNOWN_ROW]
        if ts is None or not len(ts):
            self.last_seen[known] = np.where(np.isfinite(self.last_seen[known]), self.last_seen[known], self.clock)
            return
        ts = np.asarray(ts, dtype=np.float64)
        finite = np.isfinite(ts)
        if finite.any():
            # The median, not the max: one example with a wild timestamp must not age every row.
            self.clock = max(self.clock, float(np.median(ts[finite])))
        mask = (rows > UNKNOWN_ROW) & finite
        np.maximum.at(self.last_seen, rows[mask], ts[mask])

    def expire(self, now: float | None = None, force: bool = False) -> tuple[np.ndarray, list[str]]:
        """Free the rows not seen for :attr:`ttl_s` before ``now`` (default: the clock): the rows and their ids.

        Sweeps the table at most every ``ttl_s / 16`` of event time unless ``force`` (a sweep
        reads every row). Freed rows have their count and generation updated here; their
        parameters are the caller's to reset.
        """
        if now is not None:
            self.clock = max(self.clock, float(now))
        if self.ttl_s <= 0 or not np.isfinite(self.clock) or (not force and self.clock < self._next_sweep):
            return np.zeros(0, dtype=np.int64), []
        self._next_sweep = self.clock + self.ttl_s / 16
        hw = len(self._ids)
        seen = self.last_seen[1:hw]
        seen[seen == -np.inf] = self.clock  # assigned before any event time was known: from now on
        stale = np.flatnonzero(self.last_seen[1:hw] < self.clock - self.ttl_s) + 1
        if stale.size == 0:
            return stale, []
        ids: list[str] = []
        for r in stale.tolist():
            key = self._ids[r]
            assert key is not None  # free rows have last_seen = +inf
            del self._row_of[key]
            self._ids[r] = None
            ids.append(key)
        self.counts[stale] = 0
        self.last_seen[stale] = np.inf
        self.generation[stale] += 1
        self._stamp[stale] = self._seq
        # Reused last-in first-out, lowest rows first: the table's live rows stay packed low.
        self._free.extend(sorted(stale.tolist(), reverse=True))
        self.expired_total += int(stale.size)
        return stale, ids

    # -- change tracking (for deltas of the model) -------------------------------------------

    def marker(self) -> int:
        """A point in this vocabulary's history for :meth:`changes_since` (valid in this process)."""
        m = self._seq
        self._seq += 1
        return m

    def changes_since(self, marker: int) -> RowChanges:
        """The rows assigned, freed and touched after ``marker`` was taken (see :class:`RowChanges`)."""
        hw = len(self._ids)
        changed = np.flatnonzero(self._stamp[1:hw] > marker) + 1
        assigned = [r for r in changed.tolist() if self._ids[r] is not None]
        freed = [r for r in changed.tolist() if self._ids[r] is None]
        touched = np.flatnonzero(self._touched[1:hw] > marker) + 1
        return RowChanges(
            np.asarray(assigned, dtype=np.int64),
            [self._ids[r] or "" for r in assigned],
            np.asarray(freed, dtype=np.int64),
            touched[[self._ids[r] is not None for r in touched.tolist()]] if touched.size else touched,
        )

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2

        def grown(a: np.ndarray, fill: float) -> np.ndarray:
            out = np.full(capacity, fill, dtype=a.dtype)
            out[: self.capacity] = a
            return out

        self.counts = grown(self.counts, 0)
        self.last_seen = grown(self.last_seen, np.inf)
        self.generation = grown(self.generation, 0)
        self._stamp = grown(self._stamp, 0)
        self._touched = grown(self._touched, 0)
        self.capacity = capacity

    def state(self) -> dict[str, Any]:
        """JSON-able state (ids in row order, ``None`` for free rows; per-row arrays travel
        separately, see :meth:`arrays`)."""
        return {
            "name": self.name,
            "capacity": self.capacity,
            "ids": self._ids[1:],
            "free": list(self._free),
            "ttl_s": self.ttl_s,
            "min_count": self.min_count,
            "clock": self.clock if np.isfinite(self.clock) else None,
            "expired_total": self.expired_total,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-row arrays of the state (copies): counts, last seen, generation, admission counters."""
        out = {"counts": self.counts.copy(), "last_seen": self.last_seen.copy(), "generation": self.generation.copy()}
        if self.admission is not None:
            out["admission"] = self.admission.counters.copy()
            out["admission_added"] = np.asarray([self.admission.added], dtype=np.int64)
        return out

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        counts: np.ndarray | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> GrowingVocab:
        """Inverse of :meth:`state` (+ :meth:`arrays`); snapshots without the newer keys load as before."""
        arrays = dict(arrays or {})
        if counts is not None:
            arrays.setdefault("counts", counts)
        vocab = cls(state["name"], int(state["capacity"]))
        ids: list[str | None] = list(state["ids"])
        vocab._ids = ["<unk>", *ids]
        vocab._row_of = {k: i + 1 for i, k in enumerate(ids) if k is not None}
        vocab._free = [int(r) for r in state.get("free", [])] or [i + 1 for i, k in enumerate(ids) if k is None][::-1]
        vocab._ensure_capacity(len(vocab._ids))
        vocab.ttl_s = float(state.get("ttl_s", 0.0))
        vocab.min_count = int(state.get("min_count", 1))
        clock = state.get("clock")
        vocab.clock = -np.inf if clock is None else float(clock)
        vocab.expired_total = int(state.get("expired_total", 0))
        for key, target in (("counts", vocab.counts), ("last_seen", vocab.last_seen), ("generation", vocab.generation)):
            if key in arrays:
                a = np.asarray(arrays[key])[: vocab.capacity]
                target[: len(a)] = a
        if "last_seen" not in arrays:  # older snapshot: every live row counts as seen now
            live = np.asarray([r for r in vocab._row_of.values()], dtype=np.int64)
            vocab.last_seen[live] = vocab.clock if np.isfinite(vocab.clock) else -np.inf
        vocab.last_seen[[r for r in vocab._free]] = np.inf
        if vocab.min_count > 1:
            vocab.admission = (
                AdmissionFilter(
                    arrays["admission"].shape[1],
                    arrays["admission"],
                    int(np.asarray(arrays.get("admission_added", [0])).reshape(-1)[0]),
                )
                if "admission" in arrays
                else AdmissionFilter()
            )
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
