"""``livectr snapshots list | show | diff | rollback`` and what a rollback means downstream."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from toyworld import ToyWorld

from livectr import cli
from livectr.core.config import Config
from livectr.learner import snapshot as snap
from livectr.learner.loop import _resume
from livectr.learner.online import OnlineLearner
from livectr.learner.scorer import Scorer


def publish_three(cfg: Config) -> OnlineLearner:
    """v1..v3 from one learner trained a little more before each, the users growing each time."""
    learner = OnlineLearner(cfg)
    for k in range(3):
        world = ToyWorld(users=20 * (k + 1), items=10 * (k + 1), seed=k)
        learner.learn_batch(world.examples(128))
        manifest = {
            "examples_seen": learner.examples_seen,
            "metrics": {"serving_auc": 0.6 + 0.05 * k, "serving_logloss": 0.5 - 0.01 * k, "progressive_auc": 0.7},
            "config_hash": "h1" if k < 2 else "h2",
            "offsets_topic": "ex",
            "offsets": {"0": 100 * (k + 1)},
        }
        snap.publish_snapshot(cfg.data_dir, learner.state(), manifest, keep=10)
    return learner


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["snapshots", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_show_diff(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    publish_three(cfg)
    d = str(cfg.data_dir)
    code, out, _ = run(capsys, "list", "--data-dir", d)
    lines = out.splitlines()
    assert code == 0 and "version" in lines[0]
    assert [ln.split()[0] for ln in lines[1:3]] == ["1", "2"] and lines[3].split()[:2] == ["*", "3"]
    assert "0.7000" in lines[3] and "384" in lines[3] and "Z" in lines[3]  # auc, examples, UTC time

    code, out, _ = run(capsys, "list", "--data-dir", d, "--json")
    rows = json.loads(out)["versions"]
    assert [r["version"] for r in rows] == [1, 2, 3] and [r["latest"] for r in rows] == [False, False, True]
    assert rows[0]["examples_seen"] == 128 and rows[0]["serving_auc"] == pytest.approx(0.6)
    assert all(r["size_bytes"] > 0 and r["created_at"].endswith("Z") for r in rows)

    code, out, _ = run(capsys, "show", "2", "--data-dir", d, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["verified"] and shown["manifest"]["version"] == 2
    assert shown["files"]["model.safetensors"]["checksum"] == "ok" and shown["files"]["model.safetensors"]["size_bytes"]
    code, out, _ = run(capsys, "show", "2", "--data-dir", d)
    assert code == 0 and '"version": 2' in out and "checksums: all verify" in out

    code, out, _ = run(capsys, "diff", "1", "3", "--data-dir", d, "--json")
    r = json.loads(out)
    assert code == 0 and (r["from"], r["to"]) == (1, 3)
    assert r["examples_seen"] == {"from": 128, "to": 384, "delta": 256}
    assert r["metrics"]["serving_auc"]["delta"] == pytest.approx(0.1)
    assert r["metrics"]["progressive_auc"]["delta"] == pytest.approx(0.0)
    assert r["config_hash_equal"] is False
    assert r["vocab"]["users"]["from"] <= 20 < r["vocab"]["users"]["to"] <= 60 and r["vocab"]["items"]["delta"] > 0
    assert 0 < len(r["tensors"]) <= 10 and all(t["l2_diff"] >= 0 for t in r["tensors"])
    rel = [t["relative"] for t in r["tensors"]]
    assert rel == sorted(rel, reverse=True) and rel[0] > 0
    code, out, _ = run(capsys, "diff", "1", "2", "--data-dir", d)
    assert code == 0 and "examples_seen: 128 -> 256 (+128)" in out and "config_hash: equal" in out

    code, _, err = run(capsys, "show", "9", "--data-dir", d)
    assert code == 2 and "no snapshot version 9" in err


def test_rollback_moves_latest_and_a_running_scorer_follows(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    publish_three(cfg)
    scorer = Scorer(cfg.data_dir, reload_ms=50, cfg=cfg)
    scorer.start_watcher()
    try:
        assert scorer.version == 3
        code, out, _ = run(capsys, "rollback", "1", "--data-dir", str(cfg.data_dir))
        assert code == 0 and "v00000003 -> v00000001" in out and "next snapshot will be v00000004" in out
        root = snap.snapshots_dir(cfg.data_dir)
        assert os.readlink(root / "latest") == "v00000001" and (root / "LATEST").read_text().strip() == "v00000001"
        deadline = time.monotonic() + 2.0
        while scorer.version != 1 and time.monotonic() < deadline:  # a *lower* version is still a change
            time.sleep(0.02)
        assert scorer.version == 1 and scorer.examples_seen == 128
    finally:
        scorer.stop_watcher()
    assert snap.list_versions(cfg.data_dir) == [1, 2, 3]  # nothing deleted


def test_rollback_refuses_a_corrupt_version(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    publish_three(cfg)
    model = snap.snapshots_dir(cfg.data_dir) / "v00000001" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    code, _, err = run(capsys, "rollback", "1", "--data-dir", str(cfg.data_dir))
    assert code == 2 and "model.safetensors is corrupt" in err and "latest left unchanged" in err
    assert snap.latest_version(cfg.data_dir) == 3
    code, out, _ = run(capsys, "show", "1", "--data-dir", str(cfg.data_dir))
    assert code == 1 and "corrupt" in out and "checksums: FAIL" in out
    code, _, err = run(capsys, "rollback", "7", "--data-dir", str(cfg.data_dir))
    assert code == 2 and "no snapshot version 7" in err


def test_rollback_refused_while_a_learner_runs_unless_forced(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    publish_three(cfg)
    with snap.LearnerLock(cfg.data_dir):
        code, _, err = run(capsys, "rollback", "2", "--data-dir", str(cfg.data_dir))
        assert code == 2 and "a learner is running" in err and "--force" in err
        assert snap.latest_version(cfg.data_dir) == 3
        code, out, _ = run(capsys, "rollback", "2", "--data-dir", str(cfg.data_dir), "--force")
        assert code == 0 and snap.latest_version(cfg.data_dir) == 2
        assert "Not sent on Kafka: a learner that takes no rollback requests is running" in out


def test_learner_resumes_from_the_rolled_back_version_and_numbers_above(cfg: Config) -> None:
    publish_three(cfg)
    snap.rollback(cfg.data_dir, 1)
    manifest, learner = _resume(cfg)  # what `livectr learn` starts from
    assert manifest is not None and manifest["version"] == 1 and manifest["offsets"] == {"0": 100}
    assert learner.examples_seen == 128
    learner.learn_batch(ToyWorld(users=20, items=10, seed=5).examples(64))
    version, _ = snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": learner.examples_seen}, keep=10)
    assert version == 4 and snap.latest_version(cfg.data_dir) == 4
    assert snap.list_versions(cfg.data_dir) == [1, 2, 3, 4]
    m3, _ = snap.load_version(cfg.data_dir, 3)
    assert m3["examples_seen"] == 384  # the newer version was not overwritten


def test_no_snapshots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "--data-dir", str(tmp_path))
    assert code == 0 and "no snapshots" in out
    code, _, err = run(capsys, "rollback", "1", "--data-dir", str(tmp_path))
    assert code == 2 and "versions: none" in err
