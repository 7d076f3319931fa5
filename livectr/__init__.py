"""livectr: streaming online-learning CTR prediction on Kafka.

This package is the base layer (shared event types, configuration, Kafka plumbing, the
embedded broker) and the top layer (the CLI that wires the stages together). The stages live
in their own packages: ``simulators`` → ``streams`` → ``semantic_cache`` → ``learner``.
"""

__version__ = "0.1.0"
