"""Every way of stopping ``livectr run`` ends with no process left, within seconds (issue 14).

A run is started as a terminal would (a process group of its own), stopped once the learner has
published a snapshot, and every process it started (its direct children: the stages and the
embedded broker, which sit in sessions of their own) must be gone soon after:

* SIGINT to the group (Ctrl-C) and SIGTERM to the parent alone: the parent stops the stages,
  then the broker, and writes the summary;
* SIGKILL to the parent: the children die with it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livectr.core.broker import EmbeddedBroker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")

_runs = iter(range(1_000_000))


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (a scan of /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def start_run(tmp_path: Path, bootstrap: str | None) -> tuple[subprocess.Popen[bytes], Path, Path]:
    data = tmp_path / "data"
    summary = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "livectr",
        "run",
        "--forever",
        "--quiet",
        "--semantics",
        "off",
        "--events",
        "3000000",
        "--snapshot-every-s",
        "1",
        "--data-dir",
        str(data),
        "--summary-json",
        str(summary),
    ]
    if bootstrap is not None:
        cmd += ["--bootstrap-servers", bootstrap, "--topic-prefix", f"stop{next(_runs)}-{os.getpid()}."]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        cmd,
        stdout=open(tmp_path / "run.out", "wb"),
        stderr=open(tmp_path / "run.err", "wb"),
        stdin=subprocess.DEVNULL,
        process_group=0,
        env=env,
    )
    return proc, data, summary


def first_snapshot(data: Path) -> bool:
    snapshots = data / "snapshots"
    return snapshots.is_dir() and any(p.name.startswith("v") for p in snapshots.iterdir())


STUCK_STAGE = """
import sys, time
from livectr.core.procs import stop_on_signals
stop = stop_on_signals(grace_s=float(sys.argv[1]))
print("ready", flush=True)
while True:  # a stage stuck in a flush to a broker that is gone: it never looks at stop
    time.sleep(0.05)
"""


@pytest.mark.parametrize(("signals", "grace_s", "within_s"), [(1, 1.0, 5.0), (2, 30.0, 3.0)])
def test_a_stuck_stage_exits_after_the_grace_or_at_a_second_signal(
    signals: int, grace_s: float, within_s: float
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_STAGE, str(grace_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        t0 = time.monotonic()
        for _ in range(signals):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        assert proc.wait(timeout=within_s) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 >= (grace_s if signals == 1 else 0)
        assert proc.stderr is not None and b"exiting" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("how", "embedded"),
    [("sigint-group", False), ("sigterm-parent", False), ("sigkill-parent", True)],
)
def test_stopping_leaves_no_process(how: str, embedded: bool, broker: EmbeddedBroker, tmp_path: Path) -> None:
    proc, data, summary = start_run(tmp_path, None if embedded else broker.bootstrap_servers)
    pids: set[int] = set()
    try:
        expected = 5 if embedded else 4  # produce, join-0, learn (+ broker), and the parent
        assert wait_for(lambda: first_snapshot(data) or proc.poll() is not None, 60), "no snapshot within 60s"
        assert proc.poll() is None, (tmp_path / "run.err").read_text()
        pids = children_of(proc.pid) | {proc.pid}
        assert len(pids) >= expected, pids
        if how == "sigint-group":
            os.killpg(proc.pid, signal.SIGINT)
        elif how == "sigterm-parent":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.kill()
        t0 = time.monotonic()
        assert wait_for(lambda: proc.poll() is not None and not any(alive(p) for p in pids), 15), (
            f"{how}: still running after 15s: {sorted(p for p in pids if alive(p))}"
        )
        took = time.monotonic() - t0
        if how != "sigkill-parent":
            assert proc.returncode == 0, (tmp_path / "run.err").read_text()
            result = json.loads(summary.read_text())
            assert result["interrupted"] is True
            assert result["snapshots_published"] >= 1
            assert (data / "run" / "learn.summary.json").exists(), "the learner did not stop cleanly"
        print(f"{how}: every process gone {took:.1f}s after the signal")
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
