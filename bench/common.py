"""What the benchmark scripts share: building the joined examples, their orders and masks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from livectr.core import bus
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.core.events import KIND_SCORE_REQUEST, Example, ExampleBatch, Item, decode_example, encode_example
from livectr.semantic_cache.client import SemanticCacheClient
from livectr.semantic_cache.refresher import run_refresher
from livectr.simulators.publish import publish
from livectr.streams.worker import run_join_worker

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ml-100k"
COLD_FIRST_N = 20
#: Items first seen after this fraction of the stream count as "new" (see new_item_mask).
WARMUP_FRACTION = 0.1


def read_examples(cfg: Config, expected: int, timeout_s: float = 120.0) -> list[Example]:
    """Every joined example on the examples topic, in partition-interleaved consume order.

    Score requests (the serving-AUC samples) are left out: they are not training examples.
    """
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [cfg.topics.examples])
    out: list[Example] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for msg in cons.consume(2000, 0.2):
            if msg.error() is not None:
                continue
            rec = decode_example(msg.value())
            if type(rec) is ExampleBatch:
                out.extend(ex for ex in rec.examples if ex.kind != KIND_SCORE_REQUEST)
            elif type(rec) is Example and rec.kind != KIND_SCORE_REQUEST:
                out.append(rec)
    cons.close()
    return out


def impression_order(examples: list[Example]) -> list[Example]:
    """The examples in impression event-time order, ties broken by impression id.

    Why: under ``wait`` a positive is emitted when its click arrives and a negative only when
    its window closes, so in arrival order labels come in clumps (positives early, negatives
    W later). A learner that adapts per example (VW, batch size 1) rides those clumps and its
    progressive AUC then measures emission order, not CTR skill — it even beats the oracle.
    Comparing learners on the same examples in impression order removes that artefact. Ties
    need the same care: MovieLens stamps ratings to the second, three quarters of its examples
    share their user's timestamp with another, and a stable sort would keep those in emission
    order — positives first. The impression id orders them without looking at labels.
    """
    return sorted(examples, key=lambda ex: (ex.ts, ex.impression_id))


def cold_mask(examples: Iterable[Example], first_n: int = COLD_FIRST_N) -> np.ndarray:
    """True for impressions among their item's first ``first_n`` (in stream order)."""
    seen: dict[str, int] = {}
    mask = []
    for ex in examples:
        n = seen.get(ex.item_id, 0)
        mask.append(n < first_n)
        seen[ex.item_id] = n + 1
    return np.asarray(mask)


def new_item_mask(examples: list[Example], warmup_fraction: float = WARMUP_FRACTION) -> np.ndarray:
    """True for impressions of items first seen after the first ``warmup_fraction`` of the stream.

    Why a second cold-start cut: among "an item's first 20 impressions" are those of the whole
    initial catalogue, which all fall in the first minutes, when no user is known either. There
    the model is cold, not just the item, and no item text can tell whom it suits. Items that
    arrive later meet a trained model: that is the cold-start case semantics are for.
    """
    start = int(len(examples) * warmup_fraction)
    early = {ex.item_id for ex in examples[:start]}
    return np.fromiter((ex.item_id not in early for ex in examples), bool, len(examples))


def base_config(broker: EmbeddedBroker, prefix: str, data_dir: Path) -> Config:
    cfg = Config()
    cfg.kafka.bootstrap_servers = broker.bootstrap_servers
    cfg.kafka.topic_prefix = prefix
    cfg.data_dir = data_dir
    cfg.simulator.progress = False
    # Exact labels, one example per impression: the benchmarks rebuild every policy's timing
    # from them (bench/serving.py) and compare learners on them in impression order.
    cfg.join.policy = "wait"
    cfg.join.score_sample = 0.0
    return cfg


def joined_with_semantics(
    cfg: Config, source_events: list[Any], titles_out: dict[str, str]
) -> tuple[list[Example], dict]:
    """Publish, warm the cache with the refresher, join with the cache client; examples + cache figures."""
    bus.ensure_topics(cfg)
    for ev in source_events:
        if type(ev) is Item:
            titles_out[ev.item_id] = ev.text
    stop = threading.Event()
    refresh_summary: dict[str, Any] = {}

    def refresher() -> None:
        refresh_summary.update(run_refresher(cfg, stop=stop))

    thread = threading.Thread(target=refresher, daemon=True)
    thread.start()
    # Every item text is known to the teacher before traffic: in real time an item is encoded
    # within milliseconds of its creation, long before its first impression; a replay at full
    # speed would compress that gap to nothing (the default `livectr run` shows that case).
    catalogue = [ev for ev in source_events if type(ev) is Item]
    publish(cfg, catalogue, producer_id="bench-catalogue", end_markers=False)
    client = SemanticCacheClient(cfg)
    ids = [ev.item_id for ev in catalogue]
    client.wait_for(ids, timeout_s=900)
    pub = publish(cfg, source_events, producer_id="bench")
    join = run_join_worker(cfg, worker_id="bench-sem", semantics=client)
    examples = read_examples(cfg, join["examples_out"])
    lookup = lookup_latency(client, ids)
    stats = client.stats()
    client.close()
    stop.set()
    thread.join(timeout=120)
    figures = {
        "miss_rate": stats.get("miss_rate"),
        "lookup_p50_ns": lookup[0],
        "lookup_p99_ns": lookup[1],
        "refresh_texts_per_s": refresh_summary.get("texts_per_second"),
        "bytes_per_example_semantic": refresh_summary.get("bytes_per_example"),
        "events": pub["events_published"],
        "examples": len(examples),
    }
    figures["bytes_per_example_total"] = float(np.mean([len(encoded(ex)) for ex in examples[:5000]]))
    return examples, figures


def encoded(ex: Example) -> bytes:
    return encode_example(ex)


def lookup_latency(client: Any, ids: list[str], n: int = 100_000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    picks = [ids[i] for i in rng.integers(0, len(ids), n)]
    times = np.empty(n)
    clock = time.perf_counter_ns
    for k, item_id in enumerate(picks):
        t = clock()
        client.item(item_id)
        times[k] = clock() - t
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))
