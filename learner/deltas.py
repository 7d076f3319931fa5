"""Deltas: the rows the learner touched since its last publish, and applying them to a replica.

Why rows keyed by id: between full snapshots (tens of megabytes: the hashed context and pair
tables are allocated whole) a trained mini-batch only moves the rows of its users, items,
context buckets and (user, item) pairs, plus the small dense layers. A delta carries exactly
those, as Monolith syncs its sparse parameters, so a replica stays seconds behind the learner
for a fraction of the bytes. User and item rows are sent with their ids *and* row numbers: a
row can be given to another id after vocabulary expiry, and the pair buckets hash row numbers,
so the replica binds each id to the learner's row (:meth:`GrowingVocab.bind`). Rows the
learner's vocabulary expiry freed since the last publish (and not given to a new id since) go
as ``{user,item}.expired`` with their new generation, and the replica frees them
(:meth:`GrowingVocab.unbind`): without that, an id the learner dropped would keep its row and
weights on the replica until the row was reused. Row 0, the shared row of unknown ids (which
the learner trains as the row of rare ids under admission), travels by index with a null id.
Context and
pair rows are hashed buckets, sent by index. Dense weights (the cross network, the MLP, the
semantic part: ≈35k floats with the default shape) go in every delta — they change on every
step, and a replica with stale dense weights would not score as the learner does.

A delta is one safetensors blob: arrays for the values, a JSON ``livectr`` metadata entry for
the ids, the versioning (``base_version``: the full snapshot it applies on; ``seq``: 1, 2, …
since that snapshot, each delta holding what changed since the previous one) and the global
scalars. It also carries the decision times of the examples trained into it (a bounded
sample), so the scorer that applies it can measure event → served freshness.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

from livectr.core.events import KIND_SCORE_REQUEST
from livectr.learner import item_vectors
from livectr.learner.features import EncodedBatch
from livectr.learner.predictor import Predictor
from livectr.learner.vocab import UNKNOWN_ROW, ContextHasher

#: Decision times carried per delta for the freshness measurement (a uniform sample beyond).
FRESHNESS_SAMPLE = 4096
#: Per-user arrays of the fast experts (indexed by user row) that scoring reads, sent for the
#: touched users (the precisions only matter to the learner); weights as float32, times float64.
EXPERT_USER_ARRAYS = ("user_w", "user_ts", "slope_w", "taste_w")
#: Global arrays of the fast experts that scoring reads, sent whole.
EXPERT_GLOBAL_ARRAYS = ("taste_w0", "mix", "serving_feedback")
#: Model config keys that must agree between a delta and the model it is applied to.
SHAPE_KEYS = (
    "embedding_dim",
    "context_fields",
    "context_buckets",
    "pair_buckets",
    "word_buckets",
    "hidden",
    "sem_dim",
    "sem_hidden",
)


class DeltaError(ValueError):
    """A delta that cannot be applied: unreadable, or for a model of another shape."""


@dataclass
class TouchedRows:
    """Rows of each id table trained since the last :meth:`take`, and the examples' decision times."""

    tables: dict[str, list[np.ndarray]] = field(default_factory=dict)
    #: User and item rows freed by vocabulary expiry (``user``/``item`` → arrays of rows).
    expired: dict[str, list[np.ndarray]] = field(default_factory=dict)
    decided_at: list[np.ndarray] = field(default_factory=list)
    trained_at: list[np.ndarray] = field(default_factory=list)
    examples: int = 0

    def add(self, batch: EncodedBatch, finished: float) -> None:
        """Record a trained batch (called by :meth:`OnlineLearner.learn_batch`)."""
        for name, rows in (
            ("user", batch.user),
            ("item", batch.item),
            ("context", batch.context),
            ("pair", batch.pair),
            ("words", batch.words),
        ):
            self.tables.setdefault(name, []).append(np.asarray(rows).reshape(-1))
        trained = (batch.kinds != KIND_SCORE_REQUEST) & (batch.decided_at > 0)
        self.decided_at.append(batch.decided_at[trained])
        self.trained_at.append(np.full(int(trained.sum()), finished))
        self.examples += int((batch.kinds != KIND_SCORE_REQUEST).sum())

    def expire(self, name: str, rows: np.ndarray) -> None:
        """Record rows of table ``name`` freed by expiry (called by :meth:`OnlineLearner.expire_rows`)."""
        self.expired.setdefault(name, []).append(np.asarray(rows, dtype=np.int64).reshape(-1))

    def take_expired(self) -> dict[str, np.ndarray]:
        """Unique rows freed per table since the last take (call before :meth:`take`, which clears them)."""
        return {name: np.unique(np.concatenate(parts)) for name, parts in self.expired.items()}

    def take(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, int]:
        """Unique rows per table, decision and training times, examples; then start afresh."""
        rows = {name: _unique_rows(np.concatenate(parts)) for name, parts in self.tables.items()}
        decided = np.concatenate(self.decided_at) if self.decided_at else np.zeros(0)
        trained = np.concatenate(self.trained_at) if self.trained_at else np.zeros(0)
        examples = self.examples
        self.tables, self.decided_at, self.trained_at, self.examples = {}, [], [], 0
        self.expired = {}
        return rows, decided, trained, examples

    def __bool__(self) -> bool:
        return self.examples > 0 or bool(self.expired)


