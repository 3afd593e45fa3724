"""The source contract shared by the Kafka consumer and the embedded log.

A source reads one topic for one consumer group and hands out raw records in batches::

    batches = source.next_batch(timeout_s=0.5)   # [RecordBatch], one per partition with data
    ...process them...
    source.commit(offsets)                       # {partition: next offset to read}

Offsets follow Kafka's convention everywhere: a *position* or a committed offset is **the next offset to
read**, i.e. last processed offset + 1. ``snapshot()`` returns the positions after everything
``next_batch`` has returned so far; committing a snapshot after processing those records resumes exactly
after them (the off-by-one that bytewax warns about is avoided by never storing "last read").

Partitions can be taken away (Kafka group rebalance). The source tells its :class:`RebalanceListener`
during ``next_batch``: ``on_revoked`` before a partition goes (the owner must drop any uncommitted state
for it and must not commit it any more), ``on_assigned`` when partitions arrive (reading resumes at the
group's committed offset). ``pause``/``resume`` are flow control: while paused, ``next_batch`` returns
nothing but keeps the membership alive, which is how a slow downstream step avoids eviction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from stream.settings import StreamSettings

Offsets = dict[int, int]  # partition -> next offset to read


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """Consecutive records of one partition, in offset order. ``values[i]`` sits at ``offsets[i]``.

    >>> b = RecordBatch("t", 3, [10, 11, 13], [b"a", b"b", b"c"])
    >>> b.next_offset, len(b)
    (14, 3)
    """

    topic: str
    partition: int
    offsets: list[int]
    values: list[bytes | None]

    def __post_init__(self) -> None:
        assert len(self.offsets) == len(self.values) > 0, "a record batch holds at least one record"

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def next_offset(self) -> int:
        return self.offsets[-1] + 1


class RebalanceListener(Protocol):
    def on_assigned(self, partitions: frozenset[int]) -> None: ...

    def on_revoked(self, partitions: frozenset[int]) -> None: ...


class NoRebalanceListener:
    def on_assigned(self, partitions: frozenset[int]) -> None:
        pass

    def on_revoked(self, partitions: frozenset[int]) -> None:
        pass


class Source(Protocol):
    """What the consumer core needs from Kafka or the embedded log."""

    topic: str
    listener: RebalanceListener

    def next_batch(self, timeout_s: float) -> list[RecordBatch]:
        """Records after the current positions; waits up to ``timeout_s`` for some, may return ``[]``."""
        ...

    def snapshot(self) -> Offsets:
        """Next offset to read for every assigned partition."""
        ...

    def commit(self, offsets: Mapping[int, int]) -> bool:
        """Store ``offsets`` (next offset to read) for the group; partitions not assigned are skipped.

        Returns False if the group took the partitions away meanwhile (nothing was committed)."""
        ...

    def assignment(self) -> frozenset[int]: ...

    def lag(self) -> Offsets:
        """Records between the position and the end of each assigned partition (as last seen; may lag)."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...


def open_source(
    settings: StreamSettings,
    *,
    topic: str | None = None,
    listener: RebalanceListener | None = None,
    partitions: frozenset[int] | None = None,
    group: str | None = None,
) -> Source:
    """The configured source for ``topic`` (default: interactions): Kafka if bootstrap servers are set.

    ``partitions`` is the embedded log's static assignment (default: all); Kafka assigns through the group.
    """
    topic = topic or settings.topic_interactions
    group = group or settings.consumer_group
    listener = listener or NoRebalanceListener()
    if settings.uses_kafka:
        from stream.kafka_source import KafkaSource

        if partitions is not None:
            raise ValueError("partitions are assigned by the Kafka consumer group; pass partitions=None")
        return KafkaSource(settings, topic=topic, group=group, listener=listener)
    from stream.embedded_log import EmbeddedLog, EmbeddedSource

    log = EmbeddedLog.open(
        settings.embedded_log_dir, topic, settings.partitions, segment_bytes=settings.embedded_segment_bytes
    )
    return EmbeddedSource(
        log, group=group, partitions=partitions, listener=listener, max_records=settings.batch_size,
        fsync=settings.embedded_fsync,
    )
