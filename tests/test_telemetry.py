"""Metrics discovery (file_sd targets files) and the per-process exporter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import orjson

from stream.exporter import (
    TelemetrySettings,
    _node,
    prune_targets,
    start_exporter,
    write_target,
)


def read_targets(targets_dir: Path) -> list[tuple[str, str]]:
    """``(component, host:port)`` of every registered process, in file order (what Prometheus's file_sd reads)."""
    out: list[tuple[str, str]] = []
    for path in sorted(targets_dir.glob("*.json")):
        for entry in orjson.loads(path.read_bytes()):
            out.extend((str(entry.get("labels", {}).get("component", "")), str(target)) for target in entry["targets"])
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_targets_files_are_pruned_only_for_this_nodes_dead_processes(tmp_path: Path) -> None:
    gone = dead_pid()
    ours_dead = tmp_path / f"learner-{_node()}-{gone}.json"
    other_node = tmp_path / f"learner-othernode-{gone}.json"  # same pid number, another machine: not ours to judge
    for path in (ours_dead, other_node):
        path.write_bytes(orjson.dumps([{"targets": ["10.0.0.9:1"], "labels": {"component": "learner"}}]))
    path = write_target(tmp_path, "consumer", "127.0.0.1:9401", {"extra": "x"})
    assert not ours_dead.exists() and other_node.exists() and path.exists()
    entry = orjson.loads(path.read_bytes())[0]
    assert entry == {"targets": ["127.0.0.1:9401"], "labels": {"job": "sitn", "component": "consumer", "extra": "x"}}
    assert sorted(read_targets(tmp_path)) == [("consumer", "127.0.0.1:9401"), ("learner", "10.0.0.9:1")]
    assert prune_targets(tmp_path) == []  # our own live process stays


def test_exporter_serves_this_process_registry_and_registers_it(tmp_path: Path) -> None:
    from stream import telemetry as stream_metrics

    exporter = start_exporter(TelemetrySettings(), "consumer", tmp_path)
    assert exporter is not None and exporter.target_file is not None
    stream_metrics.RECORDS_CONSUMED.inc(3)
    body = httpx.get(exporter.url, timeout=5).text
    assert "sitn_stream_records_consumed_total" in body
    assert read_targets(tmp_path) == [("consumer", exporter.url.removeprefix("http://").removesuffix("/metrics"))]
    exporter.unregister()
    assert read_targets(tmp_path) == []
    assert start_exporter(TelemetrySettings(enabled=False), "consumer", tmp_path) is None
