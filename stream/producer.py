"""Producing interaction events, keyed by ``user_id``, to Kafka or the embedded log; and event-time replay.

Replay speed is a *time-compression factor*: ``speed=86_400`` plays one day of event time per wall-clock
second, ``speed=None`` sends as fast as the producer accepts. Events go out in event-time order
(the order of :func:`stream.dataset.load_events`), each at ``start + (timestamp - first_timestamp) / speed``.

>>> wall_offset_s(timestamp=1_000_086_400, first_timestamp=1_000_000_000, speed=86_400.0)
1.0

:func:`paced_send` sends any iterable of events (consumed lazily, so an endless generator is fine) at a rate
in events per wall second, a chunk per tick, each chunk flushed before the next.

**Backpressure.** Both take a :class:`LagThrottle`: before each chunk it waits, polling the consumer group's
lag (``stream.group_offsets.GroupLag``) every ``poll_s``, while the total exceeds ``max_lag_events``. An
offered rate above what the pipeline sustains is so throttled down to it, lag stays bounded, and the
schedule resumes from where the wait ended (no burst to catch up). The stats report the achieved rate and
the time spent throttled. The lag counts from *committed* offsets, which move only with a checkpoint:
``max_lag_events`` must exceed the events of one checkpoint interval (``checkpoint_every_steps *
batch_size``) plus what the consumers' queue holds, or the producer waits for a checkpoint that needs the
events it holds back (:meth:`LagThrottle.check_headroom`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice, pairwise
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
    throttled_s: float = 0.0  # time spent waiting for the consumer group's lag to come down

    @property
    def events_per_s(self) -> float:
        """The achieved rate: events stored per wall second, throttled time included."""
        return self.events / self.wall_s if self.wall_s > 0 else float("inf")


class LagThrottle:
    """Waits while the consumer group's total lag exceeds ``max_lag_events`` (see the module docstring).

    ``lag_events`` returns the current lag per partition (a :class:`stream.group_offsets.GroupLag`).
    ``throttled_s`` and ``waits`` accumulate over the throttle's life; ``last_lag_events`` is the last total.

    >>> lags = iter([{0: 7, 1: 5}, {0: 3, 1: 2}])
    >>> clock = iter([0.0, 0.4]).__next__
    >>> throttle = LagThrottle(lambda: next(lags), max_lag_events=10, clock=clock, sleep=lambda s: None)
    >>> throttle.wait(), throttle.last_lag_events, throttle.waits
    (0.4, 5, 1)
    """

    def __init__(
        self,
        lag_events: Callable[[], dict[int, int]],
        max_lag_events: int,
        poll_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if isinstance(max_lag_events, bool) or not isinstance(max_lag_events, int) or max_lag_events < 1:
            raise ValueError(f"max_lag_events must be an int >= 1, got {max_lag_events!r}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.lag_events = lag_events
        self.max_lag_events = max_lag_events
        self.poll_s = poll_s
        self._clock = clock
        self._sleep = sleep
        self.throttled_s = 0.0
        self.waits = 0
        self.last_lag_events = 0

    def check_headroom(self, events_per_checkpoint: int, queue_events: int = 0) -> None:
        """Raise ``ValueError`` unless ``max_lag_events`` exceeds one checkpoint interval plus the queue."""
        need = events_per_checkpoint + queue_events
        if self.max_lag_events <= need:
            raise ValueError(
                f"max_lag_events must exceed the events of one checkpoint interval plus the queue ({need}: offsets "
                f"are committed only with a checkpoint), got {self.max_lag_events}"
            )

    def wait(self, stop: threading.Event | None = None) -> float:
        """Block while the lag is above the bound (or until ``stop`` is set); return the seconds waited."""
        start_s = self._clock()
        waited = False
        while True:
            self.last_lag_events = sum(self.lag_events().values())
            if self.last_lag_events <= self.max_lag_events or (stop is not None and stop.is_set()):
                break
            waited = True
            if stop is not None:
                stop.wait(self.poll_s)
            else:
                self._sleep(self.poll_s)
        if not waited:
            return 0.0
        waited_s = self._clock() - start_s
        self.throttled_s += waited_s
        self.waits += 1
        return waited_s


def paced_send(
    events: Iterable[InteractionEvent],
    producer: RecordProducer,
    rate_events_per_s: float | None,
    *,
    throttle: LagThrottle | None = None,
    stop: threading.Event | None = None,
    tick_s: float = 0.1,
    max_chunk_events: int = 4096,
    on_sent: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] | None = None,
) -> ReplayStats:
    """Send ``events`` in order at ``rate_events_per_s`` (None: flat out), one chunk per tick, lazily.

    Each chunk is ``rate * tick_s`` events (at most ``max_chunk_events``; flat out: that many) and is flushed
    before the next, so ``on_sent(n)`` always reports ``n`` events stored. Before each chunk ``throttle``
    (if any) waits while the lag is too high; the pacing schedule then moves on by the time waited. A
    flush that fails raises ``RuntimeError`` naming the first event that may not be stored, and nothing
    after it is sent. ``stop`` ends the send after the chunk in hand.
    """
    if rate_events_per_s is not None and rate_events_per_s <= 0:
        raise ValueError(f"rate_events_per_s must be > 0 or None (flat out), got {rate_events_per_s}")
    if tick_s <= 0:
        raise ValueError(f"tick_s must be > 0, got {tick_s}")
    if max_chunk_events < 1:
        raise ValueError(f"max_chunk_events must be >= 1, got {max_chunk_events}")
    pause = sleep if sleep is not None else (stop.wait if stop is not None else time.sleep)
    chunk_events = (
        max_chunk_events if rate_events_per_s is None
        else max(1, min(max_chunk_events, int(rate_events_per_s * tick_s)))
    )
    iterator = iter(events)
    start_s = clock()
    throttled_s = 0.0
    sent = 0
    while stop is None or not stop.is_set():
        chunk = list(islice(iterator, chunk_events))
        if not chunk:
            break
        if throttle is not None:
            throttled_s += throttle.wait(stop)
            if stop is not None and stop.is_set():
                break
        for event in chunk:
            send_event(producer, event)
        try:
            producer.flush()
        except Exception as exc:
            raise RuntimeError(
                f"send stopped: event_id {chunk[0].event_id!r} and after may not be stored; {sent} were acknowledged"
            ) from exc
        sent += len(chunk)
        if on_sent is not None:
            on_sent(sent)
        if rate_events_per_s is not None:
            due_s = start_s + throttled_s + sent / rate_events_per_s
            delay_s = due_s - clock()
            if delay_s > 0:
                pause(delay_s)
    stats = ReplayStats(sent, clock() - start_s, throttled_s)
    log.info("sent events=%s wall_s=%.3f events_per_s=%.0f throttled_s=%.1f", stats.events, stats.wall_s,
             stats.events_per_s, stats.throttled_s)
    return stats


def replay(
    events: Sequence[InteractionEvent],
    producer: RecordProducer,
    speed: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 1000,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    throttle: LagThrottle | None = None,
) -> ReplayStats:
    """Send ``events`` (event-time order) keyed by user_id; pace by ``speed`` or go flat out (``None``).

    Returns after ``producer.flush()``, so every event counted is stored. ``on_progress(n)`` reports
    events sent since its last call. With ``throttle``, every ``progress_every`` events are flushed and
    the throttle waits while the lag is too high; the event-time schedule moves on by the time waited.
    """
    if speed is not None and speed <= 0:
        raise ValueError(f"speed must be > 0 event-time seconds per wall second, or None (max), got {speed}")
    if any(b.timestamp < a.timestamp for a, b in pairwise(events)):
        raise ValueError("events must be in event-time order (as load_events returns them)")
    start = clock()
    first_ts = events[0].timestamp if events else 0
    unreported = 0
    throttled_s = 0.0
    for i, event in enumerate(events):
        if throttle is not None and i % progress_every == 0:
            if i:
                producer.flush()  # the lag can only see what is stored
            throttled_s += throttle.wait()
        if speed is not None:
            delay_s = start + throttled_s + wall_offset_s(event.timestamp, first_ts, speed) - clock()
            if delay_s > 0:
                sleep(delay_s)
        producer.send(event.user_id.encode(), encode_event(event))
        unreported += 1
        if on_progress is not None and (unreported >= progress_every or i == len(events) - 1):
            on_progress(unreported)
            unreported = 0
    producer.flush()
    stats = ReplayStats(len(events), clock() - start, throttled_s)
    log.info("replayed events=%s wall_s=%.3f events_per_s=%.0f throttled_s=%.1f", stats.events, stats.wall_s,
             stats.events_per_s, stats.throttled_s)
    return stats
