"""Synthetic CTR traffic with a known ground truth.

Why synthetic traffic: to show that the stream join, the online learner and semantic
distillation work, we need a stream whose true click probabilities, click delays and
cold-start structure are known. This generator draws a small "world" (users and items with
latent tastes, biases, context effects, text descriptions whose words encode the item's latent
vector) and then plays it out in event time:

* impressions arrive as a Poisson process (``impressions_per_s``); the item is drawn from a
  Zipf popularity law over the items born so far, new items getting a decaying boost so that
  cold-start impressions are common enough to measure;
* a click happens with probability ``sigmoid(b0 + user·item + biases + context)``, ``b0``
  calibrated so the overall CTR is close to ``base_ctr``; context (device, the user's local
  hour, the slot position) genuinely moves that probability;
* clicks arrive after a log-normal delay (median ``click_delay_median_s``; a tail beyond a
  10-minute attribution window); a few clicks are duplicated; optionally malformed raw records
  are mixed in (``malformed_rate``);
* user tastes drift as an Ornstein-Uhlenbeck process, so a model frozen at the start decays;
* new items are announced by an :class:`~livectr.core.events.Item` event at their birth, before any
  impression of them.

Everything is drawn in numpy chunks of impressions and merged by event time per chunk, which
keeps generation well above 150k events/s on one core. The output is deterministic for a seed.
``SimulatorConfig.events`` counts valid impression and click records (duplicates included,
items and malformed records not); the stream simply ends there, so clicks scheduled after the
end are never emitted (as in a real bounded log) and the ground truth only records what was
emitted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from livectr.core.config import SimulatorConfig
from livectr.core.events import Click, Impression, Item, encode_event
from livectr.simulators.records import BadRecord, SourceRecord

#: Event time of the first simulated second (2023-11-14 22:13:20 UTC).
EPOCH: Final[float] = 1_700_000_000.0

#: One semantic axis per latent dimension: (words for a positive coordinate, words for a negative one).
#: Real English words, so that a sentence-transformer maps them to distinguishable directions.
AXES: Final[tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = (
    (("bold", "intense", "vibrant"), ("calm", "gentle", "soft")),
    (("modern", "futuristic", "sleek"), ("classic", "vintage", "retro")),
    (("luxurious", "premium", "elegant"), ("budget", "cheap", "basic")),
    (("sporty", "athletic", "energetic"), ("relaxing", "cozy", "lazy")),
    (("funny", "playful", "whimsical"), ("serious", "formal", "somber")),
    (("outdoor", "adventurous", "rugged"), ("indoor", "homely", "domestic")),
    (("technical", "complex", "advanced"), ("simple", "easy", "beginner-friendly")),
    (("romantic", "sweet", "tender"), ("dark", "gritty", "violent")),
    (("healthy", "organic", "fresh"), ("indulgent", "sugary", "greasy")),
    (("musical", "rhythmic", "loud"), ("quiet", "silent", "peaceful")),
    (("colorful", "bright", "sunny"), ("monochrome", "grey", "muted")),
    (("family-friendly", "childlike", "kid-oriented"), ("adult", "mature", "grown-up")),
    (("fast", "quick", "instant"), ("slow", "patient", "lengthy")),
    (("natural", "wooden", "green"), ("synthetic", "plastic", "metallic")),
    (("social", "party", "group"), ("solitary", "personal", "private")),
    (("scientific", "educational", "factual"), ("fantasy", "magical", "mythical")),
)
CATEGORIES: Final[tuple[str, ...]] = (
    "book",
    "film",
    "song",
    "game",
    "gadget",
    "jacket",
    "recipe",
    "podcast",
    "lamp",
    "backpack",
    "course",
    "poster",
)
#: Filler sentences carry no signal; they make texts less templated.
FILLERS: Final[tuple[str, ...]] = (
    "Now available.",
    "A new arrival in the catalogue.",
    "Limited stock.",
    "Ships worldwide.",
    "Part of this season's selection.",
    "Reviewed by our editors.",
    "",
    "",
)
INTENSIFIERS: Final[tuple[str, ...]] = ("very", "extremely", "remarkably", "truly")
#: How many of an item's strongest latent coordinates its text mentions.
WORDS_PER_TEXT: Final[int] = 4

DEVICES: Final[tuple[str, ...]] = ("mobile", "desktop", "tablet")
DEVICE_EFFECT: Final[np.ndarray] = np.array([0.0, 0.25, -0.2])
SLOTS: Final[int] = 5
#: Position bias: every slot further down costs this much logit.
SLOT_EFFECT: Final[float] = -0.22
#: Evening peak of the daily curve (user's local hour) and its amplitude in logit.
HOUR_PEAK: Final[int] = 20
HOUR_AMPLITUDE: Final[float] = 0.35
TIMEZONES: Final[np.ndarray] = np.array([-8, -5, -3, 0, 1, 2, 5, 8, 9])
#: Variance of user·item (the personalised signal) in logit units.
AFFINITY_VARIANCE: Final[float] = 1.2
CHUNK: Final[int] = 8192
MIN_CLICK_DELAY_S: Final[float] = 0.2


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def hour_effect(hour: np.ndarray) -> np.ndarray:
    """Logit shift of the user's local hour: higher in the evening."""
    return HOUR_AMPLITUDE * np.cos(2.0 * np.pi * (hour - HOUR_PEAK) / 24.0)


