"""Benchmarks' ``--json PATH`` records: real bench scripts run as subprocesses at tiny sizes.

Each record must parse, carry the run's configuration, commit, load average and machine facts, and hold
the figures the bench prints as finite numbers, quality next to speed.
"""

from __future__ import annotations

import doctest
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bench.report

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *options: str, tmp_path: Path, timeout_s: float = 120.0) -> tuple[str, dict[str, Any]]:
    """Run ``bench/<script>`` with ``options`` and ``--json``; its stdout and the parsed record."""
    path = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *options, "--json", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout, json.loads(path.read_text())


def assert_envelope(record: dict[str, Any], bench: str, argv: list[str]) -> None:
    """The parts every record has, whatever the bench."""
    assert record["bench"] == bench
    assert record["argv"] == argv
    assert len(record["commit"]["hash"]) >= 7 and isinstance(record["commit"]["dirty"], bool)
    machine = record["machine"]
    assert machine["cpu_count"] >= 1
    for key in ("load_avg_start", "load_avg_end"):
        assert len(machine[key]) == 3 and all(x >= 0 and math.isfinite(x) for x in machine[key])
    assert machine["packages"]["numpy"]
    assert record["wall_s"] > 0
    assert record["finished_at_utc"] >= record["started_at_utc"]


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_report_examples_run() -> None:
    """bench/ is outside pytest's doctest collection (scripts); the record module's examples run here."""
    result = doctest.testmod(bench.report, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


def test_bench_index_json(tmp_path: Path) -> None:
    options = ["--items", "2000", "--queries", "200", "--clusters", "16", "--views", "1,4", "--seed", "3"]
    stdout, record = run_bench("bench_index.py", *options, tmp_path=tmp_path)
    assert_envelope(record, "bench_index", [*options, "--json", str(tmp_path / "bench_index.py.json")])
    assert record["config"]["items"] == 2000 and record["config"]["views"] == "1,4"
    assert record["config"]["json"] == str(tmp_path / "bench_index.py.json")
    figures = record["figures"]
    assert (figures["k"], figures["fetch"]) == (10, 30)
    rows = figures["rows"]
    # 1 exact + 4 + 4 efSearch + 5 + 5 nprobe settings, each a printed row
    assert [(r["index"], r["value"]) for r in rows][:3] == [("Flat", None), ("HNSW16", 16), ("HNSW16", 32)]
    assert len(rows) == 19 == sum(line.startswith(("Flat", "HNSW", "IVF")) for line in stdout.splitlines())
    for row in rows:
        assert 0.0 <= row["recall_at_k"] <= 1.0
        assert finite(row["build_s"])
        assert set(row["latency_ms_by_views"]) == {"1", "4"}
        for v, lat in row["latency_ms_by_views"].items():
            assert finite(lat["p50"]) and finite(lat["p99"]) and 0 < lat["p50"] <= lat["p99"]
            assert lat["requests"] == 200 // int(v)
    assert rows[0]["recall_at_k"] == 1.0  # exact search finds the exact top-k
    # the printed table is the record's figures (recall to 4 decimals)
    flat = next(line for line in stdout.splitlines() if line.startswith("Flat"))
    assert flat.split()[2] == "1.0000"


def test_bench_drift_input_json(tmp_path: Path) -> None:
    options = ["--part", "input", "--seeds", "1", "--events", "80000", "--kinds", "none", "domain_mix"]
    stdout, record = run_bench("bench_drift.py", *options, tmp_path=tmp_path)
    assert_envelope(record, "bench_drift", [*options, "--json", str(tmp_path / "bench_drift.py.json")])
    assert (record["config"]["events"], record["config"]["kinds"]) == (80000, ["none", "domain_mix"])
    figures = record["figures"]
    assert figures["settings"]["reference_window_events"] == 20000
    assert figures["model"] == []
    none, mix = figures["input"]
    assert (none["kind"], none["stationary"], none["unit"]) == ("none", 80000, "events")
    assert (mix["kind"], mix["stationary"]) == ("domain_mix", 40000)  # injected at the middle
    for summary in (none, mix):
        assert summary["seeds"] == 1
        assert finite(summary["false_alarm_rate"])
        assert summary["false_alarm_rate"] == summary["false_alarms"] / summary["stationary"] * 1e6
        assert finite(summary["monitor_cost_us"]["median"]) and finite(summary["monitor_cost_us"]["p90"])
    found = mix["signals"]["input_domain_mix"]  # the quality: the shift is caught, and how late
    assert found["found"] == 1 and len(found["delays"]) == 1
    assert finite(found["delay_median"]) and 0 <= found["delay_median"] <= 40000
    assert found["delay_min"] == found["delay_max"] == found["delay_median"]
    assert f"delay_events median {found['delay_median']:9.0f}" in stdout


def test_bench_stream_embedded_json(tmp_path: Path) -> None:
    missing = tmp_path / "no-events.csv"  # the seeded synthetic workload: no shared data needed
    options = ["--events", str(missing), "--limit", "4000", "--repeats", "2", "--batch-sizes", "500,2000",
               "--backends", "embedded"]
    stdout, record = run_bench("bench_stream.py", *options, tmp_path=tmp_path)
    assert_envelope(record, "bench_stream", [*options, "--json", str(tmp_path / "bench_stream.py.json")])
    assert record["config"]["events"] == str(missing) and record["config"]["repeats"] == 2
    figures = record["figures"]
    assert (figures["workload"], figures["events"]) == ("synthetic, seed 0", 4000)
    assert "kafka" not in figures
    embedded = figures["embedded"]
    assert embedded["replay"]["events"] == 4000 and finite(embedded["replay"]["events_per_s"])
    assert finite(embedded["load_avg_1m_before"]) and finite(embedded["load_avg_1m_after"])
    assert [row["batch_size"] for row in embedded["batches"]] == [500, 2000]
    for row in embedded["batches"]:
        # the count check next to the speed: every event out decoded, none dead-lettered
        assert (row["events_in"], row["events_out"], row["dead_letters_max"], row["ok"]) == (4000, [4000], 0, True)
        for rate in (row["wall_events_per_s"], row["cpu_events_per_s"]):
            assert len(rate["runs"]) == 2 and all(finite(x) and x > 0 for x in rate["runs"])
            assert rate["min"] <= rate["median"] <= rate["max"]
            assert (rate["min"], rate["max"]) == (min(rate["runs"]), max(rate["runs"]))
        assert f"{row['wall_events_per_s']['median']:>17,.0f}" in stdout


def test_pipeline_request_users_share_and_growth() -> None:
    """bench_pipeline's load: the share of entries naming served users is the one asked for, and an entry
    never changes as the served users grow (the load reads the list while it grows)."""
    from bench.bench_pipeline import RequestUsers

    runner = doctest.DocTestRunner()  # the class's own examples (bench/ is outside doctest collection)
    for test in doctest.DocTestFinder().find(RequestUsers, "RequestUsers"):
        runner.run(test)
    assert runner.summarize(verbose=False) == (0, 3)

    known = [f"u{n}" for n in range(1000)]
    for fraction in (1.0, 0.8 / 0.9, 0.5, 0.25):
        users = RequestUsers(known, fraction)
        entries = list(users)
        named = [u for u in entries if not u.startswith("new-user-")]
        assert named == known  # every served user once, in order
        assert abs(len(named) / len(entries) - fraction) <= 1 / len(entries)
    growing: list[str] = ["a", "b"]
    users = RequestUsers(growing, 0.5)
    before = list(users)
    growing.extend(["c", "d"])
    assert list(users)[: len(before)] == before == ["new-user-0", "a", "new-user-2", "b"]
    assert list(users) == ["new-user-0", "a", "new-user-2", "b", "new-user-4", "c", "new-user-6", "d"]
    assert list(RequestUsers(growing, 0.0)) == ["new-user-0"]
    with pytest.raises(ValueError, match=re.escape("known_fraction must be in [0, 1], got 1.5")):
        RequestUsers(growing, 1.5)
