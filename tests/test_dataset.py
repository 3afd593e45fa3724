"""The events.csv loader: order, domain filtering, and errors that name file, line and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.dataset import EventFile, EventLog, load_events, open_events
from stream.errors import DataFormatError

HEADER = "timestamp,user_id,item_id,domain,extra\n"


def write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "events.csv"
    path.write_text(header + body, encoding="utf-8")
    return path


def test_chronological_with_ties_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "20,u1,a,movie,x\n10,u2,b,book,x\n20,u1,c,book,x\n10,u1,d,movie,x\n")
    log = load_events(path, "movie", "book")
    assert [(e.timestamp, e.item_id) for e in log.events] == [(10, "b"), (10, "d"), (20, "a"), (20, "c")]
    assert [e.event_id for e in log.events] == ["events:3", "events:5", "events:2", "events:4"]


def test_other_domains_skipped_and_counted(tmp_path: Path) -> None:
    path = write(tmp_path, "1,u,a,movie,\n2,u,b,music,\n3,u,c,book,\n4,u,d,music,\n")
    log = load_events(path, "book", "movie")  # either direction, any names
    assert [e.item_id for e in log.events] == ["a", "c"]
    assert dict(log.skipped_by_domain) == {"music": 2}


def test_limit_keeps_first_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "3,u,a,movie,\n2,u,b,book,\n1,u,c,book,\n")
    assert [e.item_id for e in load_events(path, "movie", "book", limit=2).events] == ["b", "a"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("abc,u,a,movie,x\n", "events.csv:2: timestamp 'abc' is not a number (unix seconds)"),
        ("1,u,a,movie,x\n2,u,b\n", "events.csv:3: expected 5 fields, got 3"),
        ("1,,a,movie,x\n", "events.csv:2: user_id is empty"),
        ("1,u,,movie,x\n", "events.csv:2: item_id is empty"),
        ("1,u,a,,x\n", "events.csv:2: domain is empty"),
        ("-5,u,a,movie,x\n", "events.csv:2: timestamp -5 is negative"),
    ],
)
def test_malformed_rows_name_file_line_problem(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(DataFormatError) as err:
        load_events(path, "movie", "book")
    assert str(err.value) == f"{tmp_path}/{message}"


def test_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, "1,u,a\n", header="timestamp,user_id,item_id\n")
    with pytest.raises(DataFormatError, match=r"events.csv:1: header lacks column\(s\) \['domain'\]"):
        load_events(path, "movie", "book")


def test_same_domains_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source and target domains must differ, got 'book' twice"):
        load_events(write(tmp_path, ""), "book", "book")


def test_shipped_data_set(events_csv: Path) -> None:
    log = load_events(events_csv, "movie", "book")
    assert len(log) == 148_205  # PROVENANCE.md
    assert sum(e.domain == "book" for e in log.events) == 74_629
    assert all(a.timestamp <= b.timestamp for a, b in zip(log.events, log.events[1:], strict=False))
    assert not log.skipped_by_domain


def test_open_events_streams_a_chronological_file_as_load_events_reads_it(tmp_path: Path) -> None:
    path = write(tmp_path, "1,u1,a,movie,x\n1,u2,b,book,x\n2,u1,c,music,x\n5,u1,d,book,x\n9,u2,e,movie,x\n")
    streamed = open_events(path, "movie", "book")
    assert isinstance(streamed, EventFile)  # chronological: not held in memory
    loaded = load_events(path, "movie", "book")
    assert len(streamed) == len(loaded) == 4
    assert list(streamed) == loaded.events
    assert list(streamed) == loaded.events  # every iteration reads the file again
    assert dict(streamed.skipped_by_domain) == {"music": 1}
    assert streamed.time.unit == loaded.time.unit == "s"
    assert [e.item_id for e in open_events(path, "movie", "book", limit=2)] == ["a", "b"]


def test_open_events_sorts_a_file_that_is_not_chronological_in_memory(tmp_path: Path) -> None:
    path = write(tmp_path, "20,u1,a,movie,x\n10,u2,b,book,x\n20,u1,c,book,x\n")
    opened = open_events(path, "movie", "book")
    assert isinstance(opened, EventLog)
    assert [e.item_id for e in opened] == ["b", "a", "c"]


def test_open_events_reads_other_time_units_and_fails_like_load_events(tmp_path: Path) -> None:
    path = write(tmp_path, "1700000000000,u1,a,movie,x\n1700000001000,u1,b,book,x\n")
    opened = open_events(path, "movie", "book", time_unit="auto")
    assert isinstance(opened, EventFile) and opened.time.unit == "ms"
    assert [e.timestamp for e in opened] == [1700000000, 1700000001]
    broken = write(tmp_path, "1,u1,a,movie,x\n2,u1,b\n")
    with pytest.raises(DataFormatError, match=r"events\.csv:3: expected 5 fields, got 3"):
        open_events(broken, "movie", "book")
