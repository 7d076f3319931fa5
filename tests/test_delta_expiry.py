"""Deltas carry expiries (issue 15): when the learner's vocabulary TTL frees user/item rows, the
delta says so, so a replica following deltas (a Kafka-only scorer) forgets the ids the learner
dropped, and a row reused by a new id is never scored with the old id's weights. Admission
(``admit-min-count``) and rows freed and reused within one delta are covered too.

The deltas here go through the real blob (build → bytes → parse → apply); their transport over
Kafka is tested in test_deltas.py."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from test_vocab_bounds import make_cfg  # the same bounded-vocabulary learner (TTL 100 s)
from toyworld import ToyWorld

from livectr.core.config import Config
from livectr.core.events import Example, Impression
from livectr.learner.deltas import TouchedRows, apply_delta, build_delta, parse_delta
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor
from livectr.learner.vocab import UNKNOWN_ROW

TTL = 100.0


def renamed(examples: list[Example], ts: float, prefix: str) -> list[Example]:
    """``examples`` at event time ``ts``, their user and item ids under ``prefix`` (a new population)."""
    return [
        msgspec.structs.replace(ex, ts=ts, decided_at=ts, user_id=prefix + ex.user_id, item_id=prefix + ex.item_id)
        for ex in examples
    ]


class Replica:
    """A learner with a serving replica that follows it by deltas only (as a Kafka-only scorer)."""

    def __init__(self, cfg: Config) -> None:
        self.learner = OnlineLearner(cfg)
        self.learner.touched = TouchedRows()
        self.replica = Predictor.for_serving(cfg, self.learner.state())
        self.seq = 0
        self.last_meta: dict[str, object] = {}

    def sync(self) -> None:
        assert self.learner.touched is not None
        self.seq += 1
        blob, self.last_meta = build_delta(self.learner, self.learner.touched, 1, self.seq)
        apply_delta(self.replica, parse_delta(blob))

    def served(self, users: list[str], items: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Scores of the learner's model as served (unknown rows as a scorer has them) and the replica's."""
        imps = [
            Impression(impression_id=str(k), ts=0.0, user_id=u, item_id=i)
            for k, (u, i) in enumerate(zip(users, items, strict=True))
        ]
        want = Predictor.for_serving(self.learner.cfg, self.learner.state()).predict_batch(imps)
        return want, self.replica.predict_batch(imps)


@pytest.mark.parametrize("admit", [1, 2])
def test_rows_the_learner_expires_are_dropped_on_the_replica(admit: int) -> None:
    r = Replica(make_cfg(admit=admit))
    world = ToyWorld(users=60, items=30, seed=21)
    old = renamed(world.examples(512), 0.0, "old-")
    for _ in range(2):
        r.learner.learn_batch(old)
    r.sync()
    users, items = r.learner.featurizer.users, r.learner.featurizer.items
    old_users = sorted({ex.user_id for ex in old if ex.user_id in users})
    old_items = sorted({ex.item_id for ex in old if ex.item_id in items})
    assert len(old_users) > 40 and all(u in r.replica.featurizer.users for u in old_users)

    # Much later, a small new population: every old row expires, a few are reused by new ids.
    small = ToyWorld(users=10, items=5, seed=22)
    new = renamed(small.examples(256), 10 * TTL, "new-")
    for _ in range(2):
        r.learner.learn_batch(new)
    assert all(u not in users for u in old_users) and all(i not in items for i in old_items)
    r.sync()
    assert r.last_meta["user_expired"] >= len(old_users) - 10  # type: ignore[operator]
    rep_users, rep_items = r.replica.featurizer.users, r.replica.featurizer.items
    assert [u for u in old_users if u in rep_users] == []  # nothing the learner dropped is kept
    assert [i for i in old_items if i in rep_items] == []
    assert sorted(k for k, _ in rep_users.items()) == sorted(k for k, _ in users.items())
    assert sorted(rep_items.items()) == sorted(items.items())
    hw = users.high_water
    np.testing.assert_array_equal(rep_users.generation[:hw], users.generation[:hw])  # reused rows: new generation
    np.testing.assert_array_equal(rep_users.counts[:hw], users.counts[:hw])
    # Old ids score as unknown on both sides; new ids on reused rows as the learner scores them.
    want, got = r.served(
        old_users[:20] + [ex.user_id for ex in new[:20]], old_items[:20] + [ex.item_id for ex in new[:20]]
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_row_freed_and_reused_within_one_delta_is_sent_once_under_its_new_id() -> None:
    r = Replica(make_cfg())
    world = ToyWorld(users=8, items=4, seed=23)
    r.learner.learn_batch(renamed(world.examples(128), 0.0, "a-"))
    r.sync()
    r.learner.learn_batch(renamed(world.examples(128), 2 * TTL, "b-"))  # a-* expire, b-* take their rows
    r.learner.learn_batch(renamed(world.examples(128), 4 * TTL, "c-"))  # b-* expire (touched, then freed), c-* reuse
    r.sync()
    users = r.learner.featurizer.users
    assert not any(k.startswith(("a-", "b-")) for k in r.replica.featurizer.users._row_of)
    assert sorted(r.replica.featurizer.users._row_of) == sorted(users._row_of)
    for key, row in users.items():
        assert r.replica.featurizer.users.row(key) == row
    keys = [ex.user_id for ex in renamed(world.examples(30), 0.0, "c-")]
    items = [ex.item_id for ex in renamed(world.examples(30), 0.0, "c-")]
    want, got = r.served(keys + ["a-u1", "b-u2"], items + ["a-i1", "b-i2"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_unknown_row_trained_under_admission_travels_without_an_id() -> None:
    r = Replica(make_cfg(admit=3))
    world = ToyWorld(users=400, items=200, seed=24)  # most ids stay below the admission count
    r.learner.learn_batch(renamed(world.examples(256), 0.0, ""))
    r.sync()
    assert "u1" not in r.learner.featurizer.users  # not admitted yet: trained on the shared row
    for mine, theirs in (
        (r.learner.model.user_emb, r.replica.model.user_emb),
        (r.learner.model.item_emb, r.replica.model.item_emb),
    ):
        np.testing.assert_allclose(theirs.weight[UNKNOWN_ROW].numpy(), mine.weight[UNKNOWN_ROW].numpy(), rtol=1e-6)
    want, got = r.served(["never-seen", "u1"], ["nothing", "i1"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