def local_hour(ts: np.ndarray, tz: np.ndarray) -> np.ndarray:
    """Local hour of day (0..23) of unix times ``ts`` in timezones ``tz`` (hours from UTC)."""
    return ((np.floor(ts / 3600.0).astype(np.int64) + tz) % 24).astype(np.int64)


def describe_item(vec: np.ndarray, category: str, scale: float, rng: np.random.Generator) -> str:
    """A text whose descriptive words follow the signs of the item's strongest latent coordinates.

    Why: the semantic teacher only sees text; for semantics to help cold-start items the text
    must carry the latent signal that drives clicks. Each of the ``WORDS_PER_TEXT`` largest
    ``|vec[k]|`` contributes a word of axis ``k`` on the side of its sign, intensified when the
    coordinate is large; the category and a filler sentence add realistic noise.
    """
    top = np.argsort(-np.abs(vec), kind="stable")[:WORDS_PER_TEXT]
    words = []
    for k in top.tolist():
        pool = AXES[k][0] if vec[k] > 0 else AXES[k][1]
        word = pool[int(rng.integers(len(pool)))]
        if abs(vec[k]) > 1.3 * scale:
            word = f"{INTENSIFIERS[int(rng.integers(len(INTENSIFIERS)))]} {word}"
        words.append(word)
    head = ", ".join(words[:-1]) + f" and {words[-1]}" if len(words) > 1 else words[0]
    filler = FILLERS[int(rng.integers(len(FILLERS)))]
    return f"A {head} {category}. {filler}".strip()


def axis_of_word(word: str) -> tuple[int, int] | None:
    """``(axis, +1|-1)`` of a descriptive word, or None (for tests and analysis)."""
    for k, (pos, neg) in enumerate(AXES):
        if word in pos:
            return k, 1
        if word in neg:
            return k, -1
    return None


@dataclass
class World:
    """The static part of the simulation: users, items and the click model's parameters."""

    user_latent: np.ndarray  # (users, d), drifts during the run (mutated in place)
    user_bias: np.ndarray
    user_device: np.ndarray  # preferred device index
    user_tz: np.ndarray
    user_cum_weight: np.ndarray  # cumulative activity weights
    item_latent: np.ndarray  # (items, d), items ordered by birth time
    item_bias: np.ndarray
    item_category: np.ndarray
    item_birth: np.ndarray  # event time of birth; EPOCH for the initial catalogue
    item_zipf: np.ndarray  # base popularity weight
    item_text: list[str]
    latent_scale: float
    intercept: float = 0.0

    @property
    def initial_items(self) -> int:
        return int(np.sum(self.item_birth <= EPOCH))


def _expected_duration_s(sim: SimulatorConfig) -> float:
    """Event-time length of the run (used to spread item births over it)."""
    impressions = sim.events / (1.0 + sim.base_ctr * (1.0 + sim.duplicate_click_rate))
    return max(impressions / sim.impressions_per_s, 1.0)


