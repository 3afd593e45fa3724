"""The embedded event log: Kafka's topic/partition/offset model in append-only files, for one machine.

Layout under ``root/<topic>/``::

    meta.json                        {"format": 1, "partitions": N}
    p-0003/00000000000000012000.seg  segment files, named by the offset of their first record
    offsets/<group>.json             committed offsets of a consumer group: {"0": next offset, ...}
    lock                             flock'ed by every writer while it appends (several processes may write)

A record is ``<value_len:int32 (-1 = null)> <crc32(key+value):uint32> <key_len:uint16> key value``,
little-endian. Offsets count records from 0 per partition. A record's partition is a stable hash of its
key (``partition_for``), so one user's events keep their order. A torn tail (a crash mid-append) is cut
off by the next writer; readers stop at an incomplete record and see it once it is complete.
Committed offsets are written to a temporary file and renamed over the old one (atomic), under a lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from stream.errors import ConfigError, DataFormatError
from stream.source import Offsets, RecordBatch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_HEADER = struct.Struct("<iIH")  # value_len (-1 = null), crc32 of key+value, key_len
HEADER_BYTES = _HEADER.size
_READ_CHUNK_BYTES = 1 << 20
_IDLE_WAIT_S = 0.005


def partition_for(key: bytes, partitions: int) -> int:
    """Stable partition of ``key`` (crc32; the same in every process, unlike ``hash``).

    >>> [partition_for(b"user-%d" % i, 3) for i in range(6)]
    [2, 2, 1, 0, 0, 0]
    """
    return zlib.crc32(key) % partitions


def encode_record(key: bytes, value: bytes | None) -> bytes:
    """One record as stored in a segment.

    >>> encode_record(b"k", b"v").hex()
    '010000009a74b67e01006b76'
    """
    body = key + (value or b"")
    return _HEADER.pack(-1 if value is None else len(value), zlib.crc32(body), len(key)) + body


def decode_records(buf: bytes | memoryview, start: int = 0) -> Iterator[tuple[int, bytes, bytes | None]]:
    """Yield ``(end position, key, value)`` for each complete record of ``buf`` from ``start``.

    Stops at an incomplete tail; raises :class:`DataFormatError` on a checksum mismatch.

    >>> data = encode_record(b"k", b"v") + encode_record(b"", None) + b"\\x05"
    >>> [(end, k, v) for end, k, v in decode_records(data)]
    [(12, b'k', b'v'), (22, b'', None)]
    """
    pos, end_of_buf = start, len(buf)
    unpack = _HEADER.unpack_from
    while pos + HEADER_BYTES <= end_of_buf:
        value_len, crc, key_len = unpack(buf, pos)
        body_start = pos + HEADER_BYTES
        body_end = body_start + key_len + max(value_len, 0)
        if body_end > end_of_buf:
            return
        body = bytes(buf[body_start:body_end])
        if zlib.crc32(body) != crc:
            raise DataFormatError(f"checksum mismatch in record at byte {pos}")
        yield body_end, body[:key_len], (None if value_len < 0 else body[key_len:])
        pos = body_end


def _segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}.seg"


def _segments(partition_dir: Path) -> list[int]:
    """Base offsets of a partition's segments, ascending."""
    return sorted(int(p.stem) for p in partition_dir.glob("*.seg"))


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    with path.open("a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _scan_valid_end(path: Path, start_pos: int = 0) -> tuple[int, int]:
    """(byte position after the last complete, valid record, number of such records) from ``start_pos``."""
    data = path.read_bytes()
    end, count = start_pos, 0
    try:
        for end, _k, _v in decode_records(data, start_pos):  # noqa: B007 - the loop variables are the result
            count += 1
    except DataFormatError:
        log.warning("corrupt record, treating the rest as a torn tail path=%s pos=%s", path, end)
    return end, count


@dataclass
class _Tail:
    """Where the next record of a partition goes."""

    base_offset: int  # of the last segment
    size_bytes: int  # valid bytes in the last segment
    next_offset: int


class EmbeddedLog:
    """One topic of the embedded log: append with ``append_many``, read with :class:`PartitionReader`."""

    def __init__(self, topic_dir: Path, topic: str, partitions: int, segment_bytes: int) -> None:
        self.topic_dir = topic_dir
        self.topic = topic
        self.partitions = partitions
        self.segment_bytes = segment_bytes
        self._tails: dict[int, _Tail] = {}
        self._files: dict[int, BinaryIO] = {}

    @classmethod
    def open(
        cls, root: str | Path, topic: str, partitions: int, segment_bytes: int = 64 * 1024 * 1024
    ) -> EmbeddedLog:
        """Open ``root/topic``, creating it with ``partitions`` partitions if it does not exist yet."""
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be >= 1, got {segment_bytes}")
        if not topic or "/" in topic or topic.startswith("."):
            raise ValueError(f"topic must be a plain file name, got {topic!r}")
        topic_dir = Path(root) / topic
        topic_dir.mkdir(parents=True, exist_ok=True)
        meta_path = topic_dir / "meta.json"
        with _flock(topic_dir / "lock"):
            if meta_path.exists():
                meta = orjson.loads(meta_path.read_bytes())
                if meta["partitions"] != partitions:
                    raise ConfigError(
                        f"embedded topic {topic!r} at {topic_dir} has {meta['partitions']} partitions, "
                        f"configured {partitions}; repartitioning an existing log is not supported"
                    )
            else:
                for p in range(partitions):
                    (topic_dir / f"p-{p:04d}").mkdir(exist_ok=True)
                (topic_dir / "offsets").mkdir(exist_ok=True)
                tmp = meta_path.with_suffix(".tmp")
                tmp.write_bytes(orjson.dumps({"format": FORMAT_VERSION, "partitions": partitions}))
                os.replace(tmp, meta_path)
        return cls(topic_dir, topic, partitions, segment_bytes)

    def partition_dir(self, partition: int) -> Path:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition must be in [0, {self.partitions}), got {partition}")
        return self.topic_dir / f"p-{partition:04d}"

    def partition_for(self, key: bytes) -> int:
        return partition_for(key, self.partitions)

    # -- writing --------------------------------------------------------------------------------
    def _refresh_tail(self, partition: int) -> _Tail:
        """Bring our view of the partition's end up to date; another process may have appended."""
        pdir = self.partition_dir(partition)
        bases = _segments(pdir)
        known = self._tails.get(partition)
        if not bases:
            tail = _Tail(0, 0, 0)
        elif known is not None and known.base_offset == bases[-1]:
            size = (pdir / _segment_name(known.base_offset)).stat().st_size
            if size == known.size_bytes:
                return known
            end, count = _scan_valid_end(pdir / _segment_name(known.base_offset), known.size_bytes)
            tail = _Tail(known.base_offset, end, known.next_offset + count)
        else:
            end, count = _scan_valid_end(pdir / _segment_name(bases[-1]))
            tail = _Tail(bases[-1], end, bases[-1] + count)
        path = pdir / _segment_name(tail.base_offset)
        if path.exists() and path.stat().st_size > tail.size_bytes:
            log.warning("cutting torn tail path=%s valid_bytes=%s", path, tail.size_bytes)
            os.truncate(path, tail.size_bytes)
        if known is None or known.base_offset != tail.base_offset:
            self._close_file(partition)
        self._tails[partition] = tail
        return tail

    def _close_file(self, partition: int) -> None:
        fh = self._files.pop(partition, None)
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())  # once per rolled segment: sync() only reaches open files
            fh.close()

    def sync(self) -> None:
        """fsync every segment this writer has open, so all it appended survives a power loss."""
        for fh in self._files.values():
            os.fsync(fh.fileno())

    def append_many(self, records: Iterable[tuple[bytes, bytes | None]], fsync: bool = False) -> list[tuple[int, int]]:
        """Append ``(key, value)`` records; return each one's ``(partition, offset)``. Durable if ``fsync``."""
        by_partition: dict[int, list[bytes]] = {}
        placed: list[tuple[int, int]] = []
        counts: dict[int, int] = {}
        for key, value in records:
            p = partition_for(key, self.partitions)
            by_partition.setdefault(p, []).append(encode_record(key, value))
            placed.append((p, counts.get(p, 0)))
            counts[p] = counts.get(p, 0) + 1
        if not by_partition:
            return []
        with _flock(self.topic_dir / "lock"):
            first: dict[int, int] = {}
            for p, encoded in by_partition.items():
                first[p] = self._write(p, encoded, fsync)
        return [(p, first[p] + i) for p, i in placed]

    def append(self, key: bytes, value: bytes | None, fsync: bool = False) -> tuple[int, int]:
        return self.append_many([(key, value)], fsync=fsync)[0]

    def _write(self, partition: int, encoded: list[bytes], fsync: bool) -> int:
        """Write one partition's records (lock held); return the offset of the first."""
        tail = self._refresh_tail(partition)
        first_offset = tail.next_offset
        pdir = self.partition_dir(partition)
        i = 0
        while i < len(encoded):
            if tail.size_bytes >= self.segment_bytes:
                self._close_file(partition)
                tail = _Tail(tail.next_offset, 0, tail.next_offset)
                self._tails[partition] = tail
            fh = self._files.get(partition)
            if fh is None:
                fh = (pdir / _segment_name(tail.base_offset)).open("ab")
                self._files[partition] = fh
            room = self.segment_bytes - tail.size_bytes
            chunk: list[bytes] = []
            chunk_bytes = 0
            while i < len(encoded) and (not chunk or chunk_bytes + len(encoded[i]) <= room):
                chunk.append(encoded[i])
                chunk_bytes += len(encoded[i])
                i += 1
            fh.write(b"".join(chunk))
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
            tail.size_bytes += chunk_bytes
            tail.next_offset += len(chunk)
        return first_offset

    def end_offsets(self) -> Offsets:
        """Next offset that would be written, per partition (as seen on disk now)."""
        with _flock(self.topic_dir / "lock"):
            return {p: self._refresh_tail(p).next_offset for p in range(self.partitions)}

    def close(self) -> None:
        for p in list(self._files):
            self._close_file(p)

    # -- group offsets ---------------------------------------------------------------------------
    def offsets_path(self, group: str) -> Path:
        if not group or "/" in group or group.startswith("."):
            raise ValueError(f"consumer group must be a plain file name, got {group!r}")
        return self.topic_dir / "offsets" / f"{group}.json"

    def committed(self, group: str) -> Offsets:
        """The group's committed offsets (next offset to read); partitions never committed are absent."""
        path = self.offsets_path(group)
        if not path.exists():
            return {}
        return {int(p): int(o) for p, o in orjson.loads(path.read_bytes())["offsets"].items()}

    def commit(self, group: str, offsets: Mapping[int, int], fsync: bool = False) -> None:
        """Merge ``offsets`` into the group's file: read, update, write a temporary file, rename over."""
        for p, o in offsets.items():
            self.partition_dir(p)
            if o < 0:
                raise ValueError(f"offset must be >= 0, got {o} for partition {p}")
        path = self.offsets_path(group)
        with _flock(path.with_suffix(".lock")):
            merged = self.committed(group)
            merged.update(offsets)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with tmp.open("wb") as fh:
                fh.write(orjson.dumps({"format": FORMAT_VERSION, "offsets": {str(p): o for p, o in sorted(merged.items())}}))
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            if fsync:
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)


