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
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LIVECTR_"


class ConfigError(ValueError):
    """A config key, value or Kafka option that cannot be used; the message is one line."""


#: What a secret looks like in serialised or printed config.
REDACTED = "***"
#: librdkafka properties whose value is a secret (matched as substrings of the lower-cased key):
#: ``sasl.password``, ``ssl.key.password``, ``ssl.keystore.password``, ``ssl.key.pem``,
#: ``sasl.oauthbearer.client.secret``, ``sasl.oauthbearer.config``, ``sasl.jaas.config``, …
_SECRET_KEY_PARTS = ("password", "secret", "jaas", "key.pem", "oauthbearer.config")
#: Splits "a=1,b=x,y,c=2" before each "key=" only, so a value may hold commas (cipher lists).
_OPTION_SPLIT = re.compile(r",\s*(?=[A-Za-z0-9_.\-]+\s*=)")


def is_secret_option(key: str) -> bool:
    """Whether the librdkafka property ``key`` holds a secret (never written or printed)."""
    k = key.strip().lower()
    return any(part in k for part in _SECRET_KEY_PARTS)


def parse_options(text: str) -> dict[str, str]:
    """``"key=value,key=value"`` → dict; a value may contain commas; raises :class:`ConfigError`."""
    options: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in _OPTION_SPLIT.split(text.strip()))):
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Kafka option {entry.split('=')[0][:40]!r} is not KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def format_options(options: Mapping[str, str]) -> str:
    """Inverse of :func:`parse_options`."""
    return ",".join(f"{k}={v}" for k, v in options.items())


