"""The semantic cache with the real MiniLM teacher and the real broker fixture.

Covers: the teacher (offline, semantically sensible), ``similar()``, the client's miss and fill
paths, the refresher end to end (items → vectors in a client, dead letters, a miss filled
first) and a restart that recomputes nothing. Prints the measured figures (run with ``-s``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest

from livectr.core import bus
from livectr.core.config import Config
from livectr.core.events import EndOfStream, Impression, Item, encode_event
from livectr.core.lookup import SemanticLookup
from livectr.core.words import pack_words
from livectr.semantic_cache import client as client_mod
from livectr.semantic_cache import wire
from livectr.semantic_cache.client import SemanticCacheClient, SemanticClientFailed
from livectr.semantic_cache.codec import dequantize
from livectr.semantic_cache.reducer import PCAReducer
from livectr.semantic_cache.refresher import run_refresher
from livectr.semantic_cache.similar import similar
from livectr.semantic_cache.store import StoredVector, VectorStore, text_hash
from livectr.semantic_cache.teacher import MiniLMTeacher, Teacher

PRODUCTS = [
    "strawberry ice cream",
    "dark chocolate bar",
    "running shoes",
    "noise-cancelling headphones",
    "espresso beans",
    "crime novel",
    "yoga mat",
    "cast-iron skillet",
    "winter tyres",
    "green tea",
]
STYLES = ["premium", "budget", "organic", "family-size"]


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    return MiniLMTeacher(device="cpu", threads=1)


def _catalogue(n: int) -> list[Item]:
    return [
        Item(
            item_id=f"i{k}",
            ts=1_700_000_000.0 + k,
            text=f"{STYLES[k % 4]} {PRODUCTS[k % 10]}, pack {k // 40}",
            attributes={"category": PRODUCTS[k % 10].split()[-1]},
        )
        for k in range(n)
    ]


def _produce(cfg: Config, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    prod = bus.producer(cfg.kafka)
    tracker = bus.DeliveryTracker()
    for key, value in values:
        bus.produce(prod, topic, value, key=key, on_delivery=tracker.callback)
    bus.flush_or_raise(prod, tracker, 20)


def _drain(cfg: Config, topic: str, want: int, timeout_s: float = 15.0) -> list[Any]:
    """Read ``want`` records of ``topic`` from the beginning (fewer on timeout)."""
    cons = bus.consumer(cfg.kafka)
    bus.assign_all(cons, cfg.kafka, [topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < want and time.monotonic() < deadline:
        out.extend(m for m in cons.consume(100, timeout=0.2) if m.error() is None)
    cons.close()
    return out


class _Refresher:
    """``run_refresher`` on a thread, with its latest status."""

    def __init__(self, cfg: Config, teacher: Teacher) -> None:
        self.stop = threading.Event()
        self.latest: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(cfg, teacher), daemon=True)
        self._thread.start()

    def _run(self, cfg: Config, teacher: Teacher) -> None:
        self.summary = run_refresher(cfg, teacher=teacher, on_status=self.latest.update, stop=self.stop)

    def wait(self, predicate: Any, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.latest and predicate(self.latest):
                return True
            time.sleep(0.1)
        return False

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive()
        return self.summary


@pytest.fixture
def cfg(kafka_config: Config) -> Iterator[Config]:
    kafka_config.semantic.reducer_fit_min = 24
    kafka_config.semantic.refresh_batch = 16
    kafka_config.semantic.client_catchup_s = 5.0
    kafka_config.semantic.miss_retry_s = 0.5
    bus.ensure_topics(kafka_config)
    yield kafka_config


# -- teacher and similar ---------------------------------------------------------------------------


def test_minilm_teacher_is_offline_normalised_and_semantic(teacher: Teacher) -> None:
    assert isinstance(teacher, Teacher) and teacher.dim == 384 and teacher.version.startswith("minilm-l6-v2-")
    v = teacher.encode(
        [
            "Häagen-Dazs strawberry light ice cream",
            "a low-fat strawberry frozen dessert",
            "heavy-duty winter tyres for trucks",
        ]
    )
    assert v.dtype == np.float32 and v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert teacher.encode([]).shape == (0, 384)


def test_similar_ranks_near_duplicate_first(teacher: Teacher, kafka_config: Config) -> None:
    texts = {
        "a": "Häagen-Dazs HEAVEN strawberry light ice cream, 500 ml tub",
        "dup": "Haagen Dazs Heaven light strawberry ice-cream 500ml",
        "c": "Ben & Jerry's chocolate fudge brownie ice cream",
        "d": "stainless steel garden hose reel",
        "e": "paperback crime novel set in Oslo",
        "f": "wireless phone charger, 15 W",
    }
    vectors = teacher.encode(list(texts.values()))
    store = VectorStore.open(kafka_config)
    store.put_many(
        [
            StoredVector("item", i, teacher.version, text_hash(t), t, "", v, None, "", 0.0, time.time())
            for (i, t), v in zip(texts.items(), vectors)
        ]
    )
    store.close()
    result = similar(kafka_config, "a", k=3)
    assert [r[0] for r in result][:2] == ["dup", "c"]
    assert result[0][2] == texts["dup"] and result[0][1] > 0.8 and len(result) == 3
    assert "a" not in [r[0] for r in result]
    assert similar(kafka_config, "unknown") == []


# -- client against the broker ---------------------------------------------------------------------


def _vector_record(
    item_id: str, version: str, seed: int, computed_at: float | None = None, kind: str = "item", source_ts: float = 0.0
) -> tuple[bytes, bytes]:
    blob = np.random.default_rng(seed).integers(-127, 128, size=32, dtype=np.int8).tobytes()
    now = time.time()
    rec = wire.SemanticVector(kind, item_id, version, blob, computed_at or now, source_ts, now - 0.5)
    return wire.vector_key(kind, item_id), wire.encode(rec)


@pytest.mark.integration
def test_client_consumer_thread_restarts_after_a_failure(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the consumer thread is retried where it stopped (nothing is skipped), and
    the stats say so; the lookups never see it."""
    monkeypatch.setattr(client_mod, "RESTART_BACKOFF_S", 0.05)
    failures = iter([True, True])
    apply = SemanticCacheClient._apply

    def flaky(self: SemanticCacheClient, msg: Any) -> None:
        if next(failures, False):
            raise RuntimeError("injected")
        apply(self, msg)

    monkeypatch.setattr(SemanticCacheClient, "_apply", flaky)
    client = SemanticCacheClient(cfg, warm_from_store=False, catchup_s=0)
    try:
        _produce(cfg, cfg.topics.semantic, [_vector_record(f"r{k}", "v1", k) for k in range(5)])
        assert client.wait_for([f"r{k}" for k in range(5)], 15), client.stats()
        stats = client.stats()
        assert stats["consumer_restarts"] == 2 and stats["consumer_alive"] == 1.0
        assert stats["records_consumed"] == 5 and client.failure is None
    finally:
        client.close()
    assert client.stats()["consumer_alive"] == 0.0


