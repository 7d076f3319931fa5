"""The ASGI scorer: request forms, limits, errors, readiness, metrics and hot swap under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from servers import running
from starlette.testclient import TestClient
from toyworld import ToyWorld

from livectr.core import config as config_mod
from livectr.core.config import Config, ServeConfig
from livectr.core.events import Impression
from livectr.learner import serve as serve_mod
from livectr.learner import snapshot as snap
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor
from livectr.learner.scorer import Scorer
from livectr.learner.serve import make_app
from livectr.learner.snapshot import snapshots_dir, version_name


def publish(cfg: Config, learner: OnlineLearner) -> int:
    version, _ = snap.publish_snapshot(cfg.data_dir, learner.state(), {"examples_seen": learner.examples_seen}, keep=10)
    return version


@pytest.fixture
def trained(cfg: Config) -> tuple[OnlineLearner, ToyWorld]:
    world = ToyWorld(users=40, items=20)
    learner = OnlineLearner(cfg)
    learner.learn_batch(world.examples(256))
    publish(cfg, learner)
    return learner, world


@pytest.fixture
def client(cfg: Config, trained: tuple[OnlineLearner, ToyWorld]) -> Iterator[TestClient]:
    app = make_app(Scorer(cfg.data_dir, reload_ms=50), ServeConfig(max_body_bytes=64 * 1024, max_candidates=50))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_new_form_scores_each_item_in_order(
    cfg: Config, client: TestClient, trained: tuple[OnlineLearner, ToyWorld]
) -> None:
    learner, _ = trained
    user = "u3"
    items = ["i1", "i7", "i2", "never-seen-item"]
    context = {"device": "mobile"}
    r = client.post("/score", json={"user_id": user, "items": items, "context": context})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == 1 and "version" not in body and len(body["scores"]) == len(items)
    expected = Predictor.for_serving(cfg, learner.state()).predict_batch(
        [
            Impression(impression_id=f"x{i}", ts=time.time(), user_id=user, item_id=it, context=context)
            for i, it in enumerate(items)
        ]
    )
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-4, atol=1e-5)
    assert all(0 < s < 1 for s in body["scores"])


def test_inline_and_worker_thread_scoring_agree(
    cfg: Config, trained: tuple[OnlineLearner, ToyWorld], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to ``serve.inline_candidates`` a request scores on the event loop, above in a worker
    thread; both give the same response."""
    threaded: list[int] = []
    real = serve_mod.run_in_threadpool

    async def counting(fn: Any, *args: Any) -> Any:
        threaded.append(len(args[0]))
        return await real(fn, *args)

    monkeypatch.setattr(serve_mod, "run_in_threadpool", counting)
    body = {"user_id": "u3", "items": ["i1", "i7", "i2", "never-seen-item"], "context": {"device": "mobile"}}
    replies = []
    for inline in (4, 3, 0):
        app = make_app(Scorer(cfg.data_dir, reload_ms=50), ServeConfig(inline_candidates=inline))
        with TestClient(app) as c:
            r = c.post("/score", json=body)
            assert r.status_code == 200, r.text
            replies.append(r.json())
    assert threaded == [4, 4]  # inline_candidates 3 and 0: a worker thread; 4: the event loop
    assert replies[0] == replies[1] == replies[2]


def test_unknown_ids_still_score(client: TestClient) -> None:
    r = client.post("/score", json={"user_id": "nobody", "items": ["nothing", "nada"], "context": {"new-field": 2.5}})
    assert r.status_code == 200
    scores = r.json()["scores"]
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    assert client.post("/score", json={"user_id": "nobody", "items": []}).json()["scores"] == []


def test_original_form_keeps_its_keys(client: TestClient, trained: tuple[OnlineLearner, ToyWorld]) -> None:
    learner, world = trained
    imps = [
        Impression(impression_id=e.impression_id, ts=e.ts, user_id=e.user_id, item_id=e.item_id, context=e.context)
        for e in world.examples(5)
    ]
    payload = {"impressions": [{f: getattr(i, f) for f in i.__struct_fields__} for i in imps]}
    r = client.post("/score", json=payload)
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == 1 and body["model_version"] == 1
    np.testing.assert_allclose(body["scores"], learner.predict_batch(imps), rtol=1e-5, atol=1e-6)