def _unique_rows(rows: np.ndarray) -> np.ndarray:
    """``np.unique`` of non-negative row numbers by marking a flag per row instead of sorting:
    2 s of a busy learner touch millions of pair and word lookups in tables of ~1M rows, and
    the sort was ~4 % of the learner's time (py-spy)."""
    if not rows.size:
        return rows.astype(np.int64)
    mark = np.zeros(int(rows.max()) + 1, dtype=bool)
    mark[rows] = True
    return np.flatnonzero(mark).astype(np.int64)


def _sparse_keys(predictor: Predictor) -> dict[str, str]:
    """Table name → its weight's key in the model's state dict."""
    module_names = {id(m): n for n, m in predictor.model.named_modules()}
    return {name: f"{module_names[id(t)]}.weight" for name, t in predictor.model.sparse_tables().items()}


def _sample(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    n = len(arrays[0])
    if n <= FRESHNESS_SAMPLE:
        return arrays
    pick = np.sort(rng.choice(n, FRESHNESS_SAMPLE, replace=False))
    return tuple(a[pick] for a in arrays)


def build_delta(
    predictor: Predictor, touched: TouchedRows, base_version: int, seq: int, snapshot_version: int | None = None
) -> tuple[bytes, dict[str, Any]]:
    """The delta blob of everything ``touched`` since the last publish, and its metadata
    (``snapshot_version``: the newest snapshot the model after this delta contains)."""
    expired = touched.take_expired()
    rows, decided, trained, examples = touched.take()
    decided, trained = _sample(np.random.default_rng(seq), decided, trained)
    model, feat = predictor.model, predictor.featurizer
    freed = _split_freed(predictor, rows, expired)
    arrays: dict[str, np.ndarray] = {}
    keys = _sparse_keys(predictor)
    meta: dict[str, Any] = {
        "kind": "delta",
        "base_version": int(base_version),
        "seq": int(seq),
        "snapshot_version": int(snapshot_version or base_version),
        "created_at": time.time(),
        "examples": examples,
        "examples_seen": predictor.examples_seen,
        "item_head_distilled": predictor.item_head_distilled,
        "model_config": model.mc.to_dict(),
        "context_slots": list(feat.context.slots),
    }
    state = model.state_dict()
    for name, weight_key in keys.items():
        r = rows.get(name, np.zeros(0, dtype=np.int64))
        weight = state[weight_key]
        arrays[f"{name}.rows"] = r.astype(np.int64)
        arrays[f"{name}.values"] = weight.index_select(0, torch.from_numpy(r).to(weight.device)).cpu().numpy()
    for name, vocab in (("user", feat.users), ("item", feat.items)):
        r = arrays[f"{name}.rows"]
        meta[f"{name}_ids"] = [vocab.id_of(int(x)) if x > UNKNOWN_ROW else None for x in r]
        arrays[f"{name}.counts"] = vocab.counts[r].astype(np.int64)
        arrays[f"{name}.generation"] = vocab.generation[r].astype(np.int64)  # the pair hash mixes it in
        arrays[f"{name}.expired"] = freed[name]
        arrays[f"{name}.expired_generation"] = vocab.generation[freed[name]].astype(np.int64)
        meta[f"{name}_expired"] = int(freed[name].size)
    if feat.word_buckets:  # the words of the items sent: the scorer reads an item's words from its row
        items = arrays["item.rows"]
        feat.words_capacity(feat.items.capacity)
        arrays["item.words"] = feat.item_words[items]
    if feat.sem_dim:  # and their teacher vectors, which every score reads from the row
        arrays.update(feat.item_vectors.rows(arrays["item.rows"]))
    for key, value in state.items():
        if key not in keys.values():
            arrays[f"dense.{key}"] = value.detach().cpu().contiguous().numpy()
    if predictor.experts is not None:
        experts = predictor.experts
        users = arrays["user.rows"]
        for name in EXPERT_USER_ARRAYS:
            table = getattr(experts, name)
            if table.shape[0]:
                inside = users[users < table.shape[0]]
                dtype = np.float64 if name == "user_ts" else np.float32
                values = np.full((users.size, *table.shape[1:]), np.nan, dtype=dtype)
                values[: inside.size] = table[inside]  # rows are sorted: those beyond the table are last
                arrays[f"experts.{name}"] = values
        for name, value in experts.state().items():
            if name in EXPERT_GLOBAL_ARRAYS:
                arrays[f"experts.{name}"] = np.asarray(value, dtype=np.float64).reshape(-1)
    arrays["freshness.decided_at"] = decided.astype(np.float64)
    arrays["freshness.trained_at"] = trained.astype(np.float64)
    blob = save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"livectr": json.dumps(meta)})
    return blob, meta


