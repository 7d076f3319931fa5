"""Durability of the join's checkpoint and profile store (issue 14): fsync before they count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from livectr.streams.checkpoint import CHECKPOINT_VERSION, Checkpoint, read_checkpoint, write_checkpoint
from livectr.streams.join import PartitionJoin
from livectr.streams.profile_store import ProfileStore


def _fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path behind every fd passed to ``os.fsync`` (then fsync it for real)."""
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_write_checkpoint_fsyncs_the_file_and_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "join-state" / "p0.ckpt"
    ckpt = Checkpoint(
        version=CHECKPOINT_VERSION,
        group_id="g",
        partition=0,
        seq=1,
        impressions_position=5,
        clicks_position=3,
        out_partition=0,
        out_offset=-1,
        state=PartitionJoin(0, 600.0).snapshot(),
    )
    seen = _fsynced_paths(monkeypatch)
    write_checkpoint(path, ckpt)
    assert read_checkpoint(path) == ckpt
    assert any(Path(p).name.startswith(f".{path.name}.") for p in seen), f"temp file not fsynced: {seen}"
    assert str(path.parent) in seen, f"directory not fsynced after the rename: {seen}"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp file left behind"


def test_profile_store_commits_are_durable(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "p0.profiles.sqlite")
    try:
        # 2 = FULL: in WAL mode NORMAL (1) does not fsync at commit.
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        store.close()


def test_a_restore_removes_temp_files_of_writers_killed_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "join-state" / "p0.ckpt"
    path.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = path.with_name(f".{path.name}.{int(dead.stdout)}.tmp")
    live = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    assert read_checkpoint(path) is None
    assert not stale.exists(), "a dead writer's temp file is removed"
    assert live.exists(), "a live writer's temp file is left alone"
