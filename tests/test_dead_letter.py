"""Dead letters: the record format, and malformed messages routed with reasons while valid events go on,
over the embedded log and over the real Kafka broker."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import pytest

from stream.consumer import EventBatch, StreamConsumer
from stream.dead_letter import DeadLetter, decode_dead_letter, encode_dead_letter, open_dead_letters
from stream.embedded_log import EmbeddedLog, EmbeddedSource
from stream.errors import EventDecodeError
from stream.events import MAX_EVENT_BYTES, InteractionEvent, encode_event
from stream.producer import open_producer
from stream.settings import StreamSettings
from stream.source import Source
from stream.source_factory import open_source

DOMAINS = ("movie", "book")


def test_dead_letter_round_trips_arbitrary_bytes_and_null() -> None:
    for original in (b"\x00\xff\xfe not utf-8", b"", None):
        letter = DeadLetter("bad_json", "detail", "topic", 3, 12345, original, failed_at_ms=1_700_000_000_000)
        assert decode_dead_letter(encode_dead_letter(letter)) == letter
    assert letter.key == b"topic:3"


def test_dead_letter_wire_fields_are_stable() -> None:
    letter = DeadLetter("unknown_domain", "got 'music'", "t", 1, 7, b'{"a":1}', failed_at_ms=9)
    assert orjson.loads(encode_dead_letter(letter)) == {
        "schema_version": 1,
        "reason": "unknown_domain",
        "detail": "got 'music'",
        "source_topic": "t",
        "source_partition": 1,
        "source_offset": 7,
        "original_b64": "eyJhIjoxfQ==",
        "failed_at_ms": 9,
    }


def test_decoding_something_else_names_the_problem() -> None:
    with pytest.raises(EventDecodeError, match=r"^bad_dead_letter: KeyError: 'schema_version'$"):
        decode_dead_letter(b"{}")
    with pytest.raises(EventDecodeError, match=r"^bad_dead_letter: ValueError: schema_version 2, supported: 1$"):
        decode_dead_letter(b'{"schema_version": 2}')


def _valid(i: int, user: str) -> InteractionEvent:
    return InteractionEvent(f"ok{i}", user, f"i{i}", DOMAINS[i % 2], 1_400_000_000 + i)


def _mixed_stream() -> tuple[list[tuple[bytes, bytes | None]], list[InteractionEvent], dict[bytes | None, str]]:
    """Valid events of 4 users with every kind of malformed message between them (same users' keys)."""
    good = [_valid(i, f"user{i % 4}") for i in range(40)]
    bad: dict[bytes | None, str] = {
        b"{not json": "bad_json",
        orjson.dumps({"event_id": "x", "user_id": "user1", "domain": "movie", "timestamp": 1_400_000_000}): "missing_field",
        orjson.dumps({"event_id": "x", "user_id": "user2", "item_id": 5, "domain": "book", "timestamp": 1_400_000_000}): "wrong_type",
        orjson.dumps({"event_id": "x", "user_id": "user3", "item_id": "i", "domain": "book", "timestamp": "2014"}): "wrong_type",
        orjson.dumps({"event_id": "x", "user_id": "user0", "item_id": "i", "domain": "music", "timestamp": 1_400_000_000}): "unknown_domain",
        b'{"event_id": "' + b"x" * MAX_EVENT_BYTES + b'"}': "oversize",
        b"[1, 2]": "wrong_type",
        None: "empty",
    }
    records: list[tuple[bytes, bytes | None]] = []
    bad_items = list(bad)
    for i, event in enumerate(good):
        records.append((event.user_id.encode(), encode_event(event)))
        if i % 5 == 2 and bad_items:
            records.append((f"user{i % 4}".encode(), bad_items.pop()))
    assert not bad_items
    return records, good, bad


def _consume(consumer: StreamConsumer, expected_records: int, timeout_s: float) -> list[EventBatch]:
    batches: list[EventBatch] = []
    deadline = time.monotonic() + timeout_s
    while consumer.stats.records_in < expected_records:
        assert time.monotonic() < deadline, f"{consumer.stats.records_in} of {expected_records} within {timeout_s}s"
        batches.append(consumer.poll(timeout_s=0.5))
    return batches


def _read_dead_letters(source: Source, expected: int, timeout_s: float) -> list[DeadLetter]:
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + timeout_s
    while len(letters) < expected:
        assert time.monotonic() < deadline, f"{len(letters)} of {expected} dead letters within {timeout_s}s"
        for batch in source.next_batch(timeout_s=0.5):
            letters += [decode_dead_letter(v) for v in batch.values if v is not None]
    return letters


def _check(batches: list[EventBatch], letters: list[DeadLetter], good: list[InteractionEvent],
           bad: dict[bytes | None, str], consumer: StreamConsumer, topic: str) -> None:
    examples = [e for b in batches for e in b.events]
    by_user: dict[str, list[str]] = {}
    for ex in examples:
        by_user.setdefault(ex.user_id, []).append(ex.event_id)
    assert by_user == {u: [e.event_id for e in good if e.user_id == u] for u in ("user0", "user1", "user2", "user3")}
    assert {letter.original: letter.reason for letter in letters} == bad
    assert all(letter.source_topic == topic for letter in letters)
    assert consumer.stats.dead_letters_by_reason == {
        "bad_json": 1, "missing_field": 1, "wrong_type": 3, "unknown_domain": 1, "oversize": 1, "empty": 1,
    }
    assert sum(b.dead_letters for b in batches) == len(bad)
    # Each batch names its letters (partition, offset, reason) for the learner's tally, as the topic has them,
    # within the partition span the batch read, and one example per reason.
    marks = [(m.partition, m.offset, m.reason) for b in batches for m in b.letters]
    assert sorted(marks) == sorted((x.source_partition, x.source_offset, x.reason) for x in letters)
    for b in batches:
        for m in b.letters:
            assert b.read[m.partition][0] <= m.offset < b.read[m.partition][1]
            start, stop = b.spans.get(m.partition, (0, 0))
            assert m.offset not in b.offsets[start:stop]  # not an event's offset in its partition
        assert set(b.letter_examples) == {m.reason for m in b.letters}


def test_malformed_messages_go_to_the_embedded_dead_letter_topic(tmp_path: Path) -> None:
    settings = StreamSettings(embedded_log_dir=tmp_path, partitions=2)
    records, good, bad = _mixed_stream()
    producer = open_producer(settings)
    for key, value in records:
        producer.send(key, value)
    producer.close()
    consumer = StreamConsumer(open_source(settings), open_dead_letters(settings), DOMAINS)
    batches = _consume(consumer, len(records), timeout_s=10)
    assert consumer.positions() == EmbeddedLog.open(tmp_path, settings.topic_interactions, 2).end_offsets()
    consumer.close()
    dlq = EmbeddedLog.open(tmp_path, settings.topic_dead_letters, 1)
    letters = _read_dead_letters(EmbeddedSource(dlq), len(bad), timeout_s=5)
    _check(batches, letters, good, bad, consumer, settings.topic_interactions)
    # Each letter points at its original record: reading that offset gives the same bytes.
    log = EmbeddedLog.open(tmp_path, settings.topic_interactions, 2)
    for letter in letters:
        raw = EmbeddedSource(log, partitions=[letter.source_partition],
                             start_offsets={letter.source_partition: letter.source_offset})
        assert raw.next_batch(timeout_s=0)[0].values[0] == letter.original


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_malformed_messages_go_to_the_kafka_dead_letter_topic(kafka_broker: object) -> None:
    from stream.topics import ensure_topics

    run = uuid.uuid4().hex[:8]
    settings = StreamSettings(
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,  # type: ignore[attr-defined]
        topic_interactions=f"dl-it-{run}",
        topic_dead_letters=f"dl-dlq-{run}",
        topic_embedding_updates=f"dl-up-{run}",
        consumer_group=f"dl-{run}",
        partitions=2,
    )
    ensure_topics(settings)
    records, good, bad = _mixed_stream()
    producer = open_producer(settings)
    for key, value in records:
        producer.send(key, value)
    producer.close()
    consumer = StreamConsumer(open_source(settings), open_dead_letters(settings), DOMAINS)
    try:
        batches = _consume(consumer, len(records), timeout_s=60)
        positions = consumer.positions()
    finally:
        consumer.close()
    assert sum(positions.values()) == len(records)
    inspector = open_source(settings, topic=settings.topic_dead_letters)
    try:
        letters = _read_dead_letters(inspector, len(bad), timeout_s=60)
    finally:
        inspector.close()
    _check(batches, letters, good, bad, consumer, settings.topic_interactions)
