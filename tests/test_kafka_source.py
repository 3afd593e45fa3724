"""The Kafka source and the consumer core against the real broker: a static assignment read from given
offsets (no consumer group, so no rebalance), an exact resume at a snapshot, pause/resume, and the
learner's positions mirrored into the consumer group for lag tools."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from stream.broker import KafkaBroker
from stream.consumer import EventBatch, StreamConsumer
from stream.dead_letter import open_dead_letters
from stream.events import InteractionEvent
from stream.group_offsets import GroupCommitter, group_lag
from stream.kafka_source import KafkaSource
from stream.producer import open_producer, send_event
from stream.settings import StreamSettings, kafka_client_kwargs
from stream.topics import ensure_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

DOMAINS = ("movie", "book")
N_EVENTS = 400


@pytest.fixture
def settings(kafka_broker: object) -> Iterator[StreamSettings]:
    run = uuid.uuid4().hex[:8]
    s = StreamSettings(
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,  # type: ignore[attr-defined]
        topic_interactions=f"ks-{run}",
        topic_dead_letters=f"ks-dlq-{run}",
        topic_embedding_updates=f"ks-up-{run}",
        consumer_group=f"ks-{run}",
        partitions=4,
        batch_size=50,
        poll_timeout_s=0.2,
    )
    ensure_topics(s)
    yield s


def _produce(settings: StreamSettings, n: int) -> list[InteractionEvent]:
    events = [
        InteractionEvent(f"e{i}", f"user{i % 13}", f"i{i}", DOMAINS[i % 2], 1_400_000_000 + i) for i in range(n)
    ]
    producer = open_producer(settings)
    for e in events:
        send_event(producer, e)
    producer.close()
    return events


def _consumer(settings: StreamSettings, partitions: set[int], start: dict[int, int] | None = None) -> StreamConsumer:
    return StreamConsumer(KafkaSource(settings, settings.topic_interactions, partitions, start),
                          open_dead_letters(settings), DOMAINS)


def _read_until(consumer: StreamConsumer, records: int, timeout_s: float = 60) -> list[EventBatch]:
    """Poll until ``records`` records were read in all (each poll waits at most 0.2 s)."""
    batches: list[EventBatch] = []
    deadline = time.monotonic() + timeout_s
    while consumer.stats.records_in < records:
        assert time.monotonic() < deadline, f"{consumer.stats.records_in} of {records} records within {timeout_s}s"
        batches.append(consumer.poll(0.2))
    return batches


def _ends(settings: StreamSettings) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    probe = KafkaConsumer(**kafka_client_kwargs(settings))
    try:
        tps = [TopicPartition(settings.topic_interactions, p) for p in range(settings.partitions)]
        return {tp.partition: o for tp, o in probe.end_offsets(tps).items()}
    finally:
        probe.close()


def _described(broker: KafkaBroker, settings: StreamSettings) -> dict[int, tuple[int, int, int]]:
    """``kafka-consumer-groups --describe``: partition -> (current offset, log end offset, lag)."""
    out = subprocess.run(broker.consumer_groups_cmd("--describe", "--group", settings.consumer_group),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows: dict[int, tuple[int, int, int]] = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[1] == settings.topic_interactions and cols[3].isdigit():
            rows[int(cols[2])] = (int(cols[3]), int(cols[4]), int(cols[5]))
    return rows


def test_static_assignment_reads_its_partitions_from_the_given_offsets(settings: StreamSettings) -> None:
    events = _produce(settings, N_EVENTS)
    ends = _ends(settings)
    assert sum(ends.values()) == N_EVENTS
    start = {0: ends[0] // 2, 1: ends[1]}  # partition 1 fully trained already; 2 and 3 from the beginning
    a = _consumer(settings, {0, 1}, start)
    b = _consumer(settings, {2, 3})
    expected_a = ends[0] - start[0]
    got_a, got_b = _read_until(a, expected_a), _read_until(b, ends[2] + ends[3])
    assert a.assignment() == frozenset({0, 1}) and b.assignment() == frozenset({2, 3})
    assert {p for batch in got_a for p in batch.read} == {0}
    assert min(batch.read[0][0] for batch in got_a if 0 in batch.read) == start[0]  # not one off
    # Each event exactly once, at its own offset, in partition order.
    offsets_a = [o for batch in got_a for o in batch.offsets]
    assert offsets_a == list(range(start[0], ends[0]))
    ids = [e.event_id for batch in got_a + got_b for e in batch.events]
    assert len(ids) == len(set(ids)) == expected_a + ends[2] + ends[3]
    assert set(ids) <= {e.event_id for e in events}
    assert a.positions() == {0: ends[0], 1: ends[1]}
    assert b.positions() == {2: ends[2], 3: ends[3]}
    assert a.poll(0.5).read == {} and b.poll(0.5).read == {}
    assert isinstance(a.source, KafkaSource)
    assert a.source.consumer.config["group_id"] is None  # no group joined: nothing to rebalance
    assert group_lag(settings) == ends  # and nothing committed: a source owns no progress
    a.close()
    b.close()


def test_a_new_source_at_a_snapshot_resumes_exactly_and_pause_holds_records(settings: StreamSettings) -> None:
    events = _produce(settings, N_EVENTS)
    first = _consumer(settings, {0, 1, 2, 3})
    done = _read_until(first, 120)
    snapshot = first.positions()
    done_ids = [e.event_id for b in done for e in b.events]
    assert len(done_ids) == sum(snapshot.values()) >= 120
    first.close()

    second = _consumer(settings, {0, 1, 2, 3}, snapshot)
    second.source.pause()
    assert second.poll(1.0).read == {}  # paused: nothing handed out
    second.source.resume()
    rest = _read_until(second, N_EVENTS - len(done_ids))
    rest_ids = [e.event_id for b in rest for e in b.events]
    assert sorted(done_ids + rest_ids) == sorted(e.event_id for e in events)  # nothing lost, nothing twice
    assert second.positions() == _ends(settings)
    second.close()


def test_committed_positions_show_as_the_group_lag(settings: StreamSettings, kafka_broker: KafkaBroker) -> None:
    """What the learner commits after a checkpoint is what ``kafka-consumer-groups --describe`` shows."""
    _produce(settings, N_EVENTS)
    ends = _ends(settings)
    assert group_lag(settings) == ends  # nothing committed: lag counted from the beginning
    committer = GroupCommitter(settings)
    try:
        trained = {p: end - 3 for p, end in ends.items() if end >= 3}
        assert committer.commit(trained) is True
        assert group_lag(settings) == {p: 3 if p in trained else ends[p] for p in ends}
        assert _described(kafka_broker, settings) == {p: (trained[p], ends[p], 3) for p in trained}
        assert committer.commit({p: ends[p] for p in trained}) is True  # the next checkpoint's positions
        assert group_lag(settings) == {p: 0 if p in trained else ends[p] for p in ends}
        with pytest.raises(ValueError, match=r"positions name partitions \[4\], the topic has 0\.\.3"):
            committer.commit({4: 1})
    finally:
        committer.close()
