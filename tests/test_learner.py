"""Unit tests of the learner's pure parts: vocabularies, model, trainer, metrics."""

from __future__ import annotations

import math
import zlib

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toyworld import ToyWorld

from livectr.core.config import Config
from livectr.core.events import (
    KIND_DEFER_OBSERVED,
    KIND_DEFER_TRUE,
    KIND_FAKE_NEGATIVE,
    KIND_FINAL,
    KIND_POSITIVE_COPY,
    KIND_SCORE_REQUEST,
    Example,
)
from livectr.learner.experts import FastExperts
from livectr.learner.features import Featurizer
from livectr.learner.metrics import HistogramAUC, LearnerMetrics, LogQuantiles, ServingEvaluator, WindowAUC, exact_auc
from livectr.learner.model import ModelConfig, StudentCTR
from livectr.learner.online import OnlineLearner, fake_negative_weights, loss_weights, real_negative_share
from livectr.learner.predictor import Predictor
from livectr.learner.vocab import UNKNOWN_ROW, ContextHasher, GrowingVocab, stable_bucket


def make_cfg(semantic: bool = True) -> Config:
    cfg = Config()
    cfg.semantic.enabled = semantic
    cfg.learner.device = "cpu"
    cfg.learner.batch_size = 256
    cfg.learner.context_buckets = 1 << 12
    return cfg


# -- vocabularies ---------------------------------------------------------------------------


def test_growing_vocab_assigns_stable_rows_and_doubles_capacity() -> None:
    v = GrowingVocab("item_id", initial_capacity=4)
    rows, new = v.lookup(["a", "b", "a"])
    assert rows.tolist() == [1, 2, 1] and new.tolist() == [1, 2]
    assert v.capacity == 4
    v.counts[1] = 7
    rows, new = v.lookup(["c", "d", "e", "b"])
    assert rows.tolist() == [3, 4, 5, 2] and new.tolist() == [3, 4, 5]
    assert v.capacity == 8 and v.counts[1] == 7  # doubled, counts preserved
    rows, new = v.lookup(["zz", "a"], grow=False)
    assert rows.tolist() == [UNKNOWN_ROW, 1] and new.size == 0 and "zz" not in v
    back = GrowingVocab.from_state(v.state(), v.counts)
    assert back.lookup(["e", "a"], grow=False)[0].tolist() == [5, 1] and back.counts[1] == 7


@given(st.lists(st.text(min_size=0, max_size=6), max_size=200))
def test_growing_vocab_is_a_bijection(keys: list[str]) -> None:
    v = GrowingVocab("user_id", initial_capacity=2)
    rows, _ = v.lookup(keys)
    assert len(set(rows.tolist())) == len(set(keys))
    assert all(v.id_of(int(r)) == k for r, k in zip(rows, keys))
    assert v.capacity >= len(v) and UNKNOWN_ROW not in rows.tolist()


def test_context_hasher_slots_missing_and_dropped_fields() -> None:
    h = ContextHasher(fields=2, buckets=1000)
    out = h.encode([{"device": "ios"}, {"device": "web", "hour": 3}, {"hour": 3, "extra": "x"}])
    assert h.slots == ["device", "hour"] and h.dropped == 1 and "extra" in h.dropped_names
    assert out[0, 0] == stable_bucket("device", "ios", 1000)
    assert out[0, 1] == stable_bucket("hour", "<missing>", 1000)  # absent field → its own "missing" bucket
    assert out[1, 1] == out[2, 1] == stable_bucket("hour", 3, 1000)
    again = ContextHasher.from_state(h.state()).encode([{"hour": 3, "device": "ios"}])
    assert again.tolist() == [[out[0, 0], out[1, 1]]]  # stable across instances (no salted hash)
    assert ContextHasher(2, 1000).encode([{"new": 1}], grow=False).shape == (1, 2)


def test_float_context_values_are_log_binned() -> None:
    assert stable_bucket("price", 10.01, 1 << 20) == stable_bucket("price", 10.02, 1 << 20)
    assert stable_bucket("price", 10.0, 1 << 20) != stable_bucket("price", 1000.0, 1 << 20)
    assert stable_bucket("price", math.nan, 97) == stable_bucket("price", math.inf, 97)


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from("abcdef"),
            st.one_of(st.integers(), st.text(max_size=3), st.floats(allow_nan=True), st.booleans()),
            max_size=6,
        ),
        max_size=30,
    )
)
def test_context_hasher_bounded_buckets(contexts: list[dict]) -> None:
    h = ContextHasher(fields=3, buckets=64)
    out = h.encode(contexts)
    assert out.shape == (len(contexts), 3) and ((out >= 0) & (out < 64)).all()
    assert (h.encode(contexts) == out).all()  # memoised path agrees with the computed one


# -- model ----------------------------------------------------------------------------------


def _inputs(featurizer: Featurizer, examples: list[Example]):
    return featurizer.encode(examples).to_inputs(torch.device("cpu"))


@pytest.mark.parametrize("semantic", [True, False])
def test_model_shapes(semantic: bool) -> None:
    cfg = make_cfg(semantic)
    mc = ModelConfig.from_config(cfg)
    model = StudentCTR(mc)
    f = Featurizer.new(mc.context_fields, mc.context_buckets, mc.sem_dim)
    inp = _inputs(f, ToyWorld(users=20, items=10).examples(33))
    out = model(inp, train=True)
    assert out.logit.shape == (33,)
    if semantic:
        assert out.item_hat.shape == (33, 32) and out.user_hat.shape == (33, 32)
        assert out.gate.shape == (33,) and torch.allclose(out.gate, out.gate.round())  # hard forward
        assert model.flops_per_example()["semantic_branch"] > 0
    else:
        assert out.item_hat is None and model.semantic is None
        assert not any("semantic" in n for n, _ in model.named_parameters())


