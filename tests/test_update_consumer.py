"""UpdateConsumer against an in-memory stand-in for kafka-python's consumer (the real broker: lead's test)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from kafka import TopicPartition

from serving.service import RecommendationService
from serving.update_consumer import UpdateConsumer, key_of
from stream.events import EmbeddingUpdate, encode_update

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


def test_reads_from_the_beginning_in_batches_tracks_versions_and_skips_bad_records() -> None:
    service = RecommendationService(dim=2)
    fake = InMemoryConsumer(
        {
            0: [item("a", 1, 1.0), b"{not json", item("a", 3, 3.0), item("b", 2, 2.0)],
            1: [
                encode_update(EmbeddingUpdate("user", "u", 2, 2, (1.0, 0.0, 0.0, 1.0))),
                None,
                item("a", 2, 9.0),
            ],
        }
    )
    consumer = UpdateConsumer(service, fake, TOPIC, batch_size=3)
    consumer.start()
    assert consumer.end_offsets_at_start == {0: 4, 1: 3}
    assert not consumer.caught_up.is_set()
    assert consumer.poll_once() == 1  # partition 0 offsets 0..2: "a"@1, bad, "a"@3 -> one upsert of "a"@3
    assert consumer.positions == {0: 3, 1: 0}
    while not consumer.caught_up.is_set():
        consumer.poll_once()
    assert consumer.positions == {0: 4, 1: 3}
    assert (consumer.applied, consumer.rejected, consumer.max_version) == (
        3,
        2,
        3,
    )  # a@3, b@2, u@2; bad json + tombstone
    # "a"@2 arrived after "a"@3 and was ignored as stale.
    rec = service.recommend("u", 2)
    assert (rec.served_by, rec.index_version) == ("model", 3)
    assert [(s.item_id, s.score) for s in rec.items] == [("a", 3.0), ("b", 2.0)]


def test_empty_topic_is_caught_up_at_start() -> None:
    consumer = UpdateConsumer(RecommendationService(dim=2), InMemoryConsumer({0: []}), TOPIC)
    consumer.start()
    assert consumer.caught_up.is_set()
    assert consumer.poll_once() == 0


def test_compaction_key_is_kind_and_key() -> None:
    assert key_of(EmbeddingUpdate("user", "u7", 1, 1, (0.0,))) == b"user:u7"


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
