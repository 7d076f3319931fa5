"""Rollback over Kafka (issue 15): ``livectr snapshots rollback V`` makes a Kafka-only scorer
(no shared disk) serve V within seconds — republished by the CLI when no learner runs, by the
running learner itself otherwise — and the learner continues from V."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_deltas import Publishing, follow, impressions, kafka_only, wait_for
from test_learner_loop import produce
from toyworld import ToyWorld

from livectr import cli
from livectr.core.config import Config
from livectr.learner import snapshot as snap
from livectr.learner.loop import run_learner
from livectr.learner.predictor import Predictor
from livectr.learner.scorer import Scorer
from livectr.learner.serve import ServeMetrics

#: What "within seconds" means here (the shared test machine included).
WITHIN_S = 5.0


@pytest.fixture
def cfg(updates_config: Config) -> Config:
    return updates_config


def kafka_flags(cfg: Config) -> list[str]:
    return ["--bootstrap-servers", cfg.kafka.bootstrap_servers, "--topic-prefix", cfg.kafka.topic_prefix]


def examples_seen(cfg: Config, version: int | None) -> int:
    """``examples_seen`` of a snapshot's manifest (-1: none, or pruned meanwhile)."""
    if version is None:
        return -1
    try:
        return int(snap.load_version(cfg.data_dir, version, with_optimizer=False)[0]["examples_seen"])
    except (OSError, snap.SnapshotError):
        return -1


def served_by(cfg: Config, version: int) -> Predictor:
    return Predictor.for_serving(cfg, snap.load_version(cfg.data_dir, version, with_optimizer=False)[1])


def test_cli_rollback_republishes_v_and_a_kafka_only_scorer_serves_it(
    cfg: Config, tmp_path: Path, followers: list[Scorer], capsys: pytest.CaptureFixture[str]
) -> None:
    pub = Publishing(cfg)
    world = ToyWorld(users=60, items=30, seed=11)
    pub.train(world, 2)
    assert pub.snapshot() == 1
    cfg.learner.update_full_every_s = 0.0
    pub.train(world, 2)
    assert pub.snapshot() == 2  # on Kafka too: the chain now builds on v2
    pub.train(world)
    pub.delta()
    scorer = follow(kafka_only(cfg, tmp_path), followers)
    wait_for(lambda: scorer.current is not None and scorer.current.chain == (2, 1))

    started = time.monotonic()
    code = cli.main(["snapshots", "rollback", "1", "--data-dir", str(cfg.data_dir), *kafka_flags(cfg)])
    out = capsys.readouterr().out
    assert code == 0 and "republished on the model-updates topic" in out
    wait_for(lambda: scorer.rollbacks == 1, timeout_s=WITHIN_S)
    took = time.monotonic() - started
    assert scorer.version == 1 and scorer.current is not None and scorer.current.chain == (1, 0)
    assert "livectr_serve_rollbacks_total 1.0" in ServeMetrics(scorer).render().decode()
    imps = impressions(world, 60)
    v1 = served_by(cfg, 1).predict_batch(imps)
    np.testing.assert_allclose(scorer.score(imps), v1, rtol=1e-5, atol=1e-6)

    # A delta of the discarded chain (built on v2) is ignored: the scorer stays on v1.
    pub.train(world)
    pub.delta()
    wait_for(lambda: scorer.deltas_skipped >= 1)
    np.testing.assert_allclose(scorer.score(imps), v1, rtol=1e-5, atol=1e-6)
    # A scorer started now bootstraps from the rollback, not from v2.
    late = follow(kafka_only(cfg, tmp_path), followers)
    wait_for(lambda: late.current is not None)
    assert late.version == 1
    np.testing.assert_allclose(late.score(imps), v1, rtol=1e-5, atol=1e-6)
    print(f"rollback to a Kafka-only scorer: {took:.2f} s")


def test_a_running_learner_rolls_back_on_request_and_continues_from_v(
    cfg: Config, tmp_path: Path, followers: list[Scorer], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg.learner.batch_size = 200
    cfg.learner.shuffle_buffer = 0
    cfg.learner.align_idle_s = 0.0
    cfg.learner.snapshot_every_examples = 800
    cfg.learner.snapshot_every_s = 1.0  # the tail after the last 800 too
    cfg.learner.delta_every_s = 0.2
    cfg.learner.keep_snapshots = 10
    world = ToyWorld(users=60, items=30, seed=12)
    produce(cfg, {p: [world.examples(200) for _ in range(6)] for p in range(2)})
    stop = threading.Event()
    result: dict[str, object] = {}
    learner = threading.Thread(target=lambda: result.update(run_learner(cfg, stop=stop, bounded=False)))
    learner.start()
    try:
        wait_for(lambda: examples_seen(cfg, snap.latest_version(cfg.data_dir)) == 2400, timeout_s=120)
        top = snap.latest_version(cfg.data_dir)
        assert top is not None and top >= 3
        last = snap.load_version(cfg.data_dir, top, with_optimizer=False)[0]
        back = 2
        seen_back = examples_seen(cfg, back)
        assert 0 < seen_back < 2400
        scorer = follow(kafka_only(cfg, tmp_path), followers)
        imps = impressions(world, 80)
        at_top = served_by(cfg, top).predict_batch(imps)
        wait_for(lambda: scorer.current is not None and np.allclose(scorer.score(imps), at_top, atol=1e-6))

        started = time.monotonic()
        code = cli.main(["snapshots", "rollback", str(back), "--data-dir", str(cfg.data_dir), "--json"])
        out = capsys.readouterr().out
        assert code == 0 and '"rolled_back_by": "learner"' in out and '"published_on_kafka": true' in out
        wait_for(lambda: scorer.rollbacks == 1, timeout_s=WITHIN_S)
        took = time.monotonic() - started

        # The learner continues from v2: it trains the examples after v2's offsets again, and
        # its next snapshot numbers above the highest with the same total (not that plus them).
        wait_for(lambda: examples_seen(cfg, snap.latest_version(cfg.data_dir)) == 2400, timeout_s=120)
        newest = snap.latest_version(cfg.data_dir)
        assert newest is not None and newest > top
        again = snap.load_version(cfg.data_dir, newest, with_optimizer=False)[0]
        assert again["offsets"] == last["offsets"]
        assert snap.list_versions(cfg.data_dir)[:top] == list(range(1, top + 1))  # nothing overwritten
    finally:
        stop.set()
        learner.join(timeout=60)
    assert result["resumed_from_version"] == back  # the run it continued with resumed from v2
    # And the Kafka-only scorer ends on the learner's model (its last snapshot and delta).
    final = Scorer(cfg.data_dir, cfg=cfg).score(imps)
    wait_for(lambda: np.allclose(scorer.score(imps), final, rtol=1e-4, atol=1e-6), timeout_s=15)
    print(f"rollback by the running learner to a Kafka-only scorer: {took:.2f} s")


def test_rollback_request_without_an_answer_is_withdrawn(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    pub = Publishing(cfg)
    world = ToyWorld(users=20, items=10, seed=13)
    for _ in range(2):
        pub.train(world)
        pub.snapshot()
    with snap.LearnerLock(cfg.data_dir) as lock:
        lock.accept_rollbacks()  # claims to take requests, but never polls
        code = cli.main(["snapshots", "rollback", "1", "--data-dir", str(cfg.data_dir), "--wait-s", "0.3"])
        err = capsys.readouterr().err
    assert code == 2 and "did not take the rollback request" in err
    assert snap.latest_version(cfg.data_dir) == 2
    assert not (snap.snapshots_dir(cfg.data_dir) / snap.ROLLBACK_REQUEST).exists()
