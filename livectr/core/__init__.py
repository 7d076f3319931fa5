"""The ground floor every stage builds on: event types, configuration, Kafka plumbing, the
embedded broker, status files and the semantic-lookup contract. Nothing here imports a stage."""
