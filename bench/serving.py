"""Serving-order quality: livectr against Vowpal Wabbit fed the same label timing, per policy.

    python bench/serving.py                         # synthetic and ml-100k, every policy, 3 seeds
    python bench/serving.py --datasets ml-100k --policies defer --seeds 1
    python bench/serving.py --datasets suits   # item texts that say whom each item suits (bench/suits.py)

The joined examples (with the teacher's vectors) are built once per data set through the real
pipeline (publish → refresher → join with the cache client) and cached under ``bench/out``.
Then, for each labelling policy, the same examples are replayed in event time as a live system
sees them: each impression is scored at its own time by the model as it stands then, and each
label trains when the policy decides it. livectr and VW see exactly the same schedule; each
uses the policy's importance weights. Reported per policy: AUC and log loss of the serving
scores against the final labels, cold-start AUC, livectr with semantics on and off (mean over
seeds), and on the synthetic stream the oracle (the simulator's true click probabilities).

Policies: ``wait`` (label at the click or when the window closes), ``delayed`` (every label at
``ts + W``: what a batch pipeline delivers), ``fake-negative`` (a negative at once, a positive
copy at the click; Ktena et al. 2019), ``defer`` (the label observed after a short waiting
window, and the true label again later; Gu et al. 2021), with livectr's default choice of real
negatives (``learner.real_negatives``), and ``defer-all`` (the paper's: every real negative).
``instant`` is a reference, not a policy: every label known right after its own impression (the
impression order of the README's reference figures, on the same schedule machinery).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED, base_config, cold_mask, impression_order, joined_with_semantics  # noqa: E402
from vw_baseline import exact_auc, logloss  # noqa: E402

from livectr.core.broker import EmbeddedBroker  # noqa: E402
from livectr.core.config import Config  # noqa: E402
from livectr.core.events import (  # noqa: E402
    KIND_DEFER_OBSERVED,
    KIND_DEFER_TRUE,
    KIND_FAKE_NEGATIVE,
    KIND_FINAL,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    Example,
    ExampleBatch,
    Item,
    decode_example,
    encode_example,
)
from livectr.learner.defer_hold import ClickDelays  # noqa: E402
from livectr.learner.online import OnlineLearner, real_negative_share  # noqa: E402
from livectr.simulators.sources import open_source  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
#: Version of the cached examples' content: a cache of another version is rebuilt. 2: examples
#: carry their item's words (``Example.item_words``, from the refresher through the join).
EXAMPLE_FORMAT = 2
POLICIES = ("wait", "delayed", "fake-negative", "defer", "defer-all", "defer-hold", "instant")
#: One entry of a schedule: (event time, 0 = score / 1 = train, impression index, example to train on).
Entry = tuple[float, int, int, Example | None]


# -- data -------------------------------------------------------------------------------------


def load_examples(name: str, events: int, workdir: Path) -> tuple[list[Example], dict[str, str], np.ndarray | None]:
    """The joined examples of ``name`` in impression order, the item texts, and (synthetic) the oracle.

    Built once through the real pipeline, then read from ``bench/out`` — rebuilt when the
    cache is of another :data:`EXAMPLE_FORMAT` (what the pipeline puts on an example changed).
    """
    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-{events}" if name == "synthetic" else name
    cache, meta = OUT / f"examples-{tag}.msgpack", OUT / f"examples-{tag}.json"
    info = json.loads(meta.read_text()) if meta.exists() else {}
    if cache.exists() and info.get("format") == EXAMPLE_FORMAT:
        examples = decode_example(cache.read_bytes()).examples
        oracle = np.asarray(info["oracle"]) if info.get("oracle") is not None else None
        return examples, info["titles"], oracle
    from livectr.simulators.ml100k import convert_ml100k

    if name == "synthetic":
        log, items = None, None
    elif name == "suits":
        from suits import generate

        log, items = generate(workdir / "suits")
    else:
        log, items = convert_ml100k(SHARED, workdir / "ml-100k")
    data_dir = workdir / f"serving-{name}"
    # A fresh broker each build: a data dir left by an earlier build holds join checkpoints of
    # topics that no longer exist, and a join resuming from them would skip the new ones.
    shutil.rmtree(data_dir, ignore_errors=True)
    with EmbeddedBroker() as broker:
        cfg = base_config(broker, f"serving-{name}.", data_dir)
        cfg.learner.word_buckets = 1 << 20  # examples carry item words (whatever the run's --set says)
        cfg.simulator.events = events
        source = open_source(cfg, log=log, items=items)
        source_events = list(source.events)
        titles: dict[str, str] = {ev.item_id: ev.text for ev in source_events if type(ev) is Item}
        examples, _ = joined_with_semantics(cfg, source_events, {})
    if not examples:
        raise SystemExit(f"building the {name} examples produced none (see the log above); nothing cached")
    examples = impression_order(examples)
    oracle = None
    if source.truth is not None:
        oracle = np.asarray([source.truth.oracle(ex.impression_id) for ex in examples])
    cache.write_bytes(encode_example(ExampleBatch(examples)))
    info = {"format": EXAMPLE_FORMAT, "titles": titles, "oracle": None if oracle is None else oracle.tolist()}
    meta.write_text(json.dumps(info))
    return examples, titles, oracle


# -- schedules --------------------------------------------------------------------------------


def schedule(examples: list[Example], policy: str, window_s: float, wait_s: float) -> list[Entry]:
    """What a live system does under ``policy``, in event time: score each impression at its time,
    train each label when the policy decides it. At equal times scores come first."""
    out: list[Entry] = []
    add = out.append
    for k, ex in enumerate(examples):
        add((ex.ts, 0, k, None))
        click = ex.ts + max(ex.click_delay, 0.0)
        final = msgspec.structs.replace(ex, kind=KIND_FINAL)
        if policy == "wait":
            add((click if ex.label else ex.ts + window_s, 1, k, final))
        elif policy == "instant":  # reference: every label known right after its impression
            add((ex.ts, 1, k, final))
        elif policy == "delayed":
            add((ex.ts + window_s, 1, k, final))
        elif policy == "fake-negative":
            add((ex.ts, 1, k, msgspec.structs.replace(ex, label=0, kind=KIND_FAKE_NEGATIVE)))
            if ex.label:
                add((click, 1, k, msgspec.structs.replace(ex, label=1, kind=KIND_POSITIVE_COPY)))
        elif policy in ("defer", "defer-hold"):
            # defer-hold: the paper's timing, every observed label (and an early click's true
            # copy) held until the waiting window ends; defer: an early click leaves at once.
            early = bool(ex.label) and ex.click_delay <= wait_s
            observed = msgspec.structs.replace(ex, label=int(early), kind=KIND_DEFER_OBSERVED)
            seen = ex.ts + wait_s if policy == "defer-hold" or not early else click
            add((seen, 1, k, observed))
            true = msgspec.structs.replace(ex, kind=KIND_DEFER_TRUE)
            add((seen if early else click if ex.label else ex.ts + window_s, 1, k, true))
        else:
            raise ValueError(f"unknown policy {policy!r}")
    out.sort(key=lambda e: (e[0], e[1]))
    return out


# -- learners ---------------------------------------------------------------------------------


def livectr_serving(cfg: Config, examples: list[Example], plan: list[Entry], inline: bool = True) -> np.ndarray:
    """livectr's serving scores on ``plan``.

    ``inline``: each impression rides in the training batch at its place as a score request
    (scored with every label decided before it, never trained on) — what the learner does live;
    otherwise it is scored before the batch that holds the labels decided before it is trained.
    """
    learner = OnlineLearner(cfg)
    scores = np.zeros(len(examples))
    size = cfg.learner.batch_size
    if inline:
        batch: list[Example] = []
        where: list[int] = []
        for _, what, k, ex in plan:
            if what == 0:
                batch.append(msgspec.structs.replace(examples[k], kind=KIND_SCORE_REQUEST, label=0))
                where.append(k)
            else:
                assert ex is not None
                batch.append(ex)
                where.append(-1)
            if len(batch) >= size:
                _learn_inline(learner, batch, where, scores)
                batch, where = [], []
        if batch:
            _learn_inline(learner, batch, where, scores)
        return scores
    pending: list[int] = []
    train: list[Example] = []
    for _, what, k, ex in plan:
        if what == 0:
            pending.append(k)
            continue
        assert ex is not None
        train.append(ex)
        if len(train) >= size:
            if pending:
                scores[pending] = learner.predict_batch(
                    [msgspec.structs.replace(examples[j], kind=KIND_SCORE_REQUEST, label=0) for j in pending]
                )
                pending = []
            learner.learn_batch(train)
            train = []
    if pending:
        scores[pending] = learner.predict_batch(
            [msgspec.structs.replace(examples[j], kind=KIND_SCORE_REQUEST, label=0) for j in pending]
        )
    return scores


def _learn_inline(learner: OnlineLearner, batch: list[Example], where: list[int], scores: np.ndarray) -> None:
    probs = learner.learn_batch(batch)["predictions"]
    at = np.asarray(where)
    mask = at >= 0
    scores[at[mask]] = probs[mask]


def _vw_line(ex: Example, label: int, weight: float, titles: dict[str, str] | None) -> str:
    from vw_baseline import vw_line

    line = vw_line(msgspec.structs.replace(ex, label=label), titles)
    head, _, rest = line.partition(" |")
    return f"{head} {weight:.6g} |{rest}"


def vw_serving(
    examples: list[Example],
    plan: list[Entry],
    wait_s: float,
    titles: dict[str, str] | None = None,
    real_negatives: str = "all",
) -> np.ndarray:
    """VW (logistic, FTRL, user×item; with ``titles`` also title words × user) on the same plan,
    each example weighted as its policy prescribes (the same formulas as livectr's loss)."""
    from vowpalwabbit import Workspace

    args = "--loss_function logistic --link logistic --ftrl -b 22 -q ui --quiet"
    if titles is not None:
        args += " -q ut"
    vw = Workspace(args)
    scores = np.zeros(len(examples))
    late, total = 1.0, 4.0  # the learner's DelayedShare prior
    fixed_share = real_negative_share(real_negatives)
    for _, what, k, ex in plan:
        if what == 0:
            scores[k] = vw.predict(_vw_line(examples[k], 0, 1.0, titles))
            continue
        assert ex is not None
        weight = 1.0
        if ex.kind in (KIND_FAKE_NEGATIVE, KIND_POSITIVE_COPY, KIND_DEFER_OBSERVED, KIND_DEFER_TRUE):
            p = vw.predict(_vw_line(ex, ex.label, 1.0, titles))
            if ex.kind in (KIND_FAKE_NEGATIVE, KIND_POSITIVE_COPY):
                weight = (1 + p) if ex.label else (1 - p) * (1 + p)
            else:
                s, r = late / total, (p if fixed_share is None else fixed_share)
                if (
                    ex.kind == KIND_DEFER_TRUE
                    and not ex.label
                    and zlib.crc32(ex.impression_id.encode(), 0x5EED) >= r * 2**32
                ):
                    continue  # a real negative left out, as livectr leaves it out
                z = 1 + p + r * (1 - p)
                weight = z / (2 - s) if ex.label else (1 - p) * z / (1 - p + p * s + r * (1 - p))
                if ex.kind == KIND_DEFER_TRUE and ex.label:
                    late, total = late + float(ex.click_delay > wait_s), total + 1.0
        vw.learn(_vw_line(ex, ex.label, weight, titles))
    vw.finish()
    return scores


# -- the table --------------------------------------------------------------------------------


def figures(y: np.ndarray, p: np.ndarray, cold: np.ndarray) -> dict[str, float]:
    return {"auc": exact_auc(y, p), "logloss": logloss(y, p), "cold_auc": exact_auc(y[cold], p[cold])}


def mean_over(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
    out["auc_std"] = float(np.std([r["auc"] for r in runs]))
    return out


def evaluate(
    cfg: Config,
    examples: list[Example],
    titles: dict[str, str],
    oracle: np.ndarray | None,
    policies: tuple[str, ...],
    seeds: int,
    inline: bool,
    log: Callable[[str], None],
    semantics: tuple[str, ...] = ("on", "off"),
    vw: bool = True,
) -> dict[str, Any]:
    y = np.asarray([ex.label for ex in examples], dtype=np.float64)
    cold = cold_mask(examples)
    # Semantics off as `--semantics off` runs: no refresher, so neither teacher vectors nor item words.
    plain = [msgspec.structs.replace(ex, item_sem=None, user_sem=None, item_words=None) for ex in examples]
    res: dict[str, Any] = {"examples": len(examples), "positives": int(y.sum())}
    if oracle is not None:
        res["oracle"] = figures(y, oracle, cold)
    base = cfg
    for policy in policies:
        row: dict[str, Any] = {}
        cfg = copy.deepcopy(base)
        if policy == "defer-all":  # the paper's DEFER: every real negative trained on
            cfg.learner.real_negatives = "all"
        timing = "defer" if policy == "defer-all" else policy
        plan = schedule(examples, timing, cfg.join.window_s, cfg.join.defer_wait_s)
        plain_plan = schedule(plain, timing, cfg.join.window_s, cfg.join.defer_wait_s)
        for sem in semantics:
            runs = []
            for seed in range(seeds):
                c = copy.deepcopy(cfg)
                c.learner.seed = seed
                c.semantic.enabled = sem == "on"
                t = time.perf_counter()
                scores = livectr_serving(
                    c, examples if sem == "on" else plain, plan if sem == "on" else plain_plan, inline
                )
                runs.append({**figures(y, scores, cold), "seconds": time.perf_counter() - t})
            row[f"livectr_{sem}"] = mean_over(runs)
            log(f"  {policy:<14} livectr semantics {sem}: {row[f'livectr_{sem}']['auc']:.4f}")
        if vw:
            wait, rate = cfg.join.defer_wait_s, cfg.learner.real_negatives
            row["vw"] = figures(y, vw_serving(examples, plan, wait, None, rate), cold)
            row["vw_title_words"] = figures(y, vw_serving(examples, plan, wait, titles, rate), cold)
            log(f"  {policy:<14} VW {row['vw']['auc']:.4f}, VW + title words {row['vw_title_words']['auc']:.4f}")
            hold = learner_wait(cfg, examples) if timing == "defer" and not wait else 0.0
            if hold:
                # livectr's learner waits ``hold`` before it trains an observed negative
                # (learner.defer_hold): VW fed the join's labels with that waiting window too.
                held_plan = schedule(examples, "defer", cfg.join.window_s, hold)
                row["hold_wait_s"] = hold
                row["vw_held"] = figures(y, vw_serving(examples, held_plan, hold, None, rate), cold)
                row["vw_title_words_held"] = figures(y, vw_serving(examples, held_plan, hold, titles, rate), cold)
                log(
                    f"  {policy:<14} with a {hold:.0f} s wait: VW {row['vw_held']['auc']:.4f}, "
                    f"VW + title words {row['vw_title_words_held']['auc']:.4f}"
                )
        res[policy] = row
    return res


def learner_wait(cfg: Config, examples: list[Example]) -> float:
    """The waiting window livectr's learner settles on for this stream (learner.defer_hold),
    from all of its clicks and impressions (``examples`` in impression order)."""
    delays = ClickDelays(cfg.join.window_s)
    delays.observe([msgspec.structs.replace(ex, kind=KIND_DEFER_TRUE) for ex in examples if ex.label])
    delays.impressions = float(len(examples))
    rows: dict[str, int] = {}
    users = np.fromiter((rows.setdefault(ex.user_id, len(rows) + 1) for ex in examples), np.int64, len(examples))
    delays.observe_users(users, np.fromiter((ex.ts for ex in examples), np.float64, len(examples)))
    return delays.wait(cfg.learner.defer_hold_error, cfg.learner.defer_hold_max_s)


def print_table(name: str, res: dict[str, Any]) -> None:
    print(f"\n== serving order: {name} ({res['examples']:,} impressions, {res['positives']:,} clicks) ==")
    print(f"  {'policy':<14} {'learner':<26} {'AUC':>8} {'log loss':>9} {'cold AUC':>9}")
    for policy in POLICIES:
        if policy not in res:
            continue
        for key, label in (
            ("livectr_on", "livectr, semantics on"),
            ("livectr_off", "livectr, semantics off"),
            ("vw", "VW"),
            ("vw_title_words", "VW + title words"),
            ("vw_held", "VW, livectr's wait"),
            ("vw_title_words_held", "VW + words, livectr's wait"),
        ):
            if key not in res[policy]:
                continue
            f = res[policy][key]
            print(f"  {policy:<14} {label:<26} {f['auc']:>8.4f} {f['logloss']:>9.4f} {f['cold_auc']:>9.4f}")
    if "oracle" in res:
        f = res["oracle"]
        print(
            f"  {'':<14} {'oracle (true probabilities)':<26} {f['auc']:>8.4f} {f['logloss']:>9.4f} {f['cold_auc']:>9.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000, help="synthetic events")
    ap.add_argument("--datasets", default="synthetic,ml-100k")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--semantics", default="on,off", help="livectr with semantics on, off or both")
    ap.add_argument("--no-vw", action="store_true", help="livectr only")
    ap.add_argument("--before-batch", action="store_true", help="score before each batch instead of inside it")
    ap.add_argument("--set", action="append", default=[], help="config override section.field=value (repeatable)")
    ap.add_argument("--out", type=Path, default=OUT / "serving.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/livectr-serving-bench"))
    args = ap.parse_args(argv)
    from livectr.core.config import apply_overrides

    results: dict[str, Any] = {}
    for name in args.datasets.split(","):
        if name == "ml-100k" and not SHARED.is_dir():
            print(f"skipping ml-100k: {SHARED} not found")
            continue
        examples, titles, oracle = load_examples(name, args.events, args.workdir)
        cfg = Config()
        cfg.learner.device = "cpu"
        apply_overrides(cfg, dict(kv.split("=", 1) for kv in args.set))
        print(f"{name}: {len(examples):,} examples", flush=True)
        results[name] = evaluate(
            cfg,
            examples,
            titles,
            oracle,
            tuple(args.policies.split(",")),
            args.seeds,
            not args.before_batch,
            lambda m: print(m, flush=True),
            tuple(args.semantics.split(",")),
            not args.no_vw,
        )
        print_table(name, results[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(results, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