@dataclass
class KafkaConfig:
    """Where the broker is, how topics are named and laid out, and how clients authenticate.

    Every Kafka client livectr creates (``livectr.core.bus``: producers, consumers, admin
    clients) gets :meth:`client_properties`: the security fields below, then ``extra``.
    Secrets (``sasl_password`` and secret keys in ``extra``, see :func:`is_secret_option`) are
    never written to disk or printed: :func:`to_dict` and ``repr`` show :data:`REDACTED`, and a
    child stage reading the run's config file takes them from its environment
    (:func:`restore_secrets`).
    """

    #: Empty means: start the embedded tansu broker (``livectr run``) and use it.
    bootstrap_servers: str = ""
    topic_prefix: str = "livectr."
    #: Impressions and clicks must have the same count: the join relies on co-partitioning.
    partitions: int = 4
    replication_factor: int = 1
    #: Smallest value a stock Kafka accepts; keeps consumer-group joins fast (≈3 s on tansu).
    session_timeout_ms: int = 6000
    #: ``security.protocol``: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL ("" = librdkafka's default).
    security_protocol: str = ""
    #: ``sasl.mechanism``: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or GSSAPI.
    sasl_mechanism: str = ""
    sasl_username: str = ""
    #: Secret: from ``LIVECTR_KAFKA__SASL_PASSWORD`` only (no flag: it would show in ``ps``).
    sasl_password: str = ""
    #: ``ssl.ca.location``: CA certificate(s) that signed the brokers' certificates.
    ssl_ca_location: str = ""
    #: Any other librdkafka properties, "key=value,key=value" (``LIVECTR_KAFKA__EXTRA``, or
    #: ``--kafka-option key=value`` repeated), e.g. ``ssl.certificate.location=…``. Applied last.
    extra: str = ""

    def topic(self, name: str) -> str:
        """Full topic name for a logical name such as ``impressions``."""
        return f"{self.topic_prefix}{name}"

    def security_properties(self) -> dict[str, str]:
        """The librdkafka properties of the security fields that are set."""
        named = {
            "security.protocol": self.security_protocol,
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
        }
        return {k: v for k, v in named.items() if v}

    def client_properties(self) -> dict[str, str | int | float | bool]:
        """librdkafka properties common to every client (bootstrap, security, ``extra``)."""
        props: dict[str, str | int | float | bool] = {"bootstrap.servers": self.bootstrap_servers}
        props.update(self.security_properties())
        props.update(parse_options(self.extra))
        return props

    def redacted(self) -> KafkaConfig:
        """A copy whose secrets read :data:`REDACTED` (what may be written or printed)."""
        options = {k: REDACTED if is_secret_option(k) and v else v for k, v in parse_options(self.extra).items()}
        return dataclasses.replace(
            self, sasl_password=REDACTED if self.sasl_password else "", extra=format_options(options)
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.redacted(), f.name)!r}" for f in dataclasses.fields(self))
        return f"KafkaConfig({fields})"


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
    policy: str = "defer"
    #: ``defer``: the waiting window after which an unclicked impression is sent as a negative (0:
    #: at once, as a fake negative; the real negative follows when the attribution window closes).
    defer_wait_s: float = 0.0
    #: Fraction of impressions (by a hash of the id, so restarts agree) also sent at impression
    #: time as score requests, scored by the model as it stands then: the serving AUC (0 disables).
    #: Under ``fake-negative``, and ``defer`` without a wait, the example sent at the impression's
    #: time is scored so, and none are sent.
    score_sample: float = 1.0
    group_id: str = "livectr-join"
    #: Commit (and checkpoint the pending state) at most this often.
    commit_interval_s: float = 2.0
    workers: int = 1
    #: Unbounded runs: a source at the end of its partition this long (wall seconds) stops
    #: holding the watermark back (like Flink's ``withIdleness``); 0 disables.
    idle_timeout_s: float = 60.0
    #: A source that has delivered everything published so far (at the end of its partition)
    #: counts as its newest event time plus the wall time since that record was published, so
    #: sparse clicks do not hold fake negatives and windows until the next click (docs/design.md,
    #: "Freshness: the caught-up clock"): ``unbounded`` (live runs, ``--forever``), ``always``
    #: (bounded runs too: a paced replay, the freshness bench) or ``off``. It assumes event time
    #: runs with the wall clock, as live streams do; a replay slower than real time should keep it off.
    caught_up_clock: str = "unbounded"
    #: Recently closed impression ids remembered (two generations of this size) so a late
    #: click is reported as late rather than as an orphan.
    closed_memory: int = 100_000
    #: One ExampleBatch record per consume batch and input partition (True) or one record per
    #: example (False; measured slower, see ``python bench/join_speed.py``).
    batch_examples: bool = True
    #: Re-key impressions and clicks by impression id into internal topics of the join group
    #: (``streams/repartition.py``), so labels do not depend on how producers partition (on by
    #: default: producers disagree — murmur2 in Java and kafka-python, CRC-32 in librdkafka).
    #: Off saves one decode and produce per record, if every producer co-partitions the raw topics.
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
    #: CPU niceness the ``learn`` stage runs at (0-19). On a host shared with ``livectr serve``,
    #: a higher value lets requests take the CPU first while the learner writes a snapshot (a
    #: burst of about 150 ms every ``snapshot_every_s``); it costs the learner nothing when the
    #: CPU is free.
    nice: int = 0
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
    #: Buckets of the hashed user × item-word first-order weights (VW's ``-q ut``; 0 = none): the
    #: item's words (from its text, livectr.core.words) crossed with the user's row, plus a plain
    #: weight per word. +0.003 serving AUC on ml-100k, +0.001 on the other streams, for ~0.85 ×
    #: the learner's throughput and no measurable end-to-end cost (docs/benchmarks.md).
    word_buckets: int = 1 << 20
    #: Words kept per item (the first distinct ones of its text).
    max_item_words: int = 16
    #: Prior precision of the word weights (0: ``wide_prior``): larger shrinks them harder.
    word_prior: float = 0.0
    #: Also an uncrossed first-order weight per word, in the same table (a word's own click rate).
    plain_words: bool = True
    #: Words on more than this share of the items seen are left out (a vectoriser's max_df; 1 = keep all).
    max_word_share: float = 0.5
    #: Weight of the item-level distillation loss beside the CTR loss (docs/design.md, "Semantics").
    distill_weight: float = 2.0
    #: The semantic branch reads the user's click profile where an example carries one. Off by
    #: default: a scorer has no profiles (they live in the join), and a branch trained on them
    #: served worse than one never given them (docs/benchmarks.md, "What the scorer serves").
    user_profile_input: bool = False
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
    #: Tables whose first-order prior is tuned on the stream's progressive loss
    #: (learner.sparse.PriorTuner; empty: fixed at ``wide_prior``), its step in log units per
    #: batch, and its ceiling; never below ``wide_prior``.
    wide_prior_tune: str = "user,item"
    wide_prior_tune_rate: float = 0.02
    wide_prior_max: float = 50.0
    #: Trust region of a first-order weight's Newton step, in logits per step (0: none). A row
    #: seen hundreds of times in one batch while the model is far off (the first minutes of a
    #: stream) would otherwise take a step several logits too long (docs/design.md).
    wide_max_step: float = 0.5
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
    #: ``defer``: which real negatives are trained on — ``score``: each with the probability of a
    #: click the model gives it (the informative ones); ``all`` (the paper); or a fixed share
    #: such as ``0.25``. The importance weights account for the rest (README, "Labelling policies").
    real_negatives: str = "score"
    #: ``defer`` without a waiting window in the join: the learner holds each observed negative
    #: until a score served within a click delay of its user's last impression stands on a wrong
    #: fake negative at most this often, from the stream's click rate, click delays and how soon
    #: users come back (learner.defer_hold; 0: never held), and at most ``defer_hold_max_s``.
    defer_hold_error: float = 0.05
    defer_hold_max_s: float = 300.0
    #: ...and while at most this many are held (~0.7 KB each); beyond, the earliest are released early.
    defer_hold_max_examples: int = 200_000
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
    #: Publish full snapshots and deltas on the model-updates topic, so scorers can follow the
    #: model from Kafka alone (learner.updates).
    publish_updates: bool = True
    #: Between full snapshots, publish the rows touched since the last publish every N seconds
    #: (0: full snapshots only).
    delta_every_s: float = 2.0
    #: A full snapshot also goes on the model-updates topic at most every N seconds (and on the
    #: learner's first publish): tens of MB each, kept in memory by the embedded broker. Deltas
    #: chain from it across the disk snapshots in between (0: every snapshot).
    update_full_every_s: float = 300.0
    #: Model updates travel in messages of at most this many bytes (a full snapshot is split).
    update_chunk_bytes: int = 900_000
    #: Bounded memory (learner.vocab): a user's / an item's row (embedding, optimiser and expert
    #: state) is freed after this long without an example (event-time seconds; 0 = never) and
    #: reused by new ids; the id then scores like one never seen (docs/design.md, "Bounded vocabularies").
    user_ttl_s: float = 90 * 86400.0
    item_ttl_s: float = 90 * 86400.0
    #: An id gets its own row only after this many impressions (Monolith's admission); before, it
    #: shares the unknown row, which the learner then trains as the row of rare ids. 1 = at once.
    admit_min_count: int = 1


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
    #: Requests with at most this many candidates are scored on the event loop itself (about
    #: 1 µs of model time per candidate); larger ones go to a worker thread so that ``/healthz``,
    #: ``/readyz`` and ``/metrics`` still answer while they score. 0: always a worker thread.
    inline_candidates: int = 512
    #: The process's GIL switch interval (seconds; CPython's default is 0.005). A background
    #: thread applying a delta holds the GIL for up to this long before a request may run.
    switch_interval_s: float = 0.0005


