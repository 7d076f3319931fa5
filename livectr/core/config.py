"""One typed configuration object for every stage.

Why one object: a stage started on its own (``livectr join``) and the same stage started by
``livectr run`` must agree on topic names, window, semantics and so on. Every field has a
default here, can be overridden by an environment variable and then by a CLI flag:

    default  <  LIVECTR_<SECTION>__<FIELD> env var  <  --flag

e.g. ``LIVECTR_JOIN__WINDOW_S=300`` or ``LIVECTR_KAFKA__BOOTSTRAP_SERVERS=kafka:9092``.
The resolved object is hashed (:func:`config_hash`) into every snapshot manifest so a model
can be traced to the settings that trained it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LIVECTR_"


@dataclass
class KafkaConfig:
    """Where the broker is and how topics are named and laid out."""

    #: Empty means: start the embedded tansu broker (``livectr run``) and use it.
    bootstrap_servers: str = ""
    topic_prefix: str = "livectr."
    #: Impressions and clicks must have the same count: the join relies on co-partitioning.
    partitions: int = 4
    replication_factor: int = 1
    #: Smallest value a stock Kafka accepts; keeps consumer-group joins fast (≈3 s on tansu).
    session_timeout_ms: int = 6000
    #: Extra librdkafka properties, "key=value,key=value" (e.g. security settings).
    extra: str = ""

    def topic(self, name: str) -> str:
        """Full topic name for a logical name such as ``impressions``."""
        return f"{self.topic_prefix}{name}"

    def client_properties(self) -> dict[str, str | int | float | bool]:
        """librdkafka properties common to every client."""
        props: dict[str, str | int | float | bool] = {"bootstrap.servers": self.bootstrap_servers}
        for pair in filter(None, (p.strip() for p in self.extra.split(","))):
            key, _, value = pair.partition("=")
            props[key.strip()] = value.strip()
        return props


@dataclass
class SimulatorConfig:
    """Synthetic traffic (and replay speed) settings."""

    events: int = 1_500_000
    seed: int = 7
    users: int = 5_000
    items: int = 2_000
    #: New items keep appearing: fraction of the catalogue that is born after the start.
    new_item_fraction: float = 0.3
    latent_dim: int = 8
    #: Impressions per simulated second (sets how event time relates to event count).
    impressions_per_s: float = 200.0
    zipf_a: float = 1.1
    base_ctr: float = 0.05
    #: Replay speed: 0 = as fast as possible, 1.0 = real time, 60 = a minute per second.
    speed: float = 0.0
    progress: bool = True
    #: Fraction of clicked impressions that are clicked a second time (the join must dedupe).
    duplicate_click_rate: float = 0.005
    #: Malformed raw records per valid impression/click record (0 = none); they must be dead-lettered.
    malformed_rate: float = 0.0
    #: Click delays are log-normal: median and sigma of the underlying normal (≈2 % beyond 10 min).
    click_delay_median_s: float = 20.0
    click_delay_sigma: float = 1.6
    #: New items get this much extra popularity (× the mean item's weight), decaying over ``new_item_boost_s``.
    new_item_boost: float = 2.0
    new_item_boost_s: float = 900.0
    #: User tastes drift (Ornstein-Uhlenbeck) with this time constant in event-time seconds.
    user_drift_tau_s: float = 21_600.0


@dataclass
class JoinConfig:
    """The impression/click join."""

    window_s: float = 600.0
    #: Labelling policy: ``wait``, ``fake-negative`` or ``defer`` (README, "Labelling policies";
    #: the default is the best in serving order over the benchmark's streams).
    policy: str = "fake-negative"
    #: ``defer``: the waiting window after which an unclicked impression is sent as a negative (0:
    #: at once, as a fake negative; the real negative follows when the attribution window closes).
    defer_wait_s: float = 0.0
    #: Fraction of impressions (by a hash of the id, so restarts agree) also sent at impression
    #: time as score requests, scored by the model as it stands then: the serving AUC (0 disables).
    #: Under ``fake-negative`` every impression's fake negative is scored so, and none are sent.
    score_sample: float = 1.0
    group_id: str = "livectr-join"
    #: Commit (and checkpoint the pending state) at most this often.
    commit_interval_s: float = 2.0
    workers: int = 1
    #: Unbounded runs: a source at the end of its partition this long (wall seconds) stops
    #: holding the watermark back (like Flink's ``withIdleness``); 0 disables.
    idle_timeout_s: float = 60.0
    #: Recently closed impression ids remembered (two generations of this size) so a late
    #: click is reported as late rather than as an orphan.
    closed_memory: int = 100_000
    #: One ExampleBatch record per consume batch and input partition (True) or one record per
    #: example (False; measured slower, see ``python bench/join_speed.py``).
    batch_examples: bool = True
    #: Re-key impressions and clicks by impression id into internal topics of the join group
    #: (``streams/repartition.py``), so labels do not depend on how producers partition. Off: the
    #: raw topics must be co-partitioned by every producer (same hash of the impression id).
    repartition: bool = True
    #: Backpressure: a source (impressions or clicks of one partition) more than this many
    #: event-time seconds ahead of the other is paused until the other catches up, so pending
    #: impressions and orphan clicks stay bounded by window + skew, not by the inputs' lag (0: off).
    max_skew_s: float = 600.0
    #: ...once the partition holds at least this many pending impressions plus orphan clicks: below
    #: it memory is no concern, and a source whose clock a few very late records pushed ahead
    #: (a max-time clock) is not held back for nothing.
    backpressure_floor: int = 20_000


@dataclass
class LearnerConfig:
    """The student model and its online training."""

    batch_size: int = 512
    lr: float = 0.003
    embedding_dim: int = 16
    hidden: str = "64,32"
    cross_layers: int = 2
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    device: str = "auto"
    threads: int = 1
    #: Seed of the model's initial weights and of the gate's training samples: two runs over the
    #: same examples give the same model (the benchmarks average several seeds).
    seed: int = 0
    #: Publish a snapshot every N seconds or M examples, whichever comes first.
    snapshot_every_s: float = 30.0
    snapshot_every_examples: int = 200_000
    keep_snapshots: int = 5
    #: Buckets of the hashed context-feature table.
    context_buckets: int = 1 << 18
    #: Buckets of the hashed user×item first-order weights (0 = none).
    pair_buckets: int = 1 << 20
    #: Weight of the item-level distillation loss beside the CTR loss (docs/design.md, "Semantics").
    distill_weight: float = 2.0
    #: Weight of the user-level distillation loss, relative to the item level's. 0: a click
    #: profile moves with every click, and a head tied to it lost AUC (docs/design.md).
    user_distill_weight: float = 0.0
    #: Id tables (learner.sparse.RowOptimizer): Adagrad learning rate of the embedding columns
    #: (per-example accumulation) and its starting accumulator, in per-example gradient units.
    embedding_lr: float = 0.02
    embedding_init_accumulator: float = 0.1
    #: First-order weights (online Newton): prior precision (shrinkage of rare ids) and step scale.
    wide_prior: float = 2.5
    wide_lr: float = 1.0
    #: Score each example with the first-order updates of earlier examples of its user and item in
    #: the same mini-batch, as a per-example learner would (RowOptimizer.in_batch_wide_shift).
    in_batch_wide: bool = True
    #: Fast per-example experts beside the student, mixed in by learned weights (learner.experts):
    #: a session bias per user (a constant step, fading between sessions), and per user a slope
    #: on the student's logit (its prior precision) and, with semantics, a taste over the item's
    #: teacher vector (step, prior precision), plus one population taste shared by all users;
    #: the mixing weights' rate.
    fast_experts: bool = True
    user_bias_rate: float = 0.5
    #: A user's tracked bias fades with this time constant (event-time seconds, 0 = never):
    #: it is a *session* effect, stale once the user has been away.
    user_session_s: float = 300.0
    taste_expert_step: float = 1.5
    taste_expert_prior: float = 2.0
    slope_expert_prior: float = 5.5
    population_taste: bool = True
    expert_mix_lr: float = 0.005
    #: Examples shuffled together before mini-batches are cut (breaks label clumps; see learner.loop).
    shuffle_buffer: int = 4096
    #: Context fields that get their own embedding slot (first seen, first served; extra fields are
    #: counted and ignored so an unbounded set of field names cannot grow the model).
    context_fields: int = 4
    #: Price of using the semantic branch on one example, in loss units (DynMM resource cost):
    #: 0 opens the gate wherever the branch lowers the loss; higher trades AUC for compute.
    gate_cost: float = 0.0003
    #: Hidden width of the semantic branch.
    sem_hidden: int = 32
    #: A neighbour counts as "trained" for cold-start initialisation after this many impressions.
    cold_start_min_count: int = 5
    #: cold_start_auc covers each item's first N impressions seen by the learner.
    cold_start_impressions: int = 20
    #: Event-time alignment of the examples partitions (learner.align): a join source with nothing
    #: buffered stops holding the others back after this many wall seconds without records, and
    #: a partition stops being fetched while this many of its examples wait for the others.
    align_idle_s: float = 5.0
    align_max_buffered: int = 50_000
    #: Train a partial mini-batch when the oldest buffered example has waited this long.
    partial_batch_ms: float = 100.0
    #: The scorer checks the ``latest`` snapshot pointer at most this often.
    scorer_reload_ms: int = 500


@dataclass
class SemanticConfig:
    """The semantic cache, its teacher and the refresher."""

    enabled: bool = True
    teacher: str = "minilm"
    #: Dimension of the reduced vectors that travel with each example.
    reduced_dim: int = 32
    refresh_batch: int = 64
    #: Optional LLM enrichment: "", "openai" or "hf".
    enrich: str = ""
    enrich_url: str = ""
    enrich_model: str = ""
    user_decay: float = 0.8
    #: A user's click profile is forgotten after this long without a click (event-time seconds;
    #: 0 keeps every profile): it bounds the join's memory and checkpoints by the active users.
    user_profile_ttl_s: float = 30 * 86400.0
    #: With enrichment: LLM user summary on a user's first click and then every N clicks, over
    #: the user's last ``user_summary_items`` clicked items.
    user_summary_every: int = 5
    user_summary_items: int = 10
    #: Exact FAISS search below this many items, HNSW above.
    faiss_exact_below: int = 50_000
    neighbours: int = 10
    #: Teacher device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    teacher_device: str = "auto"
    #: CPU threads for the teacher (the refresher shares the machine with the join and learner).
    teacher_threads: int = 1
    #: Fit the PCA reducer once this many item vectors exist (or on idle with all there are).
    reducer_fit_min: int = 512
    reducer_fit_idle_s: float = 3.0
    #: Enrichment: per-request timeout and bound on generated tokens.
    enrich_timeout_s: float = 20.0
    enrich_max_tokens: int = 64
    #: Client: how long its constructor waits to catch up with the semantic topic.
    client_catchup_s: float = 5.0
    #: Client: a missed id is reported at most once per this many seconds.
    miss_retry_s: float = 5.0


@dataclass
class ServeConfig:
    """The HTTP scorer (``livectr serve``); which snapshot it polls and how often is the learner's
    ``scorer_reload_ms``."""

    #: Larger request bodies are refused with 413 before they are read.
    max_body_bytes: int = 8 * 1024 * 1024
    #: Requests with more candidates (items or impressions) are refused with 413.
    max_candidates: int = 10_000


@dataclass
class Config:
    """Everything livectr needs to run any stage."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    join: JoinConfig = field(default_factory=JoinConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    data_dir: Path = Path("./livectr-data")

    @property
    def topics(self) -> Topics:
        """Resolved topic names."""
        return Topics.from_kafka(self.kafka)