def test_hard_gate_runs_branch_only_where_open() -> None:
    cfg = make_cfg(True)
    model = StudentCTR(ModelConfig.from_config(cfg)).eval()
    f = Featurizer.new(4, cfg.learner.context_buckets, 32)
    inp = _inputs(f, ToyWorld(users=20, items=10).examples(64))
    inp = inp._replace(item_count=torch.linspace(0, 5000, 64))
    d = cfg.learner.embedding_dim
    with torch.no_grad():
        # A gate that opens for rarely seen items only: logit = 0.5 - log1p(count) / COUNT_SCALE.
        for layer in (model.semantic.gate[0], model.semantic.gate[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
        model.semantic.gate[0].weight[0, 2 * d] = 1.0
        model.semantic.gate[-1].weight[0, 0] = -1.0
        model.semantic.gate[-1].bias.fill_(0.5)
        out = model(inp, train=False)
        u, i = model.user_emb(inp.user)[:, :d], model.item_emb(inp.item)[:, :d]
        full, _, _ = model.semantic.branch_logit(u, i, inp, None)
        model.semantic = None
        plain = model(inp, train=False).logit
    assert 0 < out.gate.sum() < 64
    assert out.gate[0] == 1 and out.gate[-1] == 0
    torch.testing.assert_close(out.logit, plain + out.gate * full, rtol=1e-5, atol=1e-5)


# -- trainer --------------------------------------------------------------------------------


@pytest.mark.parametrize("semantic", [True, False])
def test_learns_user_item_signal(semantic: bool) -> None:
    world = ToyWorld(users=100, items=50, seed=3)
    learner = OnlineLearner(make_cfg(semantic))
    for _ in range(300):
        learner.learn_batch(world.examples(128))
    test = world.examples(4000)
    auc = exact_auc(learner.predict_batch(test), [e.label for e in test])
    assert auc > 0.75, auc
    s = learner.summary()
    assert s["examples_seen"] == 300 * 128 and 0.5 < s["progressive_auc"] < auc + 0.05
    if semantic:
        assert 0 < s["gate_usage"] <= 1 and s["distill_loss"] < 1.0


def warm_learner() -> tuple[Config, OnlineLearner, ToyWorld]:
    """An id-only learner (no in-batch replay nor fast experts, so scores are the plain model's) after one batch."""
    cfg = make_cfg(False)
    cfg.learner.in_batch_wide = False
    cfg.learner.fast_experts = False
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=30, items=20)
    learner.learn_batch(world.examples(256))
    return cfg, learner, world


def test_learn_batch_returns_pre_update_predictions() -> None:
    _, learner, world = warm_learner()
    batch = world.examples(256)
    before = learner.predict_batch(batch)
    out = learner.learn_batch(batch)
    np.testing.assert_allclose(out["predictions"], before, rtol=1e-5, atol=1e-6)
    assert not np.allclose(learner.predict_batch(batch), before)  # and then it did learn


def test_in_batch_shift_only_moves_repeat_ids_and_uses_only_earlier_labels() -> None:
    """With the in-batch first-order replay, an example whose user and item are new to the batch
    keeps its pre-update score; the others move; and no score depends on a later label."""
    cfg = make_cfg(False)
    cfg.learner.fast_experts = False  # tested below
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=30, items=20)
    learner.learn_batch(world.examples(256))
    batch = world.examples(256)
    before = learner.predict_batch(batch)
    twin = OnlineLearner(cfg, state=learner.state())
    out = learner.learn_batch(batch)["predictions"]
    users, items = [e.user_id for e in batch], [e.item_id for e in batch]
    fresh = np.array([users.index(u) == k and items.index(i) == k for k, (u, i) in enumerate(zip(users, items))])
    np.testing.assert_allclose(out[fresh], before[fresh], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[~fresh], before[~fresh])
    # Flip every label from position 100 on: the first 100 scores must not change.
    flipped = [msgspec.structs.replace(e, label=1 - e.label) if k >= 100 else e for k, e in enumerate(batch)]
    np.testing.assert_allclose(twin.learn_batch(flipped)["predictions"][:100], out[:100], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("semantic", [False, True])
def test_fast_experts_scores_use_only_earlier_labels_and_survive_a_snapshot(semantic: bool) -> None:
    """With the fast experts (and the in-batch replay) on, flipping later labels moves no earlier
    score, and a learner restored from a snapshot serves what the original serves."""
    learner = OnlineLearner(make_cfg(semantic))
    world = ToyWorld(users=30, items=20, seed=3, sem_dim=32 if semantic else 0)
    for _ in range(3):
        learner.learn_batch(world.examples(256))
    experts = learner.experts
    assert experts is not None and experts.user_w.any() and experts.taste_w.any() == semantic
    assert experts.slope_w.any() and experts.taste_w0.any() == semantic
    experts.mix = experts.mix_taste = experts.mix_slope = 0.5  # whatever the stream chose, the experts must count here
    batch = world.examples(256)
    twin = OnlineLearner(make_cfg(semantic), state=learner.state())
    server = Predictor(make_cfg(semantic), state=learner.state())
    np.testing.assert_allclose(server.predict_batch(batch), learner.predict_batch(batch), rtol=1e-6)
    torch.manual_seed(11)  # the gate samples from torch's global generator: the same draws for both
    out = learner.learn_batch(batch)["predictions"]
    flipped = [msgspec.structs.replace(e, label=1 - e.label) if k >= 100 else e for k, e in enumerate(batch)]
    torch.manual_seed(11)
    np.testing.assert_allclose(twin.learn_batch(flipped)["predictions"][:100], out[:100], rtol=1e-6, atol=1e-7)


@given(
    st.lists(
        st.tuples(
            st.floats(0, 1), st.integers(0, 1), st.sampled_from([KIND_FINAL, KIND_FAKE_NEGATIVE, KIND_POSITIVE_COPY])
        ),
        min_size=1,
        max_size=50,
    )
)
def test_fake_negative_weights_formula(rows: list[tuple[float, int, int]]) -> None:
    p = torch.tensor([r[0] for r in rows])
    y = torch.tensor([float(r[1]) for r in rows])
    k = torch.tensor([r[2] for r in rows])
    w = fake_negative_weights(p, y, k)
    for (pi, yi, ki), wi in zip(rows, w.tolist()):
        expected = 1.0 if ki == KIND_FINAL else (1 + pi) if yi else (1 - pi) * (1 + pi)
        assert wi == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_fake_negative_weighting_changes_the_update() -> None:
    world = ToyWorld(users=30, items=20, seed=5)
    data = world.examples(256)
    fn = [Example(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "kind": KIND_FAKE_NEGATIVE}) for e in data]
    cfg = make_cfg(False)
    # Both would make scores depend on the (weighted) residuals of earlier examples.
    cfg.learner.in_batch_wide = False
    cfg.learner.fast_experts = False
    a, b = OnlineLearner(cfg), OnlineLearner(cfg)
    b.model.load_state_dict(a.model.state_dict())
    ra, rb = a.learn_batch(data), b.learn_batch(fn)
    np.testing.assert_allclose(ra["predictions"], rb["predictions"], rtol=1e-6)
    assert ra["ctr_loss"] != pytest.approx(rb["ctr_loss"])


