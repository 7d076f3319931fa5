"""The join worker through rebalances and a fenced-out group member (issue 14), on the real broker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import pytest
from test_join_worker import configure, make_stream, publish, read_examples

from livectr.core import bus
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.streams.checkpoint import checkpoint_path, read_checkpoint
from livectr.streams.worker import run_join_worker

pytestmark = pytest.mark.integration


class Worker:
    """A join worker in a thread, with its last status and its summary."""

    def __init__(self, cfg: Config, worker_id: str, bounded: bool = True) -> None:
        self.stop = threading.Event()
        self.status: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg, worker_id, bounded), daemon=True)
        self.thread.start()

    def _run(self, cfg: Config, worker_id: str, bounded: bool) -> None:
        try:
            self.summary = run_join_worker(
                cfg, worker_id=worker_id, stop=self.stop, bounded=bounded, on_status=self.status.update
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_for(self, check: Any, timeout_s: float = 40.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check(self.status):
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"timed out; last status {self.status}"
            time.sleep(0.1)

    def finish(self, timeout_s: float = 60.0) -> dict[str, Any]:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(15)
            raise AssertionError(f"worker did not finish within {timeout_s}s: {self.status}")
        assert self.error is None, self.error
        return self.summary


def assert_exact(cfg: Config, truth: dict[str, int]) -> None:
    examples, _, _ = read_examples(cfg, ends=4, timeout_s=30)
    assert Counter(e.impression_id for e in examples) == Counter({iid: 1 for iid in truth}), "lost or repeated"
    assert {e.impression_id: e.label for e in examples} == truth


def test_scale_one_two_one_workers_mid_stream(kafka_config: Config) -> None:
    """A second worker joins mid-stream and leaves again: nothing lost, nothing repeated."""
    kafka_config.kafka.session_timeout_ms = 2000
    cfg = configure(kafka_config)
    parts = [make_stream(cfg, 0, 200), make_stream(cfg, 200, 200), make_stream(cfg, 400, 200)]
    publish(cfg, parts[0].records)
    a = Worker(cfg, "w-a")
    a.wait_for(lambda s: s.get("events_in", 0) >= len(parts[0].records))
    b = Worker(cfg, "w-b")
    b.wait_for(lambda s: len(s.get("partitions", [])) == 1)
    a.wait_for(lambda s: len(s.get("partitions", [])) == 1)
    publish(cfg, parts[1].records)
    b.wait_for(lambda s: s.get("events_in", 0) > 0)
    b.stop.set()
    b_summary = b.finish()
    assert b_summary["impressions"] > 0
    a.wait_for(lambda s: len(s.get("partitions", [])) == 2)
    publish(cfg, parts[2].records, end_partitions=2)
    a.finish()
    assert_exact(cfg, {**parts[0].truth, **parts[1].truth, **parts[2].truth})


@pytest.fixture
def own_broker(tmp_path: Any) -> Any:
    """A broker of this test's own: it is frozen (SIGSTOP), which must not stall other tests' clients."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as b:
        yield b


def test_worker_fenced_during_broker_freeze_rejoins_and_resumes(
    own_broker: EmbeddedBroker, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freeze the broker (SIGSTOP) for longer than the session timeout while the worker flushes
    before a commit — as under load, where a commit is nearly always under way. The session
    expires meanwhile, so the commit that follows is refused; the worker rejoins, restores its
    checkpoints and finishes with exact labels instead of dying with a traceback."""
    cfg = Config()
    cfg.kafka.bootstrap_servers = own_broker.bootstrap_servers
    cfg.kafka.topic_prefix = "fence."
    cfg.kafka.partitions = 2
    cfg.kafka.session_timeout_ms = 2000
    cfg.data_dir = tmp_path / "data"
    cfg.join.policy = "wait"
    cfg = configure(cfg)
    first, second = make_stream(cfg, 0, 200), make_stream(cfg, 200, 200)
    publish(cfg, first.records)

    pid = own_broker._proc.pid  # type: ignore[union-attr]
    armed = threading.Event()
    real_flush = bus.flush_or_raise

    def flush_in_a_freeze(prod: Any, tracker: Any, timeout_s: float = bus.FLUSH_S) -> None:
        """The worker's next flush happens while the broker is frozen for 3 sessions."""
        if armed.is_set() and threading.current_thread() is worker.thread:
            armed.clear()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(3 * cfg.kafka.session_timeout_ms / 1000)
            finally:
                os.kill(pid, signal.SIGCONT)
        real_flush(prod, tracker, timeout_s)

    monkeypatch.setattr(bus, "flush_or_raise", flush_in_a_freeze)
    worker = Worker(cfg, "w-f")
    worker.wait_for(lambda s: s.get("events_in", 0) >= len(first.records))
    deadline = time.monotonic() + 20
    while read_checkpoint(checkpoint_path(cfg, 1)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    armed.set()
    deadline = time.monotonic() + 30
    while armed.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    publish(cfg, second.records, end_partitions=2)
    summary = worker.finish(90)
    assert summary["fenced"] >= 1, "the freeze did not fence the worker out: the test proves nothing"
    assert_exact(cfg, {**first.truth, **second.truth})
