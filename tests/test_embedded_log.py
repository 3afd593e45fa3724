"""The embedded log: segments, torn tails, offsets, resume semantics, and resume across a process restart."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stream.consumer import StreamConsumer
from stream.dead_letter import EmbeddedDeadLetters
from stream.embedded_log import (
    HEADER_BYTES,
    EmbeddedLog,
    EmbeddedSource,
    PartitionReader,
    _segment_name,
    encode_record,
    partition_for,
)
from stream.errors import ConfigError
from stream.events import InteractionEvent, encode_event
from stream.source import RecordBatch

REPO = Path(__file__).resolve().parents[1]


def _records(n: int, partitions_hint: str = "u") -> list[tuple[bytes, bytes]]:
    return [(f"{partitions_hint}{i % 7}".encode(), f"v{i}".encode()) for i in range(n)]


def _read_all(log: EmbeddedLog, partition: int, offset: int = 0) -> tuple[list[int], list[bytes | None]]:
    reader = PartitionReader(log, partition, offset)
    offsets, values = reader.read(10_000)
    return offsets, values


def test_append_assigns_consecutive_offsets_per_partition_by_key_hash(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 3)
    placed = log.append_many(_records(30))
    expected_next = {p: 0 for p in range(3)}
    for (key, _value), (p, offset) in zip(_records(30), placed, strict=True):
        assert p == partition_for(key, 3)
        assert offset == expected_next[p]
        expected_next[p] += 1
    assert log.end_offsets() == expected_next
    for p in range(3):
        offsets, values = _read_all(log, p)
        assert offsets == list(range(expected_next[p]))
        assert values == [v for (k, v) in _records(30) if partition_for(k, 3) == p]


def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    record_bytes = len(encode_record(b"k", b"v00"))
    log = EmbeddedLog.open(tmp_path, "t", 1, segment_bytes=record_bytes * 4)
    log.append_many([(b"k", f"v{i:02d}".encode()) for i in range(10)])
    log.append_many([(b"k", f"v{i:02d}".encode()) for i in range(10, 11)])
    names = sorted(p.name for p in log.partition_dir(0).glob("*.seg"))
    assert names == [_segment_name(0), _segment_name(4), _segment_name(8)]
    offsets, values = _read_all(log, 0, offset=3)
    assert offsets == list(range(3, 11))
    assert values == [f"v{i:02d}".encode() for i in range(3, 11)]
    # A reader at the end sees records appended later, also in a new segment.
    reader = PartitionReader(log, 0, 11)
    assert reader.read(5) == ([], [])
    log.append(b"k", b"v11")
    assert reader.read(5) == ([11], [b"v11"])


def test_null_values_round_trip(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 1)
    log.append_many([(b"k", None), (b"k", b"")])
    assert _read_all(log, 0) == ([0, 1], [None, b""])


def test_torn_tail_is_cut_by_the_next_writer_and_invisible_to_readers(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 1)
    log.append_many([(b"k", b"a"), (b"k", b"b")])
    log.close()
    segment = log.partition_dir(0) / _segment_name(0)
    good_size = segment.stat().st_size
    with segment.open("ab") as fh:  # a crash in the middle of the third record
        fh.write(encode_record(b"k", b"ccc")[: HEADER_BYTES + 2])
    assert _read_all(log, 0) == ([0, 1], [b"a", b"b"])
    writer = EmbeddedLog.open(tmp_path, "t", 1)
    assert writer.append(b"k", b"d") == (0, 2)
    assert segment.stat().st_size == good_size + len(encode_record(b"k", b"d"))
    assert _read_all(writer, 0) == ([0, 1, 2], [b"a", b"b", b"d"])


def test_two_writers_interleave_without_losing_records(tmp_path: Path) -> None:
    first = EmbeddedLog.open(tmp_path, "t", 1)
    second = EmbeddedLog.open(tmp_path, "t", 1)
    assert first.append(b"k", b"1") == (0, 0)
    assert second.append(b"k", b"2") == (0, 1)
    assert first.append(b"k", b"3") == (0, 2)
    assert _read_all(first, 0) == ([0, 1, 2], [b"1", b"2", b"3"])


def test_partition_count_of_an_existing_topic_is_fixed(tmp_path: Path) -> None:
    EmbeddedLog.open(tmp_path, "t", 2)
    with pytest.raises(ConfigError, match=r"has 2 partitions, configured 3"):
        EmbeddedLog.open(tmp_path, "t", 3)


def test_seek_past_the_end_names_the_end(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 1)
    log.append(b"k", b"v")
    with pytest.raises(ValueError, match=r"offset 5 is past the end \(1\) of t/0"):
        PartitionReader(log, 0, 5)


def test_group_offsets_merge_and_are_per_group(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 3)
    assert log.committed("g") == {}
    log.commit("g", {0: 5, 2: 7})
    log.commit("g", {2: 9})
    log.commit("other", {1: 1}, fsync=True)
    assert log.committed("g") == {0: 5, 2: 9}
    assert log.committed("other") == {1: 1}
    assert sorted(p.name for p in (log.topic_dir / "offsets").glob("*.json")) == ["g.json", "other.json"]
    with pytest.raises(ValueError, match=r"partition must be in \[0, 3\), got 3"):
        log.commit("g", {3: 1})


def test_source_resumes_at_the_given_offset_not_one_off(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 1)
    log.append_many([(b"k", str(i).encode()) for i in range(10)])
    source = EmbeddedSource(log, max_records=4)
    assert source.snapshot() == {0: 0}
    first = source.next_batch(timeout_s=0)
    assert first == [RecordBatch("t", 0, [0, 1, 2, 3], [b"0", b"1", b"2", b"3"])]
    assert source.snapshot() == {0: 4}
    source.next_batch(timeout_s=0)  # 4..7 read, but only 0..3 were done
    source.close()
    again = EmbeddedSource(log, start_offsets={0: first[0].next_offset}, max_records=100)
    assert again.next_batch(timeout_s=0) == [
        RecordBatch("t", 0, list(range(4, 10)), [str(i).encode() for i in range(4, 10)])
    ]
    assert again.next_batch(timeout_s=0.01) == []
    assert log.committed("g") == {}  # a source commits nothing


def test_source_static_assignment_and_pause(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 4)
    log.append_many(_records(40))
    source = EmbeddedSource(log, partitions=[1, 3])
    assert source.assignment() == frozenset({1, 3})
    source.pause()
    assert source.next_batch(timeout_s=0.01) == []
    source.resume()
    got = source.next_batch(timeout_s=0)
    assert {b.partition for b in got} == {p for p in (1, 3) if log.end_offsets()[p] > 0}


def test_open_source_refuses_offsets_outside_its_assignment(tmp_path: Path) -> None:
    from stream.settings import StreamSettings
    from stream.source_factory import open_source

    settings = StreamSettings(embedded_log_dir=tmp_path, partitions=4)
    with pytest.raises(ValueError, match=r"start_offsets name partitions \[2\] outside the assignment \[1, 3\]"):
        open_source(settings, partitions={1, 3}, start_offsets={1: 0, 2: 5})
    with pytest.raises(ValueError, match=r"start_offsets must be >= 0, got \{1: -1\}"):
        open_source(settings, partitions={1}, start_offsets={1: -1})


def _event(i: int, user: str, domain: str = "movie", ts: int = 1_400_000_000) -> InteractionEvent:
    return InteractionEvent(f"e{i}", user, f"i{i}", domain, ts + i)


def test_consumer_core_over_the_embedded_log_decodes_events_and_dead_letters(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "events", 2)
    events = [_event(i, f"u{i % 3}", "movie" if i % 2 else "book") for i in range(12)]
    records: list[tuple[bytes, bytes | None]] = [(e.user_id.encode(), encode_event(e)) for e in events]
    records.insert(5, (b"u1", b"{not json"))
    log.append_many(records)
    dlq = EmbeddedLog.open(tmp_path, "dlq", 1)
    consumer = StreamConsumer(EmbeddedSource(log), EmbeddedDeadLetters(dlq), domains=("movie", "book"))
    batch = consumer.poll(timeout_s=0)
    assert sorted(e.event_id for e in batch.events) == sorted(e.event_id for e in events)
    assert batch.dead_letters == 1
    assert consumer.stats.dead_letters_by_reason == {"bad_json": 1}
    by_user: dict[str, list[str]] = {}
    for e in batch.events:
        by_user.setdefault(e.user_id, []).append(e.event_id)
    assert by_user == {u: [e.event_id for e in events if e.user_id == u] for u in ("u0", "u1", "u2")}
    # Each event carries its own offset; the dead letter's offset is read (in ``read``) but has no event.
    ends = log.end_offsets()
    assert batch.read == {p: (0, n) for p, n in ends.items() if n > 0}
    assert batch.positions == {p: n for p, n in ends.items() if n > 0}
    u1 = log.partition_for(b"u1")
    start, stop = batch.spans[u1]
    assert stop - start == ends[u1] - 1
    assert sorted(batch.offsets[start:stop]) == batch.offsets[start:stop]
    assert set(range(ends[u1])) - set(batch.offsets[start:stop]) == {_offset_of_bad(records, u1, log)}
    assert dlq.end_offsets() == {0: 1}  # the dead letter is stored before the batch is handed out
    consumer.close()


def _offset_of_bad(records: list[tuple[bytes, bytes | None]], partition: int, log: EmbeddedLog) -> int:
    """The offset of the malformed record in its partition: records of that partition before it."""
    same = [v for k, v in records if log.partition_for(k) == partition]
    return same.index(b"{not json")


_RESTART_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from stream.embedded_log import EmbeddedLog, EmbeddedSource
    root, start = sys.argv[1], {int(p): o for p, o in json.loads(sys.argv[2]).items()}
    source = EmbeddedSource(EmbeddedLog.open(root, "t", 2), start_offsets=start, max_records=3)
    seen = [v.decode() for b in source.next_batch(timeout_s=0) for v in b.values]
    done = source.snapshot()  # what the first batch covers: all that is "trained" before the crash
    seen += [v.decode() for b in source.next_batch(timeout_s=0) for v in b.values]  # read, not done
    print(",".join(seen))
    print(json.dumps(done))
    """
)


def test_resume_across_a_real_process_restart(tmp_path: Path) -> None:
    log = EmbeddedLog.open(tmp_path, "t", 2)
    log.append_many([(b"ad"[i % 2 : i % 2 + 1], f"v{i}".encode()) for i in range(20)], fsync=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(start: str) -> tuple[list[str], str]:
        out = subprocess.run(
            [sys.executable, "-c", _RESTART_SCRIPT, str(tmp_path), start],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        )
        seen, done = out.stdout.strip().split("\n")
        return seen.split(","), done

    values = {p: [f"v{i}" for i in range(20) if partition_for(b"ad"[i % 2 : i % 2 + 1], 2) == p] for p in (0, 1)}
    assert len(values[0]) == len(values[1]) == 10
    # Batches of 3 records; the starting partition rotates: batch 1 reads partition 0, batch 2 partition 1.
    first, done = run("{}")
    assert first == values[0][0:3] + values[1][0:3]
    assert done == '{"0": 3, "1": 0}'
    second, _ = run(done)
    # Resumes exactly after what was done; partition 1's records read but not done come again.
    assert second == values[0][3:6] + values[1][0:3]
