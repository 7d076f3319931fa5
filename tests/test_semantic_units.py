"""Fast tests of the semantic cache's pure pieces: reducer, store, work queue, wire, HTTP enrichment."""

from __future__ import annotations

import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livectr.core.broker import free_port
from livectr.core.config import Config
from livectr.core.events import DecodeError
from livectr.semantic_cache import wire
from livectr.semantic_cache.codec import dequantize
from livectr.semantic_cache.enrich import (
    OpenAICompatibleEnricher,
    clean_output,
    enriched_text,
    item_prompt,
    make_enricher,
)
from livectr.semantic_cache.reducer import PCAReducer, bytes_per_example, load_reducer, reducer_path
from livectr.semantic_cache.refresher import EncodeJob, WorkQueue
from livectr.semantic_cache.store import StoredVector, VectorStore, text_hash


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# -- reducer -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), dim=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_pca_shapes_orthonormal_and_deterministic(n: int, dim: int, seed: int) -> None:
    x = _unit(np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32))
    a, b = PCAReducer.fit(x, dim), PCAReducer.fit(x, dim)
    assert a.hash == b.hash, "refitting on the same data must give the same projection"
    assert a.transform(x).shape == (n, dim)
    kept = a.components[np.abs(a.components).sum(axis=1) > 0]
    assert len(kept) == min(dim, n)
    np.testing.assert_allclose(kept @ kept.T, np.eye(len(kept)), atol=1e-4)
    assert 0.0 < a.explained_variance <= 1.0 + 1e-6


def test_pca_keeps_neighbourhoods_of_structured_data(tmp_path: Path) -> None:
    """Vectors near a few centres in 384-d: after PCA to 32 and int8, each still has its twin nearest."""
    rng = np.random.default_rng(1)
    centres = _unit(rng.normal(size=(40, 384)))
    x = _unit(
        np.concatenate(
            [centres + 0.05 * rng.normal(size=centres.shape), centres + 0.05 * rng.normal(size=centres.shape)]
        )
    )
    reducer = PCAReducer.fit(x, 32)
    reduced = np.stack([dequantize(b, 32) for b in reducer.reduce_bytes(x)])
    sims = reduced @ reduced.T
    np.fill_diagonal(sims, -np.inf)
    twins = np.concatenate([np.arange(40, 80), np.arange(0, 40)])
    assert (sims.argmax(axis=1) == twins).mean() >= 0.95
    assert len(reducer.reduce_bytes(x[:1])[0]) == 32 and bytes_per_example(32) == 64


def test_pca_persists_with_same_hash(tmp_path: Path) -> None:
    x = _unit(np.random.default_rng(2).normal(size=(50, 24)))
    reducer = PCAReducer.fit(x, 8)
    path = reducer_path(tmp_path, "teacher v1/x", 8)
    reducer.save(path)
    loaded = load_reducer(tmp_path, "teacher v1/x", 8)
    assert loaded is not None and loaded.hash == reducer.hash
    assert loaded.version("teacher") == f"teacher/pca8-{reducer.hash}"
    np.testing.assert_array_equal(loaded.transform(x), reducer.transform(x))
    assert load_reducer(tmp_path, "other", 8) is None


def test_pca_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        PCAReducer.fit(np.ones((1, 8)), 2)
    with pytest.raises(ValueError):
        PCAReducer.fit(np.ones((5, 8)), 9)


# -- store ---------------------------------------------------------------------------------------


def _row(item_id: str, text: str, vec: np.ndarray, version: str = "t1") -> StoredVector:
    return StoredVector(
        "item", item_id, version, text_hash(text), text, "", vec.astype(np.float16), None, "", 1.0, time.time()
    )


def test_store_round_trip_survives_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vecs = _unit(rng.normal(size=(3, 384)))
    store = VectorStore(tmp_path / "semantic")
    store.put_many(
        [
            _row("a", "apple pie", vecs[0]),
            _row("b", "banana bread", vecs[1]),
            _row("a", "apple pie", vecs[2], version="t2"),
        ]
    )
    store.set_reduced([(("item", "a", "t1"), b"\x01" * 32, "r1"), (("item", "zz", "t1"), b"\x02" * 32, "r1")])
    store.close()

    reopened = VectorStore(tmp_path / "semantic")
    assert len(reopened) == 3
    a = reopened.get("item", "a", "t1")
    assert a is not None and a.text == "apple pie" and a.reduced == b"\x01" * 32 and a.reducer == "r1"
    np.testing.assert_array_equal(a.full, vecs[0].astype(np.float16))
    assert reopened.is_current("item", "a", "t1", text_hash("apple pie"))
    assert not reopened.is_current("item", "a", "t1", text_hash("apple tart"))
    assert reopened.get("item", "zz", "t1") is None, "set_reduced must not invent rows"
    assert reopened.versions("item") == {"t1": 2, "t2": 1}
    assert {r.id for r in reopened.rows("item", "t1")} == {"a", "b"}
    reopened.put_many([_row("b", "banana cake", vecs[2])])
    assert reopened.get("item", "b", "t1").text == "banana cake"
    reopened.close()
    assert VectorStore(tmp_path / "semantic").get("item", "b", "t1").text == "banana cake"


def test_text_hash_depends_on_attributes_only_when_given() -> None:
    assert text_hash("x") == text_hash("x", None) == text_hash("x", {})
    assert text_hash("x", {"price": 1}) != text_hash("x", {"price": 2})
    assert text_hash("x", {"a": 1, "b": 2}) == text_hash("x", {"b": 2, "a": 1})


