"""Deltas over Kafka (issue 15): a scorer with no shared disk follows the learner from the
model-updates topic alone — full snapshot, then deltas in order — and refuses corrupt updates."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient
from test_learner_loop import produce
from toyworld import ToyWorld

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import Impression
from livectr.learner import snapshot as snap
from livectr.learner.deltas import TouchedRows, build_delta
from livectr.learner.loop import run_learner
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor
from livectr.learner.scorer import Scorer
from livectr.learner.serve import make_app, make_scorer
from livectr.learner.updates import UpdateFollower, UpdateHeader, UpdatePublisher, pack_files


@pytest.fixture
def cfg(updates_config: Config) -> Config:
    return updates_config


def kafka_only(cfg: Config, tmp_path: Path) -> Config:
    """The same broker and topics, and an empty data dir: nothing shared on disk."""
    other = Config()
    other.kafka = cfg.kafka
    other.learner = cfg.learner
    other.semantic = cfg.semantic
    other.data_dir = tmp_path / "empty"
    return other


def follow(cfg: Config, followers: list[Scorer]) -> Scorer:
    scorer = Scorer(cfg.data_dir, reload_ms=100, cfg=cfg, load_now=False)
    scorer.attach(UpdateFollower(cfg, scorer))
    scorer.start_watcher()
    followers.append(scorer)
    return scorer


def wait_for(what: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def impressions(world: ToyWorld, n: int) -> list[Impression]:
    return [
        Impression(impression_id=e.impression_id, ts=e.ts, user_id=e.user_id, item_id=e.item_id, context=e.context)
        for e in world.examples(n)
    ]


class Publishing:
    """A learner publishing as ``run_learner`` does: snapshots on disk and Kafka, deltas between."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.learner = OnlineLearner(cfg)
        self.learner.touched = TouchedRows()
        self.prod = bus.producer(cfg.kafka)
        self.updates = UpdatePublisher(cfg, self.prod)

    def train(self, world: ToyWorld, batches: int = 2) -> None:
        for _ in range(batches):
            self.learner.learn_batch(world.examples(256))

    def snapshot(self) -> int:
        manifest = {"examples_seen": self.learner.examples_seen}
        if self.updates.chain is not None:
            manifest["delta_chain"] = list(self.updates.chain)
        version, _ = snap.publish_snapshot(self.cfg.data_dir, self.learner.state(), manifest)
        if self.updates.full_due():
            self.updates.publish_full(self.cfg.data_dir, version)
            assert self.learner.touched is not None
            self.learner.touched.take()
        return version

    def delta(self) -> None:
        last = snap.latest_version(self.cfg.data_dir)
        assert self.updates.publish_delta(self.learner, last) is not None
        bus.flush_or_raise(self.prod, self.updates.tracker)


def test_a_kafka_only_scorer_scores_as_the_learner(cfg: Config, tmp_path: Path, followers: list[Scorer]) -> None:
    pub = Publishing(cfg)
    world = ToyWorld(users=80, items=40, seed=1)
    pub.train(world, 3)
    assert pub.snapshot() == 1
    grown = ToyWorld(users=160, items=80, seed=2)  # new users and items arrive between snapshots
    for _ in range(3):
        pub.train(grown)
        pub.delta()
    full, delta = pub.updates.full_bytes, pub.updates.delta_bytes
    assert full > 4 * pub.updates.chunk_bytes and delta < full / 3  # chunked; a delta is a fraction of it

    scorer = follow(kafka_only(cfg, tmp_path), followers)
    wait_for(lambda: scorer.current is not None and scorer.current.chain == (1, 3))
    imps = impressions(grown, 200)
    np.testing.assert_allclose(scorer.score(imps), pub.learner.predict_batch(imps), rtol=1e-4, atol=1e-6)
    strangers = [Impression(impression_id="s", ts=time.time(), user_id="nobody", item_id="nothing")]
    serving = Predictor.for_serving(cfg, pub.learner.state())  # unknown ids: the mean row, as on disk
    np.testing.assert_allclose(scorer.score(strangers), serving.predict_batch(strangers), rtol=1e-4, atol=1e-6)
    assert scorer.version == 1 and scorer.deltas_applied == 3 and scorer.update_refusals == 0
    assert scorer.freshness.count > 0  # event → served measured as the deltas were applied

    # A scorer started while the chain goes on follows the new deltas live, over a second full snapshot.
    cfg.learner.update_full_every_s = 0.0
    pub.train(grown)
    assert pub.snapshot() == 2
    pub.train(grown)
    pub.delta()
    wait_for(lambda: scorer.current is not None and scorer.current.chain == (2, 1))
    late = follow(kafka_only(cfg, tmp_path), followers)  # bootstraps from v2's first message, not the topic's start
    wait_for(lambda: late.current is not None and late.current.chain == (2, 1))
    imps = impressions(grown, 100)
    expected = pub.learner.predict_batch(imps)
    for s in (scorer, late):
        np.testing.assert_allclose(s.score(imps), expected, rtol=1e-4, atol=1e-6)
    assert late.version == 2 and late.deltas_applied == 1


