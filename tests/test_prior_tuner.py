"""The first-order prior tuned on the progressive loss (learner.sparse.PriorTuner)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toyworld import ToyWorld

from livectr.core.config import Config, ConfigError, validate
from livectr.learner.online import OnlineLearner
from livectr.learner.sparse import PriorTuner, RowOptimizer, SparseTable


def _map_weight(prior: float, offset: float, labels: np.ndarray) -> tuple[float, float]:
    """The exact posterior mode of one id's weight (logistic likelihood, N(0, 1/prior) prior) and
    its posterior precision, by Newton's method."""
    w = 0.0
    for _ in range(100):
        p = 1 / (1 + math.exp(-(offset + w)))
        grad = float(np.sum(p - labels)) + prior * w
        hess = len(labels) * p * (1 - p) + prior
        w -= grad / hess
    p = 1 / (1 + math.exp(-(offset + w)))
    return w, len(labels) * p * (1 - p) + prior


@pytest.mark.parametrize(("prior", "clicks", "shown"), [(2.5, 3, 10), (0.7, 9, 12), (12.0, 0, 40)])
def test_sensitivity_is_the_derivative_of_the_posterior_mode(prior: float, clicks: int, shown: int) -> None:
    """dw/d log λ = −λ w / precision at the mode: checked against the mode solved at λ·e^±ε."""
    labels = np.array([1.0] * clicks + [0.0] * (shown - clicks))
    offset = -0.8
    w, precision = _map_weight(prior, offset, labels)
    table = SparseTable(3, 0)
    opt = RowOptimizer({"user": table}, lr=0.02, initial_accumulator=0.1, wide_prior=prior)
    table.weight.data[1, 0] = w
    opt.accum["user"][1, 0] = precision
    eps = 1e-4
    numeric = (
        _map_weight(prior * math.exp(eps), offset, labels)[0] - _map_weight(prior * math.exp(-eps), offset, labels)[0]
    ) / (2 * eps)
    got = float(opt.prior_sensitivity("user", torch.tensor([1]))[0])
    assert got == pytest.approx(numeric, rel=1e-3, abs=1e-7)


def _tuned_prior(user_sd: float, start: float, low: float, high: float, batches: int = 150, seed: int = 0) -> float:
    """Per-id weights over 300 users trained online (Newton steps, batches of 256) with the tuner
    on; labels drawn with user biases of standard deviation ``user_sd``. Returns the final prior."""
    rng = np.random.default_rng(seed)
    users = 300
    bias = rng.normal(0.0, user_sd, users + 1)
    offset = -1.0
    table = SparseTable(users + 1, 0)
    table.train()
    opt = RowOptimizer({"user": table}, lr=0.02, initial_accumulator=0.1, wide_prior=start)
    tuner = PriorTuner(opt, ["user"], rate=0.05, low=low, high=high)
    for _ in range(batches):
        idx = torch.from_numpy(rng.integers(1, users + 1, 256))
        y = torch.from_numpy((rng.random(256) < 1 / (1 + np.exp(-(offset + bias[idx.numpy()])))).astype(np.float32))
        logit = offset + table(idx)[:, 0]
        p = torch.sigmoid(logit)
        tuner.step(tuner.sensitivities({"user": idx}, {}), (p - y).detach(), 256)
        F.binary_cross_entropy_with_logits(logit, y, reduction="sum").backward()
        opt.step((p * (1 - p)).detach())
    return opt.prior("user")


def test_ids_without_signal_get_a_stronger_prior_and_ids_with_one_a_weaker_one() -> None:
    """Labels independent of the user: the progressive loss asks for more shrinkage, up to the
    ceiling. Users with biases of ±1.5 logits: for less, when the floor allows."""
    assert _tuned_prior(0.0, start=2.5, low=2.5, high=50.0) > 20.0
    assert _tuned_prior(0.0, start=2.5, low=2.5, high=8.0) == pytest.approx(8.0)
    assert _tuned_prior(1.5, start=20.0, low=0.1, high=50.0) < 5.0
    assert _tuned_prior(1.5, start=2.5, low=2.5, high=50.0) < 3.0  # never below the floor, and not pushed up


def test_moving_the_prior_moves_every_row_precision_with_it() -> None:
    table = SparseTable(4, 2)
    opt = RowOptimizer({"user": table}, lr=0.02, initial_accumulator=0.1, wide_prior=2.5)
    opt.accum["user"][1, 2] += 3.0  # a row with examples
    opt.set_prior("user", 10.0)
    assert opt.prior("user") == 10.0
    assert opt.accum["user"][:, 2].tolist() == pytest.approx([10.0, 13.0, 10.0, 10.0])
    table.grow(6)
    opt.reset_rows("user", torch.tensor([1]))
    assert opt.state()["user"][:, 2].tolist() == pytest.approx([10.0] * 6)


def test_a_learner_keeps_its_tuned_prior_across_a_restart() -> None:
    cfg = Config()
    cfg.semantic.enabled = False
    cfg.learner.device = "cpu"
    cfg.learner.batch_size = 256
    cfg.learner.context_buckets = 1 << 12
    cfg.learner.wide_prior_tune_rate = 0.2
    learner = OnlineLearner(cfg)
    world = ToyWorld(users=40, items=20, seed=3)
    for _ in range(12):
        learner.learn_batch(world.examples(256))
    tuner = learner.prior_tuner
    assert tuner is not None and tuner.names == ["user", "item"]
    moved = {name: learner.sparse_opt.prior(name) for name in tuner.names}
    assert any(value != cfg.learner.wide_prior for value in moved.values())
    restored = OnlineLearner(cfg, state=learner.state())
    assert restored.prior_tuner is not None
    assert {name: restored.sparse_opt.prior(name) for name in tuner.names} == pytest.approx(moved)
    assert restored.prior_tuner.moments == tuner.moments
    assert restored.prior_tuner.steps == tuner.steps
    for name in tuner.names:
        assert torch.equal(restored.sparse_opt.state()[name], learner.sparse_opt.state()[name])


def test_an_unknown_table_is_a_config_error() -> None:
    cfg = Config()
    cfg.learner.wide_prior_tune = "user,items"
    with pytest.raises(ConfigError, match="wide_prior_tune lists tables among user, item, not items"):
        validate(cfg)
    cfg.learner.wide_prior_tune = ""
    validate(cfg)
