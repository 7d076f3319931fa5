"""Snapshots: atomic versioned directories, the latest pointer, pruning and resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from toyworld import ToyWorld

from livectr.core.config import Config
from livectr.learner import snapshot as snap
from livectr.learner.online import OnlineLearner


def trained(cfg: Config, batches: int = 5, seed: int = 0) -> tuple[OnlineLearner, ToyWorld]:
    world = ToyWorld(users=40, items=20, seed=seed)
    learner = OnlineLearner(cfg)
    for _ in range(batches):
        learner.learn_batch(world.examples(128))
    return learner, world


def test_publish_layout_manifest_and_pointer(cfg: Config) -> None:
    learner, _ = trained(cfg)
    v, path = snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 640, "offsets": {"0": 5}}, keep=3)
    assert v == 1 and path.name == "v00000001"
    assert {p.name for p in path.iterdir()} == {
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.safetensors",
        "vocab.json",
    }
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["examples_seen"] == 640 and manifest["offsets"] == {"0": 5}
    assert manifest["model_config"]["sem_dim"] == 32 and manifest["created_at"] > 0
    root = snap.snapshots_dir(cfg.data_dir)
    assert os.readlink(root / "latest") == "v00000001" and (root / "LATEST").read_text().strip() == "v00000001"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_versions_increase_and_old_ones_are_pruned(cfg: Config) -> None:
    learner, _ = trained(cfg, batches=1)
    for _ in range(5):
        snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 1}, keep=2)
    assert snap.list_versions(cfg.data_dir) == [4, 5]
    assert snap.latest_version(cfg.data_dir) == 5


def test_half_written_snapshots_are_never_picked_up(cfg: Config) -> None:
    learner, _ = trained(cfg, batches=1)
    snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 1}, keep=5)
    root = snap.snapshots_dir(cfg.data_dir)
    # A writer that crashed mid-way leaves a temp dir (even with a manifest in it) ...
    tmp = root / ".tmp-v00000002-999-1"
    tmp.mkdir()
    (tmp / "manifest.json").write_text(json.dumps({"version": 2}))
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    # ... and a final-looking directory without its manifest is incomplete by definition.
    (root / "v00000003").mkdir()
    (root / "v00000003" / "model.safetensors").write_bytes(b"junk")
    assert snap.list_versions(cfg.data_dir) == [1]
    manifest, _ = snap.load_latest(cfg.data_dir)
    assert manifest["version"] == 1
    assert snap.clean_temp(cfg.data_dir) == 1 and not tmp.exists()


def test_failed_write_leaves_previous_snapshot_current(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    learner, _ = trained(cfg, batches=1)
    snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 1}, keep=5)
    real = snap._write_json

    def failing(path: Path, data: dict) -> None:
        if path.name == snap.MANIFEST:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(snap, "_write_json", failing)
    with pytest.raises(OSError):
        snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 2}, keep=5)
    root = snap.snapshots_dir(cfg.data_dir)
    assert snap.latest_version(cfg.data_dir) == 1 and snap.list_versions(cfg.data_dir) == [1]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_pointer_fallbacks(cfg: Config) -> None:
    learner, _ = trained(cfg, batches=1)
    for _ in range(3):
        snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 1}, keep=5)
    root = snap.snapshots_dir(cfg.data_dir)
    (root / "latest").unlink()
    (root / "LATEST").write_text("v00000002\n")
    assert snap.latest_version(cfg.data_dir) == 2  # symlink gone: the file pointer is used
    (root / "LATEST").write_text("garbage")
    assert snap.latest_version(cfg.data_dir) == 3  # both unusable: the highest complete version
    assert snap.load_latest(cfg.data_dir / "nowhere") is None


def test_resume_restores_model_optimizer_vocab_metrics_and_index(cfg: Config) -> None:
    learner, world = trained(cfg, batches=6)
    snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": learner.examples_seen}, keep=5)
    manifest, state = snap.load_latest(cfg.data_dir)
    back = OnlineLearner(cfg, state=state)
    test = world.examples(300)
    np.testing.assert_array_equal(back.predict_batch(test), learner.predict_batch(test))
    assert back.examples_seen == learner.examples_seen == manifest["examples_seen"]
    assert back.featurizer.items.state() == learner.featurizer.items.state()
    np.testing.assert_array_equal(back.featurizer.users.counts, learner.featurizer.users.counts)
    assert back.metrics.summary()["progressive_auc"] == learner.metrics.summary()["progressive_auc"]
    assert len(back.index) == len(learner.index) == 20
    for name, acc in learner.sparse_opt.state().items():
        torch.testing.assert_close(back.sparse_opt.state()[name], acc)
    a, b = learner.dense_opt, back.dense_opt
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a.state[pa][key], b.state[pb][key])
        assert float(a.state[pa]["step"]) == float(b.state[pb]["step"])
    # Same state, same next step: the resumed learner continues the very same trajectory.
    nxt = world.examples(256)
    torch.manual_seed(0)  # the gate samples in training
    resumed = back.learn_batch(nxt)["predictions"]
    torch.manual_seed(0)
    np.testing.assert_allclose(resumed, learner.learn_batch(nxt)["predictions"], rtol=1e-5, atol=1e-6)
    # The resumed learner keeps training: tables grow past the restored capacity without error.
    big = ToyWorld(users=3000, items=20, seed=9)
    back.learn_batch(big.examples(2500))
    assert back.model.user_emb.num_embeddings >= len(back.featurizer.users)


def test_pure_id_model_snapshot(cfg: Config) -> None:
    cfg.semantic.enabled = False
    learner, world = trained(cfg, batches=2)
    snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": 1}, keep=5)
    manifest, state = snap.load_latest(cfg.data_dir)
    assert manifest["model_config"]["sem_dim"] == 0 and not any("semantic" in k for k in state.tensors)
    back = OnlineLearner(cfg, state=state)
    test = world.examples(50)
    np.testing.assert_array_equal(back.predict_batch(test), learner.predict_batch(test))
