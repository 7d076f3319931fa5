"""Shared fixtures: a real Kafka-protocol broker (tansu) per test session, and configs on it."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import pytest

from livectr.broker import EmbeddedBroker
from livectr.config import Config

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
    return cfg


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    """A small CPU learner config with its own data dir (test files may define their own ``cfg``)."""
    c = Config()
    c.data_dir = tmp_path / "data"
    c.learner.device = "cpu"
    c.learner.context_buckets = 1 << 12
    return c
