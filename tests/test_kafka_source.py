"""The Kafka source and the consumer core against the real broker: resume from committed offsets,
rebalance (revoked partitions are dropped and never committed), and staying in the group while paused."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from stream.consumer import ExampleBatch, StreamConsumer
from stream.dead_letter import open_dead_letters
from stream.events import InteractionEvent
from stream.kafka_source import KafkaSource
from stream.producer import open_producer, send_event
from stream.settings import StreamSettings
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
        session_timeout_s=10,
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


def _consumer(settings: StreamSettings, name: str) -> StreamConsumer:
    return StreamConsumer(
        KafkaSource(settings, settings.topic_interactions, settings.consumer_group),
        open_dead_letters(settings), DOMAINS, consumer_id=name,
    )


@dataclass
class _Reader:
    """A consumer and the event ids of the examples it produced."""

    consumer: StreamConsumer
    batches: list[ExampleBatch] = field(default_factory=list)

    def poll(self) -> None:
        self.batches.append(self.consumer.poll(0.2))

    @property
    def seen(self) -> list[str]:
        return [ex.event_id for b in self.batches for ex in b.examples]

    def seen_in_current_assignment(self) -> list[str]:
        """Event ids of batches read since the last rebalance (older ones are re-read by the owner)."""
        current = [b.without_partitions(self.consumer.stale_partitions(b.positions)) for b in self.batches]
        return [ex.event_id for b in current for ex in b.examples]


def _poll_until(readers: list[_Reader], done: Callable[[], bool], timeout_s: float) -> None:
    """Poll every reader in turn until ``done()`` is true (each poll waits at most 0.2 s)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        for r in readers:
            r.poll()


def test_restart_resumes_from_committed_offsets(settings: StreamSettings) -> None:
    events = _produce(settings, N_EVENTS)
    first = _consumer(settings, "first")
    batch = first.poll(5.0)
    deadline = time.monotonic() + 30
    while not batch.positions:
        assert time.monotonic() < deadline
        batch = first.poll(1.0)
    committed = first.commit(batch.positions)
    assert committed == {p: pos.offset for p, pos in batch.positions.items()}
    done_ids = [ex.event_id for ex in batch.examples]
    uncommitted = first.poll(1.0)  # read, never committed
    first.close()

    second = _Reader(_consumer(settings, "second"))
    _poll_until([second], lambda: len(second.seen) >= N_EVENTS - len(done_ids), 60)
    seen = second.seen
    assert len(seen) == N_EVENTS - len(done_ids)  # nothing lost, nothing repeated beyond the uncommitted
    assert sorted(seen + done_ids) == sorted(e.event_id for e in events)
    assert set(ex.event_id for ex in uncommitted.examples) <= set(seen)
    assert second.consumer.poll(0.5).positions == {}
    second.consumer.close()


def test_rebalance_drops_revoked_partitions_and_never_commits_them(settings: StreamSettings) -> None:
    events = _produce(settings, N_EVENTS)
    a = _Reader(_consumer(settings, "a"))
    _poll_until([a], lambda: a.consumer.assignment() == frozenset({0, 1, 2, 3}) and len(a.seen) > 0, 60)
    stale_positions = a.consumer.positions()
    assert set(stale_positions) == {0, 1, 2, 3}
    assert sum(len(s["users"]) for s in a.consumer.user_state().values()) > 0

    b = _Reader(_consumer(settings, "b"))
    owned = lambda: (a.consumer.assignment(), b.consumer.assignment())  # noqa: E731
    _poll_until([a, b], lambda: all(owned()) and len(owned()[0] | owned()[1]) == 4, 60)
    assert a.consumer.assignment().isdisjoint(b.consumer.assignment())
    kept, moved = a.consumer.assignment(), b.consumer.assignment()
    assert len(kept) == len(moved) == 2
    assert a.consumer.stats.partitions_revoked == 2  # only those that moved; the kept ones keep their state
    # The user state of the partitions A gave away is gone with them.
    assert set(a.consumer.user_state()) == kept
    # Positions read before the rebalance: committed only for the partitions A kept.
    assert a.consumer.commit(stale_positions) == {p: stale_positions[p].offset for p in kept}
    assert a.consumer.stats.commits_skipped_partitions == 2
    # B starts the moved partitions from the last commit (none: the beginning): every event exactly once.
    now_a, now_b = a.seen_in_current_assignment, b.seen_in_current_assignment
    _poll_until([a, b], lambda: len(now_a()) + len(now_b()) >= N_EVENTS, 60)
    assert sorted(now_a() + now_b()) == sorted(e.event_id for e in events)
    committed_a = a.consumer.commit(a.consumer.positions())
    committed_b = b.consumer.commit(b.consumer.positions())
    assert set(committed_a) == a.consumer.assignment() and set(committed_b) == b.consumer.assignment()
    assert sum(committed_a.values()) + sum(committed_b.values()) == N_EVENTS
    a.consumer.close()
    b.consumer.close()


@pytest.mark.slow
def test_paused_source_keeps_its_membership_through_a_long_step(settings: StreamSettings) -> None:
    """max_poll_interval 10 s; a 12 s 'downstream step' spent pausing and polling keeps the partitions."""
    quick = settings.model_copy(update={"max_poll_interval_s": 10.0, "session_timeout_s": 6.0})
    _produce(quick, 40)
    reader = _Reader(_consumer(quick, "slow"))
    _poll_until([reader], lambda: len(reader.seen) == 40, 60)
    c = reader.consumer
    positions = c.positions()
    c.source.pause()
    step_end = time.monotonic() + 12.0
    while time.monotonic() < step_end:
        assert c.poll(0.5).positions == {}  # paused: nothing returned, but it counts as a poll
    c.source.resume()
    assert c.stats.partitions_revoked == 0
    assert c.commit(positions) == {p: pos.offset for p, pos in positions.items()}
    c.close()
