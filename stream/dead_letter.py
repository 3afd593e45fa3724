"""Dead letters: messages that failed to decode, kept with their original bytes, reason and origin.

A dead letter is a JSON object (orjson) so that Kafka and the embedded log carry the same bytes; the
original message is base64-encoded because it may not be valid UTF-8 or JSON. The record key is the
source ``topic:partition`` so a dead-letter topic with several partitions keeps each source partition's
letters in order.

>>> letter = DeadLetter("bad_json", "unexpected character", "t", 2, 41, b"\\xff{", failed_at_ms=5)
>>> decode_dead_letter(encode_dead_letter(letter)) == letter
True
>>> encode_dead_letter(letter)[:60]
b'{"schema_version":1,"reason":"bad_json","detail":"unexpected'
>>> print(letter.example())
partition 2 offset 41: unexpected character; record b'\\xff{'
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from stream.errors import EventDecodeError

if TYPE_CHECKING:
    from stream.embedded_log import EmbeddedLog
    from stream.settings import StreamSettings

log = logging.getLogger(__name__)

DEAD_LETTER_SCHEMA_VERSION = 1
EXAMPLE_RECORD_BYTES = 160  # how much of the original record an example shows


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str  # EventDecodeError.reason, e.g. "bad_json", "missing_field", "oversize"
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    original: bytes | None  # the message value exactly as received (None: the message had no value)
    failed_at_ms: int  # wall clock, unix milliseconds
    schema_version: int = DEAD_LETTER_SCHEMA_VERSION

    @property
    def key(self) -> bytes:
        return f"{self.source_topic}:{self.source_partition}".encode()

    def example(self) -> str:
        """One line an operator can act on: where the record was, why it failed, and (the start of) the record."""
        record = "none" if self.original is None else repr(self.original[:EXAMPLE_RECORD_BYTES])
        if self.original is not None and len(self.original) > EXAMPLE_RECORD_BYTES:
            record += f"... ({len(self.original)} bytes)"
        return f"partition {self.source_partition} offset {self.source_offset}: {self.detail}; record {record}"


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return orjson.dumps(
        {
            "schema_version": letter.schema_version,
            "reason": letter.reason,
            "detail": letter.detail,
            "source_topic": letter.source_topic,
            "source_partition": letter.source_partition,
            "source_offset": letter.source_offset,
            "original_b64": None if letter.original is None else base64.b64encode(letter.original).decode(),
            "failed_at_ms": letter.failed_at_ms,
        }
    )


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """Parse a dead-letter record; raise :class:`EventDecodeError` (reason ``bad_dead_letter``) if it is not one."""
    try:
        payload: dict[str, Any] = orjson.loads(raw)
        version = payload["schema_version"]
        if version != DEAD_LETTER_SCHEMA_VERSION:
            raise ValueError(f"schema_version {version!r}, supported: {DEAD_LETTER_SCHEMA_VERSION}")
        b64 = payload["original_b64"]
        return DeadLetter(
            reason=str(payload["reason"]),
            detail=str(payload["detail"]),
            source_topic=str(payload["source_topic"]),
            source_partition=int(payload["source_partition"]),
            source_offset=int(payload["source_offset"]),
            original=None if b64 is None else base64.b64decode(b64, validate=True),
            failed_at_ms=int(payload["failed_at_ms"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EventDecodeError("bad_dead_letter", f"{type(exc).__name__}: {exc}") from None


class DeadLetterSink(Protocol):
    """Where dead letters go. ``send`` may buffer; ``flush`` returns once every letter sent is stored."""

    def send(self, letter: DeadLetter) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class EmbeddedDeadLetters:
    """Dead letters appended to an embedded-log topic; buffered until ``flush``."""

    def __init__(self, log_: EmbeddedLog, fsync: bool = False) -> None:
        self.log = log_
        self.fsync = fsync
        self._pending: list[tuple[bytes, bytes | None]] = []

    def send(self, letter: DeadLetter) -> None:
        self._pending.append((letter.key, encode_dead_letter(letter)))

    def flush(self) -> None:
        if self._pending:
            self.log.append_many(self._pending, fsync=self.fsync)
            self._pending = []

    def close(self) -> None:
        self.flush()
        self.log.close()


class KafkaDeadLetters:
    """Dead letters produced to a Kafka topic with an idempotent producer."""

    def __init__(self, producer: Any, topic: str, flush_timeout_s: float = 30.0) -> None:
        self.producer = producer
        self.topic = topic
        self.flush_timeout_s = flush_timeout_s
        self._futures: list[Any] = []

    def send(self, letter: DeadLetter) -> None:
        self._futures.append(self.producer.send(self.topic, key=letter.key, value=encode_dead_letter(letter)))

    def flush(self) -> None:
        """Block until every letter is acknowledged; re-raise the first delivery error."""
        if not self._futures:
            return
        self.producer.flush(timeout=self.flush_timeout_s)
        futures, self._futures = self._futures, []
        for future in futures:
            future.get(timeout=0)  # raises the delivery error, if any

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.producer.close()


def open_dead_letters(settings: StreamSettings) -> DeadLetterSink:
    """The dead-letter sink of the configured backend (topic ``settings.topic_dead_letters``)."""
    if settings.uses_kafka:
        from stream.producer import make_kafka_producer

        return KafkaDeadLetters(make_kafka_producer(settings), settings.topic_dead_letters)
    from stream.embedded_log import EmbeddedLog

    dlq_log = EmbeddedLog.open(
        settings.embedded_log_dir, settings.topic_dead_letters, 1, segment_bytes=settings.embedded_segment_bytes
    )
    return EmbeddedDeadLetters(dlq_log, fsync=settings.embedded_fsync)
