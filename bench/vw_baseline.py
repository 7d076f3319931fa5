"""Vowpal Wabbit baseline on exactly the examples livectr trains on, scored progressively.

VW is the classic strong online CTR learner: logistic loss, FTRL-Proximal, hashed features
with user×item quadratic interactions. Each example is predicted before it is learned, the
same progressive validation livectr's learner reports, so the two AUCs are comparable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from livectr.core.events import Example

_SAFE = re.compile(r"[\s|:]+")


def exact_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) AUC with ties averaged; nan when only one class is present."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = labels.sum(), (~labels).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks of ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _token(value: object) -> str:
    return _SAFE.sub("_", str(value))


def vw_line(ex: Example, title_words: Mapping[str, str] | None) -> str:
    """One VW text-format example: namespaces u (user), i (item), c (context), t (title words)."""
    label = "1" if ex.label else "-1"
    ctx = " ".join(f"{_token(k)}={_token(v)}" for k, v in ex.context.items())
    line = f"{label} |u u{_token(ex.user_id)} |i i{_token(ex.item_id)} |c {ctx}"
    if title_words is not None:
        words = title_words.get(ex.item_id, "")
        line += " |t " + " ".join(_token(w) for w in words.lower().split())
    return line


def vw_progressive(
    examples: Iterable[Example], title_words: Mapping[str, str] | None = None, bits: int = 22
) -> tuple[np.ndarray, np.ndarray]:
    """Predict-then-learn over ``examples``; returns (labels, predictions).

    With ``title_words`` the item's text words are a namespace of their own and are crossed with
    the user (``-q ut``), VW's usual way to let a user's taste reach words of unseen items.
    """
    from vowpalwabbit import Workspace

    args = f"--loss_function logistic --link logistic --ftrl -b {bits} -q ui --quiet"
    if title_words is not None:
        args += " -q ut"
    vw = Workspace(args)
    labels, preds = [], []
    for ex in examples:
        line = vw_line(ex, title_words)
        preds.append(vw.predict(line))
        vw.learn(line)
        labels.append(ex.label)
    vw.finish()
    return np.asarray(labels), np.asarray(preds, dtype=np.float64)
