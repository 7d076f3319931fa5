"""Persistent store of teacher vectors, so a restart never re-runs the teacher.

Keyed by ``(kind, id, teacher_version)``; each row keeps the full vector (float16: 768 bytes
for MiniLM, enough for cosine search), the int8 reduced bytes and the projection that made
them, the text (so ``livectr similar`` can show it), a hash of what was encoded and times.

Why SQLite (WAL) rather than append-only segments: the write rate is tiny (one row per item
*change*, thousands, not per event), rows are *replaced* when an item's text changes
(segments would need compaction), a refit of the reduction must rewrite the reduced column
of many rows atomically, and ``livectr similar`` reads the file from another process while
the refresher writes it — WAL gives consistent concurrent readers for free. The hot path
never touches SQLite: the store mirrors every row in a dict.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from livectr.core.config import Config

KINDS = ("item", "user")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    teacher_version TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    text TEXT NOT NULL,
    detail TEXT NOT NULL,
    full BLOB NOT NULL,
    reduced BLOB,
    reducer TEXT NOT NULL,
    source_ts REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (kind, id, teacher_version)
)
"""


def text_hash(text: str, attributes: Mapping[str, object] | None = None) -> str:
    """What decides whether a vector must be recomputed: the text (and attributes when they are encoded)."""
    digest = hashlib.sha256(text.encode())
    if attributes:
        digest.update(json.dumps(attributes, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StoredVector:
    """One stored vector and what it was computed from."""

    kind: str
    id: str
    teacher_version: str
    text_hash: str
    text: str
    #: LLM enrichment that was appended to ``text`` before encoding ("" without enrichment).
    detail: str
    #: Full teacher vector, float16.
    full: np.ndarray
    #: int8 reduced vector bytes, or ``None`` before the reduction is fitted.
    reduced: bytes | None
    #: Hash of the projection that produced ``reduced`` ("" when none).
    reducer: str
    source_ts: float
    updated_at: float

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.id, self.teacher_version)


class VectorStore:
    """Vectors in memory for lookups, persisted in ``<dir>/vectors.sqlite``.

    Thread-safe: the refresher writes from its encoder thread while its consumer thread reads.
    """

    FILE = "vectors.sqlite"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / self.FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.commit()
        self._rows: dict[tuple[str, str, str], StoredVector] = {}
        self._load()

    @classmethod
    def open(cls, cfg: Config) -> VectorStore:
        """The store of a config: ``cfg.data_dir / "semantic"``."""
        return cls(Path(cfg.data_dir) / "semantic")

    def _load(self) -> None:
        cur = self._db.execute(
            "SELECT kind, id, teacher_version, text_hash, text, detail, full, reduced, reducer,"
            " source_ts, updated_at FROM vectors"
        )
        for row in cur:
            vec = StoredVector(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                np.frombuffer(row[6], dtype=np.float16),
                row[7],
                row[8],
                row[9],
                row[10],
            )
            self._rows[vec.key] = vec

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, kind: str, id: str, teacher_version: str) -> StoredVector | None:
        """The stored vector for a key, from memory."""
        return self._rows.get((kind, id, teacher_version))

    def is_current(self, kind: str, id: str, teacher_version: str, hash_: str) -> bool:
        """True when the stored vector was computed from exactly this text (no recompute needed)."""
        row = self._rows.get((kind, id, teacher_version))
        return row is not None and row.text_hash == hash_

    def put_many(self, rows: Iterable[StoredVector]) -> None:
        """Insert or replace rows in one transaction."""
        rows = list(rows)
        if not rows:
            return
        params = [
            (
                r.kind,
                r.id,
                r.teacher_version,
                r.text_hash,
                r.text,
                r.detail,
                np.ascontiguousarray(r.full, dtype=np.float16).tobytes(),
                r.reduced,
                r.reducer,
                float(r.source_ts),
                float(r.updated_at),
            )
            for r in rows
        ]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?,?,?,?,?,?,?,?,?,?,?)", params)
            self._db.commit()
            for r in rows:
                self._rows[r.key] = replace(r, full=np.ascontiguousarray(r.full, dtype=np.float16))

    def set_reduced(self, updates: Iterable[tuple[tuple[str, str, str], bytes, str]]) -> None:
        """Store reduced bytes (and the projection hash) for existing keys, in one transaction."""
        updates = [u for u in updates if u[0] in self._rows]
        if not updates:
            return
        now = time.time()
        with self._lock:
            self._db.executemany(
                "UPDATE vectors SET reduced=?, reducer=?, updated_at=? WHERE kind=? AND id=? AND teacher_version=?",
                [(blob, reducer, now, *key) for key, blob, reducer in updates],
            )
            self._db.commit()
            for key, blob, reducer in updates:
                self._rows[key] = replace(self._rows[key], reduced=blob, reducer=reducer, updated_at=now)

    def rows(self, kind: str | None = None, teacher_version: str | None = None) -> list[StoredVector]:
        """All rows matching ``kind`` and ``teacher_version`` (``None`` = any)."""
        return [
            r
            for r in list(self._rows.values())
            if (kind is None or r.kind == kind) and (teacher_version is None or r.teacher_version == teacher_version)
        ]

    def versions(self, kind: str = "item") -> dict[str, int]:
        """Teacher versions present for ``kind`` with their row counts."""
        out: dict[str, int] = {}
        for r in list(self._rows.values()):
            if r.kind == kind:
                out[r.teacher_version] = out.get(r.teacher_version, 0) + 1
        return out

    def latest_for(self, kind: str, id: str) -> StoredVector | None:
        """The most recently updated row of ``(kind, id)`` over all teacher versions."""
        candidates = [r for r in list(self._rows.values()) if r.kind == kind and r.id == id]
        return max(candidates, key=lambda r: r.updated_at, default=None)

    def close(self) -> None:
        with self._lock:
            self._db.close()
