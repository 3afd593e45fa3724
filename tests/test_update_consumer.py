"""UpdateConsumer against an in-memory stand-in for kafka-python's consumer (the real broker: tests/test_pipeline.py's
replica equivalence test)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import orjson
import pytest
from kafka import TopicPartition

from serving.actor import ServingCore
from serving.metrics import UPDATES_REJECTED as REJECTED
from serving.service import RecommendationService
from serving.settings import ServingSettings
from serving.update_consumer import UpdateConsumer
from stream.events import (
    EmbeddingBatch,
    EmbeddingUpdate,
    VersionRecord,
    encode_batch,
    encode_update,
    encode_version_record,
)

TOPIC = "updates"


class Record(NamedTuple):
    offset: int
    key: bytes | None
    value: bytes | None


class InMemoryConsumer:
    """Two partitions of records; ``poll`` hands out at most ``max_records`` in offset order."""

    def __init__(self, partitions: dict[int, list[bytes | None]]) -> None:
        self.logs = {TopicPartition(TOPIC, p): [Record(o, None, v) for o, v in enumerate(values)]
                     for p, values in partitions.items()}  # fmt: skip
        self.next_offset: dict[Any, int] = {}

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {tp.partition for tp in self.logs} if topic == TOPIC else None

    def assign(self, partitions: list[Any]) -> None:
        self.next_offset = {tp: 0 for tp in partitions}

    def seek_to_beginning(self, *partitions: Any) -> None:
        for tp in partitions:
            self.next_offset[tp] = 0

    def end_offsets(self, partitions: list[Any]) -> Mapping[Any, int]:
        return {tp: len(self.logs[tp]) for tp in partitions}

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> Mapping[Any, list[Any]]:
        budget = max_records or 1 << 30
        out: dict[Any, list[Any]] = {}
        for tp, log in sorted(self.logs.items(), key=lambda pair: pair[0].partition):
            records = log[self.next_offset[tp] : self.next_offset[tp] + budget]
            if records:
                out[tp] = records
                self.next_offset[tp] += len(records)
                budget -= len(records)
        return out

    def position(self, partition: Any) -> int:
        return self.next_offset[partition]

    def close(self) -> None:
        pass


def item(key: str, version: int, x: float) -> bytes:
    return encode_update(EmbeddingUpdate("item", key, version, 1, (x, 0.0)))


def closing(version: int, consumed: tuple[tuple[str, str], ...] = (), served_by: str = "model") -> bytes:
    return encode_version_record(VersionRecord(version, False, consumed, len(consumed), served_by, 1.0, 0, 0, 0.0))


def test_applies_a_version_when_its_version_record_arrives_and_skips_bad_records() -> None:
    service = RecommendationService(dim=2, popularity_refresh_s=0.0)
    fake = InMemoryConsumer(
        {
            0: [
                item("a", 1, 1.0), b"{not json", item("b", 1, 2.0), closing(1),
                encode_update(EmbeddingUpdate("user", "u", 2, 2, (1.0, 0.0, 0.0, 1.0))), None,
                item("a", 2, 3.0), closing(2, consumed=(("u", "b"),)),
                item("c", 3, 9.0),  # version 3 is never closed: pending, not applied
            ],
        }
    )
    consumer = UpdateConsumer(service, fake, TOPIC, batch_size=3)
    consumer.start()
    assert consumer.end_offsets_at_start == {0: 9}
    assert not consumer.caught_up.is_set()
    assert consumer.poll_once() == 0  # a@1, bad, b@1: version 1 not closed yet
    assert (consumer.positions, len(consumer.pending), consumer.max_version) == ({0: 3}, 2, -1)
    assert consumer.poll_once() == 2  # closing(1) applies a@1, b@1
    assert consumer.max_version == 1
    while not consumer.caught_up.is_set():
        consumer.poll_once()
    assert consumer.positions == {0: 9}
    assert (consumer.applied, consumer.versions_applied, consumer.rejected, consumer.max_version) == (4, 2, 2, 2)
    assert [u.key for u in consumer.pending] == ["c"]
    rec = service.recommend("u", 3)  # b consumed by u in version 2: excluded; c not applied
    assert (rec.served_by, rec.index_version) == ("model", 2)
    assert [(s.item_id, s.score) for s in rec.items] == [("a", 3.0)]
    assert service.recommend("stranger", 3).items[0].item_id == "b"  # popularity from the consumed pairs


def test_an_unknown_schema_version_is_refused_by_reason() -> None:
    service = RecommendationService(dim=2)
    v1 = orjson.dumps({"schema_version": 1, "kind": "item", "key": "a", "version": 1, "views": 1, "vector": [1.0, 0.0]})
    consumer = UpdateConsumer(service, InMemoryConsumer({0: [v1, closing(1)]}), TOPIC)
    consumer.start()
    before = REJECTED.labels(reason="bad_schema_version")._value.get()
    consumer.poll_once()
    assert (consumer.rejected, consumer.versions_applied, service.index.size) == (1, 1, 0)
    assert REJECTED.labels(reason="bad_schema_version")._value.get() == before + 1


def test_a_version_that_fails_validation_is_rejected_whole() -> None:
    service = RecommendationService(dim=2)
    consumer = UpdateConsumer(service, InMemoryConsumer({0: [item("a", 1, 1.0), closing(1, served_by="magic")]}), TOPIC)
    consumer.start()
    consumer.poll_once()
    assert (consumer.rejected, consumer.versions_applied, service.index.size) == (2, 0, 0)


def in_cluster_batches() -> list[EmbeddingBatch]:
    rng = np.random.default_rng(7)
    items = [f"i{n}" for n in range(12)]

    def batch(version: int, item_rows: list[int], users: list[str], consumed: list[tuple[str, str]],
              served_by: str, weight: float) -> EmbeddingBatch:
        return EmbeddingBatch(version, version == 1, [items[r] for r in item_rows],
                              rng.normal(size=(len(item_rows), 2)).astype(np.float32), users,
                              rng.normal(size=(len(users), 2, 2)).astype(np.float32), [], 0.0,
                              consumed=consumed, served_by=served_by, fused_weight=weight)

    return [
        batch(1, list(range(12)), ["u1", "u2"], [("u1", "i0"), ("u1", "i1"), ("u3", "i1"), ("u3", "i2")], "model", 1.0),
        batch(2, [3, 4], ["u1"], [("u2", "i2"), ("u1", "i2"), ("u3", "i4")], "fused", 2.0),
        batch(3, [5], ["u3"], [("u2", "i5")], "cooccurrence", 2.0),
        batch(4, [], [], [("u4", "i1")], "fused", 0.5),
    ]


@pytest.mark.parametrize("upto", [1, 2, 3, 4])
def test_a_replica_fed_by_the_records_answers_like_the_in_cluster_core(upto: int) -> None:
    """The in-cluster path (ServingCore.apply_batch) and the replica's (records -> UpdateConsumer) are one write
    path: after the same versions, every ranker answers every user the same, scores included."""
    settings = ServingSettings(dim=2, index_factory="Flat", index_search_params={}, popularity_refresh_s=0.0)
    core = ServingCore(settings, start_http=False)
    records: list[bytes | None] = []
    for batch in in_cluster_batches()[:upto]:
        core.apply_batch(batch)
        records.extend(value for _, value in encode_batch(batch))
    replica = RecommendationService.from_settings(settings)
    consumer = UpdateConsumer(replica, InMemoryConsumer({0: records}), TOPIC, batch_size=5)
    consumer.start()
    while not consumer.caught_up.is_set():
        consumer.poll_once()
    assert consumer.max_version == upto and consumer.rejected == 0
    assert (replica.ranker, replica.fused_weight) == (core.service.ranker, core.service.fused_weight)
    assert core.service.recommend("u1", 5).served_by == ("model", "fused", "cooccurrence", "fused")[upto - 1]
    for user_id in ("u1", "u2", "u3", "u4", "stranger"):
        want, got = core.service.recommend(user_id, 5), replica.recommend(user_id, 5)
        assert (got.served_by, got.items, got.index_version) == (want.served_by, want.items, want.index_version)


def test_empty_topic_is_caught_up_at_start() -> None:
    consumer = UpdateConsumer(RecommendationService(dim=2), InMemoryConsumer({0: []}), TOPIC)
    consumer.start()
    assert consumer.caught_up.is_set()
    assert consumer.poll_once() == 0


def test_a_replica_that_joins_after_compaction_gets_the_full_state() -> None:
    """Compaction keeps the latest record per key: the latest vector of every item and user and every version
    record. A replica reading that applies the same vectors, exclusions, popularity and co-occurrence."""
    settings = ServingSettings(dim=2, index_factory="Flat", index_search_params={}, popularity_refresh_s=0.0)
    core = ServingCore(settings, start_http=False)
    latest: dict[bytes, bytes] = {}
    for batch in in_cluster_batches():
        core.apply_batch(batch)
        for key, value in encode_batch(batch):
            latest.pop(key, None)  # the survivor sits where its last write was
            latest[key] = value
    replica = RecommendationService.from_settings(settings)
    consumer = UpdateConsumer(replica, InMemoryConsumer({0: list(latest.values())}), TOPIC)
    consumer.start()
    while not consumer.caught_up.is_set():
        consumer.poll_once()
    assert (consumer.max_version, consumer.rejected) == (4, 0)
    want_ids, want_vectors, _ = core.service.index.export()
    got_ids, got_vectors, _ = replica.index.export()
    order = np.argsort(got_ids)
    assert [got_ids[r] for r in order] == sorted(want_ids)
    np.testing.assert_array_equal(got_vectors[order], want_vectors[np.argsort(want_ids)])
    assert core.service.consumed.export() == replica.consumed.export()
    assert core.service.popularity.export() == replica.popularity.export()
    # Row order in the index may differ from the original's (fewer, later upserts), which only decides ties:
    # the rankers that do not read the index order answer the same.
    for ranker in ("model", "cooccurrence", "popularity"):
        core.service.set_ranker(ranker), replica.set_ranker(ranker)
        for user_id in ("u1", "u2", "u3", "u4", "stranger"):
            want, got = core.service.recommend(user_id, 5), replica.recommend(user_id, 5)
            assert (got.served_by, got.items) == (want.served_by, want.items), (ranker, user_id)


def test_consumed_pairs_beyond_one_record_travel_ahead_of_the_version_record(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.events

    monkeypatch.setattr(stream.events, "MAX_CONSUMED_RECORD_BYTES", 24)  # 2 pairs of ("uN", "iN"), 12 bytes each
    consumed = [(f"u{n}", f"i{n % 3}") for n in range(5)]
    batch = EmbeddingBatch(1, True, ["i0", "i1", "i2"], np.eye(3, 2, dtype=np.float32), [],
                           np.zeros((0, 1, 2), np.float32), [], 0.0, consumed=consumed)
    records = encode_batch(batch)
    assert [k for k, _ in records] == [b"item:i0", b"item:i1", b"item:i2", b"consumed:1:0", b"consumed:1:1",
                                       b"version:1"]
    service = RecommendationService(dim=2, popularity_refresh_s=0.0)
    consumer = UpdateConsumer(service, InMemoryConsumer({0: [v for _, v in records]}), TOPIC, batch_size=2)
    consumer.start()
    while not consumer.caught_up.is_set():
        consumer.poll_once()
    assert (consumer.versions_applied, consumer.rejected) == (1, 0)
    assert [service.consumed.history(u) for u, _ in consumed] == [(i,) for _, i in consumed]
    # A version whose consumed records did not all arrive is refused whole.
    partial = [v for k, v in records if k != b"consumed:1:1"]
    replica = RecommendationService(dim=2)
    consumer = UpdateConsumer(replica, InMemoryConsumer({0: partial}), TOPIC)
    consumer.start()
    consumer.poll_once()
    assert (consumer.versions_applied, consumer.rejected, replica.index.size) == (0, 5, 0)


def test_records_are_keyed_for_compaction_and_the_version_record_comes_last() -> None:
    (batch, *_) = in_cluster_batches()
    keys = [key for key, _ in encode_batch(batch)]
    assert keys == [f"item:i{n}".encode() for n in range(12)] + [b"user:u1", b"user:u2", b"version:1"]


def test_connect_passes_kafka_security_options_to_the_client(monkeypatch: Any) -> None:
    """A standalone replica reaches a SASL/TLS cluster: the stream settings' client options reach KafkaConsumer."""
    import kafka

    from stream.settings import StreamSettings, kafka_client_kwargs

    made: list[dict[str, Any]] = []

    def fake_consumer(**config: Any) -> InMemoryConsumer:
        made.append(config)
        return InMemoryConsumer({0: []})

    monkeypatch.setattr(kafka, "KafkaConsumer", fake_consumer)
    secured = StreamSettings(kafka_bootstrap_servers="b1:9093,b2:9093", security_protocol="SASL_SSL",
                             sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="svc", sasl_plain_password="pw",
                             ssl_cafile="/etc/ca.pem")
    options = kafka_client_kwargs(secured)
    options.pop("bootstrap_servers")
    consumer = UpdateConsumer.connect(RecommendationService(2, index_factory="Flat"), "b1:9093,b2:9093", TOPIC,
                                      client_options=options)
    assert consumer.caught_up.is_set()
    (config,) = made
    assert config["bootstrap_servers"] == ["b1:9093", "b2:9093"]
    assert (config["security_protocol"], config["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (config["sasl_plain_username"], config["sasl_plain_password"], config["ssl_cafile"]) == (
        "svc", "pw", "/etc/ca.pem")
    assert config["group_id"] is None and config["enable_auto_commit"] is False