@pytest.mark.integration
def test_client_gives_up_after_bounded_restarts_and_fails_lookups(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "RESTART_BACKOFF_S", 0.01)
    monkeypatch.setattr(client_mod, "MAX_RESTARTS", 2)

    def broken(self: SemanticCacheClient, msg: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(SemanticCacheClient, "_apply", broken)
    client = SemanticCacheClient(cfg, warm_from_store=False, catchup_s=0)
    try:
        _produce(cfg, cfg.topics.semantic, [_vector_record("g", "v1", 1)])
        deadline = time.monotonic() + 15
        while client.consumer_alive and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = client.stats()
        assert stats["consumer_alive"] == 0.0 and stats["consumer_restarts"] == 2
        with pytest.raises(SemanticClientFailed, match="injected"):
            client.item("g")
    finally:
        client.close()


@pytest.mark.integration
def test_a_summary_or_version_arriving_during_a_fold_is_not_lost(cfg: Config) -> None:
    """The background thread may store a user's summary (or switch version) while the join
    thread folds that user; the answer folded from the older state must not be kept as current."""
    client = SemanticCacheClient(cfg, warm_from_store=False, catchup_s=2.0)
    try:
        _produce(cfg, cfg.topics.semantic, [_vector_record("x1", "v1", 1)])
        assert client.wait_for(["x1"], 15)
        client.observe_click("u", "x1", 100.0)
        fold = client._profiles.profile
        arrive: list[tuple[bytes, bytes]] = []

        def fold_while_a_record_arrives(user_id: str, at: float | None = None) -> Any:
            out = fold(user_id, at)
            if arrive:  # the record lands between this fold and the answer being stored
                before = client.records
                _produce(cfg, cfg.topics.semantic, [arrive.pop()])
                deadline = time.monotonic() + 15
                while client.records == before and time.monotonic() < deadline:
                    time.sleep(0.01)
            return out

        client._profiles.profile = fold_while_a_record_arrives  # type: ignore[method-assign]
        plain = client.user("u")
        client.observe_click("u", "x1", 200.0)  # the same item again: the same vector, folded anew
        arrive.append(_vector_record("u", "v1", 7, kind="user", source_ts=200.0))
        assert client.user("u") == plain  # folded before the summary was there
        blended = client.user("u")
        assert blended not in (None, plain), "the summary that arrived during the fold counts now"

        client.observe_click("v", "x1", 300.0)  # a user without a summary
        arrive.append(_vector_record("x1", "v2", 9, computed_at=time.time() + 5))
        stale = client.user("v")  # folded from v1 vectors while v2 replaced them
        assert client.version == "v2" and stale is not None
        assert client.user("v") not in (None, stale), "after the switch, the v2 vector, not the v1 answer"
    finally:
        client.close()


@pytest.mark.integration
def test_client_miss_is_reported_then_filled(cfg: Config) -> None:
    client = SemanticCacheClient(cfg, warm_from_store=False, catchup_s=2.0)
    try:
        assert isinstance(client, SemanticLookup)
        for _ in range(3):
            assert client.item("x1") is None
        assert client.item("x2") is None
        reports = [wire.decode_request(m.value()) for m in _drain(cfg, cfg.topics.semantic_misses, 1)]
        assert reports and sorted(reports[0].ids) == ["x1", "x2"], "missed ids are deduplicated and batched"

        _produce(
            cfg,
            cfg.topics.semantic,
            [
                _vector_record("x1", "v1", 1),
                _vector_record("x2", "v1", 2),
                (b"item:bad", b"not msgpack"),
                # A vector "computed at NaN" of another version used to switch the client to that
                # version, dropping every vector it had (tests/test_fuzz_decoders.py).
                (b"item:nan", msgspec.msgpack.encode(["vec", "item", "nan", "v9", bytes(32), math.nan, 0.0, 0.0])),
            ],
        )
        assert client.wait_for(["x1", "x2"], 15)
        assert client.version == "v1" and len(client.item("x1") or b"") == 32

        assert client.user("u") is None
        client.observe_click("u", "x1", 100.0)
        first = client.user("u")
        client.observe_click("u", "x2", 200.0)
        client.observe_click("u", "never-seen", 300.0)
        assert first is not None and client.user("u") != first
        assert client.user("u", at=150.0) == first and client.user("u", at=100.0) is None, "clicks before a time"
        stats = client.stats()
        assert stats["lookups"] == 5 and stats["misses"] == 4 and stats["miss_rate"] == pytest.approx(4 / 5)
        assert stats["clicks_folded"] == 3 and stats["clicks_without_vector"] == 1
        client.observe_click("u", "x2", 200.0)  # the same click again (a restored checkpoint): ignored
        assert client.stats()["clicks_repeated"] == 1 and client.stats()["clicks_folded"] == 3
        assert stats["miss_fill_p50_s"] >= 0 and stats["staleness_p50_s"] >= 0.5 - 0.05
        assert stats["ids_reported"] == 2

        dead = _drain(cfg, cfg.topics.dead_letters, 2)
        assert len(dead) == 2
        assert all(dict(d.headers())["livectr.reason"].startswith(b"invalid semantic vector") for d in dead)

        # A newer version replaces everything (old vectors live in another space); an older one is ignored.
        _produce(cfg, cfg.topics.semantic, [_vector_record("y", "v2", 3, computed_at=time.time() + 1)])
        assert client.wait_for(["y"], 15)
        assert client.version == "v2" and client.item("x1") is None and client.user("u") is None
        # The clicks are kept: as the new version's vectors arrive, the profile folds them —
        # "never-seen" included, a click made before its item had any vector.
        _produce(cfg, cfg.topics.semantic, [_vector_record("x1", "v2", 5, computed_at=time.time() + 2)])
        assert client.wait_for(["x1"], 15)
        only_x1 = client.user("u", at=150.0)
        assert only_x1 is not None and only_x1 != first, "the v2 vector, not the v1 one"
        assert client.user("u") == only_x1, "x2 and never-seen have no v2 vector yet"
        _produce(cfg, cfg.topics.semantic, [_vector_record("never-seen", "v2", 6, computed_at=time.time() + 3)])
        assert client.wait_for(["never-seen"], 15)
        assert client.user("u") not in (None, only_x1) and client.user("u", at=150.0) == only_x1
        _produce(cfg, cfg.topics.semantic, [_vector_record("z", "v1", 4, computed_at=time.time() - 100)])
        deadline = time.monotonic() + 10
        while client.stats()["stale_version_records"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.stats()["stale_version_records"] == 1 and client.version == "v2"

        # Idle users are forgotten: "u"'s newest click is at 300.
        client.observe_click("w", "x1", 900.0)
        assert client.expire_users(300.0) == 0 and client.user("u") is not None
        assert client.expire_users(301.0) == 1
        assert client.user("u") is None and client.user("u", at=250.0) is None and client.user("w") is not None
        assert client.stats()["users_expired"] == 1 and client.stats()["users_with_clicks"] == 1
    finally:
        client.close()


@pytest.mark.integration
def test_client_lookup_latency(cfg: Config) -> None:
    """The hot path is a dict lookup: measure hits and misses per call."""
    _produce(cfg, cfg.topics.semantic, [_vector_record(f"h{k}", "v1", k) for k in range(1000)])
    client = SemanticCacheClient(cfg, warm_from_store=False)
    try:
        assert client.caught_up.is_set() and client.stats()["vectors"] == 1000
        ids = [f"h{k % 1000}" for k in range(20_000)] + [f"m{k % 500}" for k in range(20_000)]
        clock = time.perf_counter_ns
        timings = np.empty(len(ids), dtype=np.int64)
        for n, item_id in enumerate(ids):
            t0 = clock()
            client.item(item_id)
            timings[n] = clock() - t0
        hit, miss = timings[:20_000], timings[20_000:]
        print(
            f"\nlookup hit p50 {np.percentile(hit, 50):.0f} ns p99 {np.percentile(hit, 99):.0f} ns; "
            f"miss p50 {np.percentile(miss, 50):.0f} ns p99 {np.percentile(miss, 99):.0f} ns"
        )
        assert np.percentile(hit, 50) < 20_000 and np.percentile(miss, 50) < 20_000
    finally:
        client.close()


# -- refresher end to end --------------------------------------------------------------------------


@pytest.mark.integration
def test_refresher_end_to_end_then_restart_without_recompute(cfg: Config, teacher: Teacher) -> None:
    cfg.learner.word_buckets = 1 << 12  # the learner uses item words: the refresher sends them
    catalogue = _catalogue(48)
    records = [(e.item_id.encode(), encode_event(e)) for e in catalogue]
    records += [
        (b"bad", b"{not json"),
        (b"imp", encode_event(Impression("imp1", 1.7e9, "u1", "i1"))),
        (b"empty", encode_event(Item("i-empty", 1.7e9, "   "))),
    ]
    _produce(cfg, cfg.topics.items, records)
    _produce(cfg, cfg.topics.items, [(None, encode_event(EndOfStream("test", p, 0))) for p in range(2)])

    refresher = _Refresher(cfg, teacher)
    client = SemanticCacheClient(cfg, warm_from_store=False, catchup_s=0)
    try:
        ids = [e.item_id for e in catalogue]
        assert client.wait_for(ids, 60), client.stats()
        assert "/pca32-" in client.version and client.version.startswith(teacher.version)

        # A miss for an item that does not exist yet: reported, remembered, encoded first on arrival.
        assert client.item("late") is None
        assert refresher.wait(lambda s: s["misses_unknown"] >= 1, 15), refresher.latest
        late = Item("late", 1.7e9 + 100, "organic strawberry ice cream, pack 9")
        _produce(cfg, cfg.topics.items, [(b"late", encode_event(late))])
        assert client.wait_for(["late"], 30)
        k = cfg.learner.max_item_words
        assert client.item_words("late") == pack_words(late.text, k) != b"", "an item's words come with its vector"
        # A changed text is re-encoded and re-published under the same id.
        before = client.item("i0")
        _produce(cfg, cfg.topics.items, [(b"i0", encode_event(Item("i0", 1.7e9 + 200, "cast-iron garden bench")))])
        deadline = time.monotonic() + 30
        while client.item("i0") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.item("i0") != before
        assert client.item_words("i0") == pack_words("cast-iron garden bench", k)
        stats = client.stats()
    finally:
        client.close()
        summary = refresher.finish()

    print(
        f"\nrefresher: {summary['texts_encoded']} texts, {summary['texts_per_second']:.0f} texts/s (teacher time), "
        f"{summary['bytes_per_example']} semantic bytes per example, PCA keeps "
        f"{summary['pca_explained_variance']:.0%} variance; client staleness p50 {stats['staleness_p50_s']:.2f} s "
        f"p99 {stats['staleness_p99_s']:.2f} s, miss fill p50 {stats['miss_fill_p50_s']:.2f} s"
    )
    assert summary["texts_encoded"] == 50 and summary["items_seen"] == 50
    assert summary["reducer_fitted"] and summary["pca_fitted_on"] >= 24
    assert summary["dead_letters"] == 3 and summary["end_markers"] == 2
    assert set(summary["dead_letter_reasons"]) == {"malformed JSON", "unexpected event", "invalid item"}
    assert summary["misses_received"] >= 1 and summary["undelivered"] == 0
    assert stats["miss_fill_p50_s"] >= 0 and stats["staleness_p99_s"] < 60

    store = VectorStore.open(cfg)
    assert len(store.rows("item")) == 49 and store.get("item", "i0", summary["teacher_version"]).text.startswith("cast")
    store.close()
    reducer_files = list((cfg.data_dir / "semantic" / "reducers").glob("*.npz"))
    assert (
        len(reducer_files) == 1
        and PCAReducer.load(reducer_files[0]).version(summary["teacher_version"]) == summary["version"]
    )

    # Restart: same data dir, items replayed from the beginning; nothing is recomputed.
    again = _Refresher(cfg, teacher)
    try:
        assert again.wait(lambda s: s["items_seen"] >= 50, 30), again.latest
    finally:
        second = again.finish()
    assert second["texts_encoded"] == 0, "an item's older text replayed from the topic must not be re-encoded"
    assert second["skipped_unchanged"] == 49 and second["skipped_outdated"] == 1
    assert second["version"] == summary["version"] and second["published_from_store"] >= 49

    warm = SemanticCacheClient(cfg, warm_from_store=True, catchup_s=0)
    try:
        assert warm.version == summary["version"] and warm.stats()["warmed_from_store"] == 49
        assert warm.item("late") is not None and warm.stats()["misses"] == 0
        assert warm.item_words("late") == pack_words(late.text, k)  # words from the stored text
    finally:
        warm.close()


@pytest.mark.integration
def test_llm_user_summary_reaches_the_join_side_client(cfg: Config, teacher: Teacher, chat_server: Any) -> None:
    """Enrichment on: clicks travel to the refresher, the LLM summarises the user, the summary's
    vector comes back and the user vector blends it with the click profile."""
    cfg.semantic.enrich = "openai"
    cfg.semantic.enrich_url = f"http://127.0.0.1:{chat_server.server_port}"
    cfg.semantic.enrich_model = "stub"
    cfg.semantic.user_summary_every = 2
    catalogue = _catalogue(30)
    _produce(cfg, cfg.topics.items, [(e.item_id.encode(), encode_event(e)) for e in catalogue])
    refresher = _Refresher(cfg, teacher)
    client = SemanticCacheClient(cfg, warm_from_store=False, catchup_s=0)
    try:
        assert client.wait_for([e.item_id for e in catalogue], 60), client.stats()
        client.observe_click("u1", "i3", 10.0)  # first click: a summary is due
        profile_only = client.user("u1")
        assert profile_only is not None
        deadline = time.monotonic() + 30
        while client.stats()["user_summaries"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        blended = client.user("u1")
        assert client.stats()["user_summaries"] >= 1 and blended != profile_only
        assert client.user("u1", at=10.5) == blended and client.user("u1", at=10.0) is None, (
            "a summary counts only after the event time of the newest click it covers"
        )
        client.observe_click("u1", "i5", 20.0)  # one more click: not yet due (every 2 since the last summary)
        assert refresher.wait(lambda s: s["user_clicks_received"] >= 2, 15), refresher.latest
        client.observe_click("u1", "i7", 30.0)
        assert refresher.wait(lambda s: s["user_summaries"] >= 2, 30), refresher.latest
    finally:
        client.close()
        summary = refresher.finish()
    assert summary["user_summaries"] == 2 and summary["user_clicks_received"] == 3
    prompts = [
        body["messages"][1]["content"]
        for _, body, _ in chat_server.requests
        if "Recently clicked items" in body["messages"][1]["content"]
    ]
    assert len(prompts) == 2 and catalogue[3].text in prompts[0]
    assert prompts[1].index(catalogue[7].text) < prompts[1].index(catalogue[3].text)  # most recent first
    store = VectorStore.open(cfg)
    row = store.get("user", "u1", summary["teacher_version"])
    store.close()
    assert row is not None and row.text.startswith("brand tier: premium") and row.reduced is not None
    # The blend is the normalised mean of the click profile (item i3 alone) and the summary.
    profile, llm = dequantize(profile_only, 32), dequantize(_first_user_vector(cfg, "u1"), 32)
    expected = profile / np.linalg.norm(profile) + llm / np.linalg.norm(llm)
    got = dequantize(blended, 32)
    assert float(got @ expected / np.linalg.norm(expected) / np.linalg.norm(got)) > 0.99


def _first_user_vector(cfg: Config, user_id: str) -> bytes:
    """The first user vector the refresher published for ``user_id``."""
    for msg in _drain(cfg, cfg.topics.semantic, 200, timeout_s=5):
        rec = wire.decode_vector(msg.value())
        if rec.kind == "user" and rec.id == user_id:
            return rec.reduced
    raise AssertionError("no user vector on the semantic topic")