@dataclass(frozen=True)
class Topics:
    """Every topic livectr reads or writes."""

    impressions: str
    clicks: str
    items: str
    examples: str
    dead_letters: str
    semantic: str
    semantic_misses: str

    @classmethod
    def from_kafka(cls, kafka: KafkaConfig) -> Topics:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: kafka.topic(n.replace("_", "-")) for n in names})


def _coerce(value: str, annotation: Any) -> Any:
    """Turn an environment string into the field's declared type."""
    target = annotation
    if target is bool:
        if value.lower() in {"1", "true", "yes", "on"}:
            return True
        if value.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if target in (int, float, str):
        return target(value)
    if target is Path:
        return Path(value)
    raise TypeError(f"unsupported config type {target!r}")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: t for name, t in hints.items() if isinstance(t, type) and dataclasses.is_dataclass(t)}


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Set ``section.field`` (or top-level ``field``) keys; values may be strings or typed."""
    sections = _section_types()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section_name, _, field_name = dotted.rpartition(".")
        target = getattr(cfg, section_name) if section_name else cfg
        cls = sections[section_name] if section_name else Config
        hints = typing.get_type_hints(cls)
        if field_name not in hints:
            raise KeyError(f"unknown config key {dotted!r}")
        if isinstance(value, str) and hints[field_name] is not str:
            value = _coerce(value, hints[field_name])
        setattr(target, field_name, value)
    return cfg


def from_env(environ: Mapping[str, str] | None = None) -> Config:
    """A config with defaults overridden by ``LIVECTR_<SECTION>__<FIELD>`` variables."""
    environ = os.environ if environ is None else environ
    overrides: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        section, sep, name = rest.partition("__")
        overrides[f"{section}.{name}" if sep else section] = value
    return apply_overrides(Config(), overrides)


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-JSON view of the config (paths as strings)."""

    def convert(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Path):
            return str(obj)
        return obj

    return convert(cfg)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_dict` (used to hand a config to a child process)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    cfg = apply_overrides(Config(), {k: v for k, v in flat.items() if not k.startswith("data_dir")})
    if "data_dir" in data:
        cfg.data_dir = Path(data["data_dir"])
    return cfg


def config_hash(cfg: Config, sections: tuple[str, ...] = ("learner", "semantic", "join")) -> str:
    """Stable hash of the settings that shape a model (not of paths or broker addresses)."""
    view = {name: to_dict(cfg)[name] for name in sections}
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16]
