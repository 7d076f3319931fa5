"""Corrupt or partial snapshots are refused with one SnapshotError; one learner per data dir (issue 14)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from toyworld import ToyWorld

from livectr.core.config import Config
from livectr.core.events import Impression
from livectr.learner import snapshot as snap
from livectr.learner.loop import _resume
from livectr.learner.online import OnlineLearner
from livectr.learner.scorer import Scorer


def learner_after(cfg: Config, batches: int) -> OnlineLearner:
    world = ToyWorld(users=40, items=20, seed=0)
    learner = OnlineLearner(cfg)
    for _ in range(batches):
        learner.learn_batch(world.examples(128))
    return learner


def publish(cfg: Config, learner: OnlineLearner) -> Path:
    _, path = snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": learner.examples_seen}, keep=5)
    return path


def flip_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def imps(n: int = 20) -> list[Impression]:
    world = ToyWorld(users=40, items=20, seed=1)
    return [
        Impression(impression_id=e.impression_id, ts=e.ts, user_id=e.user_id, item_id=e.item_id, context=e.context)
        for e in world.examples(n)
    ]


def test_manifest_records_a_sha256_of_every_file(cfg: Config) -> None:
    path = publish(cfg, learner_after(cfg, 1))
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert set(files) == set(snap.DATA_FILES)
    import hashlib

    for name, digest in files.items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.safetensors", "vocab.json"])
def test_a_flipped_byte_is_refused_with_the_path_and_the_reason(cfg: Config, name: str) -> None:
    path = publish(cfg, learner_after(cfg, 1))
    flip_byte(path / name)
    with pytest.raises(snap.SnapshotError) as err:
        snap.load_version(cfg.data_dir, 1)
    assert err.value.path == path and name in err.value.reason and "corrupt" in err.value.reason
    assert str(path) in str(err.value)
    with pytest.raises(snap.SnapshotError):
        snap.load_latest(cfg.data_dir)


def test_a_missing_file_is_a_partial_snapshot(cfg: Config) -> None:
    path = publish(cfg, learner_after(cfg, 1))
    (path / "state.safetensors").unlink()
    with pytest.raises(snap.SnapshotError, match="state.safetensors is missing"):
        snap.load_latest(cfg.data_dir)


def test_snapshots_without_checksums_still_load_and_a_truncated_one_is_refused(cfg: Config) -> None:
    path = publish(cfg, learner_after(cfg, 1))
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]  # as written before checksums existed
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = snap.load_latest(cfg.data_dir)
    assert loaded is not None and loaded[0]["version"] == 1
    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # safetensors' own error becomes a SnapshotError
    with pytest.raises(snap.SnapshotError, match="model.safetensors"):
        snap.load_latest(cfg.data_dir)


def test_scorer_keeps_serving_the_previous_snapshot(cfg: Config, caplog: pytest.LogCaptureFixture) -> None:
    learner = learner_after(cfg, 2)
    publish(cfg, learner)
    scorer = Scorer(cfg.data_dir, reload_ms=0)
    before = scorer.score(imps())
    for _ in range(5):
        learner.learn_batch(ToyWorld(users=40, items=20, seed=2).examples(128))
    flip_byte(publish(cfg, learner) / "model.safetensors")
    with caplog.at_level(logging.ERROR):
        assert not scorer.maybe_reload(force=True)
    assert scorer.version == 1 and scorer.refused_version == 2
    np.testing.assert_allclose(scorer.score(imps()), before, rtol=1e-5, atol=1e-6)
    assert "v00000002" in caplog.text and "keeping v00000001" in caplog.text
    caplog.clear()
    assert not scorer.maybe_reload(force=True) and not caplog.text  # refused once, not every poll
    publish(cfg, learner)
    assert scorer.maybe_reload(force=True) and scorer.version == 3


def test_scorer_starts_on_the_newest_good_snapshot(cfg: Config) -> None:
    learner = learner_after(cfg, 1)
    publish(cfg, learner)
    flip_byte(publish(cfg, learner) / "state.safetensors")
    scorer = Scorer(cfg.data_dir)
    assert scorer.version == 1 and scorer.score(imps()).shape == (20,)


def test_learner_resumes_from_the_newest_good_snapshot_else_fresh(
    cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    learner = learner_after(cfg, 2)
    publish(cfg, learner)
    flip_byte(publish(cfg, learner) / "optimizer.safetensors")
    with caplog.at_level(logging.WARNING):
        manifest, _ = _resume(cfg)
    assert manifest is not None and manifest["version"] == 1
    assert "v00000002 refused" in caplog.text and "falling back to an older snapshot" in caplog.text
    flip_byte(snap.snapshots_dir(cfg.data_dir) / "v00000001" / "model.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        manifest, fresh = _resume(cfg)
    assert manifest is None and fresh.examples_seen == 0
    assert "falling back to a fresh model" in caplog.text
