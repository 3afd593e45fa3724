"""``sitn run --ray-address`` on a real two-node Ray cluster (two raylets on this machine, started with the
Ray CLI by ``tests/fixtures/ray_multinode.py``).

The run is the user's command in its own process: the consumers are placed on the second node
(``--consumer-resource worker_node``), the learner and serving on the head (``--learner-resource head``).
The test checks where every actor ran (``summary.json``'s ``ray_nodes`` against ``ray.nodes()``), that
every replayed event was trained with no dead letter, and that ``/recommend`` answered from a published
model during the run. The embedded log lives on this machine's disk, which both nodes share; across
machines the pipeline needs Kafka (``--kafka-bootstrap-servers``), see docs/scaling.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.ray_multinode import HEAD_RESOURCE, WORKER_RESOURCE, TwoNodeCluster, free_port, ray_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_EVENTS = 3000
RUN_TIMEOUT_S = 420.0


def first_user(events_csv: Path) -> str:
    with events_csv.open(encoding="utf-8") as f:
        header = f.readline().strip().split(",")
        return f.readline().strip().split(",")[header.index("user_id")]


class RecommendPoller:
    """Asks ``/recommend`` for one user every 0.2 s in a thread; keeps the answers that came from an index
    with a published version."""

    def __init__(self, url: str, user_id: str) -> None:
        self.url, self.user_id = url, user_id
        self.answers: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="recommend-poller", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.2):
            try:
                r = httpx.get(f"{self.url}/recommend", params={"user_id": self.user_id, "k": 10}, timeout=5)
            except httpx.HTTPError:
                continue  # not up yet, or already stopped
            if r.status_code == 200 and r.json()["index"]["version"] > 0:
                self.answers.append({**r.json(), "at_s": time.monotonic()})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def sitn_run_command(cluster: TwoNodeCluster, events_csv: Path, run_dir: Path, port: int,
                     rate_events_per_s: int = 300) -> list[str]:
    return [
        sys.executable, "-m", "sitn", "run",
        "--ray-address", cluster.address,
        "--consumer-resource", WORKER_RESOURCE,
        "--learner-resource", HEAD_RESOURCE,
        "--events", str(events_csv), "--limit", str(N_EVENTS),
        "--rate-events-per-s", str(rate_events_per_s),
        "--exit-after-replay", "--run-dir", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
        "--consumers", "2", "--partitions", "2", "--batch-size", "64", "--checkpoint-every-steps", "10",
        "--publish-every-steps", "5", "--learner-dim", "16", "--learner-max-len", "10",
        "--learner-replay-buffer-size", "0",
    ]


def run_env() -> dict[str, str]:
    env = ray_env()  # the cluster's token and no usage stats
    env["SITN_METRICS_ENABLED"] = "false"
    return env


def sitn_run(cluster: TwoNodeCluster, events_csv: Path, run_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sitn_run_command(cluster, events_csv, run_dir, port), env=run_env(), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, check=False)


def test_sitn_run_places_actors_on_both_nodes(ray_two_nodes: TwoNodeCluster, events_csv: Path, tmp_path: Path) -> None:
    head_id = ray_two_nodes.node_id_with(HEAD_RESOURCE)
    worker_id = ray_two_nodes.node_id_with(WORKER_RESOURCE)
    port = free_port()
    poller = RecommendPoller(f"http://127.0.0.1:{port}", first_user(events_csv))
    started_s = time.monotonic()
    try:
        out = sitn_run(ray_two_nodes, events_csv, tmp_path / "run", port)
    finally:
        poller.close()
    assert out.returncode == 0, f"sitn run failed rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    print(f"two-node run: {time.monotonic() - started_s:.1f} s, summary wall {summary['wall_time_s']:.1f} s, "
          f"ray_nodes {summary['ray_nodes']}")

    # (a) placement: consumers on the second node, learner and serving on the head
    nodes = summary["ray_nodes"]
    assert set(nodes) == {"serving", "learner", "consumer-0", "consumer-1"}, nodes
    assert (nodes["serving"], nodes["learner"]) == (head_id, head_id), (nodes, head_id)
    assert (nodes["consumer-0"], nodes["consumer-1"]) == (worker_id, worker_id), (nodes, worker_id)
    # (b) every event replayed was trained, none dead-lettered, nothing restarted
    assert summary["ok"], summary["problems"]
    assert (summary["events_to_replay"], summary["events_replayed"], summary["events_trained"]) == (N_EVENTS,) * 3
    assert (summary["dead_letters"], summary["restarts"], summary["consumer_restarts"]) == (0, 0, 0)
    # (c) /recommend answered from a published index while the pipeline ran across the two nodes
    assert poller.answers, "no /recommend answer from a published index during the run"
    assert all(a["items"] for a in poller.answers), [a for a in poller.answers if not a["items"]][:3]


def test_second_node_crash_mid_run_loses_nothing(ray_two_nodes: TwoNodeCluster, events_csv: Path,
                                                 tmp_path: Path) -> None:
    """SIGKILL the second node's raylet while its consumers read; a new second node joins (what an
    operator or autoscaler does); the run ends with every event trained once, serving up on the head."""
    head_id = ray_two_nodes.node_id_with(HEAD_RESOURCE)
    old_worker_id = ray_two_nodes.node_id_with(WORKER_RESOURCE)
    port = free_port()
    poller = RecommendPoller(f"http://127.0.0.1:{port}", first_user(events_csv))
    log_path = tmp_path / "sitn-run.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(sitn_run_command(ray_two_nodes, events_csv, tmp_path / "run", port,
                                                 rate_events_per_s=100),
                                env=run_env(), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not poller.answers:  # trained and published: the consumers on the second node are reading
            assert proc.poll() is None, f"sitn run ended before the kill rc={proc.returncode}: {log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no published model before the kill"
            time.sleep(0.2)
        killed_s = time.monotonic()
        ray_two_nodes.kill_raylet(ray_two_nodes.workers[0])
        dead_after_s = ray_two_nodes.wait_for_node_dead(old_worker_id)
        assert proc.poll() is None, "sitn run ended while the node was down"
        ray_two_nodes.add_worker()
        ray_two_nodes.wait_for_nodes([HEAD_RESOURCE, WORKER_RESOURCE])
        rejoined_s = time.monotonic()
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        poller.close()
    assert rc == 0, f"sitn run failed rc={rc}: {log_path.read_text()[-6000:]}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    new_worker_id = ray_two_nodes.node_id_with(WORKER_RESOURCE)
    print(f"node crash: the GCS saw the node dead after {dead_after_s:.1f} s, a new second node alive "
          f"{rejoined_s - killed_s:.1f} s after the kill; summary restarts "
          f"{summary['restarts']} consumer_restarts {summary['consumer_restarts']} serving_restarts "
          f"{summary['serving_restarts']} wall {summary['wall_time_s']:.1f} s")

    assert new_worker_id != old_worker_id
    nodes = summary["ray_nodes"]
    assert (nodes["serving"], nodes["learner"]) == (head_id, head_id), (nodes, head_id)
    assert (nodes["consumer-0"], nodes["consumer-1"]) == (new_worker_id, new_worker_id), (nodes, new_worker_id)
    # the consumers died with their node and were replaced (alone, or with the learner from its checkpoint)
    assert summary["consumer_restarts"] + summary["restarts"] >= 1
    # nothing lost, nothing trained twice: the learner counts each event once (it drops by offset what a
    # replacement consumer reads again; a restored learner counts what its checkpoint holds)
    assert summary["ok"], summary["problems"]
    assert (summary["events_to_replay"], summary["events_replayed"], summary["events_trained"]) == (N_EVENTS,) * 3
    assert summary["dead_letters"] == 0
    # serving (on the head) answered after the second node went down
    assert summary["serving_restarts"] == 0
    assert any(a["at_s"] > killed_s for a in poller.answers), "no /recommend answer after the node crash"
