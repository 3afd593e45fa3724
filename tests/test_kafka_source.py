"""The Kafka source and the consumer core against the real broker: a static assignment read from given
offsets (no consumer group, so no rebalance), an exact resume at a snapshot, pause/resume, and the
learner's positions mirrored into the consumer group for lag tools. The source's own record reader
(``RawPartitionRecords``) is held to kafka-python's parser on the same bytes, offline and from the broker."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder

from sitn.broker import KafkaBroker
from stream.consumer import EventBatch, StreamConsumer
from stream.dead_letter import open_dead_letters
from stream.events import InteractionEvent
from stream.group_offsets import GroupCommitter, group_lag
from stream.kafka_source import KafkaSource, RawPartitionRecords
from stream.producer import open_producer, send_event
from stream.settings import StreamSettings, kafka_client_kwargs
from stream.topics import ensure_topics

pytestmark = [pytest.mark.timeout(240)]
kafka = pytest.mark.kafka  # the tests that need the broker

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


@kafka
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


@kafka
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


@kafka
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


# --- the source's record reader against kafka-python's parser -------------------------------------------

TOPIC_PARTITION = TopicPartition("t", 0)


def _batch(magic: int, compression: int, offset: int, records: list[tuple[bytes | None, bytes | None, list]]) -> bytes:
    builder = MemoryRecordsBuilder(magic, compression, batch_size=1 << 22, offset=offset)
    for n, (key, value, headers) in enumerate(records):
        # timestamps 1.1 s apart: deltas of several varint bytes
        assert builder.append(1_700_000_000_000 + 1_100 * n, key, value, headers) is not None
    builder.close()
    return bytes(builder.buffer())


def _fetched() -> tuple[bytes, list[tuple[int, bytes | None]]]:
    """What a fetch response carries, and the (offset, value) of each complete record in it.

    Plain and gzip v2 batches with keys and null keys, null values, headers (one with a null value), values
    of 20,000 bytes (three-byte length varints), an old-format (v1) batch, and a batch cut short at the end.
    """
    plain = [
        (None if n % 3 else f"k{n}".encode(), None if n % 11 == 4 else b'{"n": %d}' % n,
         [("h", b"v"), ("e", None)] if n % 7 == 0 else [])
        for n in range(50)
    ]
    zipped = [(b"key", b"z" * (20_000 if n % 4 == 0 else n), []) for n in range(30)]
    legacy = [(None, b"old %d" % n, []) for n in range(5)]
    tail = [(None, b"tail %d" % n, []) for n in range(90)]  # offset deltas from 64 on: two-byte varints
    data = (_batch(2, 0, 0, plain) + _batch(2, 1, 50, zipped) + _batch(1, 0, 80, legacy) + _batch(2, 0, 85, tail)
            + _batch(2, 0, 175, tail)[:100])
    values = [v for _, v, _ in plain + zipped + legacy + tail]
    return data, list(enumerate(values))


def _take_all(part: Fetcher.PartitionRecords, n: int) -> list[tuple[list[tuple[int, bytes | None]], int]]:
    """Each ``take(n)``'s (offset, value) pairs with the fetch position after it, until the records drain."""
    steps = []
    for _ in range(1_000):
        if not part:
            return steps
        taken = part.take(n)
        steps.append(([r if isinstance(r, tuple) and len(r) == 2 else (r.offset, r.value) for r in taken],
                      part.next_fetch_offset))
    raise AssertionError("the records never drained")


@pytest.mark.parametrize("fetch_offset", [0, 37, 50, 61, 80, 83, 85, 150, 174, 175])
@pytest.mark.parametrize("take", [1, 13, 2000])
def test_raw_records_are_kafka_pythons_records_take_by_take(fetch_offset: int, take: int) -> None:
    data, expected = _fetched()
    stock = Fetcher.PartitionRecords(fetch_offset, TOPIC_PARTITION, MemoryRecords(data))
    raw = RawPartitionRecords(fetch_offset, TOPIC_PARTITION, MemoryRecords(data))
    stock_steps, raw_steps = _take_all(stock, take), _take_all(raw, take)
    assert raw_steps == stock_steps
    assert [r for records, _ in raw_steps for r in records] == expected[fetch_offset:]
    assert raw_steps[-1][1] == 175  # the position after the last complete batch
    assert raw.records_read == stock.records_read == 175  # fetch metrics: every record parsed, skipped ones too


