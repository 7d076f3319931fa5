"""The learner's own waiting window for ``defer``'s observed negatives (learner.defer_hold)."""

from __future__ import annotations

import math

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from livectr.core.config import Config
from livectr.core.events import KIND_DEFER_HELD, KIND_DEFER_OBSERVED, KIND_DEFER_TRUE, Example, decision_time
from livectr.learner.defer_hold import MIN_CLICKS, ClickDelays, HeldNegatives, merge_released
from livectr.learner.online import OnlineLearner

WINDOW_S = 600.0


def _clicks(delays: list[float], impressions: int) -> ClickDelays:
    out = ClickDelays(WINDOW_S)
    out.observe(
        [Example(f"c{k}", 0.0, "u", "i", {}, 1, KIND_DEFER_TRUE, 0.0, click_delay=d) for k, d in enumerate(delays)]
    )
    out.impressions = float(impressions)
    return out


def _wrong(delays: ClickDelays, wait: float) -> float:
    """Probability that an impression still unclicked after ``wait`` is a click."""
    p = delays.clicks / delays.impressions
    within = float(delays.counts[: np.searchsorted(delays.edges, wait, side="right")].sum()) / delays.clicks
    return p * (1 - within) / (1 - p * within)


def test_no_wait_where_few_impressions_are_clicked_or_few_clicks_are_known() -> None:
    delays = list(np.random.default_rng(0).uniform(2, 120, 1000))
    assert _clicks(delays, impressions=20_000).wait(0.08, 300.0) == 0.0  # 5 % clicked
    assert _clicks(delays[: MIN_CLICKS - 1], impressions=300).wait(0.08, 300.0) == 0.0
    assert _clicks(delays, impressions=1800).wait(0.08, 300.0) > 100.0  # 55 % clicked, delays up to 120 s


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 590.0), min_size=MIN_CLICKS, max_size=600),
    st.floats(0.1, 1.0),
    st.floats(0.01, 0.3),
    st.floats(0.0, 600.0),
)
def test_the_wait_is_the_shortest_that_meets_the_error(
    delays: list[float], rate: float, error: float, cap: float
) -> None:
    clicks = _clicks(delays, impressions=max(math.ceil(len(delays) / rate), len(delays)))
    wait = clicks.wait(error, cap)
    assert wait <= cap
    if wait == 0.0:
        assert clicks.clicks / clicks.impressions <= error or _wrong(clicks, 0.0) <= error or cap < 1.0
        return
    shorter = clicks.edges[clicks.edges < wait]
    assert all(_wrong(clicks, w) > error for w in shorter)  # nothing shorter would do
    assert _wrong(clicks, wait) <= error or wait == clicks.edges[clicks.edges <= cap][-1]  # or the cap
    assert clicks.wait(error * 1.5, cap) <= wait  # a looser error never waits longer


def test_the_click_counts_behind_the_wait_survive_a_snapshot() -> None:
    cfg = Config()
    cfg.learner.device, cfg.semantic.enabled, cfg.join.defer_wait_s = "cpu", False, 60.0
    learner = OnlineLearner(cfg)
    batch = [
        Example(
            f"i{k}", 1e9, f"u{k % 10}", f"i{k % 5}", {}, 1, KIND_DEFER_TRUE, 0.0, click_delay=5.0 if k % 4 else 300.0
        )
        for k in range(200)
    ]
    learner.learn_batch(batch)
    assert learner.click_delays.share_after(60.0) == (1 + 50) / (4 + 200)
    learner.learn_batch([msgspec.structs.replace(ex, kind=KIND_DEFER_OBSERVED, label=0) for ex in batch])
    assert learner.click_delays.visits == 200 and learner.click_delays.returns > 0
    back = OnlineLearner(cfg, state=learner.state())
    for name in ("share_after", "wait"):
        args = (60.0,) if name == "share_after" else (0.05, 300.0)
        assert getattr(back.click_delays, name)(*args) == getattr(learner.click_delays, name)(*args)
    assert back.click_delays.return_share == learner.click_delays.return_share
    assert back.click_delays.impressions == learner.click_delays.impressions == 200


