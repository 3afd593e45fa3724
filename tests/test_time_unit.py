"""Timestamps in any common form: each is detected, read into events that pass the wire schema's validation,
and keeps every user's order (``stream.time_unit``, ``stream.dataset.load_events``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from stream.dataset import load_events
from stream.errors import DataFormatError
from stream.events import decode_event, encode_event
from stream.time_unit import ORDINAL_EPOCH_S, TimeColumnStats

HEADER = "timestamp,user_id,item_id,domain\n"
DOMAINS = ("movie", "book")
# (user, item, domain) in file order; per user, the order is the order of their events in time.
ROWS = [("u1", "m1", "movie"), ("u2", "m2", "movie"), ("u1", "b1", "book"), ("u2", "b2", "book"),
        ("u1", "m3", "movie"), ("u3", "b1", "book")]
SECONDS = [1_400_000_000, 1_400_000_100, 1_400_000_050, 1_400_003_600, 1_400_086_400, 1_400_086_400]


def write(tmp_path: Path, stamps: list[str], name: str = "events.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{t},{u},{i},{d}\n" for t, (u, i, d) in zip(stamps, ROWS, strict=True)),
                    encoding="utf-8")
    return path


def iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def per_user_items(events: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e.user_id, []).append(e.item_id)
    return out


FORMS = {
    "s": [str(t) for t in SECONDS],
    "ms": [str(t * 1000 + 7) for t in SECONDS],
    "iso": [iso(t) for t in SECONDS],
}


@pytest.mark.parametrize("unit", ["s", "ms", "iso"])
def test_clock_forms_detected_and_read_to_the_same_seconds(tmp_path: Path, unit: str) -> None:
    log = load_events(write(tmp_path, FORMS[unit]), *DOMAINS, time_unit="auto")
    assert log.time is not None
    assert (log.time.unit, log.time.requested, log.time.fitting, log.time.rows) == (unit, "auto", 6, 6)
    assert sorted(e.timestamp for e in log.events) == sorted(SECONDS)  # ms floored, ISO 'Z' read as UTC
    assert [e.item_id for e in log.events] == ["m1", "b1", "m2", "b2", "m3", "b1"]  # time order, ties in file order
    for e in log.events:
        assert decode_event(encode_event(e), DOMAINS) == e  # passes the stream's validation
    # The same file read with its unit given gives the same events.
    assert load_events(write(tmp_path, FORMS[unit]), *DOMAINS, time_unit=unit).events == log.events


def test_ordinal_positions_keep_per_user_order_and_pass_validation(tmp_path: Path) -> None:
    # Per-user positions, as in the log: every user starts at 0, so positions tie across users.
    positions = ["0", "0", "1", "1", "2", "0"]
    log = load_events(write(tmp_path, positions), *DOMAINS, time_unit="auto")
    assert log.time is not None and (log.time.unit, log.time.step_s) == ("ordinal", 86_400)
    assert log.time.describe() == ("ordinal positions, one position = 1 day from 2000-01-01 "
                                   "(auto-detected: 6 of 6 values fit)")
    # Position p is day p from 2000-01-01; ties keep file order (deterministic).
    assert [(e.user_id, e.item_id, e.timestamp) for e in log.events] == [
        ("u1", "m1", ORDINAL_EPOCH_S), ("u2", "m2", ORDINAL_EPOCH_S), ("u3", "b1", ORDINAL_EPOCH_S),
        ("u1", "b1", ORDINAL_EPOCH_S + 86_400), ("u2", "b2", ORDINAL_EPOCH_S + 86_400),
        ("u1", "m3", ORDINAL_EPOCH_S + 2 * 86_400),
    ]
    assert per_user_items(log.events) == {"u1": ["m1", "b1", "m3"], "u2": ["m2", "b2"], "u3": ["b1"]}
    for e in log.events:
        assert decode_event(encode_event(e), DOMAINS) == e


def test_ordinal_order_comes_from_positions_not_from_file_order(tmp_path: Path) -> None:
    # u1's rows are written newest first: the positions, not the file, give the order.
    log = load_events(write(tmp_path, ["2", "0", "1", "1", "0", "5"]), *DOMAINS, time_unit="ordinal")
    assert per_user_items(log.events) == {"u1": ["m3", "b1", "m1"], "u2": ["m2", "b2"], "u3": ["b1"]}


def test_ordinal_positions_past_a_century_are_compressed_to_fit_the_window(tmp_path: Path) -> None:
    log = load_events(write(tmp_path, ["0", "1", "2", "3", "4", "1000000"]), *DOMAINS, time_unit="ordinal")
    assert log.time is not None and log.time.step_s == 3155
    assert max(e.timestamp for e in log.events) == ORDINAL_EPOCH_S + 1_000_000 * 3155
    for e in log.events:
        assert decode_event(encode_event(e), DOMAINS) == e


def test_auto_takes_the_unit_most_values_fit_and_counts_the_rest(tmp_path: Path) -> None:
    stamps = [str(t) for t in SECONDS[:5]] + ["0"]  # one stray 0 among unix seconds
    log = load_events(write(tmp_path, stamps), *DOMAINS, time_unit="auto")
    assert log.time is not None and (log.time.unit, log.time.fitting) == ("s", 5)
    assert min(e.timestamp for e in log.events) == 0  # passed through: the stream dead-letters it
    with pytest.raises(Exception, match=r"bad_timestamp: got 0, allowed \[631152000, 4102444800\) unix seconds"):
        decode_event(encode_event(log.events[0]), DOMAINS)


def test_detection_ties_and_empty_columns() -> None:
    assert TimeColumnStats.of([]).choose("auto").unit == "s"  # nothing to detect: the wire's unit
    assert TimeColumnStats.of(["1400000000", "1400000000000"]).choose("auto").unit == "s"  # tie: s before ms
    assert TimeColumnStats.of(["abc", "def"]).choose("auto").fitting == 0


def test_a_value_unreadable_in_the_chosen_unit_names_file_and_line(tmp_path: Path) -> None:
    stamps = [iso(t) for t in SECONDS[:4]] + ["yesterday", iso(SECONDS[5])]
    with pytest.raises(DataFormatError) as err:
        load_events(write(tmp_path, stamps), *DOMAINS, time_unit="auto")
    assert str(err.value) == f"{tmp_path}/events.csv:6: timestamp 'yesterday' is not an ISO-8601 date or time"
    with pytest.raises(DataFormatError, match=r"events.csv:2: timestamp '1.5' is not a whole number >= 0"):
        load_events(write(tmp_path, ["1.5", "0", "1", "2", "3", "4"]), *DOMAINS, time_unit="ordinal")