def test_table_growth_keeps_optimizer_state() -> None:
    cfg = make_cfg(False)
    cfg.learner.wide_prior_tune = ""  # a tuned prior moves every row's precision (test_prior_tuner)
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=5000, items=20, seed=1)
    learner.learn_batch(world.examples(200))
    emb = learner.model.user_emb
    cap = emb.num_embeddings
    rows = len(learner.featurizer.users)
    weight_before = emb.weight.detach()[:rows].clone()
    acc_before = learner.sparse_opt.state()["user"][:rows].clone()
    learner.learn_batch(world.examples(3000))  # enough new users to force growth
    emb = learner.model.user_emb
    assert emb.num_embeddings > cap and learner.featurizer.users.capacity == emb.num_embeddings
    acc = learner.sparse_opt.state()["user"]
    assert acc.shape == emb.weight.shape
    # Only rows in the second batch move: rows absent from it kept their weights and their
    # accumulators bit for bit through the re-allocation.
    changed = (emb.weight.detach()[:rows] - weight_before).abs().sum(1)
    keep = (changed == 0).nonzero().flatten()
    assert keep.numel() > 0
    torch.testing.assert_close(acc[keep], acc_before[keep])
    # New rows start from the initial state: Adagrad accumulator, then the prior precision.
    new_row = acc[-1]
    assert float(new_row[0]) == pytest.approx(cfg.learner.embedding_init_accumulator)
    assert float(new_row[-1]) == pytest.approx(cfg.learner.wide_prior)


def test_wide_weights_follow_online_newton() -> None:
    """One example of a fresh id moves its first-order weight by exactly -g / (prior + h)."""
    cfg, learner, world = warm_learner()
    ex = msgspec.structs.replace(world.examples(1)[0], user_id="someone-new", label=1)
    p = float(learner.learn_batch([ex])["predictions"][0])
    row = learner.featurizer.users.row("someone-new")
    d = learner.model.mc.embedding_dim
    w = float(learner.model.user_emb.weight[row, d])
    assert w == pytest.approx((1 - p) / (cfg.learner.wide_prior + p * (1 - p)), rel=1e-4)


def test_wide_step_stays_in_its_trust_region() -> None:
    """A row seen 300 times in one batch while the model is far off would take a Newton step of
    several logits (-Σg / precision); the trust region caps it, and a small step is untouched."""
    from livectr.learner.sparse import RowOptimizer, SparseTable

    def moved(max_step: float, grad: float, n: int) -> float:
        table = SparseTable(4, dim=2)
        table.train()
        opt = RowOptimizer({"ctx": table}, lr=0.02, initial_accumulator=0.1, wide_prior=2.5, wide_max_step=max_step)
        before = float(table.weight[1, 2])
        out = table(torch.ones(n, dtype=torch.long))
        (out[:, 2] * grad).sum().backward()
        opt.step(torch.full((n,), 0.02))
        return float(table.weight[1, 2]) - before

    free = moved(0.0, -0.2, 300)
    assert free == pytest.approx(60 / (2.5 + 6), rel=1e-4)  # 7 logits: the overshoot
    assert moved(0.5, -0.2, 300) == pytest.approx(0.5)
    assert moved(0.5, 0.2, 300) == pytest.approx(-0.5)
    assert moved(0.5, -0.2, 1) == pytest.approx(0.2 / 2.52, rel=1e-4)


