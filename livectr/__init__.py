"""livectr: streaming online-learning CTR prediction on Kafka.

One namespace, one stage per package: ``livectr.simulators`` produce events, ``livectr.streams``
joins them, ``livectr.semantic_cache`` supplies embeddings, ``livectr.learner`` trains, snapshots
and serves. ``livectr.core`` holds what they share (events, configuration, Kafka plumbing, the
embedded broker); ``livectr.pipeline`` and ``livectr.cli`` wire the stages together.
"""

__version__ = "0.1.0"
