"""A consumer group's committed offsets: set them (resume exactly where a checkpoint left off) and read
the group's lag.

``reset_group_offsets`` is used by the pipeline's supervisor *while no consumer of the group runs*: before
the consumers start, the group's committed offsets are moved to the positions recorded in the learner's
checkpoint (partitions the checkpoint never saw go to offset 0), so what the checkpoint holds is neither
lost nor applied twice.

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

from stream.settings import StreamSettings, kafka_client_kwargs

log = logging.getLogger(__name__)

RETRY_S = 0.2  # between tries of a lag read that failed with a retriable Kafka error


def reset_group_offsets(settings: StreamSettings, offsets: Mapping[int, int], group: str | None = None) -> dict[int, int]:
    """Commit ``offsets`` (partition -> next offset to read; missing partitions -> 0) for the group.

    Returns the full mapping committed. The group must have no active members.
    """
    group = group or settings.consumer_group
    full = {p: int(offsets.get(p, 0)) for p in range(settings.partitions)}
    unknown = sorted(set(offsets) - set(full))
    if unknown:
        raise ValueError(f"offsets name partitions {unknown}, the topic has 0..{settings.partitions - 1}")
    if settings.uses_kafka:
        _reset_kafka(settings, group, full)
    else:
        from stream.embedded_log import EmbeddedLog

        log_ = EmbeddedLog.open(
            settings.embedded_log_dir, settings.topic_interactions, settings.partitions,
            segment_bytes=settings.embedded_segment_bytes,
        )
        try:
            log_.commit(group, full, fsync=True)
        finally:
            log_.close()
    log.info("group offsets reset group=%s offsets=%s", group, full)
    return full


def _reset_kafka(settings: StreamSettings, group: str, offsets: Mapping[int, int]) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(group_id=group, enable_auto_commit=False, **kafka_client_kwargs(settings))
    try:
        tps = {p: TopicPartition(settings.topic_interactions, p) for p in offsets}
        consumer.assign(list(tps.values()))
        consumer.commit({tps[p]: OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    finally:
        consumer.close()


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