@dataclass
class MetricsConfig:
    """What the long-running stages record as they go and serve to Prometheus.

    Each stage appends a sample of its live counters to ``DATA_DIR/metrics/<stage>.jsonl`` (the
    input of ``livectr report``) and, given a port, serves them on ``/metrics``.
    """

    #: Port of the stage's Prometheus ``/metrics`` endpoint (0 = none). ``livectr run
    #: --metrics-port BASE`` gives the join workers, the learner and the refresher BASE, BASE+1, …
    port: int = 0
    #: Address the ``/metrics`` endpoint binds (0.0.0.0 to be scraped from other machines).
    host: str = "127.0.0.1"
    #: Record samples to ``DATA_DIR/metrics`` (off: only ``/metrics``, if a port is given).
    record: bool = True
    #: At most one sample per this many seconds per stage.
    interval_s: float = 1.0
    #: A stage's samples file is thinned (every other old sample dropped) past this size, so a
    #: run of any length keeps its whole span at a coarser resolution in bounded space.
    max_bytes: int = 2 * 1024 * 1024


@dataclass
class SupervisorConfig:
    """How ``livectr run`` restarts a stage that dies (a crash, an OOM kill, a SIGKILL)."""

    #: Restarts allowed per stage before the run gives up and ends ``ok: false`` (0 = never restart).
    max_restarts: int = 5
    #: Wait before the first restart, doubled for each further restart of the same stage, up to the cap.
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0