def test_held_negatives_are_released_in_due_order_labelled_by_their_clicks() -> None:
    held = HeldNegatives()
    ex = [Example(f"i{k}", 100.0 + k, "u", "i", {}, 0, KIND_DEFER_OBSERVED, 0.0) for k in range(4)]
    for k in (2, 0, 1, 3):
        held.hold(ex[k], ex[k].ts + 50.0)
    held.hold(ex[0], 999.0)  # a redelivered copy keeps its first entry
    held.click("i0", 120.0)  # within the wait
    held.click("i1", 160.0)  # after it: the held copy is a negative (its true copy says otherwise)
    held.click("nobody", 0.0)
    assert held.release(149.0) == []
    out = held.release(152.0)
    assert [(due, e.impression_id, e.label, e.kind) for due, e in out] == [
        (150.0, "i0", 1, KIND_DEFER_HELD),
        (151.0, "i1", 0, KIND_DEFER_HELD),
        (152.0, "i2", 0, KIND_DEFER_HELD),
    ]
    assert len(held) == 1 and [e.impression_id for _, e in held.release(1e9)] == ["i3"]
    for k in range(4):
        held.hold(msgspec.structs.replace(ex[k], impression_id=f"j{k}"), 1000.0 + k)
    # More held than allowed: the earliest due go early, labelled as seen so far.
    assert [e.impression_id for _, e in held.release(0.0, keep_at_most=1)] == ["j0", "j1", "j2"]


def test_released_copies_are_merged_at_their_due_times() -> None:
    ex = [Example(f"b{k}", float(t), "u", "i", {}, 0, KIND_DEFER_OBSERVED, 0.0) for k, t in enumerate((10, 20, 30))]
    late = [(d, msgspec.structs.replace(ex[0], impression_id=f"r{d}", kind=KIND_DEFER_HELD)) for d in (5, 20, 40)]
    merged, own = merge_released(ex, np.asarray([10.0, 20.0, 30.0]), late)
    assert [e.impression_id for e in merged] == ["r5", "b0", "r20", "b1", "b2", "r40"]
    assert [merged[k].impression_id for k in own] == ["b0", "b1", "b2"]


def _ratings_like(impressions: int, seed: int = 3) -> list[Example]:
    """A ``defer`` stream where most impressions are clicked, 2–120 s after them (like ml-100k)."""
    rng = np.random.default_rng(seed)
    u_eff = rng.normal(0, 1.0, 60)
    out = []
    for k in range(impressions):
        u, ts = int(rng.integers(60)), 1.7e9 + 0.5 * k
        clicked = int(rng.random() < 1 / (1 + math.exp(-(0.3 + u_eff[u]))))
        delay = float(rng.uniform(2, 120)) if clicked else -1.0
        base = dict(impression_id=f"i{k}", ts=ts, user_id=f"u{u}", item_id=f"i{k % 40}", context={}, decided_at=0.0)
        out.append(Example(**base, label=0, kind=KIND_DEFER_OBSERVED, click_delay=delay))
        out.append(Example(**base, label=clicked, kind=KIND_DEFER_TRUE, click_delay=delay))
    return sorted(out, key=lambda e: decision_time(e, WINDOW_S))


def test_a_learner_on_a_much_clicked_stream_holds_its_observed_negatives() -> None:
    """Once the stream shows that most impressions are clicked, observed negatives are held and
    trained on release with the label seen by then; every impression is still scored once, where
    its observed copy arrives, and the caller gets one prediction per example it gave."""
    stream = _ratings_like(6000)
    runs = {}
    for error in (0.0, 0.08):
        cfg = Config()
        cfg.learner.device, cfg.semantic.enabled, cfg.learner.defer_hold_error = "cpu", False, error
        learner = OnlineLearner(cfg)
        for at in range(0, len(stream), 256):
            batch = stream[at : at + 256]
            assert len(learner.learn_batch(batch)["predictions"]) == len(batch)
        runs[error] = learner
    holding, plain = runs[0.08], runs[0.0]
    assert plain.hold_wait == 0.0 and plain.held.holds == 0
    # Held from when ~MIN_CLICKS clicks were known, each released by the stream's last real negatives.
    assert 100.0 < holding.hold_wait <= 120.0 and holding.held.holds > 4000 and len(holding.held) == 0
    for learner in (holding, plain):
        assert learner.metrics.summary()["serving_auc_impressions"] == 6000


def test_no_wait_where_users_rarely_come_back_within_a_click_delay() -> None:
    """A wrong fake negative harms only the scores served while it stands: where a user's next
    impression rarely comes within a click delay, holding costs more freshness than it saves."""
    delays = list(np.random.default_rng(0).uniform(2, 120, 1000))  # median ~61 s
    users = np.arange(1, 101).repeat(10)
    for gap, waits in ((600.0, False), (5.0, True)):  # each user's impressions `gap` seconds apart
        clicks = _clicks(delays, impressions=1800)  # 55 % clicked
        clicks.observe_users(users, np.tile(np.arange(10) * gap, 100))
        assert clicks.return_share == (900 + 1) / (1000 + 1) if waits else clicks.return_share < 0.01
        assert (clicks.wait(0.05, 300.0) > 100.0) == waits
    clicks.forget_users(np.asarray([1]))
    clicks.observe_users(np.asarray([1]), np.asarray([50.0]))  # a new user in a freed row: no return
    assert clicks.returns == 900
