"""Prometheus metrics of the consumer processes, defined once. Labels are bounded: domains come from the
settings, reasons from a fixed set (``EventDecodeError.reason``), partitions from the topic's count.
Catalogue: ``docs/metrics.md``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RECORDS_CONSUMED = Counter(
    "sitn_stream_records_consumed", "Records read from the interactions topic (valid or not)."
)
EVENTS_DECODED = Counter(
    "sitn_stream_events_decoded", "Records decoded into valid interaction events, by domain.", ["domain"]
)
DEAD_LETTERS = Counter(
    "sitn_stream_dead_letters", "Records sent to the dead-letter topic, by reason.", ["reason"]
)
CONSUMER_LAG = Gauge(
    "sitn_stream_consumer_lag_records",
    "Records between the consumer's position and the end of the partition.",
    ["partition"],
)
BATCHES_DELIVERED = Counter("sitn_stream_batches_delivered", "Event batches put on the learner's queue.")
QUEUE_FULL_WAITS = Counter(
    "sitn_stream_queue_full_waits",
    "Times the learner's queue stayed full for put_wait_s (backpressure engaged).",
)
COMMITS = Counter(
    "sitn_stream_commits",
    "Checkpointed positions mirrored into the consumer group (for lag tools), by outcome.",
    ["outcome"],
)
