"""Memory caps under an endless stream of new users, and replay backpressure on the consumer group's lag.

Caps: serving's user vectors and consumed sets, the prequential evaluator's mirror of the served users
(rows reused), the publisher's item counts. Backpressure: ``group_lag`` on the embedded log and Kafka,
``LagThrottle``, ``paced_send`` and ``replay`` with a throttle, on fake clocks.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from learner.online.prequential import PrequentialEvaluator, RowTable
from learner.online.publisher import CallableTransport, Publisher
from serving.service import RecommendationService
from serving.settings import ServingSettings
from serving.store import ConsumedItems, UserVectorStore
from stream.embedded_log import EmbeddedLog, PartitionReader
from stream.events import EmbeddingBatch, EmbeddingUpdate, InteractionEvent, decode_event
from stream.group_offsets import GroupLag, group_lag
from stream.producer import LagThrottle, open_producer, paced_send, replay, send_event
from stream.settings import StreamSettings


def vec(x: float) -> np.ndarray:
    return np.array([[x]], dtype=np.float32)  # (V=1, D=1)


# -- serving ------------------------------------------------------------------------------------------


def test_user_vectors_evict_the_least_recently_updated_user() -> None:
    store = UserVectorStore(dim=1, max_users=3)
    for user_id, x in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        assert store.upsert(user_id, vec(x), version=1)
    assert store.upsert("a", vec(4.0), version=2)  # a is the most recent now; b the least
    store.get("b")  # a read does not refresh
    assert store.upsert("d", vec(5.0), version=2)
    assert [u for u, _, _ in store.export()] == ["c", "a", "d"]
    assert (store.get("b"), store.version_of("b"), store.evicted_users, len(store)) == (None, None, 1, 3)
    assert store.upsert("e", vec(6.0), version=2)
    assert [u for u, _, _ in store.export()] == ["a", "d", "e"]
    assert store.evicted_users == 2
    assert store.get("a") is not None and store.get("a").tolist() == [[4.0]]


def test_a_stale_upsert_neither_writes_nor_refreshes() -> None:
    store = UserVectorStore(dim=1, max_users=2)
    store.upsert("a", vec(1.0), version=5)
    store.upsert("b", vec(2.0), version=5)
    assert store.upsert("a", vec(9.0), version=4) is False  # stale: a stays the least recently updated
    store.upsert("c", vec(3.0), version=5)
    assert [u for u, _, _ in store.export()] == ["b", "c"]


def test_replace_all_keeps_the_last_max_users_rows_in_order() -> None:
    store = UserVectorStore(dim=1, max_users=2)
    store.replace_all([("a", 1, vec(1.0)), ("b", 1, vec(2.0)), ("c", 1, vec(3.0))])
    assert [(u, v) for u, v, _ in store.export()] == [("b", 1), ("c", 1)]
    assert store.evicted_users == 1


def test_consumed_items_evict_the_least_recently_updated_user() -> None:
    consumed = ConsumedItems(max_items_per_user=2, max_users=2)
    consumed.add("a", ["x"])
    consumed.add("b", ["y"])
    consumed.add("a", ["z", "w"])  # a refreshed, and bounded to its last 2 items
    consumed.get("b")  # a read does not refresh
    consumed.add("c", ["v"])
    assert consumed.export() == [("a", "z"), ("a", "w"), ("c", "v")]
    assert (consumed.get("b"), consumed.evicted_users, len(consumed)) == (frozenset(), 1, 2)


@pytest.mark.parametrize(("bad", "shown"), [(0, "0"), (True, "True"), (2.5, "2.5")])
def test_caps_reject_a_bad_max_users(bad: Any, shown: str) -> None:
    with pytest.raises(ValueError, match=rf"^max_users must be an int >= 1, got {shown}$"):
        UserVectorStore(dim=1, max_users=bad)
    with pytest.raises(ValueError, match=rf"^max_users must be an int >= 1, got {shown}$"):
        ConsumedItems(max_users=bad)


def _evicted(store: str) -> float:
    return REGISTRY.get_sample_value("sitn_serving_users_evicted_total", {"store": store}) or 0.0


def test_service_caps_users_falls_back_to_popularity_and_counts_evictions() -> None:
    settings = ServingSettings(dim=1, index_factory="Flat", index_search_params={}, max_users=2,
                               popularity_refresh_s=0.0)
    assert ServingSettings(dim=1).max_users == 1_000_000
    service = RecommendationService.from_settings(settings)
    assert (service.users.max_users, service.consumed.max_users) == (2, 2)
    before = {s: _evicted(s) for s in ("vectors", "consumed")}
    service.apply_updates([EmbeddingUpdate("item", "i1", 1, 1, (1.0,)), EmbeddingUpdate("item", "i2", 1, 1, (-1.0,))])
    service.record_consumed("u0", ["i2", "i2", "i1"])  # popularity: i2 2, i1 1; then i1 gains 3 below
    for n in range(1, 4):
        service.apply_updates([EmbeddingUpdate("user", f"u{n}", 1, 1, (1.0,))])
        service.record_consumed(f"u{n}", ["i1"])
    # u1 evicted from the vectors (u2, u3 kept); u0 and u1 from the consumed sets (u2, u3 kept), so
    # u1 gets popularity (i1 4, i2 2) with nothing excluded
    assert service.recommend("u3", k=2).served_by == "model"
    evicted = service.recommend("u1", k=2)
    assert (evicted.served_by, [s.item_id for s in evicted.items]) == ("popularity", ["i1", "i2"])
    assert service.health()["users"] == 2 and service.health()["users_evicted"] == 1
    assert _evicted("vectors") - before["vectors"] == 1
    assert _evicted("consumed") - before["consumed"] == 2


def test_snapshot_round_trip_keeps_the_eviction_order(tmp_path: Path) -> None:
    service = RecommendationService(dim=1, max_users=3)
    service.apply_updates([EmbeddingUpdate("item", "i", 1, 1, (1.0,))])
    service.apply_updates([EmbeddingUpdate("user", u, 1, 1, (1.0,)) for u in ("a", "b", "c")])
    service.apply_updates([EmbeddingUpdate("user", "a", 2, 1, (2.0,))])  # order now b, c, a
    service.save_snapshot(tmp_path / "s.npz")
    replica = RecommendationService.from_snapshot(tmp_path / "s.npz", max_users=3)
    replica.apply_updates([EmbeddingUpdate("user", "d", 2, 1, (1.0,))])
    assert [u for u, _, _ in replica.users.export()] == ["c", "a", "d"]


# -- the prequential evaluator's mirror -----------------------------------------------------------


def test_row_table_reuses_the_evicted_row_and_never_grows_past_the_cap() -> None:
    table = RowTable(max_rows=3, initial_capacity=2)
    table.upsert(["a", "b"], np.array([[1.0], [2.0]]))
    assert table.matrix.shape == (2, 1)
    table.upsert(["c"], np.array([[3.0]]))
    assert table.matrix.shape == (3, 1)  # doubled, clipped to max_rows
    table.upsert(["a", "d"], np.array([[4.0], [5.0]]))  # a refreshed; d evicts b and takes row 1
    assert dict(table.rows) == {"c": 2, "a": 0, "d": 1}
    assert table.matrix[:, 0].tolist() == [4.0, 5.0, 3.0]
    assert (table.evicted, table.matrix.shape) == (1, (3, 1))


def test_row_table_within_one_call_the_last_write_wins() -> None:
    table = RowTable(max_rows=2)
    table.upsert(["a", "b", "c", "a"], np.array([[1.0], [2.0], [3.0], [4.0]]))
    # a at row 0, b at 1; c evicts a (row 0); a evicts b (row 1)
    assert dict(table.rows) == {"c": 0, "a": 1}
    assert table.matrix[:, 0].tolist() == [3.0, 4.0]
    assert table.evicted == 2


def test_row_table_dense_without_evictions_and_refuses_after() -> None:
    table = RowTable()
    table.upsert(["x", "y"], np.eye(2, dtype=np.float32))
    table.upsert(["z"], np.array([[1.0, 1.0]]))
    assert table.dense().tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    capped = RowTable(max_rows=1)
    capped.upsert(["x", "y"], np.eye(2, dtype=np.float32))
    with pytest.raises(AssertionError, match="without evictions"):
        capped.dense()


def _batch(version: int, users: list[str], user_vectors: np.ndarray) -> EmbeddingBatch:
    return EmbeddingBatch(version=version, full=False, item_ids=[], item_vectors=np.zeros((0, 2), np.float32),
                          user_ids=users, user_vectors=user_vectors, popularity=["i1", "i0"], created_at_s=0.0)


def test_prequential_mirror_is_capped_like_serving() -> None:
    ev = PrequentialEvaluator(max_users=2)
    ev.set_served(1, ["i0", "i1"], np.eye(2, dtype=np.float32), ["u0", "u1"],
                  np.array([[[1.0, 0.0]], [[1.0, 0.0]]], np.float32), popularity=["i1", "i0"])
    ev.set_served_delta(_batch(2, ["u2"], np.array([[[0.0, 1.0]]], np.float32)))  # evicts u0, reuses row 0
    assert (ev.serves_user("u0"), ev.serves_user("u1"), ev.serves_user("u2")) == (False, True, True)
    # u0 by popularity (i0 is 2nd), u1 by its vector (i0 first), u2 by its vector (i1 first)
    assert ev.rank_many([("u0", "i0"), ("u1", "i0"), ("u2", "i1")]) == [2, 1, 1]
    stats = ev.stats()
    assert (stats["prequential_users"], stats["prequential_users_evicted"]) == (2.0, 1.0)
    assert ev._users.matrix.shape == (2, 1, 2)


def test_prequential_full_publish_beyond_the_cap_keeps_the_last_users() -> None:
    ev = PrequentialEvaluator(max_users=2)
    ev.set_served(1, ["i0"], np.ones((1, 2), np.float32), ["a", "b", "c"], np.ones((3, 1, 2), np.float32), ["i0"])
    assert [u for u in ("a", "b", "c") if ev.serves_user(u)] == ["b", "c"]
    assert ev.stats()["prequential_users_evicted"] == 1.0


# -- the publisher's item counts ---------------------------------------------------------------------


class _Learner:
    class config:  # mimics SITNLearner.config
        n_views, dim = 1, 2

    def embed_items(self) -> tuple[list[str], np.ndarray]:
        return ["i0"], np.zeros((1, 2), np.float32)

    def known_users(self) -> list[str]:
        return []

    def embed_users(self, user_ids: list[str]) -> np.ndarray:
        return np.zeros((len(user_ids), 1, 2), np.float32)


def test_publisher_keeps_only_the_most_counted_items_after_a_publish() -> None:
    sent: list[EmbeddingBatch] = []
    publisher = Publisher(_Learner(), CallableTransport(sent.append), popularity_size=2, max_counted_items=3)
    pairs = [("u", i) for i in ["a", "b", "b", "c", "d", "d", "d", "e"]]  # a1 b2 c1 d3 e1
    publisher.touch([], pairs, 0.0)
    batch = publisher.publish(step=1)
    assert batch.popularity == ["d", "b"]
    assert publisher.state_dict()["item_counts"] == {"a": 1, "b": 2, "d": 3}  # ties a/c/e: the first seen stays
    assert publisher.items_pruned == 2
    publisher.touch([], [("u", "e"), ("u", "e")], 0.0)  # e comes back from zero
    assert publisher.publish(step=2).popularity == ["d", "b"]
    assert publisher.state_dict()["item_counts"] == {"b": 2, "d": 3, "e": 2}


def test_publisher_rejects_a_cap_below_the_published_popularity() -> None:
    with pytest.raises(ValueError, match=r"^max_counted_items must be >= popularity_size \(1000\), got 10$"):
        Publisher(_Learner(), None, max_counted_items=10)


# -- group lag and backpressure ----------------------------------------------------------------------


def _settings(tmp_path: Path, kafka: str | None = None, partitions: int = 2) -> StreamSettings:
    return StreamSettings(kafka_bootstrap_servers=kafka, embedded_log_dir=tmp_path / "log", partitions=partitions,
                          topic_interactions=f"t-{uuid.uuid4().hex[:8]}", consumer_group=f"g-{uuid.uuid4().hex[:8]}")


def _events(n: int, start: int = 0) -> list[InteractionEvent]:
    return [InteractionEvent(f"e{i}", f"u{i % 5}", f"i{i}", "movie", 1_500_000_000 + i) for i in range(start, start + n)]


def test_group_lag_is_end_minus_committed_on_the_embedded_log(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert group_lag(settings) == {0: 0, 1: 0}
    producer = open_producer(settings)
    for event in _events(10):
        send_event(producer, event)
    producer.close()
    log = EmbeddedLog.open(settings.embedded_log_dir, settings.topic_interactions, 2)
    ends = log.end_offsets()
    assert sum(ends.values()) == 10
    assert group_lag(settings) == ends  # never committed: counted from offset 0
    log.commit(settings.consumer_group, {0: ends[0] - 1})
    with GroupLag(settings) as lag:
        assert lag() == {0: 1, 1: ends[1]}
        log.commit(settings.consumer_group, {1: ends[1]})
        assert lag() == {0: 1, 1: 0}  # an open GroupLag sees new commits
    log.close()


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now_s += seconds


class _Producer:
    def __init__(self) -> None:
        self.records: list[bytes | None] = []
        self.flushed = 0

    def send(self, key: bytes, value: bytes | None) -> None:
        self.records.append(value)

    def flush(self) -> None:
        self.flushed = len(self.records)

    def close(self) -> None:
        pass


class _Backlog:
    """A consumer that drains ``drain_per_poll`` events each time the lag is read; lag = flushed - drained."""

    def __init__(self, producer: _Producer, drain_per_poll: int) -> None:
        self.producer = producer
        self.drain_per_poll = drain_per_poll
        self.drained = 0
        self.reads: list[int] = []

    def __call__(self) -> dict[int, int]:
        lag = self.producer.flushed - self.drained
        self.reads.append(lag)
        self.drained = min(self.producer.flushed, self.drained + self.drain_per_poll)
        return {0: lag}


def test_paced_send_without_a_throttle_keeps_the_offered_rate() -> None:
    clock, producer = _Clock(), _Producer()
    acked: list[int] = []
    stats = paced_send(iter(_events(25)), producer, 100.0, tick_s=0.1, on_sent=acked.append, clock=clock,
                       sleep=clock.sleep)
    assert acked == [10, 20, 25]  # chunks of rate * tick_s, each flushed before it is counted
    assert clock.sleeps == [0.1, 0.1, 0.05]
    assert (stats.events, stats.wall_s, stats.throttled_s, stats.events_per_s) == (25, 0.25, 0.0, 100.0)


def test_a_throttle_holds_the_producer_while_lag_exceeds_the_bound() -> None:
    clock, producer = _Clock(), _Producer()
    backlog = _Backlog(producer, drain_per_poll=4)
    throttle = LagThrottle(backlog, max_lag_events=10, poll_s=0.2, clock=clock, sleep=clock.sleep)
    stats = paced_send(iter(_events(40)), producer, 100.0, throttle=throttle, tick_s=0.1, clock=clock,
                       sleep=clock.sleep)
    assert len(producer.records) == 40
    assert max(backlog.reads) <= 10 + 10  # at most the bound plus one chunk
    # Lag read before each chunk: 0, 10, 16 (held), 12 (held), 8, 14 (held), 10, ...
    assert backlog.reads[:7] == [0, 10, 16, 12, 8, 14, 10]
    assert stats.throttled_s == pytest.approx(throttle.throttled_s) and throttle.waits >= 2
    assert stats.events_per_s < 100.0  # throttled below the offered rate
    assert stats.wall_s == pytest.approx(0.4 + stats.throttled_s)  # the schedule moved on by the waits


def test_throttle_wait_returns_once_stop_is_set() -> None:
    stop = threading.Event()
    reads: list[int] = []

    def lag() -> dict[int, int]:
        reads.append(1)
        if len(reads) == 3:
            stop.set()
        return {0: 100}

    throttle = LagThrottle(lag, max_lag_events=10, poll_s=0.001)
    throttle.wait(stop)
    assert (len(reads), throttle.waits) == (3, 1)
    assert paced_send(iter(_events(5)), _Producer(), None, throttle=throttle, stop=stop).events == 0


def test_throttle_headroom_must_exceed_a_checkpoint_interval() -> None:
    throttle = LagThrottle(lambda: {0: 0}, max_lag_events=1000)
    throttle.check_headroom(events_per_checkpoint=800, queue_events=199)
    with pytest.raises(ValueError, match=r"^max_lag_events must exceed .* \(1000: offsets .*got 1000$"):
        throttle.check_headroom(events_per_checkpoint=800, queue_events=200)
    with pytest.raises(ValueError, match=r"^max_lag_events must be an int >= 1, got 0$"):
        LagThrottle(lambda: {0: 0}, max_lag_events=0)


def test_replay_with_a_throttle_flushes_and_waits_every_progress_interval() -> None:
    clock, producer = _Clock(), _Producer()
    backlog = _Backlog(producer, drain_per_poll=5)
    throttle = LagThrottle(backlog, max_lag_events=6, poll_s=0.5, clock=clock, sleep=clock.sleep)
    stats = replay(_events(30), producer, speed=None, progress_every=10, clock=clock, sleep=clock.sleep,
                   throttle=throttle)
    assert (stats.events, len(producer.records)) == (30, 30)
    assert backlog.reads == [0, 10, 5, 10, 5]  # read at 0, then at 10 and at 20 (held once each)
    assert stats.throttled_s == 1.0


def test_flat_out_paced_send_into_the_embedded_log_is_bounded_by_the_lag(tmp_path: Path) -> None:
    settings = _settings(tmp_path, partitions=1)
    producer = open_producer(settings)
    log = EmbeddedLog.open(settings.embedded_log_dir, settings.topic_interactions, 1)
    with GroupLag(settings) as lag:
        def consume_and_read() -> dict[int, int]:  # a consumer that commits 3 more at each look
            current = lag()
            end = log.end_offsets()[0]
            log.commit(settings.consumer_group, {0: min(end, end - current[0] + 3)})
            return current

        throttle = LagThrottle(consume_and_read, max_lag_events=12, poll_s=0.001)
        stats = paced_send(iter(_events(60)), producer, None, throttle=throttle, max_chunk_events=5)
        assert stats.events == 60
        assert throttle.waits >= 1
        assert max(lag().values()) <= 12 + 5
    producer.close()
    _, values = PartitionReader(log, 0).read(100)
    assert [decode_event(v, ("movie", "book")).event_id for v in values if v is not None] == [f"e{i}" for i in range(60)]
    log.close()


@pytest.mark.kafka
def test_group_lag_on_kafka(kafka_broker: Any, tmp_path: Path) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from stream.settings import kafka_client_kwargs
    from stream.topics import ensure_topics

    settings = _settings(tmp_path, kafka=kafka_broker.bootstrap_servers)
    ensure_topics(settings)
    assert group_lag(settings) == {0: 0, 1: 0}
    producer = open_producer(settings)
    for event in _events(20):
        send_event(producer, event)
    producer.close()
    with GroupLag(settings) as lag:
        ends = lag()
        assert sum(ends.values()) == 20
        consumer = KafkaConsumer(group_id=settings.consumer_group, enable_auto_commit=False,
                                 **kafka_client_kwargs(settings))
        tp = TopicPartition(settings.topic_interactions, 0)
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(ends[0] - 2, "", -1)})
        consumer.close()
        assert lag() == {0: 2, 1: ends[1]}
