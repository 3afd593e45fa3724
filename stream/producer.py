"""Producing interaction events, keyed by ``user_id``, to Kafka or the embedded log; and event-time replay.

Replay speed is a *time-compression factor*: ``speed=86_400`` plays one day of event time per wall-clock
second, ``speed=None`` sends as fast as the producer accepts. Events go out in event-time order
(the order of :func:`stream.dataset.load_events`), each at ``start + (timestamp - first_timestamp) / speed``.

>>> wall_offset_s(timestamp=1_000_086_400, first_timestamp=1_000_000_000, speed=86_400.0)
1.0
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Protocol

from stream.events import InteractionEvent, encode_event

if TYPE_CHECKING:
    from kafka import KafkaProducer

    from stream.embedded_log import EmbeddedLog
    from stream.settings import StreamSettings

log = logging.getLogger(__name__)


class RecordProducer(Protocol):
    """Appends raw ``(key, value)`` records to one topic. ``flush`` returns once all are stored."""

    def send(self, key: bytes, value: bytes | None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def make_kafka_producer(settings: StreamSettings, **overrides: Any) -> KafkaProducer:
    """An idempotent KafkaProducer (acks=all, retries, at most 5 in flight) with throughput-minded batching."""
    from kafka import KafkaProducer

    from stream.settings import kafka_client_kwargs

    config: dict[str, Any] = {
        **kafka_client_kwargs(settings),
        "enable_idempotence": True,  # explicit: a conflicting option raises instead of silently disabling it
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_in_flight_requests_per_connection": 5,
        "client_id": "sitn-producer",
    }
    config.update(overrides)
    return KafkaProducer(**config)


class KafkaRecordProducer:
    """Records to a Kafka topic; the default partitioner hashes the key (murmur2), so a user stays in one partition."""

    def __init__(self, producer: KafkaProducer, topic: str, flush_timeout_s: float = 60.0) -> None:
        self.producer = producer
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        self.failures: list[BaseException] = []

    def send(self, key: bytes, value: bytes | None) -> None:
        future = self.producer.send(self.topic, key=key, value=value)
        future.add_errback(self.failures.append)

    def flush(self) -> None:
        self.producer.flush(timeout=self.flush_timeout_s)
        if self.failures:
            first = self.failures[0]
            raise RuntimeError(f"{len(self.failures)} record(s) failed to reach {self.topic}: {first!r}") from first

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close()


class EmbeddedRecordProducer:
    """Records to an embedded-log topic, appended in chunks of ``chunk_records`` (and on ``flush``)."""

    def __init__(self, log_: EmbeddedLog, fsync: bool = False, chunk_records: int = 4096) -> None:
        self.log = log_
        self.fsync = fsync
        self.chunk_records = chunk_records
        self._pending: list[tuple[bytes, bytes | None]] = []

    def send(self, key: bytes, value: bytes | None) -> None:
        self._pending.append((key, value))
        if len(self._pending) >= self.chunk_records:
            self._append(fsync=False)

    def _append(self, fsync: bool) -> None:
        pending, self._pending = self._pending, []
        self.log.append_many(pending, fsync=fsync)

    def flush(self) -> None:
        """Append what is buffered; with ``fsync``, everything appended so far is on disk on return."""
        self._append(fsync=False)
        if self.fsync:
            self.log.sync()

    def close(self) -> None:
        self.flush()
        self.log.close()


def open_producer(settings: StreamSettings, topic: str | None = None) -> RecordProducer:
    """The configured producer for ``topic`` (default: interactions)."""
    topic = topic or settings.topic_interactions
    if settings.uses_kafka:
        return KafkaRecordProducer(make_kafka_producer(settings), topic)
    from stream.embedded_log import EmbeddedLog

    partitions = settings.partitions if topic == settings.topic_interactions else 1
    return EmbeddedRecordProducer(
        EmbeddedLog.open(settings.embedded_log_dir, topic, partitions, settings.embedded_segment_bytes),
        fsync=settings.embedded_fsync,
    )


def send_event(producer: RecordProducer, event: InteractionEvent) -> None:
    producer.send(event.user_id.encode(), encode_event(event))


def wall_offset_s(timestamp: int, first_timestamp: int, speed: float) -> float:
    """Wall-clock seconds after the start at which an event of ``timestamp`` is due at ``speed``."""
    return (timestamp - first_timestamp) / speed


@dataclass(frozen=True)
class ReplayStats:
    events: int
    wall_s: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else float("inf")


def replay(
    events: Sequence[InteractionEvent],
    producer: RecordProducer,
    speed: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 1000,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayStats:
    """Send ``events`` (event-time order) keyed by user_id; pace by ``speed`` or go flat out (``None``).

    Returns after ``producer.flush()``, so every event counted is stored. ``on_progress(n)`` reports
    events sent since its last call.
    """
    if speed is not None and speed <= 0:
        raise ValueError(f"speed must be > 0 event-time seconds per wall second, or None (max), got {speed}")
    if any(b.timestamp < a.timestamp for a, b in pairwise(events)):
        raise ValueError("events must be in event-time order (as load_events returns them)")
    start = clock()
    first_ts = events[0].timestamp if events else 0
    unreported = 0
    for i, event in enumerate(events):
        if speed is not None:
            delay_s = start + wall_offset_s(event.timestamp, first_ts, speed) - clock()
            if delay_s > 0:
                sleep(delay_s)
        producer.send(event.user_id.encode(), encode_event(event))
        unreported += 1
        if on_progress is not None and (unreported >= progress_every or i == len(events) - 1):
            on_progress(unreported)
            unreported = 0
    producer.flush()
    stats = ReplayStats(len(events), clock() - start)
    log.info("replayed events=%s wall_s=%.3f events_per_s=%.0f", stats.events, stats.wall_s, stats.events_per_s)
    return stats