class PartitionReader:
    """Reads one partition sequentially from a given offset, following segment rolls."""

    def __init__(self, log_: EmbeddedLog, partition: int, offset: int = 0) -> None:
        self.log = log_
        self.partition = partition
        self.pdir = log_.partition_dir(partition)
        self.position = 0  # next offset to read
        self._base = 0  # base offset of the segment being read
        self._file_pos = 0  # byte position in it of record `position`
        self.seek(offset)

    def seek(self, offset: int) -> None:
        """Position on ``offset`` (0 .. end of log). Scans the segment's record headers to find it."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        bases = [b for b in _segments(self.pdir) if b <= offset] or [0]
        self._base, self._file_pos, self.position = bases[-1], 0, bases[-1]
        while self.position < offset:
            got = self.read(offset - self.position)
            if not got[0]:
                raise ValueError(
                    f"offset {offset} is past the end ({self.position}) of {self.log.topic}/{self.partition}"
                )

    def read(self, max_records: int) -> tuple[list[int], list[bytes | None]]:
        """Up to ``max_records`` records from the position; ``([], [])`` when none is complete yet."""
        offsets: list[int] = []
        values: list[bytes | None] = []
        while len(offsets) < max_records:
            path = self.pdir / _segment_name(self._base)
            try:
                with path.open("rb") as fh:
                    fh.seek(self._file_pos)
                    data = fh.read(_READ_CHUNK_BYTES)
            except FileNotFoundError:
                data = b""
            consumed_bytes = 0
            for end, _key, value in decode_records(data):
                offsets.append(self.position)
                values.append(value)
                self.position += 1
                consumed_bytes = end
                if len(offsets) >= max_records:
                    break
            if consumed_bytes:
                self._file_pos += consumed_bytes
                continue
            # Nothing complete here: move to the next segment if one starts at our position.
            if (self.pdir / _segment_name(self.position)).exists() and self.position != self._base:
                self._base, self._file_pos = self.position, 0
                continue
            if len(data) >= _READ_CHUNK_BYTES:
                raise DataFormatError(f"record larger than {_READ_CHUNK_BYTES} bytes in {path}")
            break
        return offsets, values


class EmbeddedSource:
    """The :class:`~stream.source.Source` contract over an :class:`EmbeddedLog` topic.

    The assignment is static (``partitions``, default all). Reading starts at ``start_offsets`` (a
    partition without one from offset 0), as a Kafka consumer that was ``assign()``-ed and ``seek()``-ed.
    """

    def __init__(
        self,
        log_: EmbeddedLog,
        partitions: Iterable[int] | None = None,
        start_offsets: Mapping[int, int] | None = None,
        max_records: int = 2000,
    ) -> None:
        self.log = log_
        self.topic = log_.topic
        self._partitions = frozenset(range(log_.partitions) if partitions is None else partitions)
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.max_records = max_records
        start = dict(start_offsets or {})
        self._readers = {p: PartitionReader(log_, p, int(start.get(p, 0))) for p in sorted(self._partitions)}
        self._paused = False
        self._next_partition = 0

    def next_batch(self, timeout_s: float) -> list[RecordBatch]:
        readers = self._readers
        deadline = time.monotonic() + timeout_s
        order = sorted(readers)
        while True:
            if not self._paused:
                batches: list[RecordBatch] = []
                budget = self.max_records
                # Rotate the starting partition so that one busy partition cannot starve the others.
                start = self._next_partition % max(len(order), 1)
                self._next_partition += 1
                for p in order[start:] + order[:start]:
                    if budget <= 0:
                        break
                    offsets, values = readers[p].read(budget)
                    if offsets:
                        batches.append(RecordBatch(self.topic, p, offsets, values))
                        budget -= len(offsets)
                if batches:
                    return batches
            if time.monotonic() >= deadline:
                return []
            time.sleep(min(_IDLE_WAIT_S, max(deadline - time.monotonic(), 0)))

    def snapshot(self) -> Offsets:
        return {p: r.position for p, r in self._readers.items()}

    def lag(self) -> Offsets:
        ends = self.log.end_offsets()
        return {p: max(0, ends[p] - r.position) for p, r in self._readers.items()}

    def assignment(self) -> frozenset[int]:
        return self._partitions

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def close(self) -> None:
        self.log.close()
