"""User × item-word weights in the student (issue 13): the shared tokenizer and its stable hash,
what the weights learn, and item words travelling in snapshots and deltas to the scorer.

The join attaching an item's words is tested in test_join.py (the semantic join test)."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
import pytest
from test_delta_expiry import TTL, Replica, renamed
from test_vocab_bounds import make_cfg
from toyworld import ToyWorld

from livectr.core.config import Config
from livectr.core.events import KIND_FINAL, Example, Impression
from livectr.core.words import pack_words, tokenize, unpack_words, word_hash
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor

# -- the tokenizer ---------------------------------------------------------------------------


def test_tokens_are_lowercase_alphanumeric_distinct_and_capped() -> None:
    assert tokenize("The Usual Suspects (1995) — the BEST", 16) == ["the", "usual", "suspects", "1995", "best"]
    assert tokenize("a_b c-d e.f", 16) == ["a", "b", "c", "d", "e", "f"]
    assert tokenize("Crème brûlée für Zoë", 16) == ["crème", "brûlée", "für", "zoë"]
    assert tokenize("one two three four", 2) == ["one", "two"]
    assert tokenize("", 16) == [] and tokenize("!!! ---", 16) == []


def test_word_hashes_are_stable_across_processes() -> None:
    """crc32, never Python's salted hash: another interpreter (another PYTHONHASHSEED) agrees."""
    text = "Toy Story (1995) and friends"
    here = pack_words(text, 16)
    code = f"from livectr.core.words import pack_words; print(pack_words({text!r}, 16).hex())"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        )
        assert bytes.fromhex(out.stdout.strip()) == here
    assert word_hash("toy") == 0x6705A76E  # zlib.crc32(b"toy"): fixed forever, snapshots depend on it
    assert unpack_words(here).tolist() == [word_hash(t) for t in tokenize(text, 16)]
    assert unpack_words(None).size == 0


def test_malformed_word_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        unpack_words(b"\x01\x02\x03")


# -- what the weights learn ------------------------------------------------------------------


def _words_world(rng: np.random.Generator) -> tuple[list[Example], dict[str, str]]:
    """Users 0–39 click half of everything; user "fan" clicks exactly the items whose text says
    "zebra". Items z-new and q-new are seen by the others (same click rate), never by the fan."""
    texts = {f"z{k}": f"zebra story {k}" for k in range(10)}
    texts |= {f"q{k}": f"quiet story {k}" for k in range(10)}
    texts |= {"z-new": "zebra tale", "q-new": "quiet tale"}
    out: list[Example] = []
    ts = 0.0
    for _ in range(3):
        for item, text in texts.items():
            users = [f"u{u}" for u in rng.choice(40, 8, replace=False)]
            if not item.endswith("new"):
                users.append("fan")
            for user in users:
                ts += 1.0
                label = int(item.startswith("z")) if user == "fan" else int(rng.random() < 0.5)
                out.append(
                    Example(
                        f"e{len(out)}", ts, user, item, {}, label, KIND_FINAL, ts, 0.0, item_words=pack_words(text, 16)
                    )
                )
    order = rng.permutation(len(out))
    return [msgspec.structs.replace(out[k], ts=float(j), decided_at=float(j)) for j, k in enumerate(order)], texts


def _fan_gap(word_buckets: int) -> float:
    cfg = make_cfg(ttl=0.0)
    cfg.learner.word_buckets = word_buckets
    cfg.learner.fast_experts = False
    cfg.learner.batch_size = 64
    learner = OnlineLearner(cfg)
    examples, _ = _words_world(np.random.default_rng(5))
    for _ in range(2):
        for k in range(0, len(examples), 64):
            learner.learn_batch(examples[k : k + 64])
    serving = Predictor.for_serving(cfg, learner.state())
    z, q = serving.predict_batch(
        [Impression("a", 1e6, "fan", "z-new"), Impression("b", 1e6, "fan", "q-new")]  # impressions: no words on them
    )
    return float(z - q)


def test_a_user_who_clicks_a_word_ranks_an_unseen_item_with_it_higher() -> None:
    with_words, without = _fan_gap(1 << 12), _fan_gap(0)
    assert with_words > 0.15, with_words
    assert abs(without) < 0.05, without  # the ids alone cannot tell the two new items apart for the fan


# -- snapshots and deltas --------------------------------------------------------------------


