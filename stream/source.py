"""The source contract shared by the Kafka consumer and the embedded log.

This module imports no implementation: ``stream.kafka_source`` and ``stream.embedded_log`` implement the
contract, and ``stream.source_factory.open_source`` builds the configured one.

A source reads a fixed set of partitions of one topic, from offsets it is given, and hands out raw
records in batches::

    source = open_source(settings, partitions={0, 2}, start_offsets={0: 120})  # stream.source_factory
    batches = source.next_batch(timeout_s=0.5)   # [RecordBatch], one per partition with data

Offsets follow Kafka's convention everywhere: a *position* is **the next offset to read**, i.e. last
processed offset + 1. ``snapshot()`` returns the positions after everything ``next_batch`` has returned so
far; starting a new source at a snapshot resumes exactly after those records (the off-by-one that bytewax
warns about is avoided by never storing "last read").

A source owns no progress. The assignment is static (Kafka ``assign()``, no consumer group, so no
rebalance), and where to start is the caller's: in the pipeline, the positions of the learner's checkpoint
(``learner.online.trainer``). Nothing is committed here; the learner mirrors its checkpointed positions into the
consumer group (``stream.group_offsets.GroupCommitter``) only so that lag shows in standard tools.
``pause``/``resume`` are flow control: while paused, ``next_batch`` returns nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class Source(Protocol):
    """What the consumer core needs from Kafka or the embedded log."""

    topic: str

    def next_batch(self, timeout_s: float) -> list[RecordBatch]:
        """Records after the current positions; waits up to ``timeout_s`` for some, may return ``[]``."""
        ...

    def snapshot(self) -> Offsets:
        """Next offset to read for every assigned partition."""
        ...

    def assignment(self) -> frozenset[int]: ...

    def lag(self) -> Offsets:
        """Records between the position and the end of each assigned partition (as last seen; may lag)."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...
