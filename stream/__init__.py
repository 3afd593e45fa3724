"""Events in: wire schemas, data set loading, per-user state, Kafka and the embedded log."""
