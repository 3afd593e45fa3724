"""The :class:`~stream.source.Source` contract over a Kafka consumer group (kafka-python).

Auto-commit is off: offsets are committed only through ``commit``, after the work that used them. A new
group starts at the earliest offset. ``next_batch`` is one ``poll`` of at most ``batch_size`` records.

Staying in the group during a long downstream step: kafka-python sends heartbeats from its own IO thread,
so ``session_timeout_ms`` only detects dead processes. What evicts a *slow* consumer is
``max_poll_interval_ms``, the longest allowed gap between two ``poll`` calls (default here 600 s). The
Ray actor never blocks that long: when its output queue is full it ``pause()``s and keeps calling
``next_batch``, which returns nothing but counts as a poll (and handles rebalances) until there is room.
The interval is also the rebalance timeout, so it is not set higher than needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import (
    BrokerNotAvailableError,
    CommitFailedError,
    IllegalGenerationError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata

from stream.settings import StreamSettings, kafka_client_kwargs
from stream.source import NoRebalanceListener, Offsets, RebalanceListener, RecordBatch

log = logging.getLogger(__name__)

# The broker is away for a while (restart, network): the consumer retries by itself on the next call.
TRANSIENT_ERRORS = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, BrokerNotAvailableError)


class _ListenerAdapter(ConsumerRebalanceListener):
    """Forwards kafka-python's callbacks (topic-partitions) to a RebalanceListener (partition numbers).

    kafka-python's default (eager) protocol revokes *every* partition at the start of a rebalance and then
    assigns the new set, keeping the fetch position of partitions it hands back to the same member. No
    other member can have read a partition in between, so a partition that comes straight back was never
    really lost: its consumer state and uncommitted positions stay valid. The adapter therefore holds the
    revocation until the assignment arrives and forwards only the difference: ``on_revoked`` for the
    partitions that moved away, ``on_assigned`` for the ones that are new. On close, or when the member
    was evicted (``on_partitions_lost``), the revocation is forwarded at once.
    """

    def __init__(self, source: KafkaSource) -> None:
        self.source = source
        self._pending_revoke: frozenset[int] = frozenset()

    def _partitions(self, tps: Any) -> frozenset[int]:
        return frozenset(tp.partition for tp in tps if tp.topic == self.source.topic)

    def on_partitions_revoked(self, revoked: Any) -> None:
        partitions = self._partitions(revoked)
        if self.source.closing:
            self.source.listener.on_revoked(partitions | self._pending_revoke)
            self._pending_revoke = frozenset()
        else:
            self._pending_revoke |= partitions

    def on_partitions_lost(self, lost: Any) -> None:
        partitions = self._partitions(lost) | self._pending_revoke
        self._pending_revoke = frozenset()
        if partitions:
            self.source.listener.on_revoked(partitions)

    def on_partitions_assigned(self, assigned: Any) -> None:
        tps = [tp for tp in assigned if tp.topic == self.source.topic]
        if self.source.paused and tps:
            self.source.consumer.pause(*tps)
        partitions = frozenset(tp.partition for tp in tps)
        moved_away = self._pending_revoke - partitions
        new = partitions - self._pending_revoke
        self._pending_revoke = frozenset()
        if moved_away:
            self.source.listener.on_revoked(moved_away)
        if new:
            self.source.listener.on_assigned(new)


def kafka_consumer_config(settings: StreamSettings, group: str) -> dict[str, Any]:
    return {
        **kafka_client_kwargs(settings),
        "group_id": group,
        "client_id": f"sitn-{group}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.batch_size,
        "max_poll_interval_ms": int(settings.max_poll_interval_s * 1000),
        "session_timeout_ms": int(settings.session_timeout_s * 1000),
        "heartbeat_interval_ms": max(int(settings.session_timeout_s * 1000) // 3, 100),
        "fetch_max_wait_ms": 100,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }


class KafkaSource:
    """One topic, one consumer group; partitions come and go with the group's rebalances."""

    def __init__(
        self,
        settings: StreamSettings,
        topic: str,
        group: str,
        listener: RebalanceListener | None = None,
        **consumer_overrides: Any,
    ) -> None:
        self.topic = topic
        self.group = group
        self.listener: RebalanceListener = listener or NoRebalanceListener()
        self.paused = False
        self.closing = False
        config = kafka_consumer_config(settings, group)
        config.update(consumer_overrides)
        self.consumer = KafkaConsumer(**config)
        self.consumer.subscribe([topic], listener=_ListenerAdapter(self))

    def next_batch(self, timeout_s: float) -> list[RecordBatch]:
        """Records after the positions; ``[]`` while the broker cannot be reached (logged, retried next call)."""
        try:
            polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        except TRANSIENT_ERRORS as exc:
            log.warning("poll failed, will retry topic=%s group=%s error=%r", self.topic, self.group, exc)
            time.sleep(min(timeout_s, 1.0))
            return []
        out: list[RecordBatch] = []
        for tp, records in polled.items():
            if records:
                out.append(
                    RecordBatch(tp.topic, tp.partition, [r.offset for r in records], [r.value for r in records])
                )
        return out

    def assignment(self) -> frozenset[int]:
        return frozenset(tp.partition for tp in self.consumer.assignment() if tp.topic == self.topic)

    def snapshot(self) -> Offsets:
        return {p: self.consumer.position(TopicPartition(self.topic, p)) for p in self.assignment()}

    def lag(self) -> Offsets:
        """From the high watermarks the last fetches returned (no extra request); unknown ones are left out."""
        out: Offsets = {}
        for p in self.assignment():
            tp = TopicPartition(self.topic, p)
            high = self.consumer.highwater(tp)
            if high is not None:
                out[p] = max(0, high - self.consumer.position(tp))
        return out

    def commit(self, offsets: Mapping[int, int]) -> bool:
        owned = self.assignment()
        to_commit = {
            TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items() if p in owned
        }
        if not to_commit:
            return True
        try:
            self.consumer.commit(offsets=to_commit)
        except TRANSIENT_ERRORS as exc:
            # Nothing committed; the caller keeps the positions and the next commit round covers them.
            log.warning("commit failed, broker unreachable topic=%s group=%s error=%r", self.topic, self.group, exc)
            return False
        except (CommitFailedError, IllegalGenerationError, RebalanceInProgressError, UnknownMemberIdError) as exc:
            # The group moved on: these partitions belong to someone else now, who resumes from the last
            # successful commit. Nothing to undo here; the caller learns it from the return value.
            log.warning("commit rejected by the group topic=%s group=%s error=%r", self.topic, self.group, exc)
            return False
        return True

    def pause(self) -> None:
        self.paused = True
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        self.paused = False
        self.consumer.resume(*self.consumer.paused())

    def close(self) -> None:
        """Leave the group (the listener hears ``on_revoked``). Commits nothing."""
        self.closing = True
        self.consumer.close(autocommit=False)
