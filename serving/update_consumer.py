"""Kafka consumer of the compacted embedding-updates topic that feeds a standalone serving replica.

The topic carries each published version as vector records (keys ``item:<id>``, ``user:<id>``) followed by
the version record that closes it (key ``version:<n>``: consumed pairs, ranker, fused weight; consumed pairs
that do not fit it come just before, as ``consumed:<n>:<part>`` records; see
:func:`stream.events.encode_batch`). This consumer holds a version's records until its version record
arrives, reassembles the :class:`~stream.events.EmbeddingBatch` and applies it with
:meth:`RecommendationService.apply`, the write path the in-cluster serving actor uses; so after the same
versions a replica holds what the in-cluster serving holds and answers ``/recommend`` the same.

A replica is a pure function of that topic: on start it reads every partition from the beginning (no
consumer group, nothing committed). That is also how a replica that joins late gets the full state:
compaction keeps the latest vector record of every item and user, and every version and consumed record (each has its
own key), so the vectors, the consumed sets, popularity and co-occurrence are all rebuilt. Per-key
versions in the service make replays idempotent: a vector older than the stored version is ignored.

Order, per poll: decode and validate each record; on a version record, validate and apply that version
-> only then advance ``positions`` (the next offset to read, per partition) and ``max_version`` (the last
version applied). Vector records of a version whose version record has not arrived yet stay pending (they
are re-read after a restart, since nothing is committed). A record that fails to decode or validate, one of
another schema version included, is data, not a bug: it is logged with its partition, offset and reason,
counted in ``sitn_serving_updates_rejected``, and skipped. Any other exception propagates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from serving import metrics
from serving.service import RecommendationService, validate_batch, validate_update
from stream.errors import BrokerError, EventDecodeError
from stream.events import (
    ConsumedRecord,
    EmbeddingBatch,
    EmbeddingUpdate,
    UpdateRecord,
    VersionRecord,
    decode_update_record,
)

logger = logging.getLogger(__name__)


class KafkaConsumerLike(Protocol):
    """The part of ``kafka.KafkaConsumer`` this module uses (an in-memory fake implements it in tests)."""

    def partitions_for_topic(self, topic: str) -> set[int] | None: ...
    def assign(self, partitions: list[Any]) -> None: ...
    def seek_to_beginning(self, *partitions: Any) -> None: ...
    def end_offsets(self, partitions: list[Any]) -> Mapping[Any, int]: ...
    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> Mapping[Any, list[Any]]: ...
    def position(self, partition: Any) -> int: ...
    def close(self) -> None: ...


class UpdateConsumer:
    """Reads the updates topic from the beginning and applies it to ``service`` in batches.

    Args:
        service: the service to feed.
        consumer: a ``kafka.KafkaConsumer`` created with ``group_id=None`` (see :meth:`connect`).
        topic: the compacted updates topic.
        batch_size: most records applied per batch.
        poll_timeout_ms: how long one poll waits for records.
    """

    def __init__(
        self,
        service: RecommendationService,
        consumer: KafkaConsumerLike,
        topic: str,
        batch_size: int = 512,
        poll_timeout_ms: int = 200,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.service = service
        self.consumer = consumer
        self.topic = topic
        self.batch_size = batch_size
        self.poll_timeout_ms = poll_timeout_ms
        self.positions: dict[int, int] = {}  # partition -> next offset to read (all before it applied)
        self.end_offsets_at_start: dict[int, int] = {}
        self.max_version = -1  # the last version applied
        self.applied = 0  # vectors applied (stale ones not counted)
        self.versions_applied = 0
        self.rejected = 0
        self.pending: list[EmbeddingUpdate | ConsumedRecord] = []  # records of versions not closed yet, in order
        self.caught_up = threading.Event()  # set once every partition reached its end offset at start
        self._assigned: list[Any] = []

    @classmethod
    def connect(
        cls,
        service: RecommendationService,
        bootstrap_servers: str,
        topic: str,
        batch_size: int = 512,
        poll_timeout_ms: int = 200,
        metadata_timeout_s: float = 30.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> UpdateConsumer:
        """Create a kafka-python consumer (no group, auto-commit off) and start from the beginning.

        ``client_options``: extra KafkaConsumer settings, e.g. the SASL/TLS options of
        ``stream.settings.kafka_client_kwargs`` for a secured cluster.
        """
        import kafka  # imported here so tests with a fake need no broker client

        options = {"bootstrap_servers": bootstrap_servers.split(","), **(client_options or {})}
        consumer = kafka.KafkaConsumer(
            **options,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        update_consumer = cls(service, consumer, topic, batch_size, poll_timeout_ms)
        update_consumer.start(metadata_timeout_s)
        return update_consumer

    def start(self, metadata_timeout_s: float = 30.0) -> None:
        """Assign every partition of the topic and seek to the beginning."""
        from kafka import TopicPartition

        deadline_s = time.monotonic() + metadata_timeout_s
        partitions = self.consumer.partitions_for_topic(self.topic)
        while not partitions:
            if time.monotonic() > deadline_s:
                raise BrokerError(f"topic {self.topic!r} has no partitions after {metadata_timeout_s} s")
            time.sleep(0.1)  # metadata arrives asynchronously; nothing to wait on but the next poll
            partitions = self.consumer.partitions_for_topic(self.topic)
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._assigned = assigned
        self.consumer.assign(assigned)
        self.consumer.seek_to_beginning(*assigned)
        ends = self.consumer.end_offsets(assigned)
        self.end_offsets_at_start = {tp.partition: int(ends[tp]) for tp in assigned}
        self.positions = {tp.partition: 0 for tp in assigned}
        self._check_caught_up()
        logger.info("update consumer started topic=%s end_offsets=%s", self.topic, self.end_offsets_at_start)

    def poll_once(self) -> int:
        """Poll, apply every version closed in what came back, advance positions; return how many vectors
        were applied."""
        records_by_partition = self.consumer.poll(
            timeout_ms=self.poll_timeout_ms, max_records=self.batch_size
        )
        applied = 0
        for tp, records in records_by_partition.items():
            for record in records:
                decoded = self._decode(tp.partition, record.offset, record.value)
                if isinstance(decoded, EmbeddingUpdate | ConsumedRecord):
                    self.pending.append(decoded)
                elif isinstance(decoded, VersionRecord):
                    applied += self._apply_version(tp.partition, record.offset, decoded)
        # Only now, with every returned record applied or pending, take the fetch positions (gaps from
        # compaction or control records included).
        self.positions = {tp.partition: int(self.consumer.position(tp)) for tp in self._assigned}
        self.applied += applied
        self._report_lag()
        self._check_caught_up()
        return applied

    def _apply_version(self, partition: int, offset: int, record: VersionRecord) -> int:
        """Reassemble version ``record.version`` from the pending records and apply it; pending records of
        older versions (their version record was rejected or never sent) are dropped, counted."""
        mine = [u for u in self.pending if u.version == record.version]
        orphans = [u for u in self.pending if u.version < record.version]
        self.pending = [u for u in self.pending if u.version > record.version]
        if orphans:
            self._reject(partition, offset, "orphan_update", ValueError(
                f"{len(orphans)} records of versions below {record.version} had no version record"), len(orphans))
        items = [u for u in mine if isinstance(u, EmbeddingUpdate) and u.kind == "item"]
        users = [u for u in mine if isinstance(u, EmbeddingUpdate) and u.kind == "user"]
        consumed = [pair for u in mine if isinstance(u, ConsumedRecord) for pair in u.consumed]
        consumed += record.consumed
        views = {u.views for u in users}
        try:
            if len(consumed) != record.consumed_total:
                raise ValueError(f"version {record.version}: {record.consumed_total} consumed pairs sent, "
                                 f"{len(consumed)} read")
            if len(views) > 1:
                raise ValueError(f"version {record.version}: users must share one number of views, got {sorted(views)}")
            n_views = views.pop() if views else 1
            batch = EmbeddingBatch(
                version=record.version,
                full=record.full,
                item_ids=[u.key for u in items],
                item_vectors=np.array([u.vector for u in items], dtype=np.float32).reshape(
                    len(items), self.service.dim),  # (N, D)
                user_ids=[u.key for u in users],
                user_vectors=np.array([u.vector for u in users], dtype=np.float32).reshape(
                    len(users), n_views, self.service.dim),  # (U, V, D)
                popularity=[],
                created_at_s=record.created_at_s,
                consumed=consumed,
                served_by=record.served_by,
                fused_weight=record.fused_weight,
                fused_weight_cold=record.fused_weight_cold,
            )
            validate_batch(batch, self.service.dim)
        except ValueError as exc:
            self._reject(partition, offset, "invalid_version", exc, 1 + len(mine))
            return 0
        stats = self.service.apply(batch)
        self.versions_applied += 1
        self.max_version = max(self.max_version, record.version)
        return stats.items_applied + stats.users_applied

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; exceptions other than bad messages propagate."""
        while not stop.is_set():
            self.poll_once()

    def close(self) -> None:
        self.consumer.close()

    def _decode(self, partition: int, offset: int, raw: bytes | None) -> UpdateRecord | None:
        try:
            if raw is None:
                raise EventDecodeError("tombstone", "deletes are not supported; record skipped")
            record = decode_update_record(raw)
            if isinstance(record, EmbeddingUpdate):
                validate_update(record, self.service.dim)
        except ValueError as exc:  # EventDecodeError is a ValueError too
            self._reject(partition, offset, exc.reason if isinstance(exc, EventDecodeError) else "invalid_update", exc)
            return None
        return record

    def _reject(self, partition: int, offset: int, reason: str, exc: Exception, count: int = 1) -> None:
        self.rejected += count
        metrics.UPDATES_REJECTED.labels(reason=reason).inc(count)
        logger.warning("update rejected topic=%s partition=%d offset=%d reason=%s records=%d detail=%s",
                       self.topic, partition, offset, reason, count, exc)  # fmt: skip

    def _report_lag(self) -> None:
        highwater = getattr(self.consumer, "highwater", None)
        if highwater is None:
            return
        from kafka import TopicPartition

        lags = [highwater(TopicPartition(self.topic, p)) for p in self.positions]
        if all(h is not None for h in lags):
            lag = sum(h - self.positions[p] for h, p in zip(lags, self.positions, strict=True))
            metrics.CONSUMER_OFFSET_LAG.set(max(0, lag))

    def _check_caught_up(self) -> None:
        if not self.caught_up.is_set() and all(
            self.positions.get(p, 0) >= end for p, end in self.end_offsets_at_start.items()
        ):
            self.caught_up.set()
            logger.info("update consumer caught up topic=%s applied=%d max_version=%d",
                        self.topic, self.applied, self.max_version)  # fmt: skip