def _split_freed(
    predictor: Predictor, rows: dict[str, np.ndarray], expired: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Rows of the user and item tables free now: those expired since the last publish and not
    given to a new id since, and touched rows that expired after training. They are removed from
    ``rows`` (a free row has no id to send; its values are reset and never looked up)."""
    freed: dict[str, np.ndarray] = {}
    empty = np.zeros(0, dtype=np.int64)
    for name, vocab in (("user", predictor.featurizer.users), ("item", predictor.featurizer.items)):
        r = rows.get(name, empty)
        keep = vocab.live(r) | (r == UNKNOWN_ROW)
        candidates = np.union1d(expired.get(name, empty), r[~keep])
        freed[name] = candidates[~vocab.live(candidates)].astype(np.int64)
        rows[name] = r[keep]
    return freed


@dataclass
class Delta:
    """A parsed delta: its metadata and arrays."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def base_version(self) -> int:
        return int(self.meta["base_version"])

    @property
    def seq(self) -> int:
        return int(self.meta["seq"])


def parse_delta(blob: bytes) -> Delta:
    """Parse a delta blob; raises :class:`DeltaError` when it is not one."""
    try:
        arrays = load_numpy(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["livectr"])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise DeltaError(f"not a delta ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("kind") != "delta":
        raise DeltaError("not a delta (no livectr delta metadata)")
    for name in ("user", "item"):
        if len(meta.get(f"{name}_ids", ())) != len(arrays.get(f"{name}.rows", ())):
            raise DeltaError(f"delta's {name} ids and rows disagree")
        freed, gens = arrays.get(f"{name}.expired"), arrays.get(f"{name}.expired_generation")
        if (freed is None) != (gens is None) or (freed is not None and gens is not None and len(freed) != len(gens)):
            raise DeltaError(f"delta's {name} expired rows and generations disagree")
        if freed is not None and freed.size and int(freed.min()) <= UNKNOWN_ROW:
            raise DeltaError(f"delta frees {name} row {int(freed.min())}, the shared unknown row")
    return Delta(meta, arrays)


def apply_delta(predictor: Predictor, delta: Delta) -> None:
    """Write a delta's rows, dense weights and expert state into ``predictor`` (a serving replica).

    The caller holds the lock the predictor scores under. Unknown ids keep scoring as the
    impression-weighted mean row, recomputed here since the counts moved.
    """
    model, feat = predictor.model, predictor.featurizer
    have = model.mc.to_dict()
    want = delta.meta.get("model_config", {})
    for key in SHAPE_KEYS:
        if json.dumps(have.get(key)) != json.dumps(want.get(key)):
            raise DeltaError(f"delta is for another model shape ({key}: {want.get(key)} vs {have.get(key)})")
    a = delta.arrays
    for name, table in model.sparse_tables().items():
        rows, values = a.get(f"{name}.rows"), a.get(f"{name}.values")
        if rows is None or values is None or len(rows) != len(values) or values.shape[1:] != table.weight.shape[1:]:
            raise DeltaError(f"delta's {name} rows do not fit the table")
        if name not in ("user", "item") and rows.size and int(rows.max()) >= table.num_embeddings:
            raise DeltaError(f"delta's {name} rows are beyond the table ({int(rows.max())} >= {table.num_embeddings})")
    words = a.get("item.words")
    if words is not None and words.shape != (len(a["item.rows"]), feat.max_item_words):
        raise DeltaError(f"delta's item words do not fit ({words.shape}, {feat.max_item_words} per item)")
    vectors = a.get(item_vectors.DATA_KEY)
    present = a.get(item_vectors.PRESENT_KEY)
    if vectors is not None and (
        present is None
        or vectors.shape != (len(a["item.rows"]), feat.sem_dim)
        or present.shape != (len(a["item.rows"]),)
    ):
        raise DeltaError(f"delta's item vectors do not fit ({vectors.shape}, {feat.sem_dim} per item)")
    slots = list(delta.meta.get("context_slots", []))
    if slots != feat.context.slots:
        feat.context = ContextHasher.from_state({**feat.context.state(), "slots": slots})
    with torch.no_grad():
        for name, vocab in (("user", feat.users), ("item", feat.items)):
            freed = a.get(f"{name}.expired")
            if freed is not None:  # first: a row freed then reused since is in the rows below
                for row, gen in zip(freed.tolist(), a[f"{name}.expired_generation"].tolist(), strict=True):
                    vocab.unbind(row, gen)
            if freed is not None and name == "item":
                feat.clear_items(freed)
            rows = a[f"{name}.rows"]
            generations = a.get(f"{name}.generation")
            gens = generations.tolist() if generations is not None else [None] * len(rows)
            for key, row, gen in zip(delta.meta[f"{name}_ids"], rows.tolist(), gens, strict=True):
                if row > UNKNOWN_ROW:  # row 0 (unknown ids) has values but no id
                    vocab.bind(key, row, gen)
            vocab.counts[rows] = a[f"{name}.counts"]
        words = a.get("item.words")
        if words is not None and feat.word_buckets:
            feat.words_capacity(feat.items.capacity)
            feat.item_words[a["item.rows"]] = words
        if vectors is not None and feat.sem_dim:
            feat.item_vectors.apply_rows(a["item.rows"], a)
        tables = model.sparse_tables()
        tables["user"].grow(feat.users.capacity)
        tables["item"].grow(feat.items.capacity)
        for name, table in tables.items():
            rows, values = a[f"{name}.rows"], a[f"{name}.values"]
            if not rows.size:
                continue
            idx = torch.from_numpy(rows).to(table.weight.device)
            table.weight.index_copy_(0, idx, torch.from_numpy(values).to(table.weight))
        dense = {k.split(".", 1)[1]: torch.from_numpy(v.copy()) for k, v in a.items() if k.startswith("dense.")}
        model.load_state_dict(dense, strict=False)
    if predictor.experts is not None:
        _apply_experts(predictor, a)
    predictor.examples_seen = int(delta.meta.get("examples_seen", predictor.examples_seen))
    predictor.item_head_distilled = bool(delta.meta.get("item_head_distilled", predictor.item_head_distilled))
    predictor.set_unknown_rows_to_mean()


def _apply_experts(predictor: Predictor, a: dict[str, np.ndarray]) -> None:
    experts = predictor.experts
    assert experts is not None
    freed = a.get("user.expired")
    if freed is not None and freed.size:
        experts.reset_rows(freed)  # as the learner did: a user reusing the row starts afresh
    users = a["user.rows"]
    if users.size:
        experts.grow_users(int(users.max()) + 1)
    for name in EXPERT_USER_ARRAYS:
        values = a.get(f"experts.{name}")
        table = getattr(experts, name)
        if values is None or not table.shape[0] or values.shape[1:] != table.shape[1:]:
            continue
        known = ~np.isnan(values.reshape(len(values), -1)).any(axis=1)  # NaN: the learner had no row yet
        table[users[known]] = values[known]
    state = {name: a[f"experts.{name}"] for name in EXPERT_GLOBAL_ARRAYS if f"experts.{name}" in a}
    if "mix" in state:
        mix = state["mix"]
        experts.mix, experts.mix_taste, experts.mix_slope = (float(mix[i]) if mix.size > i else 0.0 for i in range(3))
    if "serving_feedback" in state:
        experts.serving_feedback = int(state["serving_feedback"][0])
    if experts.dim and "taste_w0" in state and state["taste_w0"].shape == experts.taste_w0.shape:
        experts.taste_w0 = state["taste_w0"].copy()
