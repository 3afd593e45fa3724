"""The :class:`~stream.source.Source` contract over a kafka-python consumer with a static assignment.

``assign()`` and ``seek()``, not ``subscribe()``: the consumer joins no group, so there is no rebalance,
no eviction of a slow reader, and nothing committed from here. It reads the partitions it is given from
the offsets it is given (a partition without one from its earliest retained offset);
``next_batch`` is one ``poll`` of at most ``batch_size`` records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import BrokerNotAvailableError, KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError

from stream.settings import StreamSettings, kafka_client_kwargs
from stream.source import Offsets, RecordBatch

log = logging.getLogger(__name__)

# The broker is away for a while (restart, network): the consumer retries by itself on the next call.
TRANSIENT_ERRORS = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, BrokerNotAvailableError)


def kafka_consumer_config(settings: StreamSettings, client_id: str) -> dict[str, Any]:
    return {
        **kafka_client_kwargs(settings),
        "group_id": None,  # no group: positions are the caller's (see the module docstring)
        "client_id": client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.batch_size,
        "fetch_max_wait_ms": 100,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }


class KafkaSource:
    """Fixed partitions of one topic, read from given offsets."""

    def __init__(
        self,
        settings: StreamSettings,
        topic: str,
        partitions: Iterable[int],
        start_offsets: Mapping[int, int] | None = None,
        **consumer_overrides: Any,
    ) -> None:
        self.topic = topic
        self.paused = False
        config = kafka_consumer_config(settings, f"sitn-{topic}")
        config.update(consumer_overrides)
        self.consumer = KafkaConsumer(**config)
        self._tps = {p: TopicPartition(topic, p) for p in sorted(set(partitions))}
        self.consumer.assign(list(self._tps.values()))
        start = dict(start_offsets or {})
        for p, tp in self._tps.items():
            if p in start:
                self.consumer.seek(tp, int(start[p]))
            else:
                self.consumer.seek_to_beginning(tp)

    def next_batch(self, timeout_s: float) -> list[RecordBatch]:
        """Records after the positions; ``[]`` while the broker cannot be reached (logged, retried next call)."""
        try:
            polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        except TRANSIENT_ERRORS as exc:
            log.warning("poll failed, will retry topic=%s error=%r", self.topic, exc)
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
        return frozenset(self._tps)

    def snapshot(self) -> Offsets:
        return {p: self.consumer.position(tp) for p, tp in self._tps.items()}

    def lag(self) -> Offsets:
        """From the high watermarks the last fetches returned (no extra request); unknown ones are left out."""
        out: Offsets = {}
        for p, tp in self._tps.items():
            high = self.consumer.highwater(tp)
            if high is not None:
                out[p] = max(0, high - self.consumer.position(tp))
        return out

    def pause(self) -> None:
        self.paused = True
        self.consumer.pause(*self._tps.values())

    def resume(self) -> None:
        self.paused = False
        self.consumer.resume(*self._tps.values())

    def close(self) -> None:
        self.consumer.close(autocommit=False)