def test_cold_start_copies_neighbour_embeddings() -> None:
    cfg = make_cfg(True)
    cfg.learner.cold_start_min_count = 3
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=50, items=12, seed=2)
    for _ in range(10):
        learner.learn_batch(world.examples(256, items=np.arange(10)))
    # A new item whose teacher vector is exactly item 3's: its nearest trained neighbours drive the init.
    new = Example(
        impression_id="n",
        ts=0.0,
        user_id="u1",
        item_id="brand-new",
        context={},
        label=0,
        kind=KIND_FINAL,
        decided_at=0.0,
        item_sem=world.item_vectors[3].tobytes(),
        user_sem=None,
    )
    batch = learner.featurizer.encode([new])
    learner._sync_capacity()
    vec = batch.item_sem[0]
    hits = learner.index.search(vec, cfg.semantic.neighbours * 2, exclude="brand-new")
    rows = [learner.featurizer.items.row(i) for i, s in hits if s > 0][: cfg.semantic.neighbours]
    sims = np.array([s for i, s in hits if s > 0][: cfg.semantic.neighbours])
    W = learner.model.item_emb.weight.detach()
    expected = torch.tensor(sims / sims.sum(), dtype=W.dtype) @ W[rows]
    assert learner.cold_start is not None
    assert learner.cold_start.initialise(learner.featurizer, learner.model.item_emb.weight, batch) == 1
    row = learner.featurizer.items.row("brand-new")
    torch.testing.assert_close(learner.model.item_emb.weight.detach()[row], expected)
    assert rows[0] == learner.featurizer.items.row("i3")  # the best neighbour is the item with the same vector
    assert learner.items_cold_started == 1


def test_cold_start_skipped_without_vector_or_trained_neighbours() -> None:
    learner = OnlineLearner(make_cfg(True))
    world = ToyWorld(users=10, items=5)
    out = learner.learn_batch(world.examples(50))  # empty index: nothing to copy from
    assert out["cold_started"] == 0
    out = learner.learn_batch(world.examples(5, items=np.array([4]), with_sem=False))
    assert out["cold_started"] == 0


# -- metrics --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-6, 1 - 1e-6), st.booleans()), min_size=2, max_size=400))
def test_histogram_auc_matches_rank_auc(rows: list[tuple[float, bool]]) -> None:
    """Within the histogram's logit range (|logit| < 16, i.e. any float32 CTR score not saturated),
    off by at most half the share of positive/negative pairs that share a bin (they count ½)."""
    p = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows], dtype=int)
    h = HistogramAUC()
    h.add(p[: len(p) // 2], y[: len(p) // 2])
    h.add(p[len(p) // 2 :], y[len(p) // 2 :])
    exact = exact_auc(p, y)
    if math.isnan(exact):
        assert math.isnan(h.value())
    else:
        bins = h._bin(p)
        pos, neg = bins[y == 1], bins[y == 0]
        shared = float((pos[:, None] == neg[None, :]).mean())
        assert abs(h.value() - exact) <= shared / 2 + 1e-9


def test_histogram_auc_precision_on_realistic_scores() -> None:
    rng = np.random.default_rng(0)
    p = 1 / (1 + np.exp(-rng.normal(-3, 1.2, 200_000)))
    y = (rng.random(p.size) < p).astype(int)
    h = HistogramAUC()
    h.add(p, y)
    assert abs(h.value() - exact_auc(p, y)) < 1e-4


@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=60))
def test_exact_auc_is_pairwise_probability(rows: list[tuple[float, bool]]) -> None:
    pos = [p for p, y in rows if y]
    neg = [p for p, y in rows if not y]
    got = exact_auc(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]))
    if not pos or not neg:
        assert math.isnan(got)
        return
    brute = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    assert got == pytest.approx(brute)


def test_window_auc_covers_only_the_window() -> None:
    w = WindowAUC(size=100)
    w.add(np.linspace(0, 1, 100), np.r_[np.ones(50), np.zeros(50)])  # perfectly wrong
    w.add(np.linspace(0, 1, 100), np.r_[np.zeros(50), np.ones(50)])  # then perfectly right
    assert w.value() == 1.0


def test_log_quantiles_within_bin_precision() -> None:
    rng = np.random.default_rng(1)
    v = rng.lognormal(0, 1.5, 50_000)
    q = LogQuantiles()
    q.add(v)
    q.add(np.array([-1.0, np.nan]))  # negative → below range, NaN ignored
    for level in (0.5, 0.99):
        assert q.quantile(level) == pytest.approx(np.quantile(v, level), rel=0.03)


def test_cold_start_mask_counts_impressions_not_positive_copies() -> None:
    f = Featurizer.new(1, 64, 0, initial_capacity=4)

    def mk(item: str, kind: int) -> Example:
        return Example(
            impression_id="x",
            ts=0.0,
            user_id="u",
            item_id=item,
            context={},
            label=int(kind == KIND_POSITIVE_COPY),
            kind=kind,
            decided_at=0.0,
        )

    first = [mk("a", KIND_FAKE_NEGATIVE) for _ in range(3)] + [mk("a", KIND_POSITIVE_COPY)] * 5
    cold = f.cold_mask_and_count(f.encode(first), first_n=2)
    assert cold.tolist() == [True, True, False] + [False] * 5  # third impression is past the first 2
    assert f.items.counts[f.items.row("a")] == 3  # copies not counted
    more = [mk("b", KIND_FINAL), mk("a", KIND_FINAL), mk("b", KIND_FINAL)]
    assert f.cold_mask_and_count(f.encode(more), first_n=2).tolist() == [True, False, True]
    m = LearnerMetrics()
    m.update(np.array([0.9, 0.1, 0.8, 0.2]), np.array([1, 0, 1, 0]), np.array([True, True, False, False]))
    assert m.summary()["cold_start_auc"] == 1.0 and m.summary()["cold_start_examples"] == 2


# -- fast experts ---------------------------------------------------------------------------


def _bernoulli_stream(rng: np.random.Generator, rates: np.ndarray) -> np.ndarray:
    return (rng.random(len(rates)) < rates).astype(np.float32)


def _run(
    experts: FastExperts, u: np.ndarray, v: np.ndarray | None, z: np.ndarray, y: np.ndarray, batch: int = 500
) -> np.ndarray:
    return np.concatenate(
        [
            experts.learn(
                u[k : k + batch],
                None if v is None else v[k : k + batch],
                z[k : k + batch],
                y[k : k + batch],
                np.ones(len(y[k : k + batch])),
            )
            for k in range(0, len(y), batch)
        ]
    )


