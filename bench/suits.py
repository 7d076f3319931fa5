"""A recorded-log stream whose item texts say whom each item suits ("audience" stream).

    python bench/suits.py --out /tmp/suits      # writes events.csv.gz and items.csv.gz

Why: on such streams a linear model on the title words crossed with the user (VW ``-q ut``)
learns each user's audience within a few clicks, while a model that sees items only through a
reduced sentence vector must find the audience direction in it first. The synthetic stream's
words follow latent coordinates too weakly to show it and MovieLens titles hardly name their
audience, so this stream is kept beside them as a third bench data set (``bench/serving.py
--datasets suits``). Nothing in livectr reads it.

The world: users belong to one audience each (hidden); every item is made for one or two
audiences, said in its text with varied wording, plus a product noun and a filler sentence. A
click happens with probability ``sigmoid(b0 + lift·[user's audience among the item's] + item
bias + user bias)``, after a log-normal delay (median 20 s). Users and items are drawn with
Zipf-like activity and popularity, impressions at a steady rate.
"""

from __future__ import annotations

import argparse
import csv
import gzip
from pathlib import Path

import numpy as np

AUDIENCES = (
    "students",
    "new parents",
    "retirees",
    "gamers",
    "runners",
    "home cooks",
    "frequent travellers",
    "musicians",
    "gardeners",
    "software developers",
    "painters",
    "dog owners",
)
NOUNS = ("backpack", "lamp", "headset", "water bottle", "notebook", "jacket", "speaker", "mug", "chair", "watch")
TEMPLATES = (
    "A {noun} made for {aud}.",
    "This {noun} suits {aud} best.",
    "Designed with {aud} in mind: a {noun}.",
    "The {noun} that {aud} keep coming back to.",
    "Perfect for {aud}, this {noun} does the job.",
)
FILLER = (
    "Ships in two days.",
    "Available in three colours.",
    "Comes with a one-year warranty.",
    "Easy to clean.",
    "Light and sturdy.",
    "A customer favourite this season.",
)


def _audiences_text(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} and {names[1]}"


def generate(
    out: Path,
    users: int = 600,
    items: int = 1_200,
    impressions: int = 120_000,
    seed: int = 11,
    lift: float = 2.5,
    base_ctr: float = 0.04,
    rate_per_s: float = 2.0,
) -> tuple[Path, Path]:
    """Write the stream's events and items files under ``out``; returns their paths."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    user_aud = rng.integers(len(AUDIENCES), size=users)
    n_aud = rng.choice([1, 2], size=items, p=[0.6, 0.4])
    item_auds = [rng.choice(len(AUDIENCES), size=k, replace=False) for k in n_aud]
    suits = np.zeros((items, len(AUDIENCES)), dtype=bool)
    for i, a in enumerate(item_auds):
        suits[i, a] = True
    item_bias = rng.normal(0, 0.4, items)
    user_bias = rng.normal(0, 0.4, users)
    user_w = 1.0 / np.arange(1, users + 1) ** 0.6
    item_w = 1.0 / np.arange(1, items + 1) ** 0.8
    rng.shuffle(user_w)
    rng.shuffle(item_w)
    u = rng.choice(users, size=impressions, p=user_w / user_w.sum())
    it = rng.choice(items, size=impressions, p=item_w / item_w.sum())
    logit_wo_b0 = lift * suits[it, user_aud[u]] + item_bias[it] + user_bias[u]
    # Intercept for the target click rate, by bisection on the drawn impressions.
    lo, hi = -12.0, 4.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if (1 / (1 + np.exp(-(mid + logit_wo_b0)))).mean() < base_ctr:
            lo = mid
        else:
            hi = mid
    p = 1 / (1 + np.exp(-(lo + logit_wo_b0)))
    clicked = rng.random(impressions) < p
    t0 = 1_700_000_000.0
    ts = t0 + np.cumsum(rng.exponential(1.0 / rate_per_s, impressions))
    delay = np.exp(np.log(20.0) + 1.2 * rng.standard_normal(impressions))

    items_path, events_path = out / "items.csv.gz", out / "events.csv.gz"
    with gzip.open(items_path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "text", "ts"])
        for i in range(items):
            names = [AUDIENCES[a] for a in item_auds[i]]
            text = TEMPLATES[rng.integers(len(TEMPLATES))].format(
                noun=NOUNS[rng.integers(len(NOUNS))], aud=_audiences_text(names)
            )
            w.writerow([f"a{i}", f"{text} {FILLER[rng.integers(len(FILLER))]}", f"{t0 - 1:.3f}"])
    rows: list[tuple[float, int, list[str]]] = []
    for k in range(impressions):
        iid = f"s{k}"
        rows.append((ts[k], 0, [f"{ts[k]:.3f}", "impression", iid, f"v{u[k]}", f"a{it[k]}"]))
        if clicked[k]:
            rows.append((ts[k] + delay[k], 1, [f"{ts[k] + delay[k]:.3f}", "click", iid, "", ""]))
    rows.sort(key=lambda r: (r[0], r[1]))
    with gzip.open(events_path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "type", "impression_id", "user_id", "item_id"])
        for _, _, row in rows:
            w.writerow(row)
    return events_path, items_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--impressions", type=int, default=120_000)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    events, items = generate(args.out, impressions=args.impressions, seed=args.seed)
    print(f"wrote {events} and {items}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
