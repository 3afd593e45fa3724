"""Consumer actors (Ray) over the embedded log and over the real Kafka broker: a static assignment read
from the start offsets the fleet is given, every valid event exactly once in each user's order, bounded
queue backpressure, and a dead consumer replaced alone at given positions while the others go on."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import ray

from stream.actors import ConsumerFleet
from stream.consumer import EventBatch
from stream.dataset import load_events
from stream.embedded_log import EmbeddedLog
from stream.events import InteractionEvent
from stream.producer import open_producer, replay
from stream.settings import StreamSettings

N_EVENTS = 6000
DEADLINE_S = 120.0
SLOW_STEP_S = 0.3  # the learner's step; longer than put_wait_s=0.2, so the bounded queue pushes back


def _drain(fleet: ConsumerFleet, expected: int, deadline_s: float, slow_s: float = 0.0) -> list[EventBatch]:
    """Take batches until ``expected`` events arrived."""
    batches: list[EventBatch] = []
    got = 0
    deadline = time.monotonic() + deadline_s
    while got < expected:
        assert time.monotonic() < deadline, f"only {got} of {expected} events within {deadline_s}s"
        batch = fleet.get(timeout_s=1.0)
        if batch is None:
            fleet.check_health()
            continue
        if slow_s:
            time.sleep(slow_s)  # a deliberately slow learner step (load, not synchronisation)
        batches.append(batch)
        got += len(batch)
    return batches


def _check_exactly_once_in_order(batches: list[EventBatch], events: list[InteractionEvent]) -> None:
    got = [e for b in batches for e in b.events]
    assert len(got) == len(events)
    assert sorted(e.event_id for e in got) == sorted(e.event_id for e in events)  # each exactly once
    want_by_user: dict[str, list[str]] = {}
    for e in events:
        want_by_user.setdefault(e.user_id, []).append(e.event_id)
    got_by_user: dict[str, list[str]] = {}
    for e in got:
        got_by_user.setdefault(e.user_id, []).append(e.event_id)
    assert got_by_user == want_by_user


def _produce(settings: StreamSettings, events: list[InteractionEvent]) -> None:
    producer = open_producer(settings)
    replay(events, producer)
    producer.close()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_actors_over_the_embedded_log_start_at_the_given_offsets(
    ray_cluster: object, events_csv: Path, tmp_path: Path
) -> None:
    settings = StreamSettings(embedded_log_dir=tmp_path, partitions=4, batch_size=500)
    events = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
    _produce(settings, events)
    log = EmbeddedLog.open(tmp_path, settings.topic_interactions, 4)
    ends = log.end_offsets()
    # Partition 0 was trained half-way, 1 completely; 2 and 3 not at all (no position: from the beginning).
    start = {0: ends[0] // 2, 1: ends[1]}
    by_partition: dict[int, list[InteractionEvent]] = {}
    for e in events:
        by_partition.setdefault(log.partition_for(e.user_id.encode()), []).append(e)
    expected = by_partition[0][start[0]:] + by_partition[2] + by_partition[3]
    with ConsumerFleet(settings, consumers=2, queue_maxsize=2, put_wait_s=0.2, start_offsets=start) as fleet:
        assert fleet.assignments() == {"consumer-0": frozenset({0, 2}), "consumer-1": frozenset({1, 3})}
        batches = _drain(fleet, len(expected), DEADLINE_S, slow_s=SLOW_STEP_S)
        assert fleet.get(timeout_s=0.5) is None
        delivery = fleet.delivery()
        stats = fleet.stop()
    # The learner is slower than put_wait_s: the queue filled up and the actors waited on it.
    assert sum(d["waits_on_full_queue"] for d in delivery.values()) > 0
    assert sum(d["batches_delivered"] for d in delivery.values()) == len(batches)
    _check_exactly_once_in_order(batches, expected)
    first_read = {p: min(b.read[p][0] for b in batches if p in b.read) for p in (0, 2, 3)}
    assert first_read == {0: start[0], 2: 0, 3: 0}
    assert all(1 not in b.read for b in batches)  # partition 1 was done: nothing read
    assert sum(s.events_out for s in stats.values()) == len(expected)
    assert sum(s.dead_letters for s in stats.values()) == 0
    assert log.committed(settings.consumer_group) == {}  # consumers commit nothing


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_dead_consumer_is_replaced_alone_at_the_given_positions(
    ray_cluster: object, events_csv: Path, tmp_path: Path
) -> None:
    settings = StreamSettings(embedded_log_dir=tmp_path, partitions=4, batch_size=200)
    events = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
    _produce(settings, events)
    with ConsumerFleet(settings, consumers=2, queue_maxsize=2, put_wait_s=0.2) as fleet:
        survivor = fleet.actors["consumer-0"]
        # "Train" batches, as the learner would, until consumer-1 (partitions 1 and 3) delivered some.
        taken: list[EventBatch] = []
        seen_end: dict[int, int] = {}
        while not any(seen_end.get(p, 0) >= 10 for p in (1, 3)):
            batch = fleet.get(timeout_s=DEADLINE_S)
            assert batch is not None
            taken.append(batch)
            seen_end.update({p: end for p, (_first, end) in batch.read.items()})
        ray.kill(fleet.actors["consumer-1"], no_restart=True)
        deadline = time.monotonic() + 60
        while "consumer-1" not in fleet.failed():
            assert time.monotonic() < deadline, "the killed consumer was not seen dead within 60 s"
            time.sleep(0.1)  # polling remote state, bounded by the deadline
        assert set(fleet.failed()) == {"consumer-1"}
        # The positions handed over trail what was taken by 3 records (a learner's positions may trail).
        handed = {p: seen_end[p] - 3 for p in (1, 3) if seen_end.get(p, 0) >= 10}
        fleet.replace("consumer-1", {**seen_end, **handed})
        assert fleet.actors["consumer-0"] is survivor  # the other consumer was not touched
        # Take the rest, dropping by offset what was taken already (what the learner does). Only the
        # replacement reads below what was seen: the old consumer's queued batches continue it.
        kept = list(taken)
        reread_from: dict[int, int] = {}
        deadline = time.monotonic() + DEADLINE_S
        while sum(len(b) for b in kept) < len(events):
            assert time.monotonic() < deadline, "not every event arrived after the replacement"
            batch = fleet.get(timeout_s=1.0)
            if batch is None:
                continue
            for p, (first, _end) in batch.read.items():
                if first < seen_end.get(p, 0):
                    reread_from.setdefault(p, first)
            kept.append(_without_seen(batch, seen_end))
            for p, (_first, end) in batch.read.items():
                seen_end[p] = max(seen_end.get(p, 0), end)
        assert fleet.failed() == {}
    _check_exactly_once_in_order(kept, events)
    assert {p: reread_from[p] for p in handed} == handed  # it started exactly where it was told


def _without_seen(batch: EventBatch, seen_end: dict[int, int]) -> EventBatch:
    events: list[InteractionEvent] = []
    offsets: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    for p, (start, stop) in batch.spans.items():
        keep = [(e, o) for e, o in zip(batch.events[start:stop], batch.offsets[start:stop], strict=True)
                if o >= seen_end.get(p, 0)]
        spans[p] = (len(events), len(events) + len(keep))
        events += [e for e, _ in keep]
        offsets += [o for _, o in keep]
    return EventBatch(events, offsets, spans, batch.read, batch.letters, batch.consumer_id,
                      batch.letter_examples)


@pytest.mark.kafka
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_actors_with_a_static_kafka_assignment(
    ray_cluster: object, kafka_broker: object, events_csv: Path, tmp_path: Path
) -> None:
    from stream.group_offsets import group_lag
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
    )
    assert sorted(ensure_topics(settings)) == sorted([f"it-{run}", f"dlq-{run}", f"up-{run}"])
    events = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
    # Produced before the consumers start: with a group, the start-up rebalance re-delivered records here.
    _produce(settings, events)
    with ConsumerFleet(settings, consumers=2, queue_maxsize=2, put_wait_s=0.2) as fleet:
        assert fleet.assignments() == {"consumer-0": frozenset({0, 2}), "consumer-1": frozenset({1, 3})}
        batches = _drain(fleet, len(events), DEADLINE_S, slow_s=SLOW_STEP_S)
        assert fleet.get(timeout_s=1.0) is None
        delivery = fleet.delivery()
        stats = fleet.stop()
    assert sum(d["waits_on_full_queue"] for d in delivery.values()) > 0
    _check_exactly_once_in_order(batches, events)  # nothing read twice
    assert {b.consumer_id for b in batches} == {"consumer-0", "consumer-1"}
    assert sum(s.events_out for s in stats.values()) == len(events)
    assert sum(group_lag(settings).values()) == len(events)  # consumers commit nothing; the learner does