def test_session_bias_is_trusted_where_biases_drift_and_not_where_the_student_is_right() -> None:
    rng = np.random.default_rng(0)
    n, users = 20_000, 20
    u = rng.integers(1, users + 1, n)
    # Drift: each user's click rate jumps between 0.1 and 0.6 every 200 of their examples; the
    # student's logit stays at the long-run mean, so the fast residual is worth trusting.
    phase = np.zeros(users + 1, dtype=int)
    rates = np.empty(n)
    for k, user in enumerate(u):
        phase[user] += 1
        rates[k] = 0.6 if (phase[user] // 200) % 2 else 0.1
    y = _bernoulli_stream(rng, rates)
    z = np.full(n, np.log(0.35 / 0.65))
    drift = FastExperts()
    mixed = _run(drift, u, None, z, y)
    assert drift.mix > 0.5
    assert logloss(y, 1 / (1 + np.exp(-mixed))) < logloss(y, 1 / (1 + np.exp(-z))) - 0.02

    # Stationary and the student already exact: the residual is noise and is kept out.
    rates = rng.uniform(0.05, 0.5, n)
    y = _bernoulli_stream(rng, rates)
    right = FastExperts()
    _run(right, u, None, np.log(rates / (1 - rates)), y)
    assert right.mix < 0.2


def test_taste_expert_learns_each_users_taste_in_the_vector_space() -> None:
    """Users like items along their own direction of the item vectors; the student's logit knows
    nothing of it. The taste earns its weight; the session bias alone cannot do this."""
    rng = np.random.default_rng(1)
    n, users, items, dim = 30_000, 40, 300, 8
    item_vec = rng.normal(size=(items + 1, dim))
    item_vec /= np.linalg.norm(item_vec, axis=1, keepdims=True)
    taste = rng.normal(size=(users + 1, dim)) * 2.0
    u = rng.integers(1, users + 1, n)
    i = rng.integers(1, items + 1, n)
    logit = np.einsum("nd,nd->n", taste[u], item_vec[i]) - 1.0
    y = _bernoulli_stream(rng, 1 / (1 + np.exp(-logit)))
    z = np.full(n, -1.0)
    experts = FastExperts(dim=dim)
    mixed = _run(experts, u, item_vec[i], z, y)
    half = n // 2
    assert experts.mix_taste > 0.5
    assert exact_auc(1 / (1 + np.exp(-mixed[half:])), y[half:]) > 0.7


@pytest.mark.parametrize("weighted", [False, True])
def test_expert_rounds_equal_a_sequential_scan(weighted: bool) -> None:
    """The experts' batched rounds (with the session fading and fake-negative weights) give
    what example-by-example updates give. The population taste
    steps once per batch, so it is off here: with it, batch size changes what is learned."""
    rng = np.random.default_rng(2)
    n, dim = 400, 4
    u = rng.integers(1, 6, n)
    v = rng.normal(size=(n, dim))
    z = rng.normal(size=n)
    y = (rng.random(n) < 0.3).astype(np.float32)
    w = rng.uniform(0.5, 1.5, n) if weighted else np.ones(n)
    ts = np.cumsum(rng.choice([0.0, 0.0, 30.0, 2000.0], n))  # same-time runs, short and long gaps
    ts[::7] -= 100.0  # a few late examples: a user's clock must not run backwards
    make = lambda: FastExperts(dim=dim, mix_lr=0.0, population_taste=False, session_s=300.0)  # noqa: E731
    batched, sequential = make(), make()
    out = batched.learn(u, v, z, y, w, ts)
    one_by_one = [
        sequential.learn(u[k : k + 1], v[k : k + 1], z[k : k + 1], y[k : k + 1], w[k : k + 1], ts[k : k + 1])
        for k in range(n)
    ]
    np.testing.assert_allclose(out, np.concatenate(one_by_one), rtol=1e-9, atol=1e-12)
    for table in ("taste_w", "slope_w", "user_w", "user_ts"):
        np.testing.assert_allclose(getattr(batched, table), getattr(sequential, table), rtol=1e-9, atol=1e-12)


def test_tracked_user_bias_fades_between_sessions() -> None:
    """A user who clicked everything in one sitting gets a raised bias in that sitting; an hour
    later (session_s = 5 min) it is gone, in training and at serving alike."""
    experts = FastExperts(mix_lr=0.0, session_s=300.0)
    experts.mix = 1.0
    n = 30
    users = np.ones(n, dtype=np.int64)
    experts.learn(users, None, np.zeros(n), np.ones(n, dtype=np.float32), np.ones(n), np.full(n, 1000.0))
    assert experts.user_w[1] > 1.0
    soon, later = experts.components(np.array([1, 1]), None, np.zeros(2), np.array([1060.0, 4600.0]))[:, 1]
    assert soon > 0.8 * experts.user_w[1] and abs(later) < 1e-3 * experts.user_w[1]
    first_next_session = experts.learn(
        np.array([1]), None, np.zeros(1), np.zeros(1, dtype=np.float32), np.ones(1), np.array([4600.0])
    )
    assert abs(first_next_session[0]) < 1e-3
    # Without event times nothing fades: a caller that sends none is served the bias as it stands.
    assert experts.components(np.array([1]), None, np.zeros(1))[0, 1] == experts.user_w[1] != 0.0


def test_slope_expert_learns_which_users_follow_the_student() -> None:
    """Half the users click as the student predicts, half ignore it (a constant rate): per user
    the slope on the student's logit finds which is which, and the mix takes it."""
    rng = np.random.default_rng(4)
    n, users = 40_000, 40
    u = rng.integers(1, users + 1, n)
    z = rng.normal(0.0, 1.5, n)
    follows = u % 2 == 0
    y = _bernoulli_stream(rng, np.where(follows, 1 / (1 + np.exp(-z)), 0.3))
    experts = FastExperts(mix_lr=0.002)
    mixed = _run(experts, u, None, z, y)
    assert experts.mix_slope > 0.5
    slopes = experts.slope_w[1 : users + 1]
    ignore, follow = slopes[0::2], slopes[1::2]  # users 1, 3, … and 2, 4, …
    assert ignore.mean() < -0.7 and abs(follow.mean()) < 0.2  # z cancelled for those who ignore it
    half = n // 2
    assert logloss(y[half:], 1 / (1 + np.exp(-mixed[half:]))) < logloss(y[half:], 1 / (1 + np.exp(-z[half:]))) - 0.03


def test_population_taste_reaches_users_never_seen() -> None:
    """Everyone likes items along one direction: a new user's first example of a new item is
    already scored by it (the population taste); per-user tastes and item biases have nothing yet."""
    rng = np.random.default_rng(5)
    n, dim = 20_000, 8
    item_vec = rng.normal(size=(n, dim))
    item_vec /= np.linalg.norm(item_vec, axis=1, keepdims=True)
    shared = rng.normal(size=dim) * 3.0
    u = np.arange(n) + 1  # every example a new user and a new item
    y = _bernoulli_stream(rng, 1 / (1 + np.exp(-(item_vec @ shared))))
    experts = FastExperts(dim=dim)
    mixed = _run(experts, u, item_vec, np.zeros(n), y)
    half = n // 2
    assert exact_auc(1 / (1 + np.exp(-mixed[half:])), y[half:]) > 0.75
    alone = FastExperts(dim=dim, population_taste=False)
    assert exact_auc(1 / (1 + np.exp(-_run(alone, u, item_vec, np.zeros(n), y)[half:])), y[half:]) < 0.55


def test_expert_state_of_an_older_version_loads() -> None:
    """A snapshot written before the slope, the population taste and the session clocks existed
    still loads; the new parts start fresh."""
    old = {
        "user_w": np.array([0.0, 0.4]),
        "user_h": np.array([2.5, 3.0]),
        "item_w": np.array([0.0, -0.2]),
        "item_h": np.array([2.5, 3.0]),
        "taste_w": np.zeros((2, 4)),
        "taste_h": np.full((2, 4), 2.0),
        "mix": np.array([0.7, 0.3]),
        "serving_feedback": np.array([0]),
    }
    experts = FastExperts(dim=4)
    experts.load(old)
    assert experts.mix == 0.7 and experts.mix_taste == 0.3 and experts.mix_slope == 0.0
    c = experts.components(np.array([1, 5]), np.ones((2, 4)) / 2, np.zeros(2), np.array([10.0, 10.0]))
    # User 1's bias has no session clock: it counts as from a past session and has faded. User 5
    # is unknown. (The older version's item biases are gone.)
    np.testing.assert_allclose(c[:, 1], [0.0, 0.0])
    experts.learn(
        np.array([1]), np.ones((1, 4)) / 2, np.zeros(1), np.ones(1, dtype=np.float32), np.ones(1), np.array([20.0])
    )
    assert experts.user_ts[1] == 20.0 and experts.slope_w.shape[0] >= 2


def test_expert_mix_follows_serving_outcomes_once_they_arrive() -> None:
    c = FastExperts(mix_lr=0.05)
    users = np.array([1, 1, 1, 1])
    c.learn(users, None, np.zeros(4), np.ones(4, dtype=np.float32), np.ones(4))
    c.learn(users, None, np.zeros(4), np.ones(4, dtype=np.float32), np.ones(4))
    assert c.user_w[1] > 0 and c.mix > 0 and c.serving_feedback == 0
    # Served at a positive correction, labelled 0: the serving loss pulls the mix down ...
    served = ServingEvaluator()
    served.scored(["r1", "r2"], np.zeros(2), c.components(np.array([1, 1]), None, np.zeros(2)))
    before = c.mix
    finals = [Example(iid, 0.0, "u1", "i1", {}, 0, KIND_FINAL, 0.0) for iid in ("r1", "r2", "unknown")]
    c.fit_to_served(*served.labelled(LearnerMetrics(), finals, np.zeros(3, dtype=np.float32)))
    assert c.serving_feedback == 2 and c.mix < before
    # ... and from now on the training stream no longer moves it.
    after = c.mix
    c.learn(users, None, np.zeros(4), np.ones(4, dtype=np.float32), np.ones(4))
    assert c.mix == after
    restored = FastExperts()
    restored.load(c.state())
    assert restored.mix == c.mix and restored.serving_feedback == 2
    np.testing.assert_array_equal(
        restored.correct(users, None, np.zeros(4), np.full(4, 50.0)),
        c.correct(users, None, np.zeros(4), np.full(4, 50.0)),
    )


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# -- delayed feedback: defer weights and score requests in the batch ---------------------------


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.001, 0.999), st.integers(0, 1), st.sampled_from([KIND_DEFER_OBSERVED, KIND_DEFER_TRUE])),
        min_size=1,
        max_size=20,
    ),
    st.floats(0.0, 1.0),
)
def test_defer_weights_are_the_importance_weights_of_the_duplicated_stream(
    rows: list[tuple[float, int, int]], share: float
) -> None:
    """Every impression is ingested twice; with p_dp = p·s the observed stream has
    q(y=1|x) = p − p·s/2 and q(y=0|x) = 1 − p + p·s/2, and the weights are p/q."""
    p = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r[1]) for r in rows], dtype=torch.float64)
    k = torch.tensor([r[2] for r in rows])
    w = loss_weights(p, y, k, share)
    for (pi, yi, _), wi in zip(rows, w.tolist()):
        q1 = pi - pi * share / 2
        expected = pi / q1 if yi else (1 - pi) / (1 - q1)
        assert wi == pytest.approx(expected, rel=1e-9)
    # Weighted, the duplicated stream's expected gradient is the true one: E_q[w·(p − y)] = p − p_true.
    p_true, pred = 0.3, 0.4
    q1 = p_true - p_true * share / 2
    pos = loss_weights(torch.tensor([pred]), torch.tensor([1.0]), torch.tensor([KIND_DEFER_TRUE]), share).item()
    neg = loss_weights(torch.tensor([pred]), torch.tensor([0.0]), torch.tensor([KIND_DEFER_TRUE]), share).item()
    assert pos == pytest.approx(1 / (1 - share / 2))
    assert neg == pytest.approx((1 - pred) / (1 - pred + pred * share / 2))
    assert q1 * pos * (pred - 1) + (1 - q1) * neg * pred == pytest.approx(
        (p_true / q1) * q1 * (pred - 1) + ((1 - pred) / (1 - pred + pred * share / 2)) * (1 - q1) * pred
    )


