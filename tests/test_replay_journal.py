"""``<run dir>/replay.json``: a resumed ``sitn run --events`` continues its replay or refuses, never replays twice.

Pure logic here (the journal, the plan, the resumed send); ``tests/test_run_own_data.py`` resumes a real run."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sitn.commands.run import replay_plan
from sitn.pipeline import ReplayProgress, paced_replay
from stream.dataset import open_events
from stream.events import decode_event
from stream.replay_journal import ReplayJournal, ReplayRefused, ReplaySource, file_fingerprint


def events_file(path: Path, n: int, first_ts: int = 1_400_000_000) -> Path:
    rows = ["timestamp,user_id,item_id,domain"]
    rows += [f"{first_ts + i},u{i % 7},{'book' if i % 3 else 'movie'}{i % 11},{'book' if i % 3 else 'movie'}"
             for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def source_of(path: Path, total: int = 30, limit: int | None = None) -> ReplaySource:
    return ReplaySource.of(path, ("movie", "book"), "s", limit, total)


def test_fingerprint_follows_content_not_place(tmp_path: Path) -> None:
    a = events_file(tmp_path / "a.csv", 30)
    b = tmp_path / "b.csv"
    b.write_bytes(a.read_bytes())
    assert file_fingerprint(a) == file_fingerprint(b)
    events_file(b, 31)
    assert file_fingerprint(a) != file_fingerprint(b)
    big = tmp_path / "big.bin"  # past 2 MiB: a change at the end still shows
    big.write_bytes(b"x" * (3 << 20))
    before = file_fingerprint(big)
    big.write_bytes(b"x" * ((3 << 20) - 1) + b"y")
    assert file_fingerprint(big) != before


def test_a_new_run_replays_everything_and_a_resume_only_the_rest(tmp_path: Path) -> None:
    src = source_of(events_file(tmp_path / "e.csv", 30))
    journal = ReplayJournal.in_run_dir(tmp_path / "run")
    assert journal.read() is None
    first = journal.plan(src, has_checkpoint=False)
    assert (first.skip, first.remaining, first.message) == (0, 30, None)
    journal.record(src, 12)
    resumed = journal.plan(src, has_checkpoint=True)
    assert (resumed.skip, resumed.remaining) == (12, 18)
    assert resumed.message is not None and "after the 12 events already in this run's log" in resumed.message
    journal.record(src, 30)
    done = journal.plan(src, has_checkpoint=True)
    assert (done.skip, done.remaining) == (30, 0)
    assert done.message is not None and "every one of the 30 events" in done.message


def test_a_moved_copy_resumes_but_another_file_or_other_options_are_refused(tmp_path: Path) -> None:
    original = events_file(tmp_path / "e.csv", 30)
    journal = ReplayJournal.in_run_dir(tmp_path / "run")
    journal.record(source_of(original), 12)
    moved = tmp_path / "elsewhere.csv"
    moved.write_bytes(original.read_bytes())
    assert journal.plan(source_of(moved), has_checkpoint=True).skip == 12
    other = events_file(tmp_path / "other.csv", 40)
    with pytest.raises(ReplayRefused, match=r"holds the replay of .*e\.csv \(30 events, movie -> book, time unit s\), "
                                            r"12 sent; --events now names .*other\.csv .*would mix the two"):
        journal.plan(source_of(other, total=40), has_checkpoint=True)
    with pytest.raises(ReplayRefused, match="limit 20"):
        journal.plan(source_of(original, total=20, limit=20), has_checkpoint=True)
    with pytest.raises(ReplayRefused, match="time unit ms"):
        journal.plan(ReplaySource.of(original, ("movie", "book"), "ms", None, 30), has_checkpoint=True)


def test_a_trained_run_directory_without_a_journal_refuses_events(tmp_path: Path) -> None:
    journal = ReplayJournal.in_run_dir(tmp_path / "run")
    with pytest.raises(ReplayRefused, match=r"holds a trained model but no replay\.json"):
        journal.plan(source_of(events_file(tmp_path / "e.csv", 30)), has_checkpoint=True)


def test_an_unreadable_journal_refuses_rather_than_guessing(tmp_path: Path) -> None:
    journal = ReplayJournal.in_run_dir(tmp_path / "run")
    journal.path.parent.mkdir(parents=True)
    journal.path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ReplayRefused, match=r"replay\.json cannot be read"):
        journal.plan(source_of(events_file(tmp_path / "e.csv", 30)), has_checkpoint=False)


class Run:
    """The settings ``replay_plan`` reads."""

    def __init__(self, events: Path, limit: int | None = None) -> None:
        self.events, self.source, self.target, self.limit, self.time_unit = events, "movie", "book", limit, "auto"


def test_the_run_command_records_the_file_before_sending_and_reads_the_journal_without_events(tmp_path: Path) -> None:
    path = events_file(tmp_path / "e.csv", 30)
    run = Run(path)
    journal = ReplayJournal.in_run_dir(tmp_path / "run")
    assert replay_plan(journal, None, run, has_checkpoint=False) is None  # nothing replayed, nothing to say
    log = open_events(path, "movie", "book", time_unit="auto")
    plan = replay_plan(journal, log, run, has_checkpoint=False)
    assert plan is not None and plan.skip == 0
    entry = journal.read()
    assert entry is not None and (entry.sent, entry.source.total, entry.source.time_unit) == (0, 30, "s")
    journal.record(plan.source, 17)
    without_events = replay_plan(journal, None, run, has_checkpoint=True)
    assert without_events is not None and without_events.skip == 17
    assert without_events.message is not None and "stopped after 17 of its 30 events" in without_events.message


class Producer:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, key: bytes, value: bytes | None) -> None:
        assert value is not None
        self.sent.append(decode_event(value, ("movie", "book")).event_id)

    def flush(self) -> None:
        pass


def test_a_resumed_send_starts_after_the_acknowledged_events_and_counts_them(tmp_path: Path) -> None:
    import itertools

    events = list(open_events(events_file(tmp_path / "e.csv", 30), "movie", "book", time_unit="s"))
    producer, seen = Producer(), []
    progress = ReplayProgress(total=30, sent=12, resumed_from=12)
    paced_replay(itertools.islice(events, 12, None), producer, None, progress, threading.Event(), offset=12,
                 on_sent=seen.append)
    assert producer.sent == [e.event_id for e in events[12:]]
    assert progress.sent == 30 and seen[-1] == 30 and all(n > 12 for n in seen)
