"""livectr's benchmark: every figure in the README comes from one run of this script.

    python bench/bench.py                   # every part (~40 minutes here)
    python bench/bench.py --part serving    # quality in serving order, per policy, vs VW (bench/serving.py)
    python bench/bench.py --part pipeline   # throughput: join, learner, end to end; impression-order AUC vs VW
    python bench/bench.py --part semantic   # semantics off/on vs VW (± title words), impression order

Part "serving" (the headline): for the synthetic stream and MovieLens 100K, each impression is
scored at its own event time by the model as it stood then, and each label trains when the
labelling policy decides it; livectr (semantics on and off, several seeds) and Vowpal Wabbit see
exactly the same schedule and the same importance weights (see bench/serving.py).

Part "pipeline", on one synthetic stream published once to an embedded broker: the
consume-and-decode ceiling of confluent-kafka and the join worker's throughput on the same topics
(their ratio; target ≥ 0.6); the learner's examples/s on CPU (target ≥ 50,000); progressive AUC of
livectr and of VW on exactly those examples in impression order; end to end ``livectr run``
events/s (target ≥ 20,000) and its serving AUC.

Part "semantic", for the synthetic stream and MovieLens 100K: the same examples scored by livectr
with semantics off and on, VW, and VW with the item's title words, in impression order: overall
and cold-start AUC, livectr averaged over several model seeds; cache lookup latency, refresh
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
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving  # noqa: E402
from common import (  # noqa: E402
    COLD_FIRST_N,
    ROOT,
    SHARED,
    WARMUP_FRACTION,
    base_config,
    cold_mask,
    impression_order,
    joined_with_semantics,
    new_item_mask,
    read_examples,
)
from join_speed import ceiling  # noqa: E402
from vw_baseline import exact_auc, vw_progressive  # noqa: E402

from livectr.core import bus  # noqa: E402
from livectr.core.broker import EmbeddedBroker  # noqa: E402
from livectr.core.config import Config  # noqa: E402
from livectr.core.events import Example  # noqa: E402
from livectr.learner.online import OnlineLearner  # noqa: E402
from livectr.simulators.publish import publish  # noqa: E402
from livectr.simulators.sources import open_source  # noqa: E402
from livectr.streams.worker import run_join_worker  # noqa: E402


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


def livectr_seeds(cfg: Config, examples: list[Example], semantics: bool, seeds: int) -> dict[str, float]:
    """:func:`livectr_progressive` averaged over
    ``seeds`` model seeds, with the AUCs' spread.

    Why: the student's random initialisation and the gate's sampled decisions move its AUC by
    a few thousandths from one seed to the next — as much as some of the effects measured —
    so a single run cannot tell a lift from luck.
    """
    runs = []
    for seed in range(seeds):
        seeded = copy.deepcopy(cfg)
        seeded.learner.seed = seed
        runs.append(livectr_progressive(seeded, examples, semantics))
    out = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    for k in ("auc", "cold_auc", "cold_new_auc"):
        out[f"{k}_std"] = float(np.std([r[k] for r in runs]))
    out["seeds"] = seeds
    return out


def livectr_progressive(cfg: Config, examples: list[Example], semantics: bool) -> dict[str, float]:
    """Progressive (score, then train) pass of the student over ``examples``; AUCs and speed."""

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


def vw_scores(examples: list[Example], titles: dict[str, str] | None) -> dict[str, float]:
    y, p = vw_progressive(examples, titles)
    return _aucs(y, p, examples)


def pipeline_part(events: int, workdir: Path) -> dict[str, Any]:
    """Issue 2's figures."""
    res: dict[str, Any] = {"events": events}
    with EmbeddedBroker() as broker:
        cfg = base_config(broker, "bench-pipe.", workdir / "pipe")
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
            cfg = base_config(broker, f"bench-sem-{name}.", workdir / f"sem-{name}")
            cfg.simulator.events = events
            source_events = list(open_source(cfg, log=log, items=items).events)
            titles: dict[str, str] = {}
            examples, figures = joined_with_semantics(cfg, source_events, titles)
            examples = impression_order(examples)
            row = {
                "figures": figures,
                "livectr_off": livectr_seeds(cfg, examples, semantics=False, seeds=seeds),
                "livectr_on": livectr_seeds(cfg, examples, semantics=True, seeds=seeds),
                "livectr_on_gate_free": livectr_seeds(_gate_free(cfg), examples, semantics=True, seeds=seeds),
                "vw": vw_scores(examples, None),
                "vw_title_words": vw_scores(examples, titles),
            }
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
        print(
            f"  cache lookup p50 {f['lookup_p50_ns']:.0f} ns, p99 {f['lookup_p99_ns']:.0f} ns; miss rate {f['miss_rate']:.4f};"
            f" refresh {f['refresh_texts_per_s'] or float('nan'):.0f} texts/s; bytes per example"
            f" {f['bytes_per_example_total']:.0f} (semantic part {f['bytes_per_example_semantic']})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "serving", "pipeline", "semantic"], default="all")
    parser.add_argument("--events", type=int, default=600_000, help="synthetic events of the pipeline part")
    parser.add_argument("--semantic-events", type=int, default=300_000, help="synthetic events of the semantic part")
    parser.add_argument("--seeds", type=int, default=3, help="model seeds averaged in the semantic part's AUC table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "results.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count()}, "started": time.time()}
    with tempfile.TemporaryDirectory(prefix="livectr-bench-") as tmp:
        work = Path(tmp)
        if args.part in ("all", "serving"):  # the quality figures first: serving order, per policy
            serving_out = args.out.with_name("serving.json")
            serving.main(["--seeds", str(args.seeds), "--events", str(args.semantic_events), "--out", str(serving_out)])
            results["serving"] = json.loads(serving_out.read_text())
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