@dataclass
class Config:
    """Everything livectr needs to run any stage."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    join: JoinConfig = field(default_factory=JoinConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
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
    #: Full snapshots and deltas for scorers that follow the model over Kafka (learner.updates).
    model_updates: str

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
        if section_name and section_name not in sections:
            raise ConfigError(f"unknown config section {section_name!r} (in {dotted!r})")
        target = getattr(cfg, section_name) if section_name else cfg
        cls = sections[section_name] if section_name else Config
        hints = typing.get_type_hints(cls)
        if field_name not in hints:
            raise ConfigError(f"unknown config key {dotted!r}")
        if isinstance(value, str) and hints[field_name] is not str:
            try:
                value = _coerce(value, hints[field_name])
            except ValueError:
                raise ConfigError(
                    f"config key {dotted!r}: {value[:40]!r} is not a valid {hints[field_name].__name__}"
                ) from None
        setattr(target, field_name, value)
    return cfg


def from_env(environ: Mapping[str, str] | None = None) -> Config:
    """A config with defaults overridden by ``LIVECTR_<SECTION>__<FIELD>`` variables.

    Variables without ``__`` that name no top-level field belong to other parts (e.g.
    ``LIVECTR_STOP_GRACE_S``) and are left alone; an unknown section or field, or a value of the
    wrong type, raises :class:`ConfigError`.
    """
    environ = os.environ if environ is None else environ
    sections = _section_types()
    overrides: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        section, sep, name = rest.partition("__")
        if sep:
            overrides[f"{section}.{name}"] = value  # an unknown section or field is a ConfigError
        elif section in typing.get_type_hints(Config) and section not in sections:
            overrides[section] = value  # a top-level field, e.g. LIVECTR_DATA_DIR
    return apply_overrides(Config(), overrides)


def restore_secrets(cfg: Config, environ: Mapping[str, str] | None = None) -> Config:
    """Put back secrets that a config file holds as :data:`REDACTED`, from the environment.

    ``livectr run`` hands its stages a config file without secrets; they inherit its
    environment, where the secrets came from (``LIVECTR_KAFKA__SASL_PASSWORD``, secret keys of
    ``LIVECTR_KAFKA__EXTRA``). Raises :class:`ConfigError` when a redacted secret is not there.
    """
    environ = os.environ if environ is None else environ
    kafka = cfg.kafka
    if kafka.sasl_password == REDACTED:
        kafka.sasl_password = environ.get(f"{ENV_PREFIX}KAFKA__SASL_PASSWORD", "")
        if not kafka.sasl_password:
            raise ConfigError(
                f"kafka.sasl_password is redacted in the config file: set {ENV_PREFIX}KAFKA__SASL_PASSWORD"
            )
    options = parse_options(kafka.extra)
    if REDACTED in options.values():
        from_environ = parse_options(environ.get(f"{ENV_PREFIX}KAFKA__EXTRA", ""))
        for key, value in options.items():
            if value == REDACTED:
                if not from_environ.get(key) or from_environ[key] == REDACTED:
                    raise ConfigError(
                        f"Kafka option {key} is redacted in the config file: set it in {ENV_PREFIX}KAFKA__EXTRA"
                    )
                options[key] = from_environ[key]
        kafka.extra = format_options(options)
    return cfg


#: Values no run can use: ``(key, lowest, highest, lowest itself allowed)``. A command checks them
#: before it starts anything (:func:`validate`); without, ``--partitions 0`` waited 15 s for
#: topics that never appear and ``--batch-size 0`` ended a learner in a traceback.
_BOUNDS: tuple[tuple[str, float, float, bool], ...] = (
    ("kafka.partitions", 1, 1 << 16, True),
    ("kafka.replication_factor", 1, 1 << 10, True),
    ("kafka.session_timeout_ms", 1, math.inf, True),
    ("simulator.events", 0, math.inf, True),
    ("simulator.users", 1, math.inf, True),
    ("simulator.items", 1, math.inf, True),
    ("simulator.speed", 0, math.inf, True),
    ("simulator.impressions_per_s", 0, math.inf, False),
    ("join.window_s", 0, math.inf, False),
    ("join.defer_wait_s", 0, math.inf, True),
    ("join.score_sample", 0, 1, True),
    ("join.commit_interval_s", 0, math.inf, False),
    ("join.workers", 1, 1 << 10, True),
    ("join.max_skew_s", 0, math.inf, True),
    ("join.backpressure_floor", 0, math.inf, True),
    ("learner.batch_size", 1, math.inf, True),
    ("learner.lr", 0, math.inf, False),
    ("learner.threads", 1, 1 << 10, True),
    ("learner.nice", 0, 19, True),
    ("learner.snapshot_every_s", 0, math.inf, False),
    ("learner.snapshot_every_examples", 1, math.inf, True),
    ("learner.keep_snapshots", 1, math.inf, True),
    ("learner.embedding_dim", 1, 1 << 12, True),
    ("learner.context_buckets", 1, math.inf, True),
    ("learner.pair_buckets", 0, math.inf, True),
    ("learner.word_buckets", 0, math.inf, True),
    ("learner.max_item_words", 1, 1 << 10, True),
    ("learner.word_prior", 0, math.inf, True),
    ("learner.max_word_share", 0, 1, False),
    ("learner.wide_max_step", 0, math.inf, True),
    ("learner.wide_prior_tune_rate", 0, math.inf, True),
    ("learner.wide_prior_max", 0, math.inf, False),
    ("learner.defer_hold_error", 0, 1, True),
    ("learner.defer_hold_max_s", 0, math.inf, True),
    ("learner.defer_hold_max_examples", 0, math.inf, True),
    ("learner.scorer_reload_ms", 1, math.inf, True),
    ("semantic.reduced_dim", 1, 1 << 12, True),
    ("semantic.user_profile_ttl_s", 0, math.inf, True),
    ("serve.max_body_bytes", 1, math.inf, True),
    ("serve.max_candidates", 1, math.inf, True),
    ("serve.inline_candidates", 0, math.inf, True),
    ("serve.switch_interval_s", 1e-6, 0.1, True),
    ("metrics.port", 0, 65535, True),
    ("metrics.interval_s", 0, math.inf, False),
    ("metrics.max_bytes", 1, math.inf, True),
)


#: Values of ``join.caught_up_clock`` (see :class:`JoinConfig`).
CAUGHT_UP_MODES: tuple[str, ...] = ("off", "unbounded", "always")


def names_of(spec: str) -> list[str]:
    """The names in a comma-separated setting (blanks dropped)."""
    return [name.strip() for name in spec.split(",") if name.strip()]


#: Tables whose first-order prior ``learner.wide_prior_tune`` may name.
PRIOR_TABLES: tuple[str, ...] = ("user", "item")
#: String settings with a fixed set of values, checked by :func:`validate`.
_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (("join.caught_up_clock", CAUGHT_UP_MODES),)


def validate(cfg: Config, flags: Mapping[str, str] | None = None) -> Config:
    """Raise :class:`ConfigError` (naming the key, its flag from ``flags`` and its env variable)
    for a value outside :data:`_BOUNDS`; NaN is outside every bound."""
    for dotted, low, high, inclusive in _BOUNDS:
        section, _, name = dotted.partition(".")
        value = getattr(getattr(cfg, section), name)
        if (value >= low if inclusive else value > low) and value <= high:
            continue
        rule = f"{'≥' if inclusive else '>'} {low:g}" + (f" and ≤ {high:g}" if high != math.inf else "")
        names = [n for n in ((flags or {}).get(dotted), f"{ENV_PREFIX}{section.upper()}__{name.upper()}") if n]
        raise ConfigError(f"{dotted} must be {rule}, not {value!r} ({', '.join(names)})")
    for dotted, allowed in _CHOICES:
        section, _, name = dotted.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            names = [n for n in ((flags or {}).get(dotted), f"{ENV_PREFIX}{section.upper()}__{name.upper()}") if n]
            raise ConfigError(f"{dotted} must be one of {', '.join(allowed)}, not {value!r} ({', '.join(names)})")
    unknown = [n for n in names_of(cfg.learner.wide_prior_tune) if n not in PRIOR_TABLES]
    if unknown:
        names = [
            n for n in ((flags or {}).get("learner.wide_prior_tune"), f"{ENV_PREFIX}LEARNER__WIDE_PRIOR_TUNE") if n
        ]
        raise ConfigError(
            f"learner.wide_prior_tune lists tables among {', '.join(PRIOR_TABLES)}, not {', '.join(unknown)} ({', '.join(names)})"
        )
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-JSON view of the config (paths as strings), secrets :data:`REDACTED`."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, KafkaConfig):
            obj = obj.redacted()
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Path):
            return str(obj)
        return obj

    return convert(cfg)


def from_dict(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Inverse of :func:`to_dict` (used to hand a config to a child process); redacted secrets are
    taken from ``environ`` (:func:`restore_secrets`)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    cfg = apply_overrides(Config(), {k: v for k, v in flat.items() if not k.startswith("data_dir")})
    if "data_dir" in data:
        cfg.data_dir = Path(data["data_dir"])
    return restore_secrets(cfg, environ)


def config_hash(cfg: Config, sections: tuple[str, ...] = ("learner", "semantic", "join")) -> str:
    """Stable hash of the settings that shape a model (not of paths or broker addresses)."""
    view = {name: to_dict(cfg)[name] for name in sections}
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16]
