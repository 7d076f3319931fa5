"""One learner per data dir: a second one fails at once; the lock dies with its holder (issue 14)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livectr.core.config import Config
from livectr.learner import snapshot as snap
from livectr.learner.loop import run_learner

_HOLDER = """
import sys, time
from livectr.learner.snapshot import LearnerLock
LearnerLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _hold_lock(data_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(data_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_learner_fails_at_once_naming_the_data_dir_and_the_holder(cfg: Config) -> None:
    holder = _hold_lock(cfg.data_dir)
    try:
        cfg.kafka.bootstrap_servers = "127.0.0.1:1"  # never reached: the lock comes first
        t = time.monotonic()
        with pytest.raises(snap.LearnerLockError) as err:
            run_learner(cfg)
        assert time.monotonic() - t < 2
        assert str(cfg.data_dir) in str(err.value) and f"pid {holder.pid}" in str(err.value)
        proc = subprocess.run(
            [sys.executable, "-m", "livectr", "learn", "--bootstrap-servers", "127.0.0.1:1"]
            + ["--data-dir", str(cfg.data_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode != 0
        assert f"pid {holder.pid}" in proc.stderr and str(cfg.data_dir) in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: flock dies with the process
        holder.wait()
    with snap.LearnerLock(cfg.data_dir) as lock:
        assert (snap.snapshots_dir(cfg.data_dir) / snap.LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(snap.LearnerLockError):
            snap.LearnerLock(cfg.data_dir).acquire()
    assert lock._fd is None
    snap.LearnerLock(cfg.data_dir).acquire().release()  # released on exit
