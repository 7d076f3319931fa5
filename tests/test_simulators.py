"""Synthetic generator, replay reader and MovieLens converter (no broker needed)."""

from __future__ import annotations

import collections
import csv
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livectr.core.config import Config, SimulatorConfig
from livectr.core.events import Click, DecodeError, Impression, Item, decode_event, encode_event
from livectr.simulators.ml100k import POSITIVE_RATING, age_bucket, click_delay_s, convert_ml100k
from livectr.simulators.records import BadRecord
from livectr.simulators.replay import load_replay
from livectr.simulators.sources import open_source
from livectr.simulators.synthetic import (
    AXES,
    EPOCH,
    SLOTS,
    SyntheticTraffic,
    auc,
    axis_of_word,
    describe_item,
    synthetic_stream,
)
from tests.conftest import SHARED_DATA

KIND_RANK = {Item: 0, Impression: 1, Click: 2}


def small(**overrides: object) -> SimulatorConfig:
    base: dict[str, object] = dict(events=6_000, users=300, items=200, seed=3)
    base.update(overrides)
    return SimulatorConfig(**base)  # type: ignore[arg-type]


def run(sim: SimulatorConfig) -> tuple[list, SyntheticTraffic]:
    traffic = SyntheticTraffic(sim)
    return list(traffic), traffic


@pytest.fixture(scope="module")
def default_run() -> tuple[list, SyntheticTraffic]:
    """One run with the default world sizes (60k events over ≈50 min), shared by the distribution tests."""
    return run(SimulatorConfig(events=60_000, impressions_per_s=20.0))


def encoded(records: list) -> list[bytes]:
    return [r.raw if isinstance(r, BadRecord) else encode_event(r) for r in records]


# ---------------------------------------------------------------- synthetic: determinism & order


def test_same_seed_same_stream_different_seed_different() -> None:
    a, _ = run(small(malformed_rate=0.01))
    b, _ = run(small(malformed_rate=0.01))
    c, _ = run(small(malformed_rate=0.01, seed=4))
    assert encoded(a) == encoded(b)
    assert encoded(a) != encoded(c)


def test_event_time_order_items_first_clicks_after_impressions(default_run) -> None:
    records, _ = default_run
    keyed = [(r.ts, KIND_RANK[type(r)]) for r in records if not isinstance(r, BadRecord)]
    assert keyed == sorted(keyed)
    imp_ts: dict[str, float] = {}
    item_seen: set[str] = set()
    for r in records:
        if isinstance(r, Item):
            item_seen.add(r.item_id)
        elif isinstance(r, Impression):
            assert r.item_id in item_seen, "impression before its item's description"
            imp_ts[r.impression_id] = r.ts
        elif isinstance(r, Click):
            assert r.ts - imp_ts[r.impression_id] >= 0.2 - 1e-6


def test_ids_and_epoch(default_run) -> None:
    records, _ = default_run
    imps = [r for r in records if isinstance(r, Impression)]
    assert len({r.impression_id for r in imps}) == len(imps)
    assert all(r.user_id.startswith("u") and r.item_id.startswith("i") for r in imps)
    assert EPOCH <= min(r.ts for r in imps) < EPOCH + 1
    assert set(imps[0].context) == {"device", "hour", "slot"}


# ---------------------------------------------------------------- synthetic: distributions


def test_click_delay_distribution_shape(default_run) -> None:
    _, traffic = default_run
    truth = traffic.truth
    # Only impressions old enough that even late clicks were emitted (the stream end censors the rest).
    old = truth.impression_ts() < truth.impression_ts().max() - 1_200.0
    delay = truth.click_delay()[old]
    delay = delay[~np.isnan(delay)]
    assert len(delay) > 1_000
    assert 12.0 < np.median(delay) < 30.0  # most clicks come fast ...
    assert 0.6 < np.mean(delay <= 60.0) < 0.9  # ... most within a minute
    assert np.mean(delay > 300.0) > 0.02  # a tail over many minutes
    assert 0.003 < np.mean(delay > 600.0) < 0.05  # some beyond a 10-minute window
    assert delay.min() >= 0.2 - 1e-6


def test_overall_ctr_near_base_and_oracle_is_informative(default_run) -> None:
    _, traffic = default_run
    truth = traffic.truth
    ctr = truth.clicks / truth.impressions
    assert 0.035 < ctr < 0.075
    assert abs(truth.p_true().mean() - ctr) < 0.01  # emitted labels follow the true probabilities
    assert truth.oracle_auc() > 0.72