def corrupt_message(cfg: Config, blob: bytes, header: UpdateHeader) -> None:
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    bus.produce(
        prod, cfg.topics.model_updates, blob, partition=0, on_delivery=tracker.callback, headers=header.headers()
    )
    bus.flush_or_raise(prod, tracker)


def test_corrupt_updates_are_refused_and_the_scorer_keeps_serving(
    cfg: Config, tmp_path: Path, followers: list[Scorer]
) -> None:
    pub = Publishing(cfg)
    world = ToyWorld(users=60, items=30, seed=3)
    pub.train(world, 3)
    pub.snapshot()
    pub.train(world)
    pub.delta()
    scorer = follow(kafka_only(cfg, tmp_path), followers)
    wait_for(lambda: scorer.current is not None and scorer.current.chain == (1, 1))
    imps = impressions(world, 50)
    before = scorer.score(imps)

    # A delta whose bytes were damaged in transit: its checksum fails, nothing is applied.
    pub.train(world)
    blob, _ = build_delta(pub.learner, pub.learner.touched or TouchedRows(), 1, 2)
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    corrupt_message(cfg, bytes(damaged), UpdateHeader("delta", 1, 2, 0, 1, hashlib.sha256(blob).hexdigest(), 0))
    wait_for(lambda: scorer.update_refusals == 1)
    assert scorer.current is not None and scorer.current.chain == (1, 1)
    np.testing.assert_array_equal(scorer.score(imps), before)

    # The learner's next delta (seq 3 — it believes 2 went out) follows a gap: skipped, not applied.
    pub.updates.seq = 2
    pub.train(world)
    pub.delta()
    wait_for(lambda: scorer.deltas_skipped >= 1)
    assert scorer.current.chain == (1, 1)

    # A full snapshot whose blob is intact but one file fails the manifest's checksum (a corrupt
    # disk copy published): refused like on disk, with the file named.
    pub.train(world)
    version, path = snap.publish_snapshot(cfg.data_dir, pub.learner.state(), {"examples_seen": 1})
    files = snap.read_serving_files(cfg.data_dir, version)
    model = bytearray(files["model.safetensors"])
    model[-10] ^= 0xFF
    bad = pack_files({**files, "model.safetensors": bytes(model)})
    pub.updates.send(bad, "full", version, 0)  # chunked like any full snapshot
    wait_for(lambda: scorer.update_refusals == 2)
    assert scorer.version == 1
    np.testing.assert_array_equal(scorer.score(imps), before)

    # The next good full snapshot ends the wait: installed, and the deltas after it apply again.
    cfg.learner.update_full_every_s = 0.0
    assert pub.snapshot() == version + 1
    pub.train(world)
    pub.delta()
    wait_for(lambda: scorer.current is not None and scorer.current.chain == (version + 1, 1))
    np.testing.assert_allclose(scorer.score(imps), pub.learner.predict_batch(imps), rtol=1e-4, atol=1e-6)