@pytest.mark.parametrize("check_crcs", [True, False])
def test_a_corrupt_record_ends_the_read_with_kafka_pythons_error(check_crcs: bool) -> None:
    data = bytearray(_batch(2, 0, 0, [(None, b'{"n": %d}' % n, []) for n in range(10)]))
    at = data.index(b'{"n": 5}')
    assert data[at - 1] == 2 * 8  # the value's length, zigzag varint
    data[at - 1] = 2 * 7  # one byte short: the value's last byte, "}", is read as a header count of -63
    got = []
    for cls in (Fetcher.PartitionRecords, RawPartitionRecords):
        part = cls(0, TOPIC_PARTITION, MemoryRecords(bytes(data)), check_crcs=check_crcs)
        first = [] if check_crcs else part.take(100)
        with pytest.raises(CorruptRecordError) as err:
            part.take(100)
        got.append(([r[0] if isinstance(r, tuple) and len(r) == 2 else r.offset for r in first],
                    part.next_fetch_offset, str(err.value)))
    assert got[0] == got[1]
    assert got[1][:2] == (([], 0) if check_crcs else ([0, 1, 2, 3, 4], 5))
    assert ("failed crc check" if check_crcs else "Found invalid number of record headers -63") in got[1][2]


@kafka
def test_the_source_reads_what_kafka_pythons_consumer_reads(settings: StreamSettings) -> None:
    """gzip batches, headers, null keys and values, and transactions committed and aborted (read uncommitted:
    all their records, none of their markers), from a start offset inside a batch."""
    servers = settings.kafka_bootstrap_servers
    topic = settings.topic_interactions
    producer = KafkaProducer(bootstrap_servers=servers, compression_type="gzip", linger_ms=50)
    for n in range(300):
        value = None if n % 37 == 5 else b"v%d" % n
        producer.send(topic, partition=0, key=None if n % 2 and value is not None else b"k", value=value,
                      headers=[("h", b"x")] if n % 5 == 0 else None)
    producer.flush()
    producer.close()
    tx = KafkaProducer(bootstrap_servers=servers, transactional_id=f"tx-{topic}")
    tx.init_transactions()
    for commit in (True, False, True):
        tx.begin_transaction()
        for n in range(40):
            tx.send(topic, partition=0, value=b"tx %s %d" % (b"commit" if commit else b"abort", n))
        tx.flush()  # written before the abort too (kafka-python drops what it has not sent)
        tx.commit_transaction() if commit else tx.abort_transaction()
    tx.close()
    end = _ends(settings)[0]
    assert end == 300 + 3 * 40 + 3  # three transaction markers

    stock = KafkaConsumer(**kafka_client_kwargs(settings), enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    stock.assign([tp])
    stock.seek(tp, 17)
    source = KafkaSource(settings, topic, {0}, {0: 17})
    expected: list[tuple[int, bytes | None]] = []
    got: list[tuple[int, bytes | None]] = []
    deadline = time.monotonic() + 60
    while stock.position(tp) < end or source.snapshot()[0] < end:
        assert time.monotonic() < deadline, (stock.position(tp), source.snapshot(), end)
        expected += [(r.offset, r.value) for r in stock.poll(200).get(tp, [])]
        got += [pair for batch in source.next_batch(0.2) for pair in zip(batch.offsets, batch.values, strict=True)]
    stock.close()
    source.close()
    assert got == expected
    assert len(got) == 300 - 17 + 3 * 40
    assert [o for o, _ in got] == sorted({o for o, _ in got})
    assert sum(1 for _, v in got if v is None) == sum(1 for n in range(17, 300) if n % 37 == 5)
    assert sum(1 for _, v in got if v is not None and v.startswith(b"tx abort")) == 40