def test_context_changes_click_probability(default_run) -> None:
    records, traffic = default_run
    labels = traffic.truth.labels()
    imps = [r for r in records if isinstance(r, Impression)]
    by_slot: dict[int, list[int]] = collections.defaultdict(list)
    by_device: dict[str, list[int]] = collections.defaultdict(list)
    for r in imps:
        n = int(r.impression_id.split("-")[1])
        by_slot[r.context["slot"]].append(labels[n])
        by_device[r.context["device"]].append(labels[n])
    assert set(by_slot) == set(range(1, SLOTS + 1))
    assert np.mean(by_slot[1]) > 1.3 * np.mean(by_slot[SLOTS])
    assert np.mean(by_device["desktop"]) > np.mean(by_device["tablet"])


def test_zipf_popularity_is_skewed(default_run) -> None:
    records, _ = default_run
    counts = collections.Counter(r.item_id for r in records if isinstance(r, Impression))
    top = sum(c for _, c in counts.most_common(20))
    assert top / sum(counts.values()) > 0.25  # 1 % of the catalogue, > 25 % of traffic


def test_cold_start_items_born_over_time_with_item_before_first_impression(default_run) -> None:
    records, traffic = default_run
    births = {r.item_id: r.ts for r in records if isinstance(r, Item)}
    new = {i: t for i, t in births.items() if t > EPOCH}
    assert len(new) == traffic.truth.cold_start_items > 0
    end = max(r.ts for r in records if isinstance(r, Impression))
    times = np.array(sorted(new.values()))
    assert times.min() < EPOCH + 0.3 * (end - EPOCH) and times.max() > EPOCH + 0.6 * (end - EPOCH)
    first_imp: dict[str, float] = {}
    for r in records:
        if isinstance(r, Impression):
            first_imp.setdefault(r.item_id, r.ts)
    shown_new = [i for i in new if i in first_imp]
    assert len(shown_new) > 0.8 * len(new)
    assert all(new[i] <= first_imp[i] for i in shown_new)
    assert 0.05 < traffic.truth.cold_start_mask().mean() < 0.5


def test_user_tastes_drift() -> None:
    traffic = SyntheticTraffic(small(events=20_000, user_drift_tau_s=60.0))
    before = traffic.world.user_latent.copy()
    list(traffic)
    after = traffic.world.user_latent
    corr = np.corrcoef(before.ravel(), after.ravel())[0, 1]
    assert corr < 0.5
    assert after.std() == pytest.approx(before.std(), rel=0.15)  # drift keeps the taste scale


def test_item_text_words_follow_latent_signs() -> None:
    traffic = SyntheticTraffic(SimulatorConfig(items=2_000))
    world = traffic.world
    d = world.item_latent.shape[1]
    features = np.zeros((len(world.item_text), d))
    for i, text in enumerate(world.item_text):
        for token in text.replace(",", " ").replace(".", " ").split():
            hit = axis_of_word(token)
            if hit is not None:
                features[i, hit[0]] += hit[1]
    mentioned = features != 0
    agree = np.sign(features[mentioned]) == np.sign(world.item_latent[mentioned])
    assert agree.all()
    corr = [np.corrcoef(features[:, k], world.item_latent[:, k])[0, 1] for k in range(d)]
    assert min(corr) > 0.4


def test_describe_item_mentions_strongest_axes() -> None:
    rng = np.random.default_rng(0)
    vec = np.zeros(len(AXES))
    vec[3], vec[7] = 2.0, -1.5
    text = describe_item(vec, "lamp", 1.0, rng)
    words = {w.strip(",.") for w in text.split()}
    assert words & set(AXES[3][0]) and words & set(AXES[7][1]) and "lamp" in words


