"""The :class:`~stream.source.Source` contract over a kafka-python consumer with a static assignment.

``assign()`` and ``seek()``, not ``subscribe()``: the consumer joins no group, so there is no rebalance,
no eviction of a slow reader, and nothing committed from here. It reads the partitions it is given from
the offsets it is given (a partition without one from its earliest retained offset);
``next_batch`` is one ``poll`` of at most ``batch_size`` records.

Records are read as ``(offset, value)`` pairs (:class:`RawPartitionRecords`), not as kafka-python's
``ConsumerRecord`` s: a source needs nothing else, and kafka-python's per-record parsing and its
13-field records were two thirds of a consumer's CPU (``py-spy``, ``bench/bench_stream.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import kafka
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import (
    BrokerNotAvailableError,
    CorruptRecordError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
)
from kafka.protocol.consumer import IsolationLevel
from kafka.record.util import decode_varint

from stream.settings import StreamSettings, kafka_client_kwargs
from stream.source import Offsets, RecordBatch

log = logging.getLogger(__name__)

# The broker is away for a while (restart, network): the consumer retries by itself on the next call.
TRANSIENT_ERRORS = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, BrokerNotAvailableError)

# The kafka-python release whose record parsing ``read_batch`` reproduces (``DefaultRecordBatch._read_msg``
# and ``Fetcher.PartitionRecords._unpack_records``): another one reads through its own parser instead.
FAST_PATH_KAFKA_PYTHON = "3.0.12"
RawRecord = tuple[int, bytes | None]  # (offset, value)


def read_batch(batch: Any) -> tuple[list[RawRecord], Exception | None]:
    """The ``(offset, value)`` of every record of one v2 record batch, and the error that ended it early.

    What kafka-python 3.0.12 reads from the batch (``DefaultRecordBatch._read_msg``), the same checks in
    the same order, without building its record objects; keys, timestamps and headers are checked and
    skipped. One-byte varints (and two-byte ones for lengths and offset deltas) are decoded inline. On a corrupt record
    the records before it come back with the ``CorruptRecordError``, as kafka-python yields them before
    raising. ``batch``: a ``DefaultRecordBatch``, uncompressed (``iter(batch)`` has run).

    >>> from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
    >>> builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, batch_size=1 << 20)
    >>> for offset, value in enumerate((b"a", None, b"b" * 300)):
    ...     _ = builder.append(offset, key=None, value=value, timestamp=1_700_000_000_000, headers=[])
    >>> batch = DefaultRecordBatch(bytes(builder.build()))
    >>> records, error = read_batch(iter(batch))
    >>> [(offset, value if value is None else len(value)) for offset, value in records], error
    ([(0, 1), (1, None), (2, 300)], None)
    """
    buf = bytes(batch._buffer)  # slices of bytes are the values, one copy each
    pos = batch._pos
    base_offset = batch.base_offset
    out: list[RawRecord] = []
    append = out.append
    try:
        for _ in range(batch._num_records):
            # Length => varint (zigzag throughout: (z >> 1) ^ -(z & 1))
            b = buf[pos]
            if b < 0x80:
                length = (b >> 1) ^ -(b & 1)
                pos += 1
            elif buf[pos + 1] < 0x80:
                z = (b & 0x7F) | (buf[pos + 1] << 7)
                length = (z >> 1) ^ -(z & 1)
                pos += 2
            else:
                length, pos = decode_varint(buf, pos)
            start = pos
            # Attributes => int8 (unused; kafka-python reads it as a varint), TimestampDelta => varlong
            pos = pos + 1 if buf[pos] < 0x80 else decode_varint(buf, pos)[1]
            pos = pos + 1 if buf[pos] < 0x80 else decode_varint(buf, pos)[1]
            # OffsetDelta => varint
            b = buf[pos]
            if b < 0x80:
                offset_delta = (b >> 1) ^ -(b & 1)
                pos += 1
            elif buf[pos + 1] < 0x80:
                z = (b & 0x7F) | (buf[pos + 1] << 7)
                offset_delta = (z >> 1) ^ -(z & 1)
                pos += 2
            else:
                offset_delta, pos = decode_varint(buf, pos)
            # Key => varint length (-1: null), bytes
            b = buf[pos]
            if b < 0x80:
                key_len = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                key_len, pos = decode_varint(buf, pos)
            if key_len > 0:
                pos += key_len
            # Value => varint length (-1: null), bytes
            b = buf[pos]
            if b < 0x80:
                value_len = (b >> 1) ^ -(b & 1)
                pos += 1
            elif buf[pos + 1] < 0x80:
                z = (b & 0x7F) | (buf[pos + 1] << 7)
                value_len = (z >> 1) ^ -(z & 1)
                pos += 2
            else:
                value_len, pos = decode_varint(buf, pos)
            if value_len >= 0:
                value: bytes | None = buf[pos:pos + value_len]
                pos += value_len
            else:
                value = None
            # Headers => varint count, then [key: varint length, utf-8; value: varint length (-1: null), bytes]
            if buf[pos] == 0:
                pos += 1
            else:
                pos = _skip_headers(buf, pos)
            if pos - start != length:
                raise CorruptRecordError(
                    f"Invalid record size: expected to read {length} bytes in record payload, "
                    f"but instead read {pos - start}"
                )
            append((base_offset + offset_delta, value))
        if pos != len(buf):
            raise CorruptRecordError(f"{len(buf) - pos} unconsumed bytes after all records consumed")
    except (ValueError, IndexError) as err:
        return out, CorruptRecordError(f"Found invalid record structure: {err!r}")
    except CorruptRecordError as err:
        return out, err
    return out, None


def _skip_headers(buf: bytes, pos: int) -> int:
    count, pos = decode_varint(buf, pos)
    if count < 0:
        raise CorruptRecordError(f"Found invalid number of record headers {count}")
    for _ in range(count):
        key_len, pos = decode_varint(buf, pos)
        if key_len < 0:
            raise CorruptRecordError(f"Invalid negative header key size {key_len}")
        buf[pos:pos + key_len].decode("utf-8")  # checked, as kafka-python does
        pos += key_len
        value_len, pos = decode_varint(buf, pos)
        if value_len > 0:
            pos += value_len
    return pos


class RawPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's fetched records of one partition, handed out as ``(offset, value)`` pairs.

    Positions, skipped records and errors are kafka-python's own: the fetcher drives this object exactly
    as its own (``take``, ``drain``, ``next_fetch_offset`` set before each record is handed out). Plain
    v2 batches of a ``read_uncommitted`` consumer without deserializers, the only kind this project
    reads, go through :func:`read_batch`; anything else (transactions read committed, old message
    formats, another kafka-python) through kafka-python's own parser.
    """

    def _maybe_skip_record(self, record: RawRecord) -> bool:
        return record[0] < self.fetch_offset  # a record before the fetch offset, in a batch fetched whole

    def _unpack_records(self, tp: TopicPartition, records: Any, key_deserializer: Any,
                        value_deserializer: Any) -> Iterator[RawRecord]:
        if (kafka.__version__ != FAST_PATH_KAFKA_PYTHON or key_deserializer is not None
                or value_deserializer is not None or self.isolation_level != IsolationLevel.READ_UNCOMMITTED):
            for record in super()._unpack_records(tp, records, key_deserializer, value_deserializer):
                yield record.offset, record.value
            return
        batch = records.next_batch()
        last_batch = None
        while batch is not None:
            last_batch = batch
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"Record batch for partition {self.topic_partition} at offset {batch.base_offset} "
                    "failed crc check"
                )
            if batch.magic != 2:  # an old message format: kafka-python's records
                for record in batch:
                    if self.check_crcs and not record.validate_crc():
                        raise CorruptRecordError(
                            f"Record for partition {self.topic_partition} at offset {record.offset} "
                            "failed crc check"
                        )
                    self.records_read += 1
                    self.bytes_read += record.size_in_bytes
                    self.next_fetch_offset = record.offset + 1
                    yield record.offset, record.value
                batch = records.next_batch()
                continue
            self.leader_epoch = batch.leader_epoch
            if batch.is_control_batch:  # transaction markers are not records
                self.next_fetch_offset = batch.next_offset
                batch = records.next_batch()
                continue
            # (a v2 record's own CRC check is a no-op: the batch CRC above covers it)
            read, error = read_batch(iter(batch))
            # kafka-python's fetch metrics: counted per batch here (it counts each record body as handed out)
            self.records_read += len(read)
            self.bytes_read += batch.size_in_bytes
            for offset, value in read:
                self.next_fetch_offset = offset + 1
                yield offset, value
            if error is not None:
                raise error
            batch = records.next_batch()
        if last_batch is not None and last_batch.magic == 2:
            # the batch's last offset, even if compaction removed that record (kafka-python's reasoning)
            self.next_fetch_offset = last_batch.next_offset
        self.drain()


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
        # Records as (offset, value) pairs (RawPartitionRecords): the fetcher builds its parsed records
        # through this attribute, so setting it on this consumer's fetcher touches no other consumer.
        self.consumer._fetcher.PartitionRecords = RawPartitionRecords
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
        for tp, records in polled.items():  # records: [(offset, value)], see RawPartitionRecords
            if records:
                out.append(RecordBatch(tp.topic, tp.partition, [o for o, _ in records], [v for _, v in records]))
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
