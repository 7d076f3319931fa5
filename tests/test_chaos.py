"""``livectr chaos`` (issue 14): SIGKILLed stages lose and repeat no label.

The audit is checked on its own first (a lost, a repeated, a mislabelled and an unexpected
example are each counted), so the drill below can only pass when the join really delivered
every label exactly once across the kills and restarts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from livectr.chaos import audit, expected_kinds, ground_truth
from livectr.core.config import Config
from livectr.core.events import KIND_DEFER_OBSERVED, KIND_DEFER_TRUE, KIND_SCORE_REQUEST, Example

REPO = Path(__file__).resolve().parents[1]
#: The issue's contract: keys every chaos report carries.
CONTRACT = ("expected_impressions", "final_examples", "lost", "duplicates", "kills", "restarts", "retrained_examples")


def _defer_config() -> Config:
    cfg = Config()
    cfg.simulator.events = 600
    cfg.simulator.progress = False
    cfg.join.policy = "defer"
    cfg.join.window_s = 5.0
    cfg.join.defer_wait_s = 1.0
    return cfg


def _perfect(cfg: Config) -> tuple[Any, list[Example]]:
    """The truth of ``cfg``'s stream and exactly the examples the policy must send for it."""
    truth = ground_truth(cfg)
    out = []
    for kind, (sent, labels) in expected_kinds(cfg, truth).items():
        for i in sent.nonzero()[0]:
            out.append(Example(f"{truth.id_prefix}{i}", 0.0, "u", "i", {}, int(labels[i]), kind, 0.0))
    return truth, out


def test_audit_counts_every_kind_of_damage() -> None:
    cfg = _defer_config()
    truth, examples = _perfect(cfg)
    clean = audit(cfg, truth, iter(examples))
    assert clean["expected_impressions"] == truth.impressions > 0
    assert clean["final_examples"] == truth.impressions
    assert (clean["lost"], clean["duplicates"], clean["unexpected"], clean["wrong_labels"]) == (0, 0, 0, 0)
    assert clean["expected_positives"] > 0

    true_labels = [ex for ex in examples if ex.kind == KIND_DEFER_TRUE]
    positive = next(ex for ex in true_labels if ex.label == 1)
    damaged = [ex for ex in examples if ex is not positive]  # lost
    damaged.append(examples[0])  # repeated
    damaged.append(Example("nobody-1", 0.0, "u", "i", {}, 0, KIND_DEFER_OBSERVED, 0.0))  # unexpected
    flipped = next(ex for ex in true_labels if ex.label == 0 and ex is not examples[0])
    damaged.remove(flipped)
    damaged.append(Example(flipped.impression_id, 0.0, "u", "i", {}, 1, KIND_DEFER_TRUE, 0.0))  # mislabelled
    damaged.append(Example(f"{truth.id_prefix}0", 0.0, "u", "i", {}, 0, KIND_SCORE_REQUEST, 0.0))  # not an example
    report = audit(cfg, truth, iter(damaged))
    assert report["lost"] == 1
    assert report["duplicates"] == 1
    assert report["unexpected"] == 1
    assert report["wrong_labels"] == 1
    assert report["final_examples"] == truth.impressions - 1


def _chaos(tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    summary = tmp_path / "chaos.json"
    cmd = [
        sys.executable, "-m", "livectr", "chaos", "--quiet",
        "--data-dir", str(tmp_path / "data"), "--summary-json", str(summary),
        "--semantics", "off", "--partitions", "2",
        "--events", "4000", "--users", "500", "--items-count", "200",
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    output = proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.returncode, json.loads(summary.read_text()) if summary.exists() else {}, output


@pytest.mark.integration
@pytest.mark.slow
def test_chaos_two_kills_lose_and_repeat_nothing(tmp_path: Path) -> None:
    # A 5 s window (the stream spans ~20 s of event time) so windows close during the stream
    # and the checkpoints carry open and closed state alike; defer sends two kinds per impression.
    code, report, output = _chaos(
        tmp_path,
        "--kills", "2", "--stream-s", "16", "--snapshot-every-s", "2",
        "--policies", "defer", "--window-s", "5", "--defer-wait-s", "1",
    )  # fmt: skip
    assert code == 0, output
    for key in CONTRACT:
        assert key in report, key
    run = report["policies"]["defer"]
    print(json.dumps({k: run[k] for k in ("kill_log", "restarts", "retrained_examples", "per_kind")}, indent=1))
    assert report["ok"] and run["clean"]
    assert report["expected_impressions"] > 3_500
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["unexpected"] == 0 and report["wrong_labels"] == 0
    assert report["final_examples"] == report["expected_impressions"]
    assert run["score_requests_lost"] == 0 and run["score_requests_duplicated"] == 0
    assert report["kills"] == 2
    assert report["restarts_total"] == 2
    assert {k["stage"].split("-")[0] for k in run["kill_log"]} == {"join", "learn"}
    assert any(k["hit"].startswith("mid-") for k in run["kill_log"]), run["kill_log"]
    assert report["retrained_examples"] >= 0
