"""What recording metrics costs a stage, and what ``livectr report`` costs, each against a baseline
measured in the same run.

    python bench/metrics_overhead.py

* Per status (a stage reports about once a second): the status file alone (what every stage did
  before) against the status file plus the metrics recorder, both unthrottled so each call writes.
* The learner's extra status work: :class:`RecentLearnerMetrics.sample` against the
  ``LearnerMetrics.summary()`` its status already computed.
* A samples file at its size cap: the thinning pass.
* ``livectr report`` over four stages' files at the cap (the largest a run can leave).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from livectr.core.config import Config, MetricsConfig  # noqa: E402
from livectr.core.metrics_log import SamplesFile, StageRecorder, samples_path  # noqa: E402
from livectr.core.status import StatusFile  # noqa: E402
from livectr.learner.live_metrics import RecentLearnerMetrics  # noqa: E402
from livectr.learner.metrics import LearnerMetrics  # noqa: E402
from livectr.report import build_report  # noqa: E402

#: The keys of a join worker's status (values as after a minute of traffic).
JOIN_STATUS = {
    "worker": "join-0",
    "events_in": 1_200_000,
    "impressions": 1_140_000,
    "clicks": 60_000,
    "duplicates": 300,
    "duplicate_impressions": 0,
    "examples_out": 1_130_000,
    "score_requests_out": 0,
    "example_records_out": 900,
    "positives": 55_000,
    "negatives": 1_075_000,
    "pending": 90_000,
    "orphans": 0,
    "orphans_buffered": 0,
    "late_clicks": 400,
    "late_impressions": 0,
    "suppressed_replays": 0,
    "dead_letters": 400,
    "dead_letter_reasons": {"late click": 400},
    "watermark_lag_s": 1.5,
    "events_per_second": 20_000.0,
    "partitions": [0, 1, 2, 3],
    "finished_partitions": [],
    "policy": "fake-negative",
    "window_s": 600.0,
    "elapsed_s": 60.0,
    "semantic_lookups": 1_130_000,
    "semantic_misses": 120,
    "semantic_miss_rate": 0.0001,
}


def _per_call_us(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e6


def status_cost(tmp: Path, n: int = 300, rounds: int = 7) -> tuple[float, float, float]:
    """Median µs per status, alternating rounds of the two (the machine is shared: interleave)."""
    status = StatusFile(tmp / "join.status.json", min_interval_s=0.0)
    status2 = StatusFile(tmp / "join2.status.json", min_interval_s=0.0)
    rec = StageRecorder("join-0", MetricsConfig(interval_s=0.0), samples_path(tmp, "join-0"))
    both = rec.chain(status2)
    alone = StageRecorder("join-1", MetricsConfig(interval_s=0.0), samples_path(tmp, "join-1"))
    base, recorded, recorder_only = [], [], []
    for _ in range(rounds):
        base.append(_per_call_us(lambda i: status(dict(JOIN_STATUS, events_in=i)), n))
        recorded.append(_per_call_us(lambda i: both(dict(JOIN_STATUS, events_in=i)), n))
        recorder_only.append(_per_call_us(lambda i: alone(dict(JOIN_STATUS, events_in=i)), n))
    return statistics.median(base), statistics.median(recorded), statistics.median(recorder_only)


def learner_cost(n: int = 300) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    m = LearnerMetrics()
    m.update_serving(rng.random(200_000), (rng.random(200_000) < 0.05).astype(np.float32), np.zeros(200_000, bool))
    m.freshness.add(rng.exponential(2.0, 200_000))
    recent = RecentLearnerMetrics()
    baseline = _per_call_us(lambda i: m.summary(), n)
    extra = _per_call_us(lambda i: recent.sample(m), n)
    return baseline, extra


def fill_to_cap(data_dir: Path, stage: str, cap: int) -> int:
    rec = StageRecorder(stage, MetricsConfig(interval_s=0.0, max_bytes=cap), samples_path(data_dir, stage))
    t0 = 1_700_000_000.0
    for i in range(20_000):
        rec(dict(JOIN_STATUS, events_in=i * 20_000, examples_out=i * 19_000, snapshot_version=i // 30), now=t0 + i)
    rec.close()
    return len(samples_path(data_dir, stage).read_bytes().splitlines())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base, rec, alone = status_cost(tmp)
        print(f"status file alone:            {base:8.1f} µs per status")
        print(f"recorder alone (a sample):    {alone:8.1f} µs per status")
        print(f"status file + recorder:       {rec:8.1f} µs per status  ({rec / base:.2f}× the baseline;")
        print(f"                              at one status a second: {rec / 1e4:.3f} % of a core)")
        summary_us, recent_us = learner_cost()
        print(f"learner metrics summary():    {summary_us:8.1f} µs per status (baseline)")
        print(
            f"+ RecentLearnerMetrics:       {recent_us:8.1f} µs per status  ({recent_us / summary_us:.2f}× the baseline)"
        )
        cap = Config().metrics.max_bytes
        data_dir = tmp / "data"
        lines = [fill_to_cap(data_dir, stage, cap) for stage in ("join-0", "learn", "refresh", "produce")]
        path = samples_path(data_dir, "join-0")
        thin = []
        for _ in range(3):
            path.write_bytes(path.read_bytes() * 2)
            t = time.perf_counter()
            SamplesFile(path, cap).thin()
            thin.append(time.perf_counter() - t)
        print(f"thinning a {2 * cap / 2**20:.0f} MiB samples file:  {statistics.median(thin) * 1000:8.1f} ms")
        t = time.perf_counter()
        html = build_report(data_dir)
        took = time.perf_counter() - t
        print(
            f"report over 4 stages at the {cap / 2**20:.0f} MiB cap ({sum(lines):,} samples after 20,000 each): "
            f"{took:.2f} s, {len(html) / 1024:.0f} KiB of HTML"
        )


if __name__ == "__main__":
    main()
