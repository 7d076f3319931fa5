"""The scorer: snapshot loading, hot reload, unknown ids, and the HTTP API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from servers import running
from toyworld import ToyWorld

from livectr.core.config import Config
from livectr.core.events import Impression
from livectr.learner import snapshot as snap
from livectr.learner.online import OnlineLearner
from livectr.learner.scorer import NoSnapshotError, Scorer
from livectr.learner.serve import make_app


def impressions(world: ToyWorld, n: int) -> list[Impression]:
    return [
        Impression(impression_id=e.impression_id, ts=e.ts, user_id=e.user_id, item_id=e.item_id, context=e.context)
        for e in world.examples(n)
    ]


def publish(cfg: Config, learner: OnlineLearner) -> int:
    version, _ = snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": learner.examples_seen}, keep=3)
    return version


def test_scores_match_the_learner_and_handle_unknown_ids(cfg: Config) -> None:
    world = ToyWorld(users=40, items=20)
    learner = OnlineLearner(cfg)
    for _ in range(5):
        learner.learn_batch(world.examples(128))
    publish(cfg, learner)
    scorer = Scorer(cfg.data_dir)
    imps = impressions(world, 50)
    np.testing.assert_allclose(scorer.score(imps), learner.predict_batch(imps), rtol=1e-5, atol=1e-6)
    strangers = [
        Impression(
            impression_id="z", ts=0.0, user_id="never-seen", item_id="nor-this", context={"brand-new-field": 1.5}
        )
    ]
    out = scorer.score(strangers)
    assert out.shape == (1,) and 0 < out[0] < 1
    assert scorer.version == 1 and scorer.examples_seen == 640


def test_hot_reload_follows_the_latest_pointer(cfg: Config) -> None:
    with pytest.raises(NoSnapshotError):
        Scorer(cfg.data_dir, reload_ms=50).score([])
    world = ToyWorld(users=40, items=20)
    learner = OnlineLearner(cfg)
    learner.learn_batch(world.examples(128))
    scorer = Scorer(cfg.data_dir, reload_ms=50)
    publish(cfg, learner)
    time.sleep(0.06)
    imps = impressions(world, 30)
    first = scorer.score(imps)
    assert scorer.version == 1
    for _ in range(20):
        learner.learn_batch(world.examples(128))
    publish(cfg, learner)
    assert scorer.score(imps) is not None and scorer.version in (1, 2)  # within the check interval: may lag
    time.sleep(0.06)
    second = scorer.score(imps)
    assert scorer.version == 2 and scorer.reloads == 2
    assert not np.allclose(first, second)
    np.testing.assert_allclose(second, learner.predict_batch(imps), rtol=1e-5, atol=1e-6)


@pytest.fixture
def server(cfg: Config) -> Iterator[tuple[str, OnlineLearner, ToyWorld]]:
    world = ToyWorld(users=40, items=20)
    learner = OnlineLearner(cfg)
    learner.learn_batch(world.examples(256))
    publish(cfg, learner)
    with running(make_app(Scorer(cfg.data_dir, reload_ms=50))) as base:
        yield base, learner, world


def call(url: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, data=body, method="POST" if body is not None else "GET", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_score_and_healthz(server: tuple[str, OnlineLearner, ToyWorld]) -> None:
    base, learner, world = server
    imps = impressions(world, 5)
    payload = {
        "impressions": [
            {
                "impression_id": i.impression_id,
                "ts": i.ts,
                "user_id": i.user_id,
                "item_id": i.item_id,
                "context": i.context,
            }
            for i in imps
        ]
    }
    code, body = call(f"{base}/score", json.dumps(payload).encode())
    assert code == 200 and body["version"] == 1
    np.testing.assert_allclose(body["scores"], learner.predict_batch(imps), rtol=1e-5, atol=1e-6)
    code, body = call(f"{base}/healthz")
    assert code == 200 and body == {"version": 1, "examples_seen": 256}


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"{not json", "invalid request"),
        (b'{"impressions": [{"user_id": "u"}]}', "invalid request"),
        (
            b'{"impressions": [{"impression_id": "a", "ts": "yesterday", "user_id": "u", "item_id": "i"}]}',
            "invalid request",
        ),
        (b'{"items": []}', "invalid request"),
    ],
)
def test_http_rejects_invalid_input(server: tuple[str, OnlineLearner, ToyWorld], body: bytes, reason: str) -> None:
    base, _, _ = server
    code, reply = call(f"{base}/score", body)
    assert code == 422 and reason in reply["error"]  # 400 before the ASGI server; malformed bodies are 422 now


def test_http_unknown_route(server: tuple[str, OnlineLearner, ToyWorld]) -> None:
    base, _, _ = server
    assert call(f"{base}/nope")[0] == 404