def validate(sim: SimulatorConfig) -> None:
    """Reject settings the generator cannot honour, with a reason."""
    if not 1 <= sim.latent_dim <= len(AXES):
        raise ValueError(f"latent_dim must be 1..{len(AXES)} (one word axis per dimension), got {sim.latent_dim}")
    if sim.users < 1 or sim.items < 1 or sim.events < 0:
        raise ValueError("users and items must be >= 1 and events >= 0")
    if not 0.0 <= sim.new_item_fraction < 1.0:
        raise ValueError("new_item_fraction must be in [0, 1)")
    if not 0.0 < sim.base_ctr < 1.0:
        raise ValueError("base_ctr must be in (0, 1)")
    if sim.impressions_per_s <= 0 or sim.zipf_a < 0:
        raise ValueError("impressions_per_s must be > 0 and zipf_a >= 0")
    if not 0.0 <= sim.duplicate_click_rate <= 1.0 or sim.malformed_rate < 0:
        raise ValueError("duplicate_click_rate must be in [0, 1] and malformed_rate >= 0")


def build_world(sim: SimulatorConfig, rng: np.random.Generator) -> World:
    """Draw users, items, their texts and calibrate the intercept to ``base_ctr``."""
    validate(sim)
    d = sim.latent_dim
    scale = (AFFINITY_VARIANCE / d) ** 0.25  # so that var(user·item) = AFFINITY_VARIANCE
    users = sim.users
    user_rank = rng.permutation(users) + 1.0
    user_weight = user_rank**-0.5
    n_items = sim.items
    n_initial = max(1, round(n_items * (1.0 - sim.new_item_fraction)))
    births = np.full(n_items, EPOCH)
    if n_items > n_initial:
        span = 0.8 * _expected_duration_s(sim)
        births[n_initial:] = EPOCH + np.sort(rng.uniform(0.0, span, n_items - n_initial))
    births = np.round(births, 3)
    item_rank = rng.permutation(n_items) + 1.0
    categories = rng.integers(len(CATEGORIES), size=n_items)
    category_bias = rng.normal(0.0, 0.2, len(CATEGORIES))
    item_latent = rng.normal(0.0, scale, (n_items, d))
    text_rng = np.random.default_rng(rng.integers(2**63))
    world = World(
        user_latent=rng.normal(0.0, scale, (users, d)),
        user_bias=rng.normal(0.0, 0.3, users),
        user_device=rng.choice(len(DEVICES), size=users, p=[0.6, 0.3, 0.1]),
        user_tz=rng.choice(TIMEZONES, size=users),
        user_cum_weight=np.cumsum(user_weight),
        item_latent=item_latent,
        item_bias=rng.normal(0.0, 0.3, n_items) + category_bias[categories],
        item_category=categories,
        item_birth=births,
        item_zipf=item_rank**-sim.zipf_a,
        item_text=[describe_item(item_latent[i], CATEGORIES[categories[i]], scale, text_rng) for i in range(n_items)],
        latent_scale=scale,
    )
    world.intercept = _calibrate_intercept(world, sim, rng)
    return world


