"""``livectr run`` on the embedded broker never discards an earlier run's state silently (issue 14)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from toyworld import ToyWorld

from livectr.core.config import Config
from livectr.learner import snapshot as snap
from livectr.learner.online import OnlineLearner
from livectr.pipeline import DataDirInUse, prepare_embedded_data_dir, run_pipeline


def earlier_run(cfg: Config) -> None:
    """What a finished embedded run leaves: a snapshot, join checkpoints, the semantic store, logs."""
    learner = OnlineLearner(cfg)
    learner.learn_batch(ToyWorld(users=10, items=5).examples(32))
    snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 32})
    ckpt = cfg.data_dir / "join-state" / "livectr-join" / "impressions-0.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    (cfg.data_dir / "semantic").mkdir()
    (cfg.data_dir / "semantic" / "vectors.sqlite").write_bytes(b"v")
    (cfg.data_dir / "run").mkdir()


def test_run_refuses_to_discard_an_earlier_run_without_fresh(cfg: Config) -> None:
    earlier_run(cfg)
    with pytest.raises(DataDirInUse, match=r"1 model snapshot\(s\) \(latest v00000001\) and join checkpoints.*--fresh"):
        run_pipeline(cfg, quiet=True)  # refused before the embedded broker starts
    assert snap.list_versions(cfg.data_dir) == [1]
    assert (cfg.data_dir / "join-state").is_dir() and not (cfg.data_dir / "broker.log").exists()


def test_fresh_discards_stream_state_but_keeps_the_semantic_store(cfg: Config) -> None:
    earlier_run(cfg)
    prepare_embedded_data_dir(cfg.data_dir, fresh=True)
    assert snap.list_versions(cfg.data_dir) == []
    assert not (cfg.data_dir / "join-state").exists() and not (cfg.data_dir / "run").exists()
    assert (cfg.data_dir / "semantic" / "vectors.sqlite").read_bytes() == b"v"


def test_a_new_or_stateless_data_dir_needs_no_flag(cfg: Config) -> None:
    prepare_embedded_data_dir(cfg.data_dir, fresh=False)  # a fresh clone: nothing there yet
    (cfg.data_dir / "semantic").mkdir(parents=True)
    (cfg.data_dir / "run").mkdir()
    prepare_embedded_data_dir(cfg.data_dir, fresh=False)  # only the semantic store and stage logs
    assert (cfg.data_dir / "semantic").is_dir()


def test_fresh_never_pulls_the_data_dir_from_under_a_live_learner(cfg: Config) -> None:
    earlier_run(cfg)
    with snap.LearnerLock(cfg.data_dir):
        with pytest.raises(snap.LearnerLockError):
            prepare_embedded_data_dir(cfg.data_dir, fresh=True)
    assert snap.list_versions(cfg.data_dir) == [1]


def test_cli_refusal_is_one_line_and_fast(cfg: Config) -> None:
    earlier_run(cfg)
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "livectr", "run", "--data-dir", str(cfg.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - t < 15
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("livectr run: ") and "--fresh" in lines[0], proc.stderr
    assert str(cfg.data_dir) in lines[0]
    assert snap.list_versions(cfg.data_dir) == [1]


def test_fresh_with_an_external_broker_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "livectr", "run", "--fresh", "--bootstrap-servers", "127.0.0.1:1"]
        + ["--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "--fresh only applies to the embedded broker" in proc.stderr
