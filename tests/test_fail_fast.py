"""Bad command lines fail fast: one clear line on stderr, non-zero exit, nothing started (issue 14)."""

from __future__ import annotations

import gzip
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from livectr.core import bus
from livectr.core.config import Config, KafkaConfig
from livectr.simulators.replay import ReplayInputError, check_replay_inputs, load_replay
from livectr.simulators.sources import check_source

GOOD_LOG = "ts,type,impression_id,user_id,item_id\n1700000000,impression,a,u,i\n1700000001,click,a,,\n"


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def livectr(*args: str, timeout: float = 30) -> tuple[subprocess.CompletedProcess[str], float]:
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "livectr", *args], capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t


def assert_one_clear_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- the checks themselves -------------------------------------------------------------------


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ReplayInputError, match=r"--log file .*nope.csv does not exist"):
        check_replay_inputs(tmp_path / "nope.csv")
    with pytest.raises(ReplayInputError, match="is not a file"):
        check_replay_inputs(tmp_path)
    log = tmp_path / "log.csv"
    log.write_text(GOOD_LOG)
    with pytest.raises(ReplayInputError, match=r"--items file .*items.csv does not exist"):
        check_replay_inputs(log, tmp_path / "items.csv")
    broken = tmp_path / "log.csv.gz"
    broken.write_bytes(b"this is not gzip")
    with pytest.raises(ReplayInputError, match="unreadable"):
        check_replay_inputs(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ReplayInputError, match="is empty"):
        check_replay_inputs(empty)
    with pytest.raises(ReplayInputError, match="--items only makes sense with a log"):
        check_source(None, log)


def test_files_without_the_required_columns(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("time,kind,id,user,item\n1700000000,impression,a,u,i\n")
    with pytest.raises(
        ReplayInputError, match=r"lacks the required column\(s\) ts, type, impression_id \(it has: id, item"
    ):
        load_replay(log)
    jsonl = tmp_path / "log.jsonl.gz"
    with gzip.open(jsonl, "wt") as fh:
        fh.write('{"ts": 1700000000, "type": "impression", "impression_id": "a", "user": "u", "item_id": "i"}\n')
    with pytest.raises(ReplayInputError, match=r"lacks the required column\(s\) user_id \(it has"):
        check_replay_inputs(jsonl)
    good = tmp_path / "good.csv"
    good.write_text(GOOD_LOG)
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni,A lamp\n")
    with pytest.raises(ReplayInputError, match="--items file .* lacks the required column.*text"):
        check_replay_inputs(good, items)
    items.write_text("item_id,text\ni,A lamp\n")
    check_replay_inputs(good, items)  # fine


def test_unreachable_broker_is_reported_within_seconds() -> None:
    kafka = KafkaConfig()
    kafka.bootstrap_servers = closed_port()
    t = time.monotonic()
    with pytest.raises(bus.BrokerUnreachable, match=f"no Kafka broker reachable at {kafka.bootstrap_servers}"):
        bus.check_reachable(kafka, timeout_s=2.0)
    assert time.monotonic() - t < 4


# -- the commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "produce"])
def test_missing_log_fails_before_anything_starts(tmp_path: Path, command: str) -> None:
    data = tmp_path / "data"
    broker = [] if command == "run" else ["--bootstrap-servers", closed_port()]
    proc, took = livectr(command, *broker, "--data-dir", str(data), "--log", str(tmp_path / "missing.csv"))
    assert_one_clear_line(proc, f"livectr {command}:", "missing.csv does not exist")
    assert took < 15
    assert not (data / "broker.log").exists() and not (data / "run").exists()  # no broker, no stage


@pytest.mark.parametrize("command", ["run", "produce"])
def test_unreachable_bootstrap_servers_fail_within_seconds(tmp_path: Path, command: str) -> None:
    data = tmp_path / "data"
    servers = closed_port()
    proc, took = livectr(command, "--bootstrap-servers", servers, "--data-dir", str(data), "--events", "100")
    assert_one_clear_line(proc, f"livectr {command}:", f"no Kafka broker reachable at {servers}")
    assert took < 15
    assert not (data / "run").exists()


def test_run_with_a_columnless_log_on_a_live_broker_starts_no_stage(kafka_config: Config, tmp_path: Path) -> None:
    cfg = kafka_config
    log = tmp_path / "log.csv"
    log.write_text("when,what\n1,2\n")
    proc, took = livectr(
        "run",
        "--bootstrap-servers",
        cfg.kafka.bootstrap_servers,
        "--topic-prefix",
        cfg.kafka.topic_prefix,
        "--data-dir",
        str(cfg.data_dir),
        "--log",
        str(log),
    )
    assert_one_clear_line(proc, "livectr run:", "lacks the required column(s) ts, type, impression_id")
    assert took < 15
    assert not (cfg.data_dir / "run").exists()
    existing = AdminClient(cfg.kafka.client_properties()).list_topics(timeout=10).topics
    assert cfg.topics.impressions not in existing  # not even the topics were created