def _with_words(examples: list[Example], tag: str) -> list[Example]:
    return [
        msgspec.structs.replace(ex, item_words=pack_words(f"{tag} {ex.item_id} w{ex.item_id[-1]}", 16))
        for ex in examples
    ]


def _impressions(examples: list[Example]) -> list[Impression]:
    return [Impression(ex.impression_id, ex.ts, ex.user_id, ex.item_id, ex.context) for ex in examples]


def test_item_words_survive_a_snapshot_and_the_scorer_scores_as_the_learner() -> None:
    cfg = make_cfg(ttl=0.0)
    cfg.learner.word_buckets = 1 << 12
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=30, items=20, seed=31)
    examples = _with_words(world.examples(1024), "alpha")
    for k in range(0, len(examples), 256):
        learner.learn_batch(examples[k : k + 256])
    state = learner.state()
    assert "words.items" in state.arrays
    restored = Predictor.for_serving(cfg, state)
    feat, back = learner.featurizer, restored.featurizer
    rows = np.asarray([feat.items.row(ex.item_id) for ex in examples[:50]])
    np.testing.assert_array_equal(back.item_words[rows], feat.item_words[rows])
    assert (feat.item_words[rows] != 0).sum(axis=1).min() >= 3  # every item kept its words
    imps = _impressions(examples[:200])
    want = Predictor.for_serving(cfg, learner.state()).predict_batch(imps)
    np.testing.assert_allclose(restored.predict_batch(imps), want, rtol=1e-5, atol=1e-6)
    off = Predictor.for_serving(cfg, state)
    off.featurizer.item_words[:] = 0  # the words matter to the served score
    assert np.abs(off.predict_batch(imps) - want).max() > 1e-3


def test_deltas_carry_item_words_and_reused_rows_take_the_new_items_words() -> None:
    cfg: Config = make_cfg()  # TTL 100 s
    cfg.learner.word_buckets = 1 << 12
    r = Replica(cfg)
    world = ToyWorld(users=40, items=20, seed=32)
    old = _with_words(renamed(world.examples(512), 0.0, "old-"), "old")
    r.learner.learn_batch(old)
    r.sync()
    feat, rep = r.learner.featurizer, r.replica.featurizer
    n = feat.items.high_water
    np.testing.assert_array_equal(rep.item_words[:n], feat.item_words[:n])
    # Much later a new population: the old items expire, new ones reuse their rows with other words.
    new = _with_words(renamed(ToyWorld(users=10, items=5, seed=33).examples(256), 10 * TTL, "new-"), "new")
    r.learner.learn_batch(new)
    r.sync()
    n = feat.items.high_water
    np.testing.assert_array_equal(rep.item_words[:n], feat.item_words[:n])
    live = {row for _, row in feat.items.items()}
    freed = [row for row in range(1, n) if row not in live]
    assert freed and not feat.item_words[freed].any()  # expired items left no words behind
    new_rows = [feat.items.row(ex.item_id) for ex in new[:5]]
    assert (feat.item_words[new_rows, 0] == word_hash("new")).all()  # a reused row holds its new item's words
    want, got = r.served([ex.user_id for ex in new[:40]], [ex.item_id for ex in new[:40]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_words_on_most_items_are_left_out() -> None:
    """A word on more than ``max_word_share`` of the items (``a`` on every templated text) would be
    a second copy of the user's bias; it is dropped once enough items are counted."""
    cfg = make_cfg(ttl=0.0)
    cfg.learner.word_buckets = 1 << 12
    cfg.learner.max_word_share = 0.5
    learner = OnlineLearner(cfg)
    examples = [
        Example(f"e{k}", float(k), "u", f"i{k}", {}, 0, KIND_FINAL, float(k), 0.0, item_words=pack_words(f"a x{k}", 16))
        for k in range(300)
    ]
    learner.learn_batch(examples[:50])  # fewer than 100 items counted: every word kept
    learner.learn_batch(examples[50:])
    feat = learner.featurizer
    last = feat.item_words[feat.items.row("i299")]
    assert word_hash("x299") in last and word_hash("a") not in last
    first = feat.item_words[feat.items.row("i0")]  # stored before 100 items were counted: kept
    assert word_hash("a") in first
    assert Predictor(cfg, learner.state()).featurizer.word_counts[-1] == 300  # counts survive a snapshot
