"""Fault-injection points: where ``livectr chaos`` aims its SIGKILLs.

A crash in the middle of writing a checkpoint or a snapshot is the case durability code exists
for, and the hardest to hit by chance (the write takes milliseconds). Stages call
:func:`hold` at those moments; with ``$LIVECTR_FAULT_HOLD_S`` set, the call sleeps that long
while the half-written temp file or directory exists, so a watcher that sees the temp appear
kills the process mid-write. Unset (every normal run), it returns at once.
"""

from __future__ import annotations

import os
import time

#: Seconds to linger at a fault point (float; unset or 0 = never).
HOLD_ENV = "LIVECTR_FAULT_HOLD_S"
#: Comma-separated fault points that hold (unset = every point).
POINTS_ENV = "LIVECTR_FAULT_POINTS"

#: The join worker, between writing a checkpoint's temp file and renaming it into place.
CHECKPOINT = "checkpoint"
#: The learner, between writing a snapshot's temp directory and renaming it into place.
SNAPSHOT = "snapshot"


def hold(point: str) -> None:
    """Linger at fault point ``point`` when the environment asks for it (see the module docstring)."""
    raw = os.environ.get(HOLD_ENV)
    if not raw:
        return
    points = os.environ.get(POINTS_ENV)
    if points and point not in {p.strip() for p in points.split(",")}:
        return
    try:
        seconds = float(raw)
    except ValueError:
        return
    if seconds > 0:
        time.sleep(seconds)
