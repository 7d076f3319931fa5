"""Backpressure (issue 14): when one input is read far ahead of the other in event time, the
join pauses it, so pending impressions and orphan clicks stay bounded by the window and the
allowed skew instead of growing with the skew."""

from __future__ import annotations

from collections import Counter

import pytest
from test_join_rebalance import Worker, assert_exact
from test_join_worker import configure, publish

from livectr.core.config import Config
from livectr.core.events import Click, Impression, encode_event
from livectr.streams import repartition
from livectr.streams import worker as worker_module

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
IMPRESSIONS = 20_000
#: Records per consume batch in this test: the pause acts between batches, so a batch is what a
#: source can overshoot by (the default, 10,000, would hide the bound at this stream's size).
BATCH = 1_000


def stream(cfg: Config) -> tuple[list, list, dict[str, int]]:
    """Impressions every 2 s over two partitions; 9 in 10 clicked 30 s later (clicks over both too)."""
    imps, clicks, truth = [], [], {}
    for k in range(IMPRESSIONS):
        iid, ts, p = f"imp{k}", T0 + 2 * k, k % 2
        imps.append((cfg.topics.impressions, p, encode_event(Impression(iid, ts, f"u{k % 7}", f"i{k % 5}"))))
        truth[iid] = int(k % 10 != 0)
        if k % 10 != 0:
            clicks.append((cfg.topics.clicks, (k // 2) % 2, encode_event(Click(iid, ts + 30))))
    return imps, clicks, truth


def end_counts(records: list) -> dict[int, int]:
    return dict(Counter(p for _, p, _ in records))


@pytest.mark.parametrize("first", ["impressions", "clicks"])
def test_a_source_read_ahead_is_paused_and_state_stays_bounded(
    kafka_config: Config, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    monkeypatch.setattr(worker_module, "CONSUME_BATCH", BATCH)
    monkeypatch.setattr(repartition, "CONSUME_BATCH", BATCH)
    cfg = configure(kafka_config, max_skew_s=600.0, backpressure_floor=BATCH, repartition=True)
    imps, clicks, truth = stream(cfg)
    ahead, behind = (imps, clicks) if first == "impressions" else (clicks, imps)
    worker = Worker(cfg, "w-bp")
    publish(cfg, ahead)
    # The ahead source alone: the worker reads a little of it, then holds it back.
    worker.wait_for(lambda s: s.get("backpressure_pauses", 0) > 0 or s.get("events_in", 0) >= len(ahead))
    publish(cfg, behind, end_partitions=2)
    summary = worker.finish(120)
    assert_exact(cfg, truth)
    # Unpaused, the source read ahead is held whole (20,000 impressions or 18,000 clicks). Paused,
    # window + skew hold (600 + 600) s × 0.5 events/s = 600, plus per partition the floor and the
    # batches read before a pause acts (the join's, and the repartitioner's while a raw partition
    # has not been seen, and a clock held at its slowest raw partition): measured 4,000–10,900
    # on a loaded machine. The bound is loose; what it shows is that the state stops short of
    # the whole skew.
    bound = IMPRESSIONS * 3 // 4
    assert summary["backpressure_pauses"] > 0
    assert summary["peak_pending"] <= bound, summary
    assert summary["peak_orphans"] <= bound, summary
