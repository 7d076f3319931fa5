"""What the scorer serves is what the learner measures (issue 13): item teacher vectors kept per
item row, in snapshots and deltas, and read by every score; no user profile at scoring time."""

from __future__ import annotations

import msgspec
import numpy as np
from test_delta_expiry import TTL, Replica, renamed
from test_vocab_bounds import make_cfg
from toyworld import ToyWorld

from livectr.core.events import KIND_DEFER_OBSERVED, KIND_SCORE_REQUEST, Example, Impression
from livectr.learner.item_vectors import DATA_KEY, PRESENT_KEY, ItemVectors
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor
from livectr.learner.vocab import UNKNOWN_ROW
from livectr.semantic_cache.codec import dequantize, to_bytes

DIM = 32


def _vec(seed: int) -> bytes:
    return to_bytes(np.random.default_rng(seed).normal(size=DIM))


def test_the_last_vector_of_a_row_wins_and_odd_or_unknown_ones_are_ignored() -> None:
    iv = ItemVectors(DIM)
    items = np.asarray([3, 5, 3, UNKNOWN_ROW, 7])
    iv.store(items, [_vec(1), _vec(2), _vec(3), _vec(4), b"\x01\x02"])
    vectors, present = iv.lookup(np.asarray([3, 5, 7, UNKNOWN_ROW, 99]))
    assert present.tolist() == [True, True, False, False, False]
    np.testing.assert_allclose(vectors[0], dequantize(_vec(3)), atol=1e-6)  # the later record of row 3
    np.testing.assert_allclose(vectors[1], dequantize(_vec(2)), atol=1e-6)
    assert not vectors[2:].any()
    iv.clear(np.asarray([3]))
    assert iv.lookup(np.asarray([3, 5]))[1].tolist() == [False, True]
    saved = iv.arrays(8)
    back = ItemVectors(DIM, saved[DATA_KEY], saved[PRESENT_KEY])
    np.testing.assert_array_equal(back.lookup(np.asarray([3, 5, 7]))[0], iv.lookup(np.asarray([3, 5, 7]))[0])
    assert back.lookup(np.asarray([3, 5, 7]))[1].tolist() == [False, True, False]


def _semantic_examples(n: int, seed: int) -> list[Example]:
    return ToyWorld(users=30, items=20, seed=seed).examples(n, with_sem=True)


def _impressions(examples: list[Example]) -> list[Impression]:
    return [Impression(ex.impression_id, ex.ts, ex.user_id, ex.item_id, ex.context) for ex in examples]


