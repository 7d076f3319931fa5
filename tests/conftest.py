"""Shared fixtures: a real Kafka-protocol broker (tansu) per test session, configs on it, and a
stub OpenAI-compatible chat server for the LLM enrichment paths."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from livectr.core import bus
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.learner.scorer import Scorer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One tansu broker on a free loopback port for the whole session."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def kafka_config(broker: EmbeddedBroker, tmp_path: Path) -> Config:
    """A config on the session broker with a topic prefix of its own, so tests never share topics."""
    cfg = Config()
    cfg.kafka.bootstrap_servers = broker.bootstrap_servers
    cfg.kafka.topic_prefix = f"t{next(_prefixes)}-{os.getpid()}."
    cfg.kafka.partitions = 2
    cfg.data_dir = tmp_path / "data"
    cfg.simulator.progress = False
    # Most broker tests check exact labels, one example per impression: the wait policy's.
    cfg.join.policy = "wait"
    return cfg


@pytest.fixture
def updates_config(kafka_config: Config) -> Config:
    """A small CPU model on the real broker, topics created; full snapshots span several
    messages of the model-updates topic (the delta and rollback tests)."""
    c = kafka_config
    c.learner.device = "cpu"
    c.learner.context_buckets = 1 << 12
    c.learner.pair_buckets = 1 << 12
    c.learner.update_chunk_bytes = 64 * 1024
    bus.ensure_topics(c)
    return c


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    """A small CPU learner config with its own data dir (test files may define their own ``cfg``)."""
    c = Config()
    c.data_dir = tmp_path / "data"
    c.learner.device = "cpu"
    c.learner.context_buckets = 1 << 12
    c.join.policy = "wait"
    return c


class _ChatHandler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat endpoint; behaviour chosen by the server's ``mode``."""

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body, self.headers.get("Authorization")))  # type: ignore[attr-defined]
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        if mode == "slow":
            time.sleep(1.0)
        content = {
            "ok": "Deeper attributes: brand tier: premium; health: light; occasion: treat",
            "slow": "too late",
            "empty": "   ",
        }.get(mode)
        payload = (
            {"choices": [{"message": {"role": "assistant", "content": content}}]}
            if content is not None
            else {"unexpected": True}
        )
        data = json.dumps(payload).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the "slow" case): exactly what is being tested

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def chat_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    server.requests = []  # type: ignore[attr-defined]
    server.mode = "ok"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def followers() -> Iterator[list[Scorer]]:
    """Scorers a test starts following the model; their watchers are stopped at the end."""
    started: list[Scorer] = []
    yield started
    for scorer in started:
        scorer.stop_watcher()
