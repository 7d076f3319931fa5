"""Run ``livectr run`` as a user would, against the session broker, and read its summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from livectr.core.config import Config

REPO = Path(__file__).resolve().parents[1]


def livectr_run_command(cfg: Config, summary_path: Path, *extra: str) -> list[str]:
    """The ``livectr run --quiet`` command line on ``cfg``'s broker, topic prefix, partitions and
    data dir, plus ``extra`` flags."""
    return [
        sys.executable, "-m", "livectr", "run", "--quiet",
        "--bootstrap-servers", cfg.kafka.bootstrap_servers,
        "--topic-prefix", cfg.kafka.topic_prefix,
        "--partitions", str(cfg.kafka.partitions),
        "--data-dir", str(cfg.data_dir),
        "--summary-json", str(summary_path),
        *extra,
    ]  # fmt: skip


def livectr_run(cfg: Config, summary_path: Path, *extra: str, timeout_s: float = 400) -> dict[str, Any]:
    """``livectr run --quiet`` on ``cfg``'s broker, topic prefix, partitions and data dir, plus
    ``extra`` flags; fails with the end of its output unless it exits 0; returns the summary."""
    cmd = livectr_run_command(cfg, summary_path, *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(summary_path.read_text())


def child_pids(parent: int) -> dict[int, str]:
    """Live children of process ``parent`` and their command lines (Linux ``/proc``)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found
