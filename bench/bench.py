"""livectr's benchmark: every figure in the README comes from one run of this script.

    python bench/bench.py                   # both parts, default sizes (~10 minutes here)
    python bench/bench.py --part pipeline   # issue 2: join, learner, end to end, AUC vs VW
    python bench/bench.py --part semantic   # issue 3: semantics off/on vs VW (± title words)

Part "pipeline", on one synthetic stream published once to an embedded broker:

* the consume-and-decode ceiling of confluent-kafka over the join's input topics, and the
  join worker's throughput on the same topics, in the same run (their ratio; target ≥ 0.6);
* the learner's examples/s on CPU over the joined examples (target ≥ 50,000);
* progressive AUC of livectr and of Vowpal Wabbit (logistic, FTRL, user×item quadratics) on
  exactly those examples in the same order (target: livectr ≥ VW);
* end to end: ``livectr run`` (every stage a process, broker on this machine), events/s
  (target ≥ 20,000).

Part "semantic", for the synthetic stream and for MovieLens 100K: the stream is published,
the refresher (MiniLM teacher) encodes the catalogue, the join worker attaches vectors from
the cache, and then — on the very same examples — livectr with semantics off, livectr with
semantics on, VW, and VW with the item's title words are scored progressively: overall AUC and
cold-start AUC (impressions among an item's first 20; and among those, items first seen after
the first 10 % of the stream), livectr averaged over several model seeds. Also: cache lookup p50/p99, refresh
throughput, miss rate, bytes per joined example.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from join_speed import ceiling  # noqa: E402
from vw_baseline import exact_auc, vw_line, vw_progressive  # noqa: E402

from livectr.core import bus  # noqa: E402
from livectr.core.broker import EmbeddedBroker  # noqa: E402
from livectr.core.config import Config  # noqa: E402
from livectr.core.events import (  # noqa: E402
    KIND_FAKE_NEGATIVE,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    Example,
    ExampleBatch,
    Item,
    decision_time,
    decode_example,
)
from livectr.learner.online import OnlineLearner  # noqa: E402
from livectr.simulators.publish import publish  # noqa: E402
from livectr.simulators.sources import open_source  # noqa: E402
from livectr.streams.join import request_threshold, requested  # noqa: E402
from livectr.streams.worker import run_join_worker  # noqa: E402

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


def _aucs(y: np.ndarray, p: np.ndarray, examples: list[Example]) -> dict[str, float]:
    """Overall, cold-start and cold-start-among-new-items AUC of scores ``p``."""
    cold = cold_mask(examples)
    cold_new = cold & new_item_mask(examples)
    return {
        "auc": exact_auc(y, p),
        "cold_auc": exact_auc(y[cold], p[cold]),
        "cold_new_auc": exact_auc(y[cold_new], p[cold_new]),
        "cold_new_impressions": int(cold_new.sum()),
    }


def livectr_seeds(
    cfg: Config, examples: list[Example], semantics: bool, seeds: int, fake_negative: bool | None = None
) -> dict[str, float]:
    """:func:`livectr_progressive` (or, with a policy, :func:`livectr_serving`) averaged over
    ``seeds`` model seeds, with the AUCs' spread.

    Why: the student's random initialisation and the gate's sampled decisions move its AUC by
    a few thousandths from one seed to the next — as much as some of the effects measured —
    so a single run cannot tell a lift from luck.
    """
    runs = []
    for seed in range(seeds):
        seeded = copy.deepcopy(cfg)
        seeded.learner.seed = seed
        runs.append(
            livectr_progressive(seeded, examples, semantics)
            if fake_negative is None
            else livectr_serving(seeded, examples, fake_negative, semantics)
        )
    out = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    for k in ("auc", "cold_auc", "cold_new_auc"):
        out[f"{k}_std"] = float(np.std([r[k] for r in runs]))
    out["seeds"] = seeds
    return out


def livectr_progressive(cfg: Config, examples: list[Example], semantics: bool) -> dict[str, float]:
    """Progressive (score, then train) pass of the student over ``examples``; AUCs and speed."""
    import msgspec

    cfg.semantic.enabled = semantics
    if not semantics:
        examples = [msgspec.structs.replace(ex, item_sem=None, user_sem=None) for ex in examples]
    learner = OnlineLearner(cfg)
    bs = cfg.learner.batch_size
    preds = []
    start = time.perf_counter()
    for k in range(0, len(examples), bs):
        preds.append(learner.learn_batch(examples[k : k + bs])["predictions"])
    elapsed = time.perf_counter() - start
    p = np.concatenate(preds)
    y = np.asarray([ex.label for ex in examples])
    out = {**_aucs(y, p, examples), "examples_per_s": len(examples) / elapsed}
    s = learner.summary()
    for key in ("gate_usage", "gate_compute_saved", "items_cold_started"):
        if key in s:
            out[key] = s[key]
    return out


def serving_schedule(
    examples: list[Example], window_s: float, fake_negative: bool
) -> list[tuple[float, int, int, Example | None]]:
    """What a live system does, in event time: score impression ``k`` at its time, train each
    label when it is decided. Entries are ``(time, 0, k, None)`` (score) and ``(time, 1, k,
    example)`` (train), sorted; at equal times scoring comes first.

    Under ``wait`` (the examples as joined) a label is decided at its click or at the window's
    close; under ``fake-negative`` every impression is trained on as a negative at once and a
    clicked one again as a positive copy at its click (the join's other policy, rebuilt here
    from the same examples so that both policies are compared on one stream).
    """
    out: list[tuple[float, int, int, Example | None]] = []
    for k, ex in enumerate(examples):
        out.append((ex.ts, 0, k, None))
        if not fake_negative:
            out.append((decision_time(ex, window_s), 1, k, ex))
            continue
        out.append((ex.ts, 1, k, msgspec.structs.replace(ex, label=0, kind=KIND_FAKE_NEGATIVE)))
        if ex.label:
            out.append(
                (ex.ts + max(ex.click_delay, 0.0), 1, k, msgspec.structs.replace(ex, label=1, kind=KIND_POSITIVE_COPY))
            )
    out.sort(key=lambda e: (e[0], e[1]))
    return out


def livectr_serving(
    cfg: Config, examples: list[Example], fake_negative: bool, semantics: bool = False
) -> dict[str, float]:
    """Serving AUCs of the student on :func:`serving_schedule` (scores taken before any later label trains).

    As live, under ``wait`` the impressions the join would sample (``join.score_sample``, same
    hash) are scored as score requests, whose labelled outcomes the learner uses (its fast
    experts' mix is fitted to them); every impression's score counts in the AUC.
    ``examples`` must be in impression order (the cold-start masks are cut in that order).
    """
    cfg = copy.deepcopy(cfg)
    cfg.semantic.enabled = semantics
    if not semantics:
        examples = [msgspec.structs.replace(ex, item_sem=None, user_sem=None) for ex in examples]
    learner = OnlineLearner(cfg)
    below = 0 if fake_negative else request_threshold(cfg.join.score_sample)
    is_request = [below > 0 and requested(ex.impression_id, below) for ex in examples]
    scores = np.zeros(len(examples))
    pending: list[int] = []
    batch: list[Example] = []

    def score_pending() -> None:
        """Score the impressions waiting, before the model changes: it has seen only labels decided before them."""
        requests = [k for k in pending if is_request[k]]
        others = [k for k in pending if not is_request[k]]
        if requests:
            scores[requests] = learner.score_requests(
                [msgspec.structs.replace(examples[k], kind=KIND_SCORE_REQUEST) for k in requests]
            )
        if others:
            scores[others] = learner.predict_batch([examples[k] for k in others])
        pending.clear()

    for _, what, k, ex in serving_schedule(examples, cfg.join.window_s, fake_negative):
        if what == 0:
            pending.append(k)
            continue
        batch.append(ex)
        if len(batch) >= cfg.learner.batch_size:
            score_pending()
            learner.learn_batch(batch)
            batch = []
    score_pending()
    return _aucs(np.asarray([ex.label for ex in examples]), scores, examples)


def vw_serving(examples: list[Example], window_s: float, fake_negative: bool) -> float:
    """Serving AUC of Vowpal Wabbit (same arguments as :func:`vw_progressive`) on the same schedule."""
    from vowpalwabbit import Workspace

    vw = Workspace("--loss_function logistic --link logistic --ftrl -b 22 -q ui --quiet")
    scores = np.zeros(len(examples))
    for _, what, k, ex in serving_schedule(examples, window_s, fake_negative):
        if what == 0:
            scores[k] = vw.predict(vw_line(examples[k], None))
        else:
            vw.learn(vw_line(ex, None))
    vw.finish()
    return exact_auc(np.asarray([ex.label for ex in examples]), scores)


def vw_scores(examples: list[Example], titles: dict[str, str] | None) -> dict[str, float]:
    y, p = vw_progressive(examples, titles)
    return _aucs(y, p, examples)


def _base_config(broker: EmbeddedBroker, prefix: str, data_dir: Path) -> Config:
    cfg = Config()
    cfg.kafka.bootstrap_servers = broker.bootstrap_servers
    cfg.kafka.topic_prefix = prefix
    cfg.data_dir = data_dir
    cfg.simulator.progress = False
    return cfg


def pipeline_part(events: int, workdir: Path) -> dict[str, Any]:
    """Issue 2's figures."""
    res: dict[str, Any] = {"events": events}
    with EmbeddedBroker() as broker:
        cfg = _base_config(broker, "bench-pipe.", workdir / "pipe")
        cfg.simulator.events = events
        cfg.semantic.enabled = False
        bus.ensure_topics(cfg)
        pub = publish(cfg, open_source(cfg).events, producer_id="bench")
        res["produce_events_per_s"] = pub["events_per_second"]
        records = sum(sum(c) for k, c in pub["partition_counts"].items() if k != "items")
        res["ceiling_msgs_per_s"] = ceiling(cfg, records)
        join = run_join_worker(cfg, worker_id="bench")
        res["join_events_per_s"] = join["events_per_second"]
        res["join_ratio"] = res["join_events_per_s"] / res["ceiling_msgs_per_s"]
        examples = read_examples(cfg, join["examples_out"])
    res["examples"] = len(examples)
    on = livectr_progressive(cfg, examples, semantics=True)
    off = livectr_progressive(cfg, examples, semantics=False)
    vw = vw_scores(examples, None)
    res.update(
        learner_examples_per_s=on["examples_per_s"],
        learner_examples_per_s_no_semantics=off["examples_per_s"],
        arrival_livectr_auc=on["auc"],
        arrival_livectr_auc_no_semantics=off["auc"],
        arrival_vw_auc=vw["auc"],
    )
    ordered = impression_order(examples)
    on, off, vw = (
        livectr_progressive(cfg, ordered, semantics=True),
        livectr_progressive(cfg, ordered, semantics=False),
        vw_scores(ordered, None),
    )
    res.update(livectr_auc=on["auc"], livectr_auc_no_semantics=off["auc"], vw_auc=vw["auc"])
    for policy, fn in (("wait", False), ("fake_negative", True)):
        res[f"serving_livectr_auc_{policy}"] = livectr_serving(cfg, impression_order(examples), fn)["auc"]
        res[f"serving_vw_auc_{policy}"] = vw_serving(examples, cfg.join.window_s, fn)
    for semantics in ("on", "off"):
        summary_path = workdir / f"e2e-{semantics}.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "livectr",
                "run",
                "--quiet",
                "--events",
                str(events),
                "--semantics",
                semantics,
                "--data-dir",
                str(workdir / f"e2e-{semantics}"),
                "--summary-json",
                str(summary_path),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        summary = json.loads(summary_path.read_text())
        res[f"e2e_events_per_s_semantics_{semantics}"] = summary["events_per_second"]
        res[f"e2e_auc_semantics_{semantics}"] = summary["progressive_auc"]
        res[f"e2e_serving_auc_semantics_{semantics}"] = summary["serving_auc"]
        res[f"e2e_serving_impressions_semantics_{semantics}"] = summary["serving_auc_impressions"]
        res[f"e2e_freshness_p50_s_semantics_{semantics}"] = summary["freshness_p50_s"]
        res[f"e2e_freshness_p99_s_semantics_{semantics}"] = summary["freshness_p99_s"]
    return res


def _joined_with_semantics(
    cfg: Config, source_events: list[Any], titles_out: dict[str, str]
) -> tuple[list[Example], dict]:
    """Publish, warm the cache with the refresher, join with the cache client; examples + cache figures."""
    from livectr.semantic_cache.client import SemanticCacheClient
    from livectr.semantic_cache.refresher import run_refresher

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
    lookup = _lookup_latency(client, ids)
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
    figures["bytes_per_example_total"] = float(np.mean([len(_encoded(ex)) for ex in examples[:5000]]))
    return examples, figures


def _encoded(ex: Example) -> bytes:
    from livectr.core.events import encode_example

    return encode_example(ex)


def _lookup_latency(client: Any, ids: list[str], n: int = 100_000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    picks = [ids[i] for i in rng.integers(0, len(ids), n)]
    times = np.empty(n)
    clock = time.perf_counter_ns
    for k, item_id in enumerate(picks):
        t = clock()
        client.item(item_id)
        times[k] = clock() - t
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _gate_free(cfg: Config) -> Config:
    """The same config with no compute price on the semantic branch (the gate's accuracy-only choice)."""
    free = copy.deepcopy(cfg)
    free.learner.gate_cost = 0.0
    return free


def semantic_part(events: int, workdir: Path, seeds: int = 3) -> dict[str, Any]:
    """Issue 3's table: the same examples scored by four learners, for two datasets."""
    from livectr.simulators.ml100k import convert_ml100k

    datasets: dict[str, tuple[Path | None, Path | None]] = {"synthetic": (None, None)}
    if SHARED.is_dir():
        datasets["ml-100k"] = convert_ml100k(SHARED, workdir / "ml-100k")
    res: dict[str, Any] = {}
    with EmbeddedBroker() as broker:
        for name, (log, items) in datasets.items():
            cfg = _base_config(broker, f"bench-sem-{name}.", workdir / f"sem-{name}")
            cfg.simulator.events = events
            source_events = list(open_source(cfg, log=log, items=items).events)
            titles: dict[str, str] = {}
            examples, figures = _joined_with_semantics(cfg, source_events, titles)
            examples = impression_order(examples)
            row = {
                "figures": figures,
                "livectr_off": livectr_seeds(cfg, examples, semantics=False, seeds=seeds),
                "livectr_on": livectr_seeds(cfg, examples, semantics=True, seeds=seeds),
                "livectr_on_gate_free": livectr_seeds(_gate_free(cfg), examples, semantics=True, seeds=seeds),
                "vw": vw_scores(examples, None),
                "vw_title_words": vw_scores(examples, titles),
            }
            for policy, fn in (("fake_negative", True), ("wait", False)):
                for sem in ("off", "on"):
                    row[f"serving_{policy}_{sem}"] = livectr_seeds(cfg, examples, sem == "on", seeds, fake_negative=fn)
            res[name] = row
    return res


def _print_pipeline(r: dict[str, Any]) -> None:
    print(f"\n== pipeline ({r['events']:,} synthetic events; {r['examples']:,} examples) ==")
    rows = [
        ("produce (events/s)", r["produce_events_per_s"], ""),
        ("consume+decode ceiling (msg/s)", r["ceiling_msgs_per_s"], ""),
        ("join (events/s)", r["join_events_per_s"], f"{r['join_ratio']:.2f} × ceiling (target ≥ 0.6)"),
        ("learner, semantics on (examples/s)", r["learner_examples_per_s"], "target ≥ 50,000"),
        ("learner, semantics off (examples/s)", r["learner_examples_per_s_no_semantics"], ""),
        ("end to end, semantics on (events/s)", r["e2e_events_per_s_semantics_on"], "target ≥ 20,000"),
        ("end to end, semantics off (events/s)", r["e2e_events_per_s_semantics_off"], ""),
    ]
    for label, value, note in rows:
        print(f"  {label:<40} {value:>12,.0f}  {note}")
    for order, prefix in (("impression order", ""), ("arrival order", "arrival_")):
        print(f"  progressive AUC, {order}:")
        print(
            f"    {'livectr (semantics on)':<38} {r[prefix + 'livectr_auc']:>12.4f}  "
            f"{r[prefix + 'livectr_auc'] - r[prefix + 'vw_auc']:+.4f} vs VW (target ≥ 0)"
        )
        print(f"    {'livectr (semantics off)':<38} {r[prefix + 'livectr_auc_no_semantics']:>12.4f}")
        print(f"    {'Vowpal Wabbit':<38} {r[prefix + 'vw_auc']:>12.4f}")
    print("  serving AUC (score at impression time, train each label when decided; same examples):")
    for policy in ("wait", "fake_negative"):
        print(
            f"    {'livectr / VW, policy ' + policy:<38} {r['serving_livectr_auc_' + policy]:>12.4f}"
            f"  / {r['serving_vw_auc_' + policy]:.4f}"
        )
    for s in ("on", "off"):
        print(
            f"  {'end to end AUC / freshness p50, p99 (' + s + ')':<40} {r[f'e2e_auc_semantics_{s}']:>12.4f}"
            f"  {r[f'e2e_freshness_p50_s_semantics_{s}']:.2f} s, {r[f'e2e_freshness_p99_s_semantics_{s}']:.2f} s"
        )
        print(
            f"  {'end to end serving AUC (' + s + ')':<40} {r[f'e2e_serving_auc_semantics_{s}']:>12.4f}"
            f"  over {r[f'e2e_serving_impressions_semantics_{s}']:,} sampled impressions, each scored at its own time"
        )


def _print_semantic(res: dict[str, Any]) -> None:
    for name, row in res.items():
        f = row["figures"]
        on, off, vwt = row["livectr_on"], row["livectr_off"], row["vw_title_words"]
        print(
            f"\n== semantics: {name} ({f['examples']:,} examples; livectr: mean ± sd over {on['seeds']} seeds;"
            f" cold start = an item's first {COLD_FIRST_N} impressions, new items = first seen after"
            f" {WARMUP_FRACTION:.0%} of the stream: {on['cold_new_impressions']:,.0f} impressions) =="
        )
        print(f"  {'learner':<30} {'AUC':>15} {'cold-start AUC':>15} {'cold, new items':>15}")
        for key, label in (
            ("livectr_off", "livectr, semantics off"),
            ("livectr_on", "livectr, semantics on"),
            ("livectr_on_gate_free", "livectr, sem. on, gate cost 0"),
            ("vw", "VW (FTRL, u×i)"),
            ("vw_title_words", "VW + title words"),
        ):
            r = row[key]
            cells = [
                f"{r[k]:.4f}" + (f"±{r[k + '_std']:.4f}" if k + "_std" in r else "")
                for k in ("auc", "cold_auc", "cold_new_auc")
            ]
            print(f"  {label:<30} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}")
        print(
            f"  lift on−off: overall {on['auc'] - off['auc']:+.4f}, cold start {on['cold_auc'] - off['cold_auc']:+.4f},"
            f" cold new items {on['cold_new_auc'] - off['cold_new_auc']:+.4f};"
            f" on − VW+title words: {on['auc'] - vwt['auc']:+.4f}"
        )
        print(
            f"  learner speed on these examples (vectors attached): semantics on {on['examples_per_s']:,.0f},"
            f" off {off['examples_per_s']:,.0f} examples/s"
        )
        free = row["livectr_on_gate_free"]
        print(
            f"  gate usage {on.get('gate_usage', float('nan')):.3f}, compute saved {on.get('gate_compute_saved', float('nan')):.3f}"
            f" (gate cost 0: usage {free.get('gate_usage', float('nan')):.3f}, saved"
            f" {free.get('gate_compute_saved', float('nan')):.3f}),"
            f" items cold-started from FAISS neighbours {on.get('items_cold_started', 0)}"
        )
        print("  serving order (each impression scored at its time, labels trained when decided), livectr:")
        for policy in ("fake_negative", "wait"):
            for sem in ("off", "on"):
                r = row[f"serving_{policy}_{sem}"]
                cells = [f"{r[k]:.4f}±{r[k + '_std']:.4f}" for k in ("auc", "cold_auc", "cold_new_auc")]
                print(
                    f"    {'policy ' + policy + ', semantics ' + sem:<28} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}"
                )
            on_, off_ = row[f"serving_{policy}_on"], row[f"serving_{policy}_off"]
            print(
                f"    lift ({policy}): overall {on_['auc'] - off_['auc']:+.4f}, cold start"
                f" {on_['cold_auc'] - off_['cold_auc']:+.4f}, cold new items {on_['cold_new_auc'] - off_['cold_new_auc']:+.4f}"
            )
        print(
            f"  cache lookup p50 {f['lookup_p50_ns']:.0f} ns, p99 {f['lookup_p99_ns']:.0f} ns; miss rate {f['miss_rate']:.4f};"
            f" refresh {f['refresh_texts_per_s'] or float('nan'):.0f} texts/s; bytes per example"
            f" {f['bytes_per_example_total']:.0f} (semantic part {f['bytes_per_example_semantic']})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "pipeline", "semantic"], default="all")
    parser.add_argument("--events", type=int, default=600_000, help="synthetic events of the pipeline part")
    parser.add_argument("--semantic-events", type=int, default=300_000, help="synthetic events of the semantic part")
    parser.add_argument("--seeds", type=int, default=3, help="model seeds averaged in the semantic part's AUC table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "results.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count()}, "started": time.time()}
    with tempfile.TemporaryDirectory(prefix="livectr-bench-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "pipeline"):
            results["pipeline"] = pipeline_part(args.events, work)
            _print_pipeline(results["pipeline"])
        if args.part in ("all", "semantic"):
            results["semantic"] = semantic_part(args.semantic_events, work, args.seeds)
            _print_semantic(results["semantic"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