def test_413_for_oversized_body_and_too_many_candidates(client: TestClient) -> None:
    r = client.post("/score", content=b" " * (64 * 1024 + 1))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = client.post("/score", json={"user_id": "u", "items": [f"i{k}" for k in range(51)]})
    assert r.status_code == 413 and "51 items" in r.json()["error"]
    many = [{"impression_id": str(k), "ts": 0.0, "user_id": "u", "item_id": "i"} for k in range(51)]
    r = client.post("/score", json={"impressions": many})
    assert r.status_code == 413 and "51 impressions" in r.json()["error"]
    assert client.post("/score", json={"user_id": "u", "items": [f"i{k}" for k in range(50)]}).status_code == 200


def test_413_for_a_chunked_body_without_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/score", content=chunks())
    assert r.status_code == 413


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"{not json", "JSON is malformed"),
        (b"", "truncated"),
        (b'{"user_id": "u", "items": [1, 2]}', "Expected `str`, got `int` - at `$.items[0]`"),
        (b'{"user_id": "u"}', "missing required field `items`"),
        (b'{"items": ["a"]}', "missing required field `user_id`"),
        (b'{"user_id": "u", "items": [], "color": "red"}', "unknown field `color`"),
        (b'{"user_id": "u", "items": [], "context": {"k": [1]}}', "at `$.context"),
        (b'{"impressions": [{"user_id": "u"}]}', "missing required field"),
        (b'{"impressions": [], "user_id": "u", "items": []}', "not both"),
    ],
)
def test_422_with_the_reason(client: TestClient, body: bytes, reason: str) -> None:
    r = client.post("/score", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and reason in r.json()["error"], r.text


def test_500_is_a_json_body(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: Predictor, records: object) -> np.ndarray:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(Predictor, "predict_batch", boom)
    r = client.post("/score", json={"user_id": "u", "items": ["a"]})
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
    assert "kaboom" in r.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "no route" in r.json()["error"]
    r = client.get("/score")
    assert r.status_code == 405 and "error" in r.json()


def test_readyz_is_503_until_the_first_snapshot(cfg: Config) -> None:
    scorer = Scorer(cfg.data_dir, reload_ms=30, load_now=False)
    with TestClient(make_app(scorer)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert c.post("/score", json={"user_id": "u", "items": ["a"]}).status_code == 503
        world = ToyWorld(users=10, items=5)
        learner = OnlineLearner(cfg)
        learner.learn_batch(world.examples(64))
        publish(cfg, learner)
        deadline = time.monotonic() + 10
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"ready": True, "model_version": 1}
        assert c.post("/score", json={"user_id": "u", "items": ["a"]}).json()["model_version"] == 1


def test_metrics_exposition(client: TestClient) -> None:
    client.post("/score", json={"user_id": "u", "items": ["a", "b"]})
    client.post("/score", content=b"{")
    text = client.get("/metrics").text
    for name in (
        "livectr_serve_request_seconds_bucket",
        "livectr_serve_requests_total",
        "livectr_serve_model_version 1.0",
        "livectr_serve_snapshot_age_seconds",
        "livectr_serve_snapshot_loads_total 1.0",
        "livectr_serve_snapshot_load_failures_total 0.0",
        "livectr_serve_rollbacks_total 0.0",
    ):
        assert name in text, name
    assert 'livectr_serve_requests_total{route="/score",status="200"} 1.0' in text
    assert 'livectr_serve_requests_total{route="/score",status="422"} 1.0' in text


def test_a_corrupt_snapshot_is_counted_and_the_previous_model_keeps_serving(
    cfg: Config, trained: tuple[OnlineLearner, ToyWorld]
) -> None:
    learner, _ = trained
    scorer = Scorer(cfg.data_dir, reload_ms=20)
    with TestClient(make_app(scorer)) as c:
        assert c.post("/score", json={"user_id": "u", "items": ["a"]}).json()["model_version"] == 1
        scorer.stop_watcher()  # corrupt v2 before the watcher can see it whole
        v2 = publish(cfg, learner)
        (snapshots_dir(cfg.data_dir) / version_name(v2) / "model.safetensors").write_bytes(b"garbage")
        scorer.start_watcher()
        deadline = time.monotonic() + 10
        while scorer.load_failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scorer.load_failures == 1
        r = c.post("/score", json={"user_id": "u", "items": ["a"]})
        assert r.status_code == 200 and r.json()["model_version"] == 1
        assert "livectr_serve_snapshot_load_failures_total 1.0" in c.get("/metrics").text
        time.sleep(0.1)
        assert scorer.load_failures == 1, "a failed version is not retried on every poll"
        publish(cfg, learner)  # v3 is fine: serving moves on
        while scorer.version != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.post("/score", json={"user_id": "u", "items": ["a"]}).json()["model_version"] == 3


def test_hot_swap_under_load(cfg: Config) -> None:
    """Publish v1, serve, publish v2 and v3 while clients loop: zero errors, versions advance."""
    world = ToyWorld(users=40, items=20)
    learner = OnlineLearner(cfg)
    learner.learn_batch(world.examples(128))
    published = {publish(cfg, learner)}
    scorer = Scorer(cfg.data_dir, reload_ms=20)
    seen: list[int] = []
    errors: list[str] = []
    stop = threading.Event()
    with running(make_app(scorer)) as base:

        def loop() -> None:
            with httpx.Client(base_url=base, timeout=10) as http:
                while not stop.is_set():
                    try:
                        r = http.post("/score", json={"user_id": "u1", "items": [f"i{k}" for k in range(20)]})
                        if r.status_code != 200 or len(r.json()["scores"]) != 20:
                            errors.append(f"{r.status_code} {r.text}")
                        else:
                            seen.append(r.json()["model_version"])
                    except Exception as exc:
                        errors.append(repr(exc))

        clients = [threading.Thread(target=loop) for _ in range(3)]
        for t in clients:
            t.start()
        for _ in range(2):
            time.sleep(0.3)
            learner.learn_batch(world.examples(128))
            published.add(publish(cfg, learner))
        deadline = time.monotonic() + 10
        while (not seen or seen[-1] != 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        stop.set()
        for t in clients:
            t.join()
    assert not errors, errors[:5]
    assert published == {1, 2, 3}
    assert set(seen) <= published and seen[0] == 1 and seen[-1] == 3
    assert len(seen) > 20


def test_serve_config_from_env_and_flags() -> None:
    cfg = config_mod.from_env({"LIVECTR_SERVE__MAX_CANDIDATES": "7", "LIVECTR_SERVE__MAX_BODY_BYTES": "1024"})
    assert cfg.serve.max_candidates == 7 and cfg.serve.max_body_bytes == 1024
    from livectr.cli import build_config, build_parser

    args = build_parser().parse_args(
        ["serve", "--max-candidates", "9", "--reload-ms", "100", "--inline-candidates", "0"]
    )
    cfg = build_config(args)
    assert cfg.serve.max_candidates == 9 and cfg.learner.scorer_reload_ms == 100 and args.port == 8000
    assert cfg.serve.inline_candidates == 0
    assert build_config(build_parser().parse_args(["learn", "--nice", "7"])).learner.nice == 7


def test_score_latency_is_recorded_over_time_for_the_report(
    cfg: Config, trained: tuple[OnlineLearner, ToyWorld]
) -> None:
    from livectr.core.metrics_log import StageRecorder, read_all, samples_path
    from livectr.report import build_report

    recorder = StageRecorder("serve-8000", cfg.metrics, samples_path(cfg.data_dir, "serve-8000"))
    app = make_app(Scorer(cfg.data_dir, reload_ms=50), recorder=recorder, record_interval_s=0.05)
    recorder.cfg.interval_s = 0.0  # every sample reaches the file
    body = {"user_id": "u1", "items": [f"i{k}" for k in range(20)]}
    with TestClient(app) as c:
        for _ in range(4):
            for _ in range(10):
                assert c.post("/score", json=body).status_code == 200
            assert c.post("/score", content=b"{").status_code == 422
            time.sleep(0.12)
    samples = read_all(cfg.data_dir)["serve-8000"]
    timed = [s for s in samples if "latency_p99_ms" in s]
    assert len(timed) >= 3
    assert all(0 < s["latency_p50_ms"] <= s["latency_p99_ms"] <= s["latency_max_ms"] for s in timed)
    assert sum(s["interval_requests"] for s in timed) == 40  # each request in exactly one interval
    last = samples[-1]  # written as the app stopped
    assert last["requests_served"] == 40 and last["request_errors"] == 4 and last["snapshot_version"] == 1
    html = build_report(cfg.data_dir)
    assert "Served latency, POST /score (ms)" in html and "serve-8000: p50" in html
