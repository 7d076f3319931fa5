"""``livectr run`` restarts a stage that dies instead of ending the run (issue 14)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from runs import REPO, child_pids, livectr_run_command

from livectr.chaos import ground_truth
from livectr.core import config as config_mod
from livectr.core.config import Config, SupervisorConfig
from livectr.pipeline import Stage, Supervisor, restart_delay, restartable


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = SupervisorConfig(max_restarts=5, backoff_s=1.0, backoff_max_s=5.0)
    assert [restart_delay(policy, n) for n in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert restartable("join-0") and restartable("learn") and restartable("refresh")
    assert not restartable("produce") and not restartable("catalogue")


def test_a_stage_that_keeps_dying_exhausts_its_budget(tmp_path: Path) -> None:
    # `livectr join` without a broker exits 1 at once: a crash the supervisor cannot cure.
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_mod.to_dict(Config())))
    stage = Stage("join-0", ["join"], tmp_path)
    stages = {"join-0": stage}
    supervisor = Supervisor(stages, SupervisorConfig(max_restarts=2, backoff_s=0.01, backoff_max_s=0.01))
    stage.start(config_path)
    deadline = time.monotonic() + 120
    failed = None
    while failed is None and time.monotonic() < deadline:
        failed = supervisor.check()
        time.sleep(0.05)
    stage.wait(timeout_s=5)
    assert failed == "join-0"
    assert stage.restarts == 2
    assert stage.exit_codes == [1, 1]
    assert supervisor.restarts() == {"join-0": 2}
    assert stage.log_path.read_text().count("--- restart") == 2, "a restarted stage appends to its log"


@pytest.mark.integration
@pytest.mark.slow
def test_run_survives_a_sigkilled_join_worker(kafka_config: Config, tmp_path: Path) -> None:
    """The join is killed right after its first examples, before its first periodic checkpoint:
    the restarted worker must find where they stand (the checkpoint taken with the partitions).
    Re-keyed inputs, the default; the direct join's case is in test_join_worker.py
    (``test_sigkill_before_the_first_checkpoint_resends_nothing``)."""
    cfg = kafka_config
    cfg.simulator.events = 4_000
    cfg.simulator.users = 500
    cfg.simulator.items = 200
    truth = ground_truth(cfg)
    summary_path = tmp_path / "summary.json"
    cmd = livectr_run_command(
        cfg, summary_path,
        "--events", "4000", "--users", "500", "--items-count", "200",
        "--semantics", "off", "--policy", "wait", "--window-s", "5",
        # ~20 s of event time in ~12 s: the join is mid-stream when it is killed.
        "--speed", "1.7", "--restart-backoff-s", "0.5",
    )  # fmt: skip
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    status = cfg.data_dir / "run" / "join-0.status.json"
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and run.poll() is None:
            try:
                progressed = json.loads(status.read_text()).get("examples_out", 0) > 0
            except (OSError, ValueError):
                progressed = False
            join = [pid for pid, cmdline in child_pids(run.pid).items() if " join " in cmdline]
            if progressed and join:
                os.kill(join[0], signal.SIGKILL)
                killed = join[0]
            time.sleep(0.1)
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert killed is not None, "the join worker never got going"
    assert run.returncode == 0, output[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True
    assert summary["restarts"]["join-0"] == 1
    assert summary["impressions"] == truth.impressions
    manifest = json.loads((cfg.data_dir / "snapshots" / "latest" / "manifest.json").read_text())
    assert manifest["examples_seen"] == truth.impressions, "one label per impression despite the kill"
