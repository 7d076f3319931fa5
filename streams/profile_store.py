"""Incremental persistence of the clicks a join partition keeps for the users' profiles.

Why apart from the partition checkpoint: the checkpoint is rewritten whole at every commit
(every 2 s), which suits the pending windows — bounded by the attribution window — but not the
users' click histories, which grow with the number of active users. Here each commit writes
only the users whose kept clicks changed since the previous one (an upsert of their whole kept
history, at most ``history`` clicks) and deletes the users the join forgot
(``user_profile_ttl_s``), in one SQLite transaction: the cost of a commit follows the traffic
since the last one, not the size of the user base.

Order and consistency: the worker applies the changes *before* it writes the checkpoint and
commits offsets, so the store is never behind a checkpoint. It can be ahead of it (a crash
between the two): those clicks are re-matched by the replay and counted once (profiles ignore a
click they hold), and profiles are read as of each impression's time, so an extra click made
after an impression never reaches that impression's example.

One file per input partition, next to its checkpoint, because a partition — and its users'
clicks — move between workers as a unit.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from livectr.streams.profiles import ClickLog, ProfileChanges

#: A row's value: one user's kept clicks, (event times, item ids), oldest first.
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(tuple[list[float], list[str]]).decode


class ProfileStore:
    """The kept clicks of one input partition's users, in SQLite (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL, not NORMAL: in WAL mode NORMAL does not fsync at commit, so a power loss could
        # undo a transaction the checkpoint and the Kafka commit that follow already rely on.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS clicks (user TEXT PRIMARY KEY, value BLOB NOT NULL)")

    def apply(self, changes: ProfileChanges) -> None:
        """Upsert the changed users' clicks and delete the forgotten users, atomically."""
        if not changes.changed and not changes.expired:
            return
        rows = [(user_id, _encode(clicks)) for user_id, clicks in changes.changed.items()]
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT INTO clicks(user, value) VALUES(?, ?) ON CONFLICT(user) DO UPDATE SET value = excluded.value",
                rows,
            )
            db.executemany("DELETE FROM clicks WHERE user = ?", [(u,) for u in changes.expired])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def load(self) -> ClickLog:
        """Every stored user's clicks."""
        out = ClickLog()
        for user_id, value in self._db.execute("SELECT user, value FROM clicks"):
            ts, items = _decode(value)
            out.users.append(user_id)
            out.counts.append(len(ts))
            out.ts.extend(ts)
            out.items.extend(items)
        return out

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM clicks").fetchone()[0])

    def close(self) -> None:
        self._db.close()