def test_a_disk_scorer_following_kafka_skips_covered_snapshots_and_still_rolls_back(
    cfg: Config, tmp_path: Path, followers: list[Scorer], capsys: pytest.CaptureFixture[str]
) -> None:
    from livectr import cli

    pub = Publishing(cfg)
    world = ToyWorld(users=60, items=30, seed=5)
    pub.train(world, 2)
    pub.snapshot()
    cfg.learner.update_full_every_s = 0.0
    pub.train(world, 2)
    pub.snapshot()
    pub.train(world)
    pub.delta()
    scorer = follow(cfg, followers)  # the learner's data dir and Kafka
    wait_for(lambda: scorer.current is not None and scorer.current.chain == (2, 1))
    # A disk snapshot on the same chain is not loaded: the next delta brings the model past it,
    # and from then on the scorer names that version.
    cfg.learner.update_full_every_s = 300.0
    pub.train(world)
    assert pub.snapshot() == 3
    loads = scorer.reloads
    pub.train(world)
    pub.delta()
    wait_for(lambda: scorer.version == 3)
    assert scorer.reloads == loads and scorer.current is not None and scorer.current.chain == (2, 2)
    assert cli.main(["snapshots", "rollback", "1", "--data-dir", str(cfg.data_dir)]) == 0
    capsys.readouterr()
    wait_for(lambda: scorer.version == 1)
    v1 = Predictor.for_serving(cfg, snap.load_version(cfg.data_dir, 1, with_optimizer=False)[1])
    imps = impressions(world, 50)
    pub.train(world)
    pub.delta()  # a delta of the chain of v2: not for the rolled-back model
    wait_for(lambda: scorer.deltas_skipped >= 1)
    np.testing.assert_allclose(scorer.score(imps), v1.predict_batch(imps), rtol=1e-5, atol=1e-6)


def test_learner_loop_publishes_and_livectr_serve_follows_without_a_data_dir(cfg: Config, tmp_path: Path) -> None:
    cfg.learner.batch_size = 256
    cfg.learner.shuffle_buffer = 0
    cfg.learner.align_idle_s = 0.0
    cfg.learner.snapshot_every_examples = 2000
    cfg.learner.delta_every_s = 0.0001  # a delta after every poll that trained something
    world = ToyWorld(users=60, items=30, seed=6)
    produce(cfg, {p: [world.examples(200) for _ in range(6)] for p in range(2)}, ends=2)
    summary = run_learner(cfg)
    assert summary["examples_trained"] == 2400 and summary["deltas_published"] >= 1
    assert summary["full_snapshots_on_kafka"] == 1  # the rest of the chain went as deltas
    assert summary["last_delta_bytes"] < summary["last_full_snapshot_bytes"] / 3

    remote = kafka_only(cfg, tmp_path)
    with TestClient(make_app(make_scorer(remote), remote.serve)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200)
        scorer: Scorer = client.app.state.scorer  # type: ignore[attr-defined]
        wait_for(lambda: scorer.deltas_applied == summary["deltas_published"])
        metrics = client.get("/metrics").text
        assert f"livectr_serve_deltas_applied_total {summary['deltas_published']}.0" in metrics
        assert "livectr_serve_freshness_seconds_count" in metrics
        disk = Scorer(cfg.data_dir, cfg=cfg)  # the learner's final snapshot: the same model
        imps = impressions(world, 100)
        body = {"user_id": imps[0].user_id, "items": [i.item_id for i in imps]}
        got = client.post("/score", json=body).json()
        want = disk.score(
            [
                Impression(impression_id=str(k), ts=0.0, user_id=body["user_id"], item_id=i)
                for k, i in enumerate(body["items"])
            ]
        )
        np.testing.assert_allclose(got["scores"], want, rtol=1e-4, atol=1e-6)


def test_a_row_given_to_another_id_is_rebound_on_the_replica() -> None:
    """After vocabulary expiry the learner may give a row to a new id: the replica follows by id."""
    from livectr.learner.vocab import UNKNOWN_ROW, GrowingVocab

    vocab = GrowingVocab("user_id", initial_capacity=2)
    vocab.bind("alice", 1)
    vocab.bind("bob", 3)  # rows skipped over stay unused
    assert vocab.row("alice") == 1 and vocab.row("bob") == 3 and vocab.capacity >= 4
    vocab.bind("carol", 1)  # alice expired, her row reused
    assert vocab.row("alice") == UNKNOWN_ROW and vocab.row("carol") == 1
    vocab.bind("carol", 2)  # re-admitted elsewhere: her old row no longer names her
    assert vocab.row("carol") == 2
    with pytest.raises(KeyError):
        vocab.id_of(1)  # free on the replica now
    vocab.bind("dave", 1, generation=4)  # the learner's generation of a reused row (the pair hash)
    assert vocab.row("dave") == 1 and int(vocab.generation[1]) == 4