@pytest.mark.parametrize("semantic", [False, True])
def test_score_requests_in_a_batch_are_scored_in_place_and_never_trained_on(semantic: bool) -> None:
    """A request rides in the batch: it gets exactly the score an example at its place would get
    (every earlier label counts), the model trains as if it were not there, and its score waits
    for the impression's final label (serving metrics)."""
    world = ToyWorld(users=30, items=20, seed=3, sem_dim=32 if semantic else 0)
    warm = world.examples(512)
    batch = world.examples(256)
    requests = [msgspec.structs.replace(ex, kind=KIND_SCORE_REQUEST, label=0) for ex in batch[100:140]]
    mixed = batch[:100] + requests + batch[100:]

    def learner() -> OnlineLearner:
        torch.manual_seed(11)
        lrn = OnlineLearner(make_cfg(semantic))
        lrn.learn_batch(warm)
        return lrn

    with_requests, plain = learner(), learner()
    torch.manual_seed(5)
    out = with_requests.learn_batch(mixed)["predictions"]
    torch.manual_seed(5)
    plain.learn_batch(batch)
    # Scored in place: as the same impression would be as a training example right after the
    # batch's first 100 examples (the requests before it teach nothing). With semantics the
    # training forward samples the gate (its draws depend on the batch's length): not compared.
    for k in (100, 117, 139) if not semantic else ():
        torch.manual_seed(5)
        alone = learner().learn_batch(batch[:100] + [batch[k]])["predictions"]
        np.testing.assert_allclose(out[k], alone[100], rtol=1e-5, atol=1e-6)
    # Never trained on: a request's label changes nothing, and (the gate's draws aside, see
    # above) the weights and the experts are those of the batch without the requests.
    flipped = learner()
    torch.manual_seed(5)
    flipped_requests = [msgspec.structs.replace(r, label=1) for r in requests]
    out_flipped = flipped.learn_batch(batch[:100] + flipped_requests + batch[100:])["predictions"]
    np.testing.assert_array_equal(out_flipped, out)
    for (name, a), b in zip(with_requests.model.state_dict().items(), flipped.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert with_requests.examples_seen == plain.examples_seen == 512 + 256
    assert with_requests.experts is not None and plain.experts is not None
    if not semantic:
        for (name, a), b in zip(with_requests.model.state_dict().items(), plain.model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        np.testing.assert_allclose(with_requests.experts.user_w, plain.experts.user_w, rtol=1e-6, atol=1e-9)
    # Their scores are paired with the impressions' final labels (here later in the same batch).
    summary = with_requests.metrics.summary()
    assert summary["serving_auc_impressions"] == 40 and len(with_requests.serving_eval) == 0
    assert math.isfinite(summary["serving_logloss"]) and plain.metrics.summary()["serving_auc_impressions"] == 0
    # A request whose label has not come yet waits for it.
    with_requests.learn_batch(requests[:5])
    assert len(with_requests.serving_eval) == 5


def test_a_batch_is_weighed_with_the_delays_of_its_own_clicks() -> None:
    """The stream's first batch of ``defer`` clicks must not be weighed by the prior share alone
    (Beta(1, 3): 0.25 late, when without a waiting window every click is late): its positives
    would weigh ~0.6 of what they should, and the model would start far too low."""
    cfg = make_cfg(False)
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=10, items=5, seed=1)
    seen: list[float] = []
    real = learner.click_delays.share_after

    def spy(wait_s: float) -> float:
        seen.append(real(wait_s))
        return seen[-1]

    learner.click_delays.share_after = spy  # type: ignore[method-assign]
    batch = [msgspec.structs.replace(ex, kind=KIND_DEFER_TRUE, label=1, click_delay=10.0) for ex in world.examples(100)]
    learner.learn_batch(batch)
    assert seen == [pytest.approx((1 + 100) / (4 + 100))]


def test_taste_expert_ignores_an_item_head_never_distilled() -> None:
    """Cold semantic cache (issue 13): while no example has carried a teacher vector, the item
    head's output is an untrained projection, and the taste expert must not learn from it (it
    acted as one more global bias and drove the served scores to 0); from the first teacher
    vector on, the distilled vectors stand in for missing ones as before, also after a restore."""
    learner = OnlineLearner(make_cfg(True))
    world = ToyWorld(users=30, items=20, seed=3, sem_dim=32)
    for _ in range(3):
        learner.learn_batch(world.examples(256, with_sem=False))
    experts = learner.experts
    assert experts is not None and not learner.item_head_distilled
    assert not experts.taste_w.any() and not experts.taste_w0.any()
    assert experts.user_w.any() and experts.slope_w.any()  # the other experts learn as before
    learner.learn_batch(world.examples(256))
    assert learner.item_head_distilled
    before = experts.taste_w.copy()
    learner.learn_batch(world.examples(256, with_sem=False))
    assert (experts.taste_w != before).any()
    assert OnlineLearner(make_cfg(True), state=learner.state()).item_head_distilled
    assert Predictor(make_cfg(True), state=learner.state()).item_head_distilled


@given(
    st.lists(
        st.tuples(st.floats(0.001, 0.999), st.integers(0, 1), st.sampled_from([KIND_DEFER_OBSERVED, KIND_DEFER_TRUE])),
        min_size=1,
        max_size=50,
    ),
    st.floats(0, 1),
)
def test_defer_weights_with_a_share_of_real_negatives(rows: list[tuple[float, int, int]], s: float) -> None:
    """With every real negative (r = 1) the weights are the paper's; with none (r = 0) and every
    click after the wait (s = 1) they are fake-negative's; a dropped real negative weighs 0."""
    p = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    y = torch.tensor([float(r[1]) for r in rows], dtype=torch.float64)
    k = torch.tensor([r[2] for r in rows])
    paper = loss_weights(p, y, k, s, 1.0)
    for (pi, yi, _), wi in zip(rows, paper.tolist()):
        expected = 1 / (1 - s / 2) if yi else (1 - pi) / (1 - pi + pi * s / 2)
        assert wi == pytest.approx(expected, rel=1e-6, abs=1e-9)
    none = loss_weights(p, y, k, 1.0, 0.0)
    for (pi, yi, _), wi in zip(rows, none.tolist()):
        assert wi == pytest.approx((1 + pi) if yi else (1 - pi) * (1 + pi), rel=1e-6, abs=1e-9)
    dropped = torch.tensor([ki == KIND_DEFER_TRUE and not yi for _, yi, ki in rows])
    by_score = loss_weights(p, y, k, s, p, dropped)
    assert all(w == 0.0 for w, d in zip(by_score.tolist(), dropped.tolist()) if d)
    assert all(w > 0.0 or pi == 1.0 for (pi, _, _), w, d in zip(rows, by_score.tolist(), dropped.tolist()) if not d)


def test_real_negatives_are_kept_by_score_and_the_same_ones_on_a_replay() -> None:
    """``real_negatives = score``: a real negative is trained on with the probability of a click
    the model gives it, chosen by a hash of the impression id (a replay keeps the same ones)."""
    assert real_negative_share("score") is None and real_negative_share("all") == 1.0
    assert real_negative_share("0.25") == 0.25
    for bad in ("some", "1.5", "-0.1", "nan"):
        with pytest.raises(ValueError):
            real_negative_share(bad)
    cfg = make_cfg(False)
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=10, items=5, seed=1)
    batch = [msgspec.structs.replace(ex, kind=KIND_DEFER_TRUE, label=0) for ex in world.examples(4000)]
    kinds = np.full(len(batch), KIND_DEFER_TRUE)
    labels = np.zeros(len(batch), dtype=np.float32)
    rate = torch.full((len(batch),), 0.2, dtype=torch.float64)
    dropped = learner._dropped_real_negatives(batch, kinds, labels, rate)
    assert dropped is not None and 0.75 < float(dropped.double().mean()) < 0.85
    again = learner._dropped_real_negatives(batch, kinds, labels, rate)
    assert again is not None and bool((dropped == again).all())
    assert learner._dropped_real_negatives(batch, kinds, labels, 1.0) is None


