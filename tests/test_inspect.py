"""``sitn inspect``: the report's values against a small handmade file, the same validation as the stream, and
the exit status a script can test before starting a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sitn.cli import main
from stream.events import MAX_ID_CHARS

LONG_USER = "x" * (MAX_ID_CHARS + 44)
ROWS = [  # line 2 onwards
    "1400000000,a,m1,movie",
    "1400000100,a,b1,book",
    "1400000200,a,m2,movie",
    "1400000300,b,m1,movie",
    "1400000400,b,m3,movie",
    "1400000500,c,b2,book",
    "0,c,b3,book",  # line 8: out of the wire's time window -> bad_timestamp
    f"1400000600,{LONG_USER},m1,movie",  # line 9: user_id too long -> bad_value
    "1400000700,d,x1,music",  # another domain: skipped by the reader, not a dead letter
]


def write(tmp_path: Path, rows: list[str], name: str = "events.csv") -> Path:
    path = tmp_path / name
    path.write_text("timestamp,user_id,item_id,domain\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def inspect_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(["inspect", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_report_of_a_handmade_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = inspect_json(capsys, "--events", str(write(tmp_path, ROWS)), "--source", "movie",
                                "--target", "book")
    assert report["rows"] == 9
    assert report["rows_by_domain"] == {"movie": 5, "book": 3, "music": 1}
    assert (report["domains"], report["rows_kept"], report["rows_skipped_other_domains"]) == (["movie", "book"], 8, 1)
    time = report["time"]
    assert (time["unit"], time["requested"], time["rows"], time["fitting"]) == ("s", "auto", 8, 7)
    assert (time["first"], time["last"]) == ("2014-05-13T16:53:20Z", "2014-05-13T17:01:40Z")
    assert (time["first_unix_s"], time["last_unix_s"]) == (1_400_000_000, 1_400_000_500)
    assert (report["users"], report["overlap_users"], report["events_valid"]) == (3, 1, 6)  # overlap: a
    assert report["per_domain"] == {
        "movie": {"events": 4, "users": 2, "items": 3, "history_length": {"min": 2, "median": 2, "p90": 2, "max": 2}},
        "book": {"events": 2, "users": 2, "items": 2, "history_length": {"min": 1, "median": 1, "p90": 1, "max": 1}},
    }
    assert report["dead_letters"] == 2
    assert report["dead_letters_by_reason"] == {"bad_timestamp": 1, "bad_value": 1}
    assert report["dead_letter_examples"] == {
        "bad_timestamp": "line 8: got 0, allowed [631152000, 4102444800) unix seconds",
        "bad_value": f"line 9: 'user_id' must have 1..{MAX_ID_CHARS} characters, got {len(LONG_USER)}",
    }
    assert report["problems"] == ["would dead-letter 2 of 8 rows (25.0%), above the threshold of 1.0%"]
    assert code == 1  # a run of this file would fail its exit check


def test_history_percentiles_and_every_domain_without_source_and_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # u0 has 1 movie event, u1 2, ... u9 10 (ms timestamps, detected); u9 alone also has a book event.
    rows = [f"{1_500_000_000_000 + 1000 * (10 * u + k)},u{u},m{k},movie" for u in range(10) for k in range(u + 1)]
    rows.append("1500000200000,u9,b1,book")
    code, report = inspect_json(capsys, "--events", str(write(tmp_path, rows)))
    assert code == 0 and report["problems"] == []
    assert report["domains"] == ["book", "movie"] and report["source_target"] is False
    assert report["time"]["unit"] == "ms" and report["time"]["fitting"] == 56
    assert report["per_domain"]["movie"]["history_length"] == {"min": 1, "median": 5.5, "p90": 9, "max": 10}
    assert report["per_domain"]["book"] == {"events": 1, "users": 1, "items": 1,
                                            "history_length": {"min": 1, "median": 1, "p90": 1, "max": 1}}
    assert (report["users"], report["overlap_users"], report["dead_letters"]) == (10, 1, 0)


def test_ordinal_file_read_as_seconds_is_flagged_before_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [f"{k},u{u},i{k},{'tab9' if k % 2 else 'tab4'}" for u in range(3) for k in range(4)]
    path = write(tmp_path, rows)
    code, report = inspect_json(capsys, "--events", str(path), "--source", "tab9", "--target", "tab4",
                                "--time-unit", "s")
    assert code == 1
    assert report["dead_letters_by_reason"] == {"bad_timestamp": 12} and report["events_valid"] == 0
    assert report["problems"][0] == "would train nothing: 0 of 12 events to replay"
    code, report = inspect_json(capsys, "--events", str(path), "--source", "tab9", "--target", "tab4")
    assert code == 0
    assert (report["time"]["unit"], report["time"]["ordinal_step_s"]) == ("ordinal", 86_400)
    assert (report["time"]["first"], report["time"]["last"]) == ("2000-01-01T00:00:00Z", "2000-01-04T00:00:00Z")
    assert (report["events_valid"], report["overlap_users"]) == (12, 3)


def test_readable_report_and_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--events", str(write(tmp_path, ROWS)), "--source", "movie", "--target", "book"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "unix seconds (auto-detected: 7 of 8 values fit)" in out
    assert "would be dead-lettered │ 2 (bad_timestamp 1, bad_value 1)" in out
    assert main(["inspect", "--events", str(write(tmp_path, ["1,u,a"], "short.csv"))]) == 1
    assert f"{tmp_path}/short.csv:2: expected 4 fields, got 3" in " ".join(capsys.readouterr().err.split())
    assert main(["inspect", "--events", str(tmp_path / "missing.csv")]) == 1
    assert "events file not found" in capsys.readouterr().err
