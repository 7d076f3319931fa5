"""Progressive validation under fake-negative labelling scores each impression exactly once."""

from __future__ import annotations

import numpy as np

from livectr.core.events import KIND_FAKE_NEGATIVE, KIND_FINAL, KIND_POSITIVE_COPY
from livectr.learner.metrics import DelayedLabelEvaluator, LearnerMetrics


def _feed(ev: DelayedLabelEvaluator, m: LearnerMetrics, rows: list[tuple[str, float, float, int, int]]) -> None:
    ids = [r[0] for r in rows]
    ev.observe(
        m,
        ids,
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
        np.array([r[3] for r in rows], dtype=np.float32),
        np.array([r[4] for r in rows]),
        np.zeros(len(rows), dtype=bool),
    )


def test_positive_copy_is_scored_with_the_fake_negatives_score() -> None:
    ev, m = DelayedLabelEvaluator(window_s=100, slack_s=0), LearnerMetrics()
    _feed(ev, m, [("a", 0.0, 0.9, 0, KIND_FAKE_NEGATIVE), ("b", 1.0, 0.1, 0, KIND_FAKE_NEGATIVE)])
    assert m.examples == 0 and len(ev) == 2
    # the model was pushed down on "a" meanwhile: its copy now scores 0.05, but 0.9 is what counts
    _feed(ev, m, [("a", 0.0, 0.05, 1, KIND_POSITIVE_COPY)])
    assert m.examples == 1 and m.positives == 1
    _feed(ev, m, [("c", 150.0, 0.5, 0, KIND_FAKE_NEGATIVE)])  # event time passes b's window
    assert m.examples == 2 and len(ev) == 1
    ev.flush(m)
    assert m.examples == 3 and m.positives == 1
    assert m.auc.value() == 1.0  # a (0.9, clicked) above b (0.1) and c (0.5)


def test_final_labels_pass_straight_through() -> None:
    ev, m = DelayedLabelEvaluator(window_s=100), LearnerMetrics()
    _feed(ev, m, [("a", 0.0, 0.7, 1, KIND_FINAL), ("b", 0.0, 0.2, 0, KIND_FINAL)])
    assert m.examples == 2 and len(ev) == 0


def test_positive_copy_ahead_of_its_fake_negative_waits_for_it() -> None:
    """The learner's shuffle can put a quick click's copy before its fake negative: still one evaluation."""
    ev, m = DelayedLabelEvaluator(window_s=100, slack_s=0), LearnerMetrics()
    _feed(ev, m, [("a", 0.0, 0.05, 1, KIND_POSITIVE_COPY), ("b", 0.0, 0.1, 0, KIND_FAKE_NEGATIVE)])
    assert m.examples == 0 and len(ev) == 2
    _feed(ev, m, [("a", 0.0, 0.9, 0, KIND_FAKE_NEGATIVE)])  # the fake negative's score counts, as clicked
    assert m.examples == 1 and m.positives == 1 and len(ev) == 1
    _feed(ev, m, [("c", 0.0, 0.6, 1, KIND_POSITIVE_COPY)])  # its fake negative never comes (a restart)
    ev.flush(m)
    assert m.examples == 3 and m.positives == 2 and len(ev) == 0
    assert m.auc.value() == 1.0  # a (0.9) and c (0.6), clicked, above b (0.1)


def test_a_copy_arriving_many_closures_late_is_not_evaluated_again() -> None:
    """A lagging partition's positive copy can reach the learner after hundreds of thousands of
    other impressions closed: it is still recognised as closed (older generations of closed ids
    are kept as hashes), so every impression counts once."""
    ev, m = DelayedLabelEvaluator(window_s=100, slack_s=0, memory=10, old_generations=20), LearnerMetrics()
    _feed(ev, m, [("lag", 0.0, 0.3, 0, KIND_FAKE_NEGATIVE)])
    # 150 more impressions close after it (15 generations of 10), the clock far past its window.
    _feed(ev, m, [(f"x{k}", 200.0 + k, 0.1, 0, KIND_FAKE_NEGATIVE) for k in range(150)])
    _feed(ev, m, [("z", 1000.0, 0.1, 0, KIND_FAKE_NEGATIVE)])
    assert m.examples == 151  # "lag" and every x closed once
    _feed(ev, m, [("lag", 0.0, 0.9, 1, KIND_POSITIVE_COPY)])  # its click, very late
    ev.flush(m)
    assert m.examples == 152 and ev.late == 1  # z at the flush; "lag" not again