# -- work queue ----------------------------------------------------------------------------------


def _job(item_id: str, text: str = "t") -> EncodeJob:
    return EncodeJob(item_id, text, {}, text_hash(text), 0.0, 0.0)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "urgent", "prio", "drop"]), st.integers(0, 9), st.integers(0, 3)), max_size=40
    )
)
def test_queue_coalesces_and_serves_urgent_first(ops: list[tuple[str, int, int]]) -> None:
    queue = WorkQueue()
    latest: dict[str, str] = {}
    urgent: set[str] = set()
    for op, i, version in ops:
        item_id, text = f"i{i}", f"text{version}"
        if op == "drop":
            queue.discard(item_id)
            latest.pop(item_id, None)
            urgent.discard(item_id)
        elif op == "prio":
            assert queue.prioritise(item_id) == (item_id in latest)
            if item_id in latest:
                urgent.add(item_id)
        else:
            queue.put(_job(item_id, text), urgent=op == "urgent")
            latest[item_id] = text
            if op == "urgent":
                urgent.add(item_id)
    taken: list[EncodeJob] = []
    while len(queue):
        taken.extend(queue.take(3, timeout_s=0))
    assert sorted(j.item_id for j in taken) == sorted(latest), "every pending item exactly once"
    assert all(j.text == latest[j.item_id] for j in taken), "the latest text wins"
    flags = [j.item_id in urgent for j in taken]
    assert flags == sorted(flags, reverse=True), "urgent items come first"


# -- wire ----------------------------------------------------------------------------------------


def test_wire_round_trip_and_rejections() -> None:
    vec = wire.SemanticVector("item", "i1", "v", b"\x00" * 32, 1.0, 2.0, 3.0)
    assert wire.decode_vector(wire.encode(vec)) == vec
    miss = wire.MissReport("item", ["a", "b"], 4.0, "r")
    assert wire.decode_request(wire.encode(miss)) == miss
    for bad in (None, b"\xc1", wire.encode(miss)):
        with pytest.raises(DecodeError):
            wire.decode_vector(bad)
    with pytest.raises(DecodeError):
        wire.decode_request(wire.encode(vec))


# -- enrichment over HTTP ------------------------------------------------------------------------


def test_openai_enricher_against_stub_server(chat_server: ThreadingHTTPServer) -> None:
    url = f"http://127.0.0.1:{chat_server.server_port}"
    enricher = OpenAICompatibleEnricher(url, "tiny-model", api_key="k", timeout_s=0.5)
    text = enricher.enrich_item("Häagen-Dazs strawberry light ice cream", {"price": 5.5})
    assert text == "Häagen-Dazs strawberry light ice cream. brand tier: premium; health: light; occasion: treat"
    path, body, auth = chat_server.requests[-1]  # type: ignore[attr-defined]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "tiny-model" and body["temperature"] == 0 and body["max_tokens"] == 64
    assert "price: 5.5" in body["messages"][1]["content"]
    assert enricher.summarize_user(["a", "b"]).startswith("brand tier")
    assert enricher.stats.succeeded == 2 and enricher.stats.fallbacks == 0
    assert OpenAICompatibleEnricher(url + "/v1/", "m").endpoint == f"{url}/v1/chat/completions"


@pytest.mark.parametrize("mode", ["error", "slow", "empty", "shape"])
def test_openai_enricher_falls_back_and_counts(chat_server: ThreadingHTTPServer, mode: str) -> None:
    chat_server.mode = mode  # type: ignore[attr-defined]
    enricher = OpenAICompatibleEnricher(f"http://127.0.0.1:{chat_server.server_port}", "m", timeout_s=0.3)
    assert enricher.enrich_item("plain text") == "plain text"
    assert enricher.summarize_user(["x", "y"]) == "x; y"
    assert enricher.stats.fallbacks == 2 and enricher.stats.succeeded == 0 and enricher.stats.last_error


def test_openai_enricher_unreachable_server_falls_back() -> None:
    enricher = OpenAICompatibleEnricher(f"http://127.0.0.1:{free_port()}", "m", timeout_s=0.5)
    assert enricher.enrich_item("plain") == "plain"
    assert enricher.stats.fallbacks == 1 and "URLError" in enricher.stats.last_error


def test_prompt_and_cleaning() -> None:
    prompt = item_prompt("Vanilla tub", {"category": "dessert"})
    assert "Häagen-Dazs" in prompt and prompt.endswith("Deeper attributes:") and "category: dessert" in prompt
    assert clean_output('  "Deeper attributes:  premium;\n light "  ') == "premium; light"
    assert enriched_text("a", "") == "a" and enriched_text("a", "b") == "a. b"


def test_make_enricher_validates_settings() -> None:
    cfg = Config()
    assert make_enricher(cfg) is None
    cfg.semantic.enrich = "openai"
    with pytest.raises(ValueError):
        make_enricher(cfg)
    cfg.semantic.enrich_url, cfg.semantic.enrich_model = "http://127.0.0.1:1", "m"
    assert isinstance(make_enricher(cfg), OpenAICompatibleEnricher)
    cfg.semantic.enrich, cfg.semantic.enrich_model = "hf", "/does/not/exist"
    with pytest.raises(ValueError):
        make_enricher(cfg)