def draw(cum_weight: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` indices drawn proportionally to the weights whose cumulative sum is ``cum_weight``."""
    idx = np.searchsorted(cum_weight, rng.random(n) * cum_weight[-1], side="right")
    return np.minimum(idx, len(cum_weight) - 1)


def _context(
    world: World, users: np.ndarray, ts: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Device (mostly the user's usual one), the user's local hour and the slot (1-based)."""
    n = len(users)
    device = np.where(rng.random(n) < 0.8, world.user_device[users], rng.integers(len(DEVICES), size=n))
    hour = local_hour(ts, world.user_tz[users])
    slot = rng.integers(1, SLOTS + 1, size=n)
    return device, hour, slot


def click_logit(
    world: World,
    users: np.ndarray,
    items: np.ndarray,
    device: np.ndarray,
    hour: np.ndarray,
    slot: np.ndarray,
    intercept: float | None = None,
) -> np.ndarray:
    """True click logit of impressions (current user tastes)."""
    b0 = world.intercept if intercept is None else intercept
    affinity = np.einsum("ij,ij->i", world.user_latent[users], world.item_latent[items])
    return (
        b0
        + affinity
        + world.user_bias[users]
        + world.item_bias[items]
        + DEVICE_EFFECT[device]
        + hour_effect(hour)
        + SLOT_EFFECT * (slot - 1)
    )


def _calibrate_intercept(world: World, sim: SimulatorConfig, rng: np.random.Generator) -> float:
    """Bisect the intercept so that the mean click probability of typical traffic is ``base_ctr``."""
    n = 20_000
    users = draw(world.user_cum_weight, rng, n)
    items = draw(np.cumsum(world.item_zipf[: world.initial_items]), rng, n)
    ts = EPOCH + rng.uniform(0.0, 86_400.0, n)
    device, hour, slot = _context(world, users, ts, rng)
    rest = click_logit(world, users, items, device, hour, slot, intercept=0.0)
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigmoid(rest + mid).mean() < sim.base_ctr else (lo, mid)
    return 0.5 * (lo + hi)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - pos * (pos + 1) / 2.0) / (pos * neg))


@dataclass
class GroundTruth:
    """What the generator emitted, and the truth behind it.

    Filled while the stream is generated, a chunk ahead of the consumer: it is complete once
    the event iterator is exhausted. Impressions are indexed by their number ``n`` (the id is
    ``f"{id_prefix}{n}"``, numbers 0..impressions-1).
    """

    seed: int
    id_prefix: str
    items: int = 0
    cold_start_items: int = 0
    duplicate_clicks: int = 0
    malformed: int = 0
    malformed_by_topic: dict[str, int] = field(default_factory=dict)
    new_item_boost_s: float = 0.0
    _imp: dict[str, list[np.ndarray]] = field(
        repr=False, default_factory=lambda: {k: [] for k in ("ts", "p", "user", "item", "item_birth")}
    )
    _click_imp: list[np.ndarray] = field(repr=False, default_factory=list)
    _click_ts: list[np.ndarray] = field(repr=False, default_factory=list)
    _cache: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def record_impressions(
        self, ts: np.ndarray, p: np.ndarray, users: np.ndarray, items: np.ndarray, item_birth: np.ndarray
    ) -> None:
        for key, arr in (("ts", ts), ("p", p), ("user", users), ("item", items), ("item_birth", item_birth)):
            self._imp[key].append(arr)
        self._cache.clear()

    def record_clicks(self, imp_index: np.ndarray, ts: np.ndarray) -> None:
        """First (non-duplicate) clicks emitted."""
        self._click_imp.append(imp_index)
        self._click_ts.append(ts)
        self._cache.clear()

    def _cat(self, key: str) -> np.ndarray:
        if key not in self._cache:
            if key in self._imp:
                parts = self._imp[key]
            else:
                parts = self._click_imp if key == "click_imp" else self._click_ts
            dtype = np.int64 if key in ("user", "item", "click_imp") else np.float64
            self._cache[key] = np.concatenate(parts) if parts else np.zeros(0, dtype)
        return self._cache[key]

    @property
    def impressions(self) -> int:
        return len(self._cat("ts"))

    @property
    def clicks(self) -> int:
        """Impressions with at least one emitted click (duplicates not counted)."""
        return len(self._cat("click_imp"))

    def click_delay(self) -> np.ndarray:
        """Per impression: event-time delay of its emitted click, NaN when not clicked."""
        delay = np.full(self.impressions, np.nan)
        idx = self._cat("click_imp")
        delay[idx] = self._cat("click_ts") - self._cat("ts")[idx]
        return delay

    def clicks_within(self, window_s: float) -> int:
        """Clicks that arrived at most ``window_s`` after their impression (positives of policy ``wait``)."""
        idx = self._cat("click_imp")
        return int(np.sum(self._cat("click_ts") - self._cat("ts")[idx] <= window_s))

    def labels(self, window_s: float | None = None) -> np.ndarray:
        """Per impression: clicked (within ``window_s`` when given)."""
        delay = self.click_delay()
        return ~np.isnan(delay) if window_s is None else delay <= window_s

    def p_true(self) -> np.ndarray:
        """True click probability of every emitted impression (the oracle's score)."""
        return self._cat("p")

    def oracle(self, impression_id: str) -> float:
        """True click probability of one impression, by id."""
        if not impression_id.startswith(self.id_prefix):
            raise KeyError(impression_id)
        return float(self._cat("p")[int(impression_id[len(self.id_prefix) :])])

    def oracle_auc(self, window_s: float | None = None) -> float:
        """AUC of the true probabilities against the emitted labels: the ceiling for any model."""
        return auc(self.p_true(), self.labels(window_s))

    def oracle_scores(self, window_s: float | None = None) -> dict[str, float]:
        """``oracle_auc`` and ``oracle_logloss`` of the true probabilities against the emitted labels."""
        p, y = np.clip(self.p_true(), 1e-7, 1 - 1e-7), self.labels(window_s)
        loss = float(-np.mean(np.where(y, np.log(p), np.log1p(-p)))) if p.size else math.nan
        return {"oracle_auc": self.oracle_auc(window_s), "oracle_logloss": loss}

    def impression_users(self) -> np.ndarray:
        return self._cat("user")

    def impression_items(self) -> np.ndarray:
        return self._cat("item")

    def impression_ts(self) -> np.ndarray:
        return self._cat("ts")

    def cold_start_mask(self, age_s: float | None = None) -> np.ndarray:
        """Impressions of items born after the start, within ``age_s`` (default: the boost period) of birth."""
        age_s = self.new_item_boost_s if age_s is None else age_s
        birth = self._cat("item_birth")
        return (birth > EPOCH) & (self._cat("ts") - birth <= age_s)

    def summary(self, window_s: float | None = None) -> dict[str, float | int]:
        """Counts for reports (and, with ``window_s``, the expected positives under ``wait``)."""
        out: dict[str, float | int] = {
            "impressions": self.impressions,
            "clicks": self.clicks,
            "duplicate_clicks": self.duplicate_clicks,
            "malformed": self.malformed,
            "items": self.items,
            "cold_start_items": self.cold_start_items,
            "cold_start_impressions": int(self.cold_start_mask().sum()),
            "ctr": self.clicks / max(self.impressions, 1),
            "oracle_auc": self.oracle_auc(window_s),
        }
        if window_s is not None:
            out["clicks_within_window"] = self.clicks_within(window_s)
        return out


def _malformed(kind: int, ts: float, ref: str, key: str) -> tuple[bytes, str, str]:
    """Raw bytes of one kind of malformed record: (raw, reason, logical topic it claims)."""
    if kind == 0:
        raw = encode_event(Impression(impression_id=key, ts=ts, user_id="u0", item_id="i0"))
        return raw[: len(raw) // 2], "truncated-json", "impressions"
    if kind == 1:
        return (
            b'{"type":"impression","ts":%.3f,"user_id":"u0","item_id":"i0"}' % ts,
            "missing-impression-id",
            "impressions",
        )
    if kind == 2:
        return b'{"type":"click","impression_id":12345,"ts":%.3f}' % ts, "id-not-a-string", "clicks"
    if kind == 3:
        return (
            b'{"type":"click","impression_id":"%s","ts":%d}' % (ref.encode(), int(ts * 1000)),
            "ts-in-milliseconds",
            "clicks",
        )
    if kind == 4:
        return b'{"type":"view","impression_id":"%s","ts":%.3f}' % (key.encode(), ts), "unknown-type", "impressions"
    if kind == 5:
        return b"\x00\xffnot json at all", "not-json", "clicks"
    return b"", "empty", "impressions"


MALFORMED_KINDS: Final[int] = 7


class SyntheticTraffic:
    """Iterable synthetic event stream; ``truth`` is filled as it is generated.

    Iterate once; a second iteration raises (the world's user tastes drift while generating).
    """

    def __init__(self, sim: SimulatorConfig) -> None:
        self.sim = sim
        seeds = np.random.SeedSequence(sim.seed).spawn(3)
        self.world = build_world(sim, np.random.default_rng(seeds[0]))
        self._rng = np.random.default_rng(seeds[1])
        self._text_rng = np.random.default_rng(seeds[2])
        self.id_prefix = f"s{sim.seed}-"
        self.truth = GroundTruth(seed=sim.seed, id_prefix=self.id_prefix, new_item_boost_s=sim.new_item_boost_s)
        self._started = False

    def __iter__(self) -> Iterator[SourceRecord]:
        if self._started:
            raise RuntimeError("a SyntheticTraffic stream can be iterated only once")
        self._started = True
        return self._generate()

    def _item_weights(self, born: int, now: float) -> np.ndarray:
        """Cumulative popularity of the ``born`` items at time ``now``: Zipf plus the new-item boost."""
        w = self.world
        weight = w.item_zipf[:born].copy()
        birth = w.item_birth[:born]
        age = now - birth
        fresh = (birth > EPOCH) & (age < self.sim.new_item_boost_s)
        if fresh.any():
            boost = self.sim.new_item_boost * weight.mean() * (1.0 - age[fresh] / self.sim.new_item_boost_s)
            weight[fresh] += boost
        return np.cumsum(weight)

    def _drift(self, dt: float) -> None:
        """Ornstein-Uhlenbeck step of every user's taste (stationary scale preserved)."""
        if dt <= 0:
            return
        rho = math.exp(-dt / self.sim.user_drift_tau_s)
        w = self.world
        w.user_latent *= rho
        w.user_latent += math.sqrt(1.0 - rho * rho) * w.latent_scale * self._rng.standard_normal(w.user_latent.shape)

    def _generate(self) -> Iterator[SourceRecord]:
        sim, w, rng, truth = self.sim, self.world, self._rng, self.truth
        user_ids = [f"u{i}" for i in range(sim.users)]
        item_ids = [f"i{i}" for i in range(sim.items)]
        remaining = sim.events
        next_ts = EPOCH + rng.exponential(1.0 / sim.impressions_per_s)
        last_drift = EPOCH
        n0 = 0
        item_ptr = 0
        pend_ts = np.zeros(0)
        pend_imp = np.zeros(0, np.int64)
        pend_dup = np.zeros(0, bool)
        delay_mu = math.log(sim.click_delay_median_s)
        while remaining > 0:
            arrivals = next_ts + np.concatenate(([0.0], np.cumsum(rng.exponential(1.0 / sim.impressions_per_s, CHUNK))))
            ts = np.round(arrivals[:CHUNK], 3)
            next_ts = float(arrivals[CHUNK])
            horizon = round(next_ts, 3)
            self._drift(float(ts[0]) - last_drift)
            last_drift = float(ts[0])
            born = int(np.searchsorted(w.item_birth, ts[0], side="right"))
            users = draw(w.user_cum_weight, rng, CHUNK)
            items = draw(self._item_weights(born, float(ts[0])), rng, CHUNK)
            device, hour, slot = _context(w, users, ts, rng)
            p = sigmoid(click_logit(w, users, items, device, hour, slot))
            clicked = np.flatnonzero(rng.random(CHUNK) < p)
            delays = np.maximum(rng.lognormal(delay_mu, sim.click_delay_sigma, len(clicked)), MIN_CLICK_DELAY_S)
            click_ts = np.round(ts[clicked] + delays, 3)
            dup = rng.random(len(clicked)) < sim.duplicate_click_rate
            dup_ts = np.round(click_ts[dup] + 0.05 + rng.exponential(2.0, int(dup.sum())), 3)
            pend_ts = np.concatenate((pend_ts, click_ts, dup_ts))
            pend_imp = np.concatenate((pend_imp, n0 + clicked, n0 + clicked[dup]))
            pend_dup = np.concatenate((pend_dup, np.zeros(len(clicked), bool), np.ones(int(dup.sum()), bool)))

            due = pend_ts < horizon
            c_ts, c_imp, c_dup = pend_ts[due], pend_imp[due], pend_dup[due]
            pend_ts, pend_imp, pend_dup = pend_ts[~due], pend_imp[~due], pend_dup[~due]
            item_end = int(np.searchsorted(w.item_birth, horizon, side="left"))
            i_idx = np.arange(item_ptr, item_end)

            # Merge by (ts, kind): items before impressions before clicks at equal times.
            all_ts = np.concatenate((w.item_birth[i_idx], ts, c_ts))
            kind = np.concatenate(
                (np.zeros(len(i_idx), np.int8), np.ones(CHUNK, np.int8), np.full(len(c_ts), 2, np.int8))
            )
            ref = np.concatenate((i_idx, np.arange(CHUNK), np.arange(len(c_ts))))
            order = np.lexsort((kind, all_ts))
            kind, ref, all_ts = kind[order], ref[order], all_ts[order]
            counted = np.cumsum(kind > 0)
            if counted[-1] >= remaining:
                cut = int(np.searchsorted(counted, remaining)) + 1
                kind, ref, all_ts = kind[:cut], ref[:cut], all_ts[:cut]
            remaining -= int(np.sum(kind > 0))

            records = self._build_records(
                kind, ref, all_ts, ts, users, items, device, hour, slot, n0, c_ts, c_imp, c_dup, user_ids, item_ids
            )
            # Ground truth of exactly what is emitted.
            n_imp = int(np.sum(kind == 1))
            truth.record_impressions(ts[:n_imp], p[:n_imp], users[:n_imp], items[:n_imp], w.item_birth[items[:n_imp]])
            sent_clicks = ref[kind == 2]
            first = sent_clicks[~c_dup[sent_clicks]]
            truth.record_clicks(c_imp[first], c_ts[first])
            truth.duplicate_clicks += int(c_dup[sent_clicks].sum())
            sent_items = ref[kind == 0]
            truth.items += len(sent_items)
            truth.cold_start_items += int(np.sum(w.item_birth[sent_items] > EPOCH))
            item_ptr = item_end
            n0 += CHUNK
            yield from records

    def _build_records(
        self,
        kind: np.ndarray,
        ref: np.ndarray,
        all_ts: np.ndarray,
        ts: np.ndarray,
        users: np.ndarray,
        items: np.ndarray,
        device: np.ndarray,
        hour: np.ndarray,
        slot: np.ndarray,
        n0: int,
        c_ts: np.ndarray,
        c_imp: np.ndarray,
        c_dup: np.ndarray,
        user_ids: list[str],
        item_ids: list[str],
    ) -> list[SourceRecord]:
        """Turn a merged chunk into event objects (bulk list comprehensions: no per-event numpy)."""
        n_imp = int(np.sum(kind == 1))
        prefix = self.id_prefix
        ts_l = ts[:n_imp].tolist()
        u_l, i_l = users[:n_imp].tolist(), items[:n_imp].tolist()
        d_l, h_l, s_l = device[:n_imp].tolist(), hour[:n_imp].tolist(), slot[:n_imp].tolist()
        impressions = [
            Impression(
                impression_id=f"{prefix}{n0 + j}",
                ts=ts_l[j],
                user_id=user_ids[u_l[j]],
                item_id=item_ids[i_l[j]],
                context={"device": DEVICES[d_l[j]], "hour": h_l[j], "slot": s_l[j]},
            )
            for j in range(n_imp)
        ]
        clicks = [Click(impression_id=f"{prefix}{i}", ts=t) for i, t in zip(c_imp.tolist(), c_ts.tolist())]
        w = self.world
        kinds, refs = kind.tolist(), ref.tolist()
        out: list[SourceRecord] = []
        append = out.append
        for k, r in zip(kinds, refs):
            if k == 1:
                append(impressions[r])
            elif k == 2:
                append(clicks[r])
            else:
                append(
                    Item(
                        item_id=item_ids[r],
                        ts=float(w.item_birth[r]),
                        text=w.item_text[r],
                        attributes={"category": CATEGORIES[int(w.item_category[r])]},
                    )
                )
        if self.sim.malformed_rate > 0 and out:
            out = self._insert_malformed(out, all_ts)
        return out

    def _insert_malformed(self, out: list[SourceRecord], all_ts: np.ndarray) -> list[SourceRecord]:
        """Mix malformed raw records in at random positions (``malformed_rate`` per valid record)."""
        rng, truth = self._text_rng, self.truth
        valid = sum(1 for r in out if not isinstance(r, Item))
        n_bad = int(rng.binomial(valid, min(self.sim.malformed_rate, 1.0)))
        if n_bad == 0:
            return out
        positions = np.sort(rng.integers(0, len(out) + 1, n_bad))[::-1].tolist()
        kinds = rng.integers(MALFORMED_KINDS, size=n_bad).tolist()
        for pos, k in zip(positions, kinds):
            truth.malformed += 1
            key = f"bad-{self.sim.seed}-{truth.malformed}"
            ts = float(all_ts[min(pos, len(all_ts) - 1)])
            raw, reason, topic = _malformed(k, ts, f"{self.id_prefix}0", key)
            truth.malformed_by_topic[topic] = truth.malformed_by_topic.get(topic, 0) + 1
            out.insert(pos, BadRecord(raw=raw, reason=reason, topic=topic, key=key.encode()))
        return out


def synthetic_stream(sim: SimulatorConfig) -> tuple[Iterator[SourceRecord], GroundTruth]:
    """The event iterator of a fresh synthetic run and its (filling) ground truth."""
    traffic = SyntheticTraffic(sim)
    return iter(traffic), traffic.truth
