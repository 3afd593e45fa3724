"""Replay: pacing arithmetic, input checks, and ``sitn replay`` end to end into the embedded log and Kafka."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stream.dataset import load_events
from stream.embedded_log import EmbeddedLog, EmbeddedSource
from stream.events import InteractionEvent, decode_event
from stream.producer import replay
from stream.settings import StreamSettings
from stream.source import RecordBatch, Source

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 3000


class _ListProducer:
    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes | None]] = []
        self.flushed = 0

    def send(self, key: bytes, value: bytes | None) -> None:
        self.records.append((key, value))

    def flush(self) -> None:
        self.flushed = len(self.records)

    def close(self) -> None:
        pass


class _FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds


def _ev(i: int, ts: int) -> InteractionEvent:
    return InteractionEvent(f"e{i}", f"u{i % 2}", f"i{i}", "movie", ts)


def test_speed_paces_by_event_time_compression() -> None:
    clock = _FakeClock()
    producer = _ListProducer()
    day = 86_400
    events = [_ev(0, 1_400_000_000), _ev(1, 1_400_000_000), _ev(2, 1_400_000_000 + day), _ev(3, 1_400_000_000 + 3 * day)]
    stats = replay(events, producer, speed=2 * day, clock=clock, sleep=clock.sleep)
    # Event times 0, 0, 1 day, 3 days at 2 days per wall second: due at 0, 0, 0.5 and 1.5 s.
    assert clock.sleeps == pytest.approx([0.5, 1.0], abs=1e-9)
    assert stats.events == 4 and stats.wall_s == pytest.approx(1.5, abs=1e-9)
    assert [k for k, _ in producer.records] == [b"u0", b"u1", b"u0", b"u1"]
    assert producer.flushed == 4


def test_max_speed_never_sleeps_and_reports_progress() -> None:
    clock = _FakeClock()
    seen: list[int] = []
    events = [_ev(i, 1_400_000_000 + i * 1000) for i in range(25)]
    replay(events, _ListProducer(), speed=None, on_progress=seen.append, progress_every=10, clock=clock,
           sleep=clock.sleep)
    assert clock.sleeps == []
    assert seen == [10, 10, 5]


def test_replay_rejects_bad_speed_and_unordered_events() -> None:
    with pytest.raises(ValueError, match=r"speed must be > 0 event-time seconds per wall second, or None \(max\), got 0"):
        replay([_ev(0, 1_400_000_000)], _ListProducer(), speed=0)
    with pytest.raises(ValueError, match=r"events must be in event-time order"):
        replay([_ev(0, 1_400_000_005), _ev(1, 1_400_000_000)], _ListProducer())


def _run_cli(env_extra: dict[str, str], events_csv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITN_")}
    env.update(env_extra, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "sitn", "replay", "--events", str(events_csv), "--limit", str(N_ROWS), *args],
        capture_output=True, text=True, env=env, timeout=180, check=True,
    )


def _read_everything(source: Source, expected: int, timeout_s: float) -> list[RecordBatch]:
    batches: list[RecordBatch] = []
    deadline = time.monotonic() + timeout_s
    while sum(len(b) for b in batches) < expected:
        assert time.monotonic() < deadline, f"read {sum(len(b) for b in batches)} of {expected} within {timeout_s}s"
        batches += source.next_batch(timeout_s=0.5)
    return batches


def _check_partitioned_in_event_time(batches: list[RecordBatch], events: list[InteractionEvent]) -> None:
    decoded: dict[int, list[InteractionEvent]] = {}
    for b in batches:
        decoded.setdefault(b.partition, []).extend(decode_event(v, ("movie", "book")) for v in b.values)
    assert sorted(e.event_id for es in decoded.values() for e in es) == sorted(e.event_id for e in events)
    partition_of_user: dict[str, int] = {}
    for p, es in decoded.items():
        assert [e.timestamp for e in es] == sorted(e.timestamp for e in es)  # event-time order per partition
        for e in es:
            assert partition_of_user.setdefault(e.user_id, p) == p  # one user, one partition
    # Within a user, the order is exactly the loader's (same-second ties in file order).
    for user in list(partition_of_user)[:200]:
        got = [e.event_id for e in decoded[partition_of_user[user]] if e.user_id == user]
        assert got == [e.event_id for e in events if e.user_id == user]


def test_cli_replays_into_the_embedded_log(events_csv: Path, tmp_path: Path) -> None:
    out = _run_cli({"SITN_EMBEDDED_LOG_DIR": str(tmp_path), "SITN_PARTITIONS": "3"}, events_csv, "--max", "--no-progress")
    events = load_events(events_csv, "movie", "book", limit=N_ROWS).events
    assert f"replayed {len(events):,} events to sitn.interactions" in out.stderr
    log = EmbeddedLog.open(tmp_path, "sitn.interactions", 3)
    assert sum(log.end_offsets().values()) == len(events)
    _check_partitioned_in_event_time(_read_everything(EmbeddedSource(log), len(events), 10), events)


def test_cli_rejects_speed_with_max(events_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        _run_cli({"SITN_EMBEDDED_LOG_DIR": str(tmp_path)}, events_csv, "--max", "--speed", "10")
    assert "sitn replay: error: argument --speed: not allowed with argument --max" in err.value.stderr
    assert err.value.returncode == 2


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_cli_replays_into_kafka_keyed_by_user(kafka_broker: object, events_csv: Path) -> None:
    from stream.kafka_source import KafkaSource

    run = uuid.uuid4().hex[:8]
    servers: str = kafka_broker.bootstrap_servers  # type: ignore[attr-defined]
    env = {
        "SITN_KAFKA_BOOTSTRAP_SERVERS": servers,
        "SITN_TOPIC_INTERACTIONS": f"replay-{run}",
        "SITN_TOPIC_DEAD_LETTERS": f"replay-dlq-{run}",
        "SITN_TOPIC_EMBEDDING_UPDATES": f"replay-up-{run}",
        "SITN_PARTITIONS": "3",
    }
    out = _run_cli(env, events_csv, "--max")
    events = load_events(events_csv, "movie", "book", limit=N_ROWS).events
    assert f"replayed {len(events):,} events to replay-{run}" in out.stderr
    settings = StreamSettings(kafka_bootstrap_servers=servers, batch_size=1000)
    source = KafkaSource(settings, topic=f"replay-{run}", partitions={0, 1, 2})
    try:
        batches = _read_everything(source, len(events), 60)
    finally:
        source.close()
    assert {b.partition for b in batches} == {0, 1, 2}
    _check_partitioned_in_event_time(batches, events)
