"""Consumer actors (Ray) over the embedded log and over the real Kafka broker: every valid event exactly
once, each user's order kept, positions committed back through the fleet, bounded queue backpressure."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from stream.actors import ConsumerFleet
from stream.consumer import ExampleBatch, PendingCommits
from stream.dataset import load_events
from stream.events import InteractionEvent
from stream.producer import open_producer, replay
from stream.settings import StreamSettings

N_EVENTS = 6000
DEADLINE_S = 120.0
SLOW_STEP_S = 0.3  # the learner's step; longer than put_wait_s=0.2, so the bounded queue pushes back


def _drain(fleet: ConsumerFleet, expected: int, deadline_s: float, slow_s: float = 0.0) -> list[ExampleBatch]:
    """Take batches until ``expected`` examples arrived, committing each batch's positions as it is done."""
    batches: list[ExampleBatch] = []
    pending = PendingCommits()
    got = 0
    deadline = time.monotonic() + deadline_s
    while got < expected:
        assert time.monotonic() < deadline, f"only {got} of {expected} examples within {deadline_s}s"
        batch = fleet.get(timeout_s=1.0)
        if batch is None:
            fleet.check_health()
            continue
        if slow_s:
            time.sleep(slow_s)  # a deliberately slow learner step (load, not synchronisation)
        batches.append(batch)
        got += len(batch)
        pending.add(batch)
        fleet.commit(pending.take())
    return batches


def _wait_for_full_assignment(fleet: ConsumerFleet, partitions: int, timeout_s: float = 60) -> dict[str, frozenset[int]]:
    """Wait until every consumer owns partitions and together they own all of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        owned = fleet.assignments()
        if all(owned.values()) and set().union(*owned.values()) == set(range(partitions)):
            return owned
        assert time.monotonic() < deadline, f"partitions not all assigned within {timeout_s}s: {owned}"
        time.sleep(0.2)  # polling remote state, bounded by the deadline


def _check_exactly_once_in_order(batches: list[ExampleBatch], events: list[InteractionEvent]) -> None:
    got_ids = [ex.event_id for b in batches for ex in b.examples]
    assert len(got_ids) == len(events)
    assert sorted(got_ids) == sorted(e.event_id for e in events)  # each exactly once
    want_by_user: dict[str, list[str]] = {}
    for e in events:
        want_by_user.setdefault(e.user_id, []).append(e.event_id)
    got_by_user: dict[str, list[str]] = {}
    for ex in (ex for b in batches for ex in b.examples):
        got_by_user.setdefault(ex.user_id, []).append(ex.event_id)
    assert got_by_user == want_by_user


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_actors_over_the_embedded_log(ray_cluster: object, events_csv: Path, tmp_path: Path) -> None:
    settings = StreamSettings(embedded_log_dir=tmp_path, partitions=4, batch_size=500)
    events = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
    producer = open_producer(settings)
    replay(events, producer)
    producer.close()
    with ConsumerFleet(settings, consumers=2, queue_maxsize=2, put_wait_s=0.2) as fleet:
        owned = _wait_for_full_assignment(fleet, 4)
        assert owned == {"consumer-0": frozenset({0, 2}), "consumer-1": frozenset({1, 3})}
        batches = _drain(fleet, len(events), DEADLINE_S, slow_s=SLOW_STEP_S)
        assert fleet.get(timeout_s=0.5) is None
        delivery = fleet.delivery()
        stats = fleet.stop()
    # The learner is slower than put_wait_s: the queue filled up and the actors waited (paused) on it.
    assert sum(d["waits_on_full_queue"] for d in delivery.values()) > 0
    assert sum(d["batches_delivered"] for d in delivery.values()) == len(batches)
    _check_exactly_once_in_order(batches, events)
    assert {b.consumer_id for b in batches} == {"consumer-0", "consumer-1"}
    assert sum(s.examples_out for s in stats.values()) == len(events)
    assert sum(s.dead_letters for s in stats.values()) == 0
    from stream.embedded_log import EmbeddedLog

    log = EmbeddedLog.open(tmp_path, settings.topic_interactions, 4)
    assert log.committed(settings.consumer_group) == log.end_offsets()


@pytest.mark.kafka
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_actors_in_one_kafka_group(
    ray_cluster: object, kafka_broker: object, events_csv: Path, tmp_path: Path
) -> None:
    from stream.topics import ensure_topics

    run = uuid.uuid4().hex[:8]
    settings = StreamSettings(
        kafka_bootstrap_servers=kafka_broker.bootstrap_servers,  # type: ignore[attr-defined]
        topic_interactions=f"it-{run}",
        topic_dead_letters=f"dlq-{run}",
        topic_embedding_updates=f"up-{run}",
        consumer_group=f"g-{run}",
        partitions=4,
        batch_size=500,
        poll_timeout_s=0.2,
        session_timeout_s=30,  # heartbeats come from a thread; 10 s proved tight on a busy 2-core box
    )
    assert sorted(ensure_topics(settings)) == sorted([f"it-{run}", f"dlq-{run}", f"up-{run}"])
    events = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
    with ConsumerFleet(settings, consumers=2, queue_maxsize=2, put_wait_s=0.2) as fleet:
        # Produce only once the group is stable with both members, so no startup rebalance re-delivers.
        owned = _wait_for_full_assignment(fleet, 4)
        assert sorted(p for ps in owned.values() for p in ps) == [0, 1, 2, 3]
        # The group may form in two generations (one member first, then both), which revokes
        # partitions once during start-up; only revocations after this point count.
        revoked_at_start = {cid: s.partitions_revoked for cid, s in fleet.stats().items()}
        producer = open_producer(settings)
        replay(events, producer)
        producer.close()
        batches = _drain(fleet, len(events), DEADLINE_S, slow_s=SLOW_STEP_S)
        assert fleet.get(timeout_s=1.0) is None
        delivery = fleet.delivery()
        revoked_while_running = {cid: s.partitions_revoked for cid, s in fleet.stats().items()}
        stats = fleet.stop()
    assert sum(d["waits_on_full_queue"] for d in delivery.values()) > 0
    # Waiting on the full queue (paused, still polling) kept both members in the group throughout.
    assert revoked_while_running == revoked_at_start
    _check_exactly_once_in_order(batches, events)
    assert {b.consumer_id for b in batches} == {"consumer-0", "consumer-1"}
    assert sum(s.examples_out for s in stats.values()) == len(events)
