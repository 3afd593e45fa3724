"""``sitn run`` on a log of another shape, end to end as a user runs it (a subprocess, the embedded log, its own
local Ray cluster): ordinal timestamps are detected and the run trains; a run whose records are all dead
letters fails loudly (exit status 1, the reason, an example record, ``summary.json``); a file without the
domains asked for stops before anything starts."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sitn.cli import main
from stream.events import MAX_TIMESTAMP_S, MIN_TIMESTAMP_S

USERS, EVENTS_PER_USER = 40, 15
RUN_TIMEOUT_S = 240


def ordinal_file(tmp_path: Path) -> Path:
    """Per-user positions 0..14 as the timestamp column (the issue's log shape), domains tab9 and tab4."""
    rng = random.Random(0)
    rows = ["timestamp,user_id,item_id,domain"]
    for user in range(USERS):
        for k in range(EVENTS_PER_USER):
            domain = "tab9" if rng.random() < 0.6 else "tab4"
            rows.append(f"{k},user{user},{domain}-item{rng.randrange(30)},{domain}")
    path = tmp_path / "ordinal.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def sitn_run(tmp_path: Path, events: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "sitn", "run", "--events", str(events), "--source", "tab9", "--target", "tab4",
            "--max", "--exit-after-replay", "--run-dir", str(run_dir), "--port", "0", "--consumers", "1",
            "--partitions", "2", "--batch-size", "32", "--learner-dim", "16", "--learner-max-len", "10",
            "--checkpoint-every-steps", "5", *extra]
    env = {**os.environ, "SITN_METRICS_DASHBOARD_PORT": "0", "COLUMNS": "250", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return done, summary


@pytest.mark.ray
@pytest.mark.slow
def test_ordinal_time_file_is_detected_and_trains(tmp_path: Path) -> None:
    done, summary = sitn_run(tmp_path, ordinal_file(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ordinal positions, one position = 1 day from 2000-01-01 (auto-detected: 600 of 600 values fit)" in (
        " ".join(done.stderr.split()))
    n = USERS * EVENTS_PER_USER
    assert (summary["ok"], summary["problems"]) == (True, [])
    assert (summary["events_replayed"], summary["events_trained"], summary["dead_letters"]) == (n, n, 0)
    assert summary["records_consumed"] == n and summary["dead_letters_by_reason"] == {}
    assert summary["prequential"]["target_events"] > 0  # target events were ranked before learning them
    # Its output is not a terminal: the live table's figures come as a log line per tick instead.
    assert re.search(rf"status replayed [\d,]+/{n:,} \(.*\| trained [\d,]+ \| dead letters 0 \|", done.stderr), (
        done.stderr[-3000:])


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_whose_records_are_all_dead_letters_fails_naming_the_reason(tmp_path: Path) -> None:
    # The failure: ordinal positions read as unix seconds, so every record fails the wire's time check.
    done, summary = sitn_run(tmp_path, ordinal_file(tmp_path), "--time-unit", "s")
    n = USERS * EVENTS_PER_USER
    assert done.returncode == 1, done.stderr[-3000:]
    err = " ".join(done.stderr.split())
    assert "unix seconds (as given: 0 of 600 values fit); --time-unit auto would read them as ordinal positions" in err
    assert "warning: dead letters: 100.0% of the last 600 records (threshold 1.0%); top reason bad_timestamp (600)" in err
    assert f"allowed [{MIN_TIMESTAMP_S}, {MAX_TIMESTAMP_S}) unix seconds; record b'{{\"schema_version\":1" in err
    assert "sitn run failed: trained nothing: 0 of 600 events to replay" in err
    assert "sitn run failed: dead-lettered 600 of 600 records consumed (100.0%), above the threshold of 1.0%" in err
    assert "hint (bad_timestamp):" in err
    assert summary["ok"] is False and len(summary["problems"]) == 2
    assert (summary["events_trained"], summary["dead_letters"], summary["dead_letter_ratio"]) == (0, n, 1.0)
    assert summary["dead_letters_by_reason"] == {"bad_timestamp": n}
    assert summary["dead_letter_examples"]["bad_timestamp"].startswith("partition ")


def test_a_file_without_the_domains_asked_for_stops_before_starting(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    events = ordinal_file(tmp_path)
    code = main(["run", "--events", str(events), "--source", "movie", "--target", "book",
                 "--run-dir", str(tmp_path / "run")])
    assert code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"sitn run: no events of domains 'movie' and 'book' in {events}; its other domains: tab9 (" in err
    assert "Nothing was started." in err
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_resuming_with_the_same_events_replays_nothing_twice_and_another_file_is_refused(tmp_path: Path) -> None:
    events = ordinal_file(tmp_path)
    n = USERS * EVENTS_PER_USER
    first, summary = sitn_run(tmp_path, events)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (summary["events_replayed"], summary["events_trained"]) == (n, n)
    journal = json.loads((tmp_path / "run" / "replay.json").read_text())
    assert journal["sent"] == n and journal["source"]["total"] == n and journal["source"]["time_unit"] == "ordinal"

    # Given again (the README's resume command), the file is not replayed a second time: the run finds every
    # event in its log, trains nothing new and ends, its model and counts those of the first run.
    again, summary = sitn_run(tmp_path, events)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"every one of the {n} events of {events.resolve()} is already in this run's log" in (
        " ".join(again.stderr.split()))
    assert (summary["events_replayed"], summary["events_trained"], summary["records_consumed"]) == (n, n, n)

    # Another file into the same run directory would mix two replays in one log: refused before anything starts.
    other = tmp_path / "other.csv"
    other.write_text(events.read_text(encoding="utf-8") + "15,user0,tab4-item1,tab4\n", encoding="utf-8")
    refused, _ = sitn_run(tmp_path, other)
    assert refused.returncode == 1
    err = " ".join(refused.stderr.split())
    assert f"sitn run: not started: this run directory's log holds the replay of {events.resolve()} ({n} events" in err
    assert "would mix the two" in err
