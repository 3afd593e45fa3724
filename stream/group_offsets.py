"""The consumer group's committed offsets, kept only so that progress is visible to standard tools.

Positions are the learner's: its checkpoint holds the next offset to read of every partition, and the
consumers start there (``stream.source``). After each checkpoint the learner mirrors those positions into
the consumer group (:class:`GroupCommitter`), so ``kafka-consumer-groups --describe``, a Prometheus Kafka
exporter and :class:`GroupLag` show how far the durable model is behind the log. Nothing is ever read back
from the group: a failed commit costs only a stale lag figure until the next checkpoint's commit.

``group_lag`` / :class:`GroupLag` read end offset minus committed offset per partition of the interactions
topic. Offsets are committed only after the checkpoint that holds their effect, so this lag includes what
was trained since the last checkpoint: it saw-tooths between the events in flight and those plus one
checkpoint interval (``checkpoint_every_steps * batch_size`` events), and is bounded when training keeps up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from stream import telemetry
from stream.settings import StreamSettings, kafka_client_kwargs

log = logging.getLogger(__name__)

RETRY_S = 0.2  # between tries of a lag read that failed with a retriable Kafka error
COMMIT_TIMEOUT_S = 5.0  # a group commit gives up after this (broker away): the learner must not wait on it


class GroupCommitter:
    """Commits positions (partition -> next offset to read) for the consumer group, which has no members.

    On Kafka it is a group-less commit (``KafkaConsumer.commit`` with explicit offsets, no subscription),
    which the broker accepts for a group without active members; on the embedded log, the group's offsets
    file. ``commit`` returns False (logged, counted) when the broker cannot be reached within
    ``COMMIT_TIMEOUT_S``; call ``close()`` at the end.
    """

    def __init__(self, settings: StreamSettings, group: str | None = None) -> None:
        self.settings = settings
        self.group = group or settings.consumer_group
        self._consumer: Any = None
        self._log: Any = None

    def commit(self, positions: Mapping[int, int]) -> bool:
        if not positions:
            return True
        unknown = sorted(p for p in positions if not 0 <= p < self.settings.partitions)
        if unknown:
            raise ValueError(f"positions name partitions {unknown}, the topic has 0..{self.settings.partitions - 1}")
        try:
            if self.settings.uses_kafka:
                self._commit_kafka(positions)
            else:
                self._commit_embedded(positions)
        except Exception as exc:
            if not _transient(exc):
                raise
            telemetry.COMMITS.labels("failed").inc()
            log.warning("group commit failed, the next checkpoint commits newer positions group=%s error=%r",
                        self.group, exc)
            return False
        telemetry.COMMITS.labels("committed").inc()
        return True

    def _commit_kafka(self, positions: Mapping[int, int]) -> None:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        if self._consumer is None:
            self._consumer = KafkaConsumer(group_id=self.group, client_id=f"sitn-{self.group}-positions",
                                           enable_auto_commit=False, **kafka_client_kwargs(self.settings))
        topic = self.settings.topic_interactions
        offsets = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in positions.items()}
        self._consumer.commit(offsets, timeout_ms=int(COMMIT_TIMEOUT_S * 1000))

    def _commit_embedded(self, positions: Mapping[int, int]) -> None:
        if self._log is None:
            from stream.embedded_log import EmbeddedLog

            s = self.settings
            self._log = EmbeddedLog.open(s.embedded_log_dir, s.topic_interactions, s.partitions,
                                         segment_bytes=s.embedded_segment_bytes)
        self._log.commit(self.group, dict(positions), fsync=self.settings.embedded_fsync)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _transient(exc: BaseException) -> bool:
    """A Kafka error (broker away, coordinator moving, commit refused): only the lag figure goes stale, so
    it is logged and counted, and the next checkpoint's commit covers it. Anything else is a bug: re-raised."""
    from kafka.errors import KafkaError

    return isinstance(exc, KafkaError)


class GroupLag:
    """Reads the group's lag, ``{partition: end offset - committed offset}``, as often as called.

    Open once and call it repeatedly (a producer's throttle polls it a few times a second); ``close()``
    at the end. A partition the group never committed counts from its first offset, where its consumer
    starts (offset 0 in the embedded log, the earliest retained offset on Kafka). On Kafka, a retriable
    error (no group coordinator yet on a fresh broker, a leader moving) is retried for ``timeout_s``.
    """

    def __init__(self, settings: StreamSettings, group: str | None = None, timeout_s: float = 30.0) -> None:
        self.settings = settings
        self.group = group or settings.consumer_group
        self.timeout_s = timeout_s
        self._log: Any = None
        self._admin: Any = None
        if settings.uses_kafka:
            from kafka import KafkaAdminClient, TopicPartition

            self._admin = KafkaAdminClient(**kafka_client_kwargs(settings), client_id="sitn-lag")
            self._tps = [TopicPartition(settings.topic_interactions, p) for p in range(settings.partitions)]
        else:
            from stream.embedded_log import EmbeddedLog

            self._log = EmbeddedLog.open(
                settings.embedded_log_dir, settings.topic_interactions, settings.partitions,
                segment_bytes=settings.embedded_segment_bytes,
            )

    def __call__(self) -> dict[int, int]:
        if self._log is not None:
            ends = self._log.end_offsets()
            committed = self._log.committed(self.group)
            return {p: max(0, end - committed.get(p, 0)) for p, end in ends.items()}
        from kafka.errors import KafkaError

        deadline_s = time.monotonic() + self.timeout_s
        while True:
            try:
                return self._kafka_lag()
            except KafkaError as exc:
                if not exc.retriable or time.monotonic() >= deadline_s:
                    raise
                log.debug("group lag retried group=%s error=%s", self.group, type(exc).__name__)
                time.sleep(RETRY_S)

    def _kafka_lag(self) -> dict[int, int]:
        from kafka.admin import OffsetSpec

        committed_raw = self._admin.list_group_offsets({self.group: self._tps})[self.group]
        committed = {tp.partition: om.offset for tp, om in committed_raw.items() if om is not None and om.offset >= 0}
        ends = self._admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in self._tps})
        missing = [tp for tp in self._tps if tp.partition not in committed]
        if missing:
            earliest = self._admin.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in missing})
            committed.update({tp.partition: o.offset for tp, o in earliest.items()})
        return {tp.partition: max(0, ends[tp].offset - committed[tp.partition]) for tp in self._tps}

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        if self._admin is not None:
            self._admin.close()

    def __enter__(self) -> GroupLag:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def group_lag(settings: StreamSettings, group: str | None = None) -> dict[int, int]:
    """End offset minus committed offset per partition of the interactions topic, for the consumer group.

    One look; to poll, keep a :class:`GroupLag` open instead.
    """
    with GroupLag(settings, group) as lag:
        return lag()