def test_a_served_example_is_scored_with_what_the_scorer_has() -> None:
    """The learner's own serving-order scores (score requests, defer's observed copies) read the
    item row's stored vector and no user profile: the scorer's score of the same impression is
    the same number. Training examples of the batch still teach their own vectors."""
    cfg = make_cfg(semantic=True, ttl=0.0)
    learner = OnlineLearner(cfg)
    examples = _semantic_examples(1024, 41)
    for k in range(0, len(examples), 256):
        learner.learn_batch(examples[k : k + 256])
    probe = examples[:100]
    requests = [msgspec.structs.replace(ex, kind=KIND_SCORE_REQUEST, label=0) for ex in probe]
    observed = [msgspec.structs.replace(ex, kind=KIND_DEFER_OBSERVED, label=0) for ex in probe]
    scorer = Predictor.for_serving(cfg, learner.state())
    served = scorer.predict_batch(_impressions(probe))
    np.testing.assert_allclose(learner.predict_batch(requests), served, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(learner.predict_batch(observed), served, rtol=1e-5, atol=1e-6)
    # A request's own vectors are not read: scrambled ones give the same scores.
    scrambled = [msgspec.structs.replace(ex, item_sem=_vec(k), user_sem=_vec(k + 1)) for k, ex in enumerate(requests)]
    np.testing.assert_allclose(learner.predict_batch(scrambled), served, rtol=1e-5, atol=1e-6)
    # Training examples do not read the user's profile either (``learner.user_profile_input``).
    others = [msgspec.structs.replace(ex, user_sem=_vec(k)) for k, ex in enumerate(probe)]
    np.testing.assert_allclose(learner.predict_batch(others), learner.predict_batch(probe), rtol=1e-5, atol=1e-6)
    # The stored vectors matter to the served score (they are not ignored altogether).
    blind = Predictor.for_serving(cfg, learner.state())
    blind.featurizer.item_vectors.present[:] = False
    assert np.abs(blind.predict_batch(_impressions(probe)) - served).max() > 1e-4


def test_a_request_is_scored_with_the_row_as_it_stood_and_then_teaches_the_row() -> None:
    """A new item's first request is scored without a vector (the scorer has none yet), whatever
    vector it carries; the learner then keeps that vector on the row, so later scores — and the
    scorer, after the next delta — have it. Scoring alone (``predict_batch``) stores nothing."""
    cfg = make_cfg(semantic=True, ttl=0.0)
    learner = OnlineLearner(cfg)
    learner.learn_batch(_semantic_examples(512, 42))
    new = Example("n0", 1e6, "u1", "brand-new", {}, 0, KIND_SCORE_REQUEST, 1e6, -1.0, _vec(9), None)
    bare = msgspec.structs.replace(new, item_sem=None)
    np.testing.assert_allclose(learner.predict_batch([new]), learner.predict_batch([bare]), rtol=1e-6)
    assert learner.featurizer.items.row("brand-new") == UNKNOWN_ROW  # scoring neither grows nor stores
    learner.learn_batch([new])  # as the join sends it: scored in the batch, not trained on
    feat = learner.featurizer
    row = feat.items.row("brand-new")
    assert row != UNKNOWN_ROW
    vectors, present = feat.item_vectors.lookup(np.asarray([row]))
    assert present[0]
    np.testing.assert_allclose(vectors[0], dequantize(_vec(9)), atol=1e-6)
    assert np.abs(learner.predict_batch([new]) - learner.predict_batch([bare])).max() < 1e-6  # the row's, not its own


def test_item_vectors_survive_a_snapshot_and_travel_in_deltas_with_expiry() -> None:
    r = Replica(make_cfg(semantic=True))  # TTL 100 s
    old = renamed(_semantic_examples(512, 43), 0.0, "old-")
    r.learner.learn_batch(old)
    r.sync()
    feat, rep = r.learner.featurizer, r.replica.featurizer
    n = feat.items.high_water
    assert feat.item_vectors.present[1:n].all()
    np.testing.assert_array_equal(rep.item_vectors.data[:n], feat.item_vectors.data[:n])
    restored = Predictor.for_serving(r.learner.cfg, r.learner.state()).featurizer
    np.testing.assert_array_equal(restored.item_vectors.data[:n], feat.item_vectors.data[:n])
    np.testing.assert_array_equal(restored.item_vectors.present[:n], feat.item_vectors.present[:n])
    # Much later a new population: the old items expire and their rows forget their vectors.
    new = renamed(ToyWorld(users=10, items=5, seed=44).examples(256, with_sem=True), 10 * TTL, "new-")
    new = [msgspec.structs.replace(ex, item_sem=None) for ex in new]  # these items have no vector yet
    r.learner.learn_batch(new)
    r.sync()
    n = feat.items.high_water
    np.testing.assert_array_equal(rep.item_vectors.present[:n], feat.item_vectors.present[:n])
    assert not feat.item_vectors.present[1:n].any()  # expired rows, reused by items without vectors
    want, got = r.served([ex.user_id for ex in new[:40]], [ex.item_id for ex in new[:40]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_an_item_first_seen_in_a_served_copy_is_still_cold_started() -> None:
    """Under ``defer`` an item's first example is the served (observed) copy, scored from the row
    as it stood — without a vector; the cold-start initialisation still finds the vector it
    brought (it fails if it reads the served inputs)."""
    cfg = make_cfg(semantic=True, ttl=0.0)
    cfg.learner.cold_start_min_count = 3
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=50, items=12, seed=2)
    for _ in range(10):
        learner.learn_batch(world.examples(256, items=np.arange(10)))
    before = learner.items_cold_started
    new = Example("n", 0.0, "u1", "brand-new", {}, 0, KIND_DEFER_OBSERVED, 0.0, -1.0, world.item_vectors[3].tobytes())
    learner.learn_batch([new])
    assert learner.items_cold_started == before + 1
    assert learner.cold_start is not None and "brand-new" in learner.cold_start.ids  # and it is indexed
