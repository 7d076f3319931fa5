"""Bounded learner memory (issue 14): expiry, admission, row reuse and snapshots with freed rows."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toyworld import ToyWorld

from livectr.core.config import Config, from_env
from livectr.core.events import KIND_FINAL, KIND_POSITIVE_COPY, Example
from livectr.learner.online import OnlineLearner
from livectr.learner.predictor import Predictor
from livectr.learner.snapshot import load_latest, publish_snapshot
from livectr.learner.sparse import INIT_STD
from livectr.learner.vocab import UNKNOWN_ROW, GrowingVocab


def make_cfg(semantic: bool = False, ttl: float = 100.0, admit: int = 1) -> Config:
    cfg = Config()
    cfg.semantic.enabled = semantic
    cfg.learner.device = "cpu"
    cfg.learner.batch_size = 256
    cfg.learner.context_buckets = 1 << 10
    cfg.learner.pair_buckets = 1 << 12
    cfg.learner.user_ttl_s = ttl
    cfg.learner.item_ttl_s = ttl
    cfg.learner.admit_min_count = admit
    return cfg


def at(examples: list[Example], ts: float, **change: object) -> list[Example]:
    return [msgspec.structs.replace(ex, ts=ts, decided_at=ts, **change) for ex in examples]


# -- the vocabulary on its own ----------------------------------------------------------------


def test_rows_unseen_for_the_ttl_expire_and_their_ids_become_unknown() -> None:
    v = GrowingVocab("user_id", initial_capacity=4, ttl_s=10.0)
    rows, new = v.lookup(["a", "b"], ts=np.array([0.0, 0.0]))
    assert rows.tolist() == [1, 2] and new.tolist() == [1, 2]
    v.lookup(["b"], ts=np.array([8.0]))
    freed, ids = v.expire(now=15.0, force=True)  # cutoff 5: a (seen at 0) goes, b (seen at 8) stays
    assert freed.tolist() == [1] and ids == ["a"]
    assert "a" not in v and v.row("a") == UNKNOWN_ROW and v.row("b") == 2
    assert v.lookup(["a"], grow=False)[0].tolist() == [UNKNOWN_ROW]
    assert len(v) == 2 and v.free_rows == 1 and v.expired_total == 1
    assert v.counts[1] == 0 and v.generation[1] == 1
    # the next new id takes the freed row instead of growing the table
    rows, new = v.lookup(["c"], ts=np.array([16.0]))
    assert rows.tolist() == [1] and new.tolist() == [1] and v.high_water == 3 and v.free_rows == 0
    # a ttl of 0 never expires anything
    keep = GrowingVocab("item_id", ttl_s=0.0)
    keep.lookup(["x"], ts=np.array([0.0]))
    assert keep.expire(now=1e12, force=True)[0].size == 0 and "x" in keep


def test_one_wild_timestamp_does_not_age_every_row() -> None:
    v = GrowingVocab("user_id", ttl_s=100.0)
    v.lookup(["a", "b", "c"], ts=np.array([0.0, 0.0, 0.0]))
    v.lookup(["d", "e", "f"], ts=np.array([10.0, 10.0, 4e9]))  # a year-2096 timestamp among them
    assert v.clock == 10.0 and v.expire(force=True)[0].size == 0
    v.lookup(["g"], ts=np.array([np.nan]))  # not a time: no clock move, never expires on its own
    assert v.clock == 10.0 and v.last_seen[v.row("g")] == 10.0


def test_sweeps_are_spaced_by_a_sixteenth_of_the_ttl() -> None:
    v = GrowingVocab("user_id", ttl_s=160.0)
    v.lookup(["a"], ts=np.array([0.0]))
    assert v.expire(now=1.0)[0].size == 0  # first sweep at 1: nothing stale; next one due at 11
    v.lookup(["b"], ts=np.array([1.0]))
    assert v.expire(now=170.0)[0].tolist() == [1, 2]
    v.lookup(["c"], ts=np.array([170.0]))
    assert v.expire(now=175.0)[0].size == 0  # not due before 180, even if something were stale


def test_admission_after_a_minimum_count_of_impressions() -> None:
    v = GrowingVocab("user_id", ttl_s=0.0, min_count=3)
    ts = np.array([0.0])
    assert v.lookup(["x"], ts=ts)[0].tolist() == [UNKNOWN_ROW]
    # copies (positive copies, score requests) do not count as impressions
    assert v.lookup(["x", "x"], ts=np.array([0.0, 0.0]), countable=np.array([False, False]))[0].tolist() == [0, 0]
    assert v.lookup(["x"], ts=ts)[0].tolist() == [UNKNOWN_ROW]
    rows, new = v.lookup(["y", "x", "y"], ts=np.array([0.0, 0.0, 0.0]))
    assert rows.tolist() == [0, 1, 0] and new.tolist() == [1]  # x's third impression admits it
    # several impressions in one call count together: all of them get the row
    rows, _ = v.lookup(["z", "z", "z"], ts=np.array([1.0, 1.0, 1.0]))
    assert rows.tolist() == [2, 2, 2]
    back = GrowingVocab.from_state(v.state(), arrays=v.arrays())
    assert back.min_count == 3 and back.lookup(["y"], ts=ts)[0].tolist() == [3]  # y's count survived


def test_changes_since_a_marker_list_assigned_and_freed_rows() -> None:
    v = GrowingVocab("item_id", ttl_s=10.0)
    v.lookup(["a", "b", "c"], ts=np.array([0.0, 0.0, 9.0]))
    m = v.marker()
    assert v.changes_since(m).assigned.size == 0
    v.expire(now=15.0, force=True)  # a and b go
    v.lookup(["d"], ts=np.array([15.0]))  # takes row 1
    changes = v.changes_since(m)
    assert changes.assigned.tolist() == [1] and changes.assigned_ids == ["d"] and changes.freed.tolist() == [2]
    assert changes.touched.tolist() == [1]
    m2 = v.marker()
    v.lookup(["c"], ts=np.array([16.0]))
    v.lookup(["c", "zz"], grow=False)  # serving lookups touch nothing
    changes = v.changes_since(m2)
    assert changes.assigned.size == 0 and changes.freed.size == 0 and changes.touched.tolist() == [3]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 30), min_size=1, max_size=12), st.floats(0.0, 8.0)),
        min_size=1,
        max_size=40,
    ),
    st.floats(1.0, 20.0),
    st.integers(1, 3),
)
def test_vocabulary_never_exceeds_its_bound_and_maps_ids_consistently(
    steps: list[tuple[list[int], float]], ttl: float, min_count: int
) -> None:
    """After each batch: the live ids are exactly the admitted ids seen within the ttl, the table
    never holds more rows than the most ids ever live at once (free rows are reused before it
    grows), and id ↔ row is a bijection that survives a snapshot round trip."""
    v = GrowingVocab("user_id", initial_capacity=2, ttl_s=ttl, min_count=min_count)
    last: dict[str, float] = {}
    seen: dict[str, int] = {}
    now, peak = 0.0, 0
    for ids, dt in steps:
        now += dt
        v.expire(now=now, force=True)
        for k in [k for k, t in last.items() if t < now - ttl]:
            del last[k]
        keys = [f"u{i}" for i in ids]
        rows, _ = v.lookup(keys, ts=np.full(len(keys), now))
        for k, r in zip(keys, rows.tolist()):
            seen[k] = seen.get(k, 0) + 1
            if r != UNKNOWN_ROW:
                last[k] = now
        peak = max(peak, len(v) - 1)
        live = dict(v.items())
        assert set(live) == set(last)  # expired ids are gone, recent admitted ones are there
        assert len(set(live.values())) == len(live) and all(v.id_of(r) == k for k, r in live.items())
        assert all(0 < r < v.high_water for r in live.values())
        assert v.high_water - 1 <= peak  # the bound: never more rows than ids live at once
        assert v.high_water <= v.capacity and len(v) - 1 + v.free_rows == v.high_water - 1
        for k, r in zip(keys, rows.tolist()):
            assert r == live.get(k, UNKNOWN_ROW)
            if min_count == 1:
                assert r != UNKNOWN_ROW
    back = GrowingVocab.from_state(v.state(), arrays=v.arrays())
    assert dict(back.items()) == dict(v.items()) and back.free_rows == v.free_rows
    new = [f"new{i}" for i in range(3)]
    ts = np.zeros(3) + now
    assert back.lookup(new * min_count, ts=np.tile(ts, min_count))[0].tolist() == (
        v.lookup(new * min_count, ts=np.tile(ts, min_count))[0].tolist()
    )


# -- the learner: rows reset on reuse, tables flat, snapshots --------------------------------


def test_a_reused_row_starts_fresh_everywhere() -> None:
    cfg = make_cfg(semantic=True, ttl=100.0)
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=20, items=10, seed=3)
    old = at(world.examples(256), 0.0, user_id="old-user", item_id="old-item", label=1)
    for _ in range(3):
        learner.learn_batch(old)
    users, items = learner.featurizer.users, learner.featurizer.items
    u, i = users.row("old-user"), items.row("old-item")
    d = learner.model.mc.embedding_dim
    assert learner.model.user_emb.weight[u, d] > 0 and users.counts[u] > 0
    assert learner.experts is not None and learner.experts.user_w[u] != 0
    assert learner.cold_start is not None and "old-item" in learner.cold_start.ids
    user_acc_before = learner.sparse_opt.accum["user"][u].clone()
    pair_before = learner.featurizer.pairs(np.array([u]), np.array([i]))

    assert learner.expire_rows(200.0, force=True) >= 2
    assert "old-user" not in users and "old-item" not in items
    assert "old-item" not in learner.cold_start.ids and "old-item" not in learner.cold_start.index
    for table, name, r in ((learner.model.user_emb, "user", u), (learner.model.item_emb, "item", i)):
        row = table.weight[r]
        assert row[d] == 0 and float(row[:d].abs().max()) < 6 * INIT_STD  # fresh: small random, wide 0
        torch.testing.assert_close(learner.sparse_opt.accum[name][r], learner.sparse_opt._init[name][0])
    assert not torch.equal(learner.sparse_opt.accum["user"][u], user_acc_before)
    assert learner.experts.user_w[u] == 0 and learner.experts.user_ts[u] == -np.inf
    assert learner.experts.slope_w[u] == 0 and learner.experts.slope_h[u] == learner.experts.slope_prior
    assert np.all(learner.experts.taste_w[u] == 0)
    assert users.counts[u] == 0 and users.generation[u] == 1

    capacity = learner.model.user_emb.num_embeddings
    fresh = at(world.examples(1), 201.0, user_id="new-user", item_id="new-item")
    learner.learn_batch(fresh)
    assert users.row("new-user") == u and items.row("new-item") == i  # the freed rows, reused
    assert learner.model.user_emb.num_embeddings == capacity
    assert learner.featurizer.pairs(np.array([u]), np.array([i])) != pair_before  # no inherited pair weight


def test_tables_stay_flat_under_a_rotating_population() -> None:
    cfg = make_cfg(ttl=50.0)
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=40, items=30, seed=4)
    sizes = []
    for step in range(40):  # every 10 s, 64 users none of whom come back
        batch = [
            msgspec.structs.replace(ex, user_id=f"g{step}-u{k % 64}", ts=10.0 * step, decided_at=10.0 * step)
            for k, ex in enumerate(world.examples(256))
        ]
        learner.learn_batch(batch)
        sizes.append((learner.model.user_emb.num_embeddings, learner.featurizer.users.high_water))
    assert learner.featurizer.users.expired_total > 30 * 64
    assert sizes[-1] == sizes[10]  # flat after warm-up
    assert len(learner.featurizer.users) - 1 <= 64 * 7  # only the users of the last ttl (+ a sweep's slack)


def test_pre_admission_ids_share_the_unknown_row_and_copies_do_not_admit() -> None:
    cfg = make_cfg(ttl=0.0, admit=2)
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=5, items=5, seed=5)
    ex = at(world.examples(1), 0.0, user_id="rare", item_id="rare-item", label=1)
    learner.learn_batch(ex + at(ex, 1.0, kind=KIND_POSITIVE_COPY))
    assert "rare" not in learner.featurizer.users and "rare-item" not in learner.featurizer.items
    d = learner.model.mc.embedding_dim
    assert learner.model.user_emb.weight[UNKNOWN_ROW, d] != 0  # the shared row learned from it
    assert learner.featurizer.users.counts[UNKNOWN_ROW] == 0
    assert learner.experts is not None and learner.experts.user_w[UNKNOWN_ROW] == 0  # no per-user state
    learner.learn_batch(at(ex, 2.0, kind=KIND_FINAL))  # the second impression admits it
    assert "rare" in learner.featurizer.users and "rare-item" in learner.featurizer.items


@pytest.mark.parametrize("admit", [1, 2])
def test_snapshot_round_trip_with_expired_rows(tmp_path, admit: int) -> None:
    cfg = make_cfg(semantic=True, ttl=100.0, admit=admit)
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=30, items=20, seed=6)
    for _ in range(4):
        learner.learn_batch(at(world.examples(256), 0.0))
    for step in range(4):  # users 0-14 stay active, the others expire
        recent = [e for e in world.examples(512) if int(e.user_id[1:]) < 15]
        learner.learn_batch(at(recent, 150.0 + step))
    users = learner.featurizer.users
    assert "u20" not in users and "u3" in users and users.free_rows > 0
    publish_snapshot(tmp_path, learner.state(), {"examples_seen": learner.examples_seen})
    loaded = load_latest(tmp_path)
    assert loaded is not None
    _, state = loaded

    resumed = OnlineLearner(cfg, state=state)
    assert dict(resumed.featurizer.users.items()) == dict(users.items())
    assert resumed.featurizer.users.free_rows == users.free_rows
    np.testing.assert_array_equal(resumed.featurizer.users.last_seen, users.last_seen)
    np.testing.assert_array_equal(resumed.featurizer.users.generation, users.generation)
    probe = at(world.examples(64), 160.0)
    np.testing.assert_allclose(resumed.predict_batch(probe), learner.predict_batch(probe), rtol=1e-5, atol=1e-6)
    # both assign the next new id the same (reused) row
    new = at(world.examples(admit), 161.0, user_id="brand-new")
    assert resumed.learn_batch(new) is not None and learner.learn_batch(new) is not None
    assert resumed.featurizer.users.row("brand-new") == users.row("brand-new") != UNKNOWN_ROW

    # serving: an expired user scores exactly like one never seen
    scorer = Predictor.for_serving(cfg, state)
    expired = at(world.examples(8, items=np.arange(5)), 160.0, user_id="u20")
    unknown = [msgspec.structs.replace(e, user_id="never-seen") for e in expired]
    np.testing.assert_array_equal(scorer.predict_batch(expired), scorer.predict_batch(unknown))
    live = [msgspec.structs.replace(e, user_id="u3") for e in expired]
    assert not np.array_equal(scorer.predict_batch(live), scorer.predict_batch(unknown))


def test_expiry_and_admission_are_configured_by_env_and_flags(monkeypatch) -> None:
    cfg = from_env({"LIVECTR_LEARNER__USER_TTL_S": "3600", "LIVECTR_LEARNER__ADMIT_MIN_COUNT": "3"})
    assert cfg.learner.user_ttl_s == 3600.0 and cfg.learner.admit_min_count == 3
    from livectr import cli

    args = cli.build_parser().parse_args(["learn", "--item-ttl-s", "60", "--admit-min-count", "2"])
    built = cli.build_config(args)
    assert built.learner.item_ttl_s == 60.0 and built.learner.admit_min_count == 2
    with pytest.raises(ValueError):
        GrowingVocab("user_id", min_count=0)


@pytest.mark.slow
def test_reduced_soak_is_flat_with_expiry_and_grows_without(tmp_path) -> None:
    """bench/soak.py at a reduced size (CI): table rows and snapshots flat after warm-up with
    expiry, growing with the population without it (sizes, not timings, are asserted)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import soak

    out = tmp_path / "soak.json"
    argv = ["--events", "40000", "--every", "8000", "--ttl-s", "20", "--warmup-ttls", "3"]
    argv += ["--user-lookback", "2000", "--item-lookback", "300", "--sem-dim", "8", "--out", str(out)]
    assert soak.main(argv) == 0
    import json

    ratios = json.loads(out.read_text())["ratios"]
    on = next(v for k, v in ratios.items() if k.startswith("expiry on"))
    off = ratios["expiry off (baseline)"]
    assert on["user_rows"]["ratio"] == 1.0 and on["live_users"]["ratio"] < 1.2
    assert on["snapshot_mb"]["ratio"] < 1.1
    assert off["live_users"]["ratio"] > 1.5 and off["snapshot_mb"]["late"] > on["snapshot_mb"]["late"]
