"""The configured source: the Kafka consumer if bootstrap servers are set, else the embedded log.

The one place that knows every implementation of the :class:`~stream.source.Source` contract; the contract
imports none of them, and each implementation imports only the contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from stream.settings import StreamSettings
from stream.source import Source


def open_source(
    settings: StreamSettings,
    *,
    topic: str | None = None,
    partitions: Iterable[int] | None = None,
    start_offsets: Mapping[int, int] | None = None,
) -> Source:
    """The configured source for ``topic`` (default: interactions): Kafka if bootstrap servers are set.

    ``partitions``: the static assignment (default: all ``settings.partitions``, or the topic's one
    partition for the others). ``start_offsets``: next offset to read per partition; a partition missing
    from it starts at its beginning (the earliest retained offset on Kafka, 0 in the embedded log).
    """
    topic = topic or settings.topic_interactions
    if partitions is None:
        partitions = range(settings.partitions if topic == settings.topic_interactions else 1)
    assigned = frozenset(partitions)
    start = {int(p): int(o) for p, o in (start_offsets or {}).items()}
    unknown = sorted(set(start) - assigned)
    if unknown:
        raise ValueError(f"start_offsets name partitions {unknown} outside the assignment {sorted(assigned)}")
    negative = {p: o for p, o in start.items() if o < 0}
    if negative:
        raise ValueError(f"start_offsets must be >= 0, got {negative}")
    if settings.uses_kafka:
        from stream.kafka_source import KafkaSource

        return KafkaSource(settings, topic=topic, partitions=assigned, start_offsets=start)
    from stream.embedded_log import EmbeddedLog, EmbeddedSource

    partition_count = settings.partitions if topic == settings.topic_interactions else 1
    log = EmbeddedLog.open(settings.embedded_log_dir, topic, partition_count,
                           segment_bytes=settings.embedded_segment_bytes)
    return EmbeddedSource(log, partitions=assigned, start_offsets=start, max_records=settings.batch_size)