def test_malformed_records_are_undecodable() -> None:
    records, traffic = run(small(malformed_rate=0.02))
    bad = [r for r in records if isinstance(r, BadRecord)]
    assert len(bad) == traffic.truth.malformed > 0
    assert {b.topic for b in bad} <= {"impressions", "clicks"}
    for b in bad:
        with pytest.raises(DecodeError):
            decode_event(b.raw)


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError):
        SyntheticTraffic(small(latent_dim=len(AXES) + 1))
    with pytest.raises(ValueError):
        SyntheticTraffic(small(base_ctr=0.0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.integers(0, 3_000),
    users=st.integers(1, 40),
    items=st.integers(1, 30),
    seed=st.integers(0, 2**32 - 1),
    new_frac=st.floats(0.0, 0.9),
    ctr=st.floats(0.01, 0.5),
    dup=st.floats(0.0, 0.5),
    bad=st.sampled_from([0.0, 0.05]),
    window=st.floats(1.0, 900.0),
)
def test_ground_truth_matches_emitted_events(
    events: int, users: int, items: int, seed: int, new_frac: float, ctr: float, dup: float, bad: float, window: float
) -> None:
    sim = SimulatorConfig(
        events=events,
        users=users,
        items=items,
        seed=seed,
        new_item_fraction=new_frac,
        base_ctr=ctr,
        duplicate_click_rate=dup,
        malformed_rate=bad,
        impressions_per_s=50.0,
    )
    stream, truth = synthetic_stream(sim)
    records = list(stream)
    imps = {r.impression_id: r for r in records if isinstance(r, Impression)}
    clicks = [r for r in records if isinstance(r, Click)]
    first_click: dict[str, Click] = {}
    for c in clicks:
        first_click.setdefault(c.impression_id, c)
    assert len(imps) + len(clicks) == events
    assert truth.impressions == len(imps)
    assert truth.clicks == len(first_click)
    assert truth.duplicate_clicks == len(clicks) - len(first_click)
    assert truth.items == sum(isinstance(r, Item) for r in records)
    assert truth.cold_start_items == sum(isinstance(r, Item) and r.ts > EPOCH for r in records)
    assert truth.malformed == sum(isinstance(r, BadRecord) for r in records)
    within = sum(c.ts - imps[i].ts <= window for i, c in first_click.items())
    assert truth.clicks_within(window) == within
    for imp_id in list(imps)[:5]:
        assert 0.0 < truth.oracle(imp_id) < 1.0
    assert truth.labels().sum() == len(first_click)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auc_matches_pairwise_definition(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([p[0] for p in pairs], float)
    labels = np.array([p[1] for p in pairs])
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        assert math.isnan(auc(scores, labels))
        return
    expected = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(scores, labels) == pytest.approx(expected)


# ---------------------------------------------------------------- replay


def write_csv(path: Path, rows: list[list[str]]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz"])
def test_replay_csv_sorts_validates_and_dead_letters(tmp_path: Path, name: str) -> None:
    log = tmp_path / name
    write_csv(
        log,
        [
            ["ts", "type", "impression_id", "user_id", "item_id", "device", "slot"],
            ["1700000010", "click", "m1", "", "", "", ""],
            ["1700000005", "impression", "m1", "u1", "i1", "mobile", "2"],
            ["1700000001", "impression", "m0", "u2", "i2", "", "1"],
            ["1700000010", "impression", "m2", "u1", "i1", "desktop", "3"],
            ["", "impression", "m3", "u1", "i1", "", ""],  # no ts
            ["1700000011", "view", "m4", "u1", "i1", "", ""],  # unknown type
            ["1700000011123", "click", "m0", "", "", "", ""],  # milliseconds
            ["1700000012", "impression", "m5", "", "i1", "", ""],  # no user
            ["1700000013", "impression", "m6", "u1", "i1", "x", "y", "extra"],  # too many cells
        ],
    )
    items = tmp_path / ("items.csv.gz" if name.endswith(".gz") else "items.csv")
    write_csv(
        items,
        [
            ["item_id", "text", "ts", "genre"],
            ["i1", "A red lamp", "1700000100", "home"],
            ["i2", "A blue book", "", ""],
            ["", "no id", "", ""],
        ],
    )
    records, counts = load_replay(log, items)
    bad = [r for r in records if isinstance(r, BadRecord)]
    good = [r for r in records if not isinstance(r, BadRecord)]
    assert counts == {"impressions": 3, "clicks": 1, "items": 2, "bad_records": 6}
    assert all(b.topic is None for b in bad)
    reasons = " | ".join(b.reason for b in bad)
    for fragment in ("missing field 'ts'", "unknown event type", "not a unix time", "'user_id'", "cells", "'item_id'"):
        assert fragment in reasons
    assert b"1700000011123" in b"".join(b.raw for b in bad)
    assert [type(r).__name__ for r in good] == ["Item", "Impression", "Item", "Impression", "Impression", "Click"]
    i2, m0, i1, m1 = good[0], good[1], good[2], good[3]
    assert (i2.item_id, i2.ts) == ("i2", 1700000001.0)  # no ts: the log's first ts
    assert (i1.item_id, i1.ts) == ("i1", 1700000005.0)  # late item row moved before first impression
    assert i1.attributes == {"genre": "home"}
    assert m0.context == {"slot": "1"}  # CSV values stay strings; empty = absent
    assert m1.context == {"device": "mobile", "slot": "2"}
    assert good[-2].impression_id == "m2" and good[-1].impression_id == "m1"  # impression before click at equal ts


def test_replay_jsonl_keeps_numbers_and_rejects_bad_lines(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl.gz"
    lines = [
        {
            "ts": 1700000002.5,
            "type": "impression",
            "impression_id": "a",
            "user_id": "u",
            "item_id": "i",
            "slot": 2,
            "score": 0.5,
            "vip": True,
            "gone": None,
        },
        {"ts": 1700000001, "type": "click", "impression_id": "z"},
        {"ts": 1700000003, "type": "impression", "impression_id": "b", "user_id": "u", "item_id": "i", "tags": ["x"]},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n[1, 2]\n\n"
    with gzip.open(log, "wt") as fh:
        fh.write(text)
    records, counts = load_replay(log)
    assert counts["bad_records"] == 3 and counts["impressions"] == 1 and counts["clicks"] == 1
    good = [r for r in records if not isinstance(r, BadRecord)]
    assert [r.ts for r in good] == [1700000001.0, 1700000002.5]
    assert good[1].context == {"slot": 2, "score": 0.5, "vip": True}
    reasons = [r.reason for r in records if isinstance(r, BadRecord)]
    assert any("scalar" in r for r in reasons) and sum("malformed JSON" in r for r in reasons) == 2
    assert any(r.raw == b"{not json" for r in records if isinstance(r, BadRecord))


def test_replay_events_round_trip_through_the_wire_codec(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text(
        json.dumps(
            {"ts": 1700000000, "type": "impression", "impression_id": "a", "user_id": "u", "item_id": "i", "hour": 3}
        )
        + "\n"
    )
    (event,), _ = load_replay(log)
    assert decode_event(encode_event(event)) == event


def test_replay_unknown_extension_rejected(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    path.write_text("x")
    with pytest.raises(ValueError):
        load_replay(path)


# ---------------------------------------------------------------- sources


def test_open_source_synthetic_and_replay(tmp_path: Path) -> None:
    cfg = Config()
    cfg.simulator.events = 500
    src = open_source(cfg)
    assert src.truth is not None and "synthetic" in src.description
    assert sum(isinstance(r, (Impression, Click)) for r in src.events) == 500
    log = tmp_path / "log.csv"
    write_csv(log, [["ts", "type", "impression_id"], ["1700000000", "click", "m"]])
    src = open_source(cfg, log=log)
    assert src.truth is None and [type(r) for r in src.events] == [Click]
    with pytest.raises(ValueError):
        open_source(cfg, items=log)


# ---------------------------------------------------------------- MovieLens 100K

ML100K = SHARED_DATA / "ml-100k"


def test_ml100k_helpers() -> None:
    assert [age_bucket(a) for a in (7, 18, 30, 44, 49, 55, 73)] == [
        "<18",
        "18-24",
        "25-34",
        "35-44",
        "45-49",
        "50-55",
        "56+",
    ]
    delays = [click_delay_s(u, i) for u in range(50) for i in range(50)]
    assert min(delays) >= 2 and max(delays) <= 120 and len(set(delays)) > 50
    assert click_delay_s(3, 9) == click_delay_s(3, 9)


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="MovieLens 100K not available")
def test_ml100k_conversion_replays_every_rating(tmp_path: Path) -> None:
    events, items = convert_ml100k(ML100K, tmp_path / "ml")
    ratings = [int(line.split("\t")[2]) for line in (ML100K / "u.data").read_text().splitlines() if line.strip()]
    records, counts = load_replay(events, items)
    assert counts == {
        "impressions": 100_000,
        "clicks": sum(r >= POSITIVE_RATING for r in ratings),
        "items": 1_682,
        "bad_records": 0,
    }
    keyed = [(r.ts, KIND_RANK[type(r)]) for r in records]
    assert keyed == sorted(keyed)
    imps = {r.impression_id: r for r in records if isinstance(r, Impression)}
    clicks = [r for r in records if isinstance(r, Click)]
    assert all(2 <= c.ts - imps[c.impression_id].ts <= 120 for c in clicks)
    sample = next(iter(imps.values()))
    assert set(sample.context) == {"age", "gender", "occupation"}
    toy = next(r for r in records if isinstance(r, Item) and r.item_id == "i1")
    assert toy.text.startswith("Toy Story (1995)") and "Animation" in toy.text
    assert toy.attributes["year"] == "1995"
    assert not any(p.is_relative_to(Path(__file__).resolve().parents[1]) for p in (events, items))


def test_the_catalogue_skips_a_malformed_row_and_stops_at_the_traffic() -> None:
    """A bad row sorted among the leading items (a log's malformed first line) must not cut the
    catalogue short: a semantics-on run waited for a catalogue of 0 items and trained nothing."""
    from livectr.simulators.sources import leading_items

    bad = BadRecord(b"not json", "malformed", None)
    items = [Item("i1", 0.0, "a"), Item("i2", 0.0, "b")]
    stream = [items[0], bad, items[1], Impression("x", 1.0, "u", "i1", {}), Item("i3", 2.0, "c")]
    assert list(leading_items(iter(stream))) == items