def test_defer_without_a_wait_serves_the_observed_copys_score() -> None:
    """``defer`` with ``defer_wait_s = 0``: the join sends no score request, the observed copy
    (scored at its impression's place) is the served score, paired with the true label later."""
    cfg = make_cfg(False)
    cfg.join.defer_wait_s = 0.0
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=10, items=5, seed=3)
    examples = world.examples(300)
    observed = [msgspec.structs.replace(ex, kind=KIND_DEFER_OBSERVED, label=0) for ex in examples]
    scores = learner.learn_batch(observed)["predictions"]
    assert len(learner.serving_eval) == 300
    learner.learn_batch([msgspec.structs.replace(ex, kind=KIND_DEFER_TRUE) for ex in examples])
    assert len(learner.serving_eval) == 0
    summary = learner.metrics.summary()
    assert summary["serving_auc_impressions"] == 300
    labels = np.asarray([ex.label for ex in examples], dtype=np.float64)
    assert summary["serving_auc"] == pytest.approx(exact_auc(scores, labels), abs=0.02)
    cfg.join.defer_wait_s = 5.0  # with a wait, only requests are served scores
    waiting = OnlineLearner(cfg)
    waiting.learn_batch(observed)
    assert len(waiting.serving_eval) == 0


def test_real_negatives_left_out_by_their_served_score_skip_the_model_but_keep_their_label() -> None:
    cfg = make_cfg(False)
    cfg.join.defer_wait_s = 0.0
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=10, items=5, seed=4)
    examples = world.examples(400)
    served = learner.learn_batch([msgspec.structs.replace(ex, kind=KIND_DEFER_OBSERVED, label=0) for ex in examples])[
        "predictions"
    ]
    seen = learner.examples_seen
    true = [msgspec.structs.replace(ex, kind=KIND_DEFER_TRUE, label=0) for ex in examples]
    out = learner.learn_batch(true)["predictions"]
    kept = [k for k, ex in enumerate(true) if zlib.crc32(ex.impression_id.encode(), 0x5EED) / 2**32 < served[k]]
    assert learner.examples_seen - seen == len(kept) < len(true)
    left_out = sorted(set(range(len(true))) - set(kept))
    assert np.allclose(out[left_out], served[left_out])  # a left-out row reports its served score
    assert learner.metrics.summary()["serving_auc_impressions"] == len(true)
    assert len(learner.serving_eval) == 0
