"""Live status of a stage, shared through small JSON files.

Why files: every stage runs in its own process (so the two cores work in parallel and a
stage can be killed and restarted alone). A stage writes its latest counters atomically
(temp file + rename) at most once a second; ``livectr run`` reads them to draw progress.
The same files let an operator ``cat`` a stage's state on a multi-machine deployment.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

StatusCallback = Callable[[dict[str, Any]], None]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=float))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """Read a status/summary file; an absent or unreadable file is an empty dict."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class StatusFile:
    """A throttled status writer to pass as a stage's ``on_status`` callback."""

    def __init__(self, path: Path | None, min_interval_s: float = 0.5) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self.latest: dict[str, Any] = {}

    def __call__(self, status: dict[str, Any]) -> None:
        self.latest = dict(status, updated_at=time.time())
        now = time.monotonic()
        if self.path is not None and now - self._last >= self.min_interval_s:
            self._last = now
            write_json_atomic(self.path, self.latest)

    def close(self) -> None:
        """Write the last status regardless of throttling."""
        if self.path is not None and self.latest:
            write_json_atomic(self.path, self.latest)
