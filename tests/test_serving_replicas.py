"""Several serving replicas behind one port (issue 13), on the real thing: uvicorn servers bound with
SO_REUSEPORT driven over real HTTP; a pipeline on real Ray with two serving actors on one port, one of them
SIGKILLed mid-run; ``sitn serve --workers 2`` processes fed by a real Kafka broker's updates topic.

Which replica answered is read from the answer itself: every response carries the ``X-Sitn-Pid`` header
and ``/healthz`` has ``pid``. Each request opens a new connection (the kernel spreads connections, not
requests, over the listeners).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving.api import PID_HEADER, create_app, reuse_port_socket, serve_in_thread
from serving.service import RecommendationService
from serving.settings import ServingSettings
from stream.dataset import load_events
from stream.events import EmbeddingBatch, InteractionEvent, encode_batch
from tests.test_pipeline import make_pipeline, wait_for

REQUESTS = 80  # new connections per spread check: both of two listeners get one with probability 1 - 2^-79


def batch(version: int, full: bool = True) -> EmbeddingBatch:
    """A version of three items and one user (dim 2); the user's query vector points at item a."""
    return EmbeddingBatch(
        version=version, full=full, item_ids=["a", "b", "c"],
        item_vectors=np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32),  # (N, D)
        user_ids=["u1"], user_vectors=np.array([[[1.0, 0.0]]], dtype=np.float32),  # (U, V, D)
        popularity=[], created_at_s=0.0, consumed=[("u1", "b")],
    )


def versions_answering(url: str, requests: int = REQUESTS) -> Counter[int]:
    """``applied_version`` of the replica that answered each of ``requests`` ``/healthz`` calls."""
    return Counter(int(httpx.get(f"{url}/healthz", timeout=10).json()["applied_version"]) for _ in range(requests))


def test_two_servers_bound_with_reuse_port_share_one_port_and_the_kernel_spreads_connections() -> None:
    services = [RecommendationService(dim=2, popularity_refresh_s=0.0) for _ in range(2)]
    services[0].apply(batch(1))
    services[1].apply(batch(2))
    settings = ServingSettings(port=0, dim=2)
    first = serve_in_thread(create_app(services[0], settings), "127.0.0.1", 0, reuse_port=True)
    second = serve_in_thread(create_app(services[1], settings), "127.0.0.1", first.port, reuse_port=True)
    try:
        assert second.port == first.port
        assert set(versions_answering(first.url)) == {1, 2}
        body = httpx.get(f"{first.url}/recommend", params={"user_id": "u1", "k": 2}, timeout=10)
        assert body.headers[PID_HEADER] == str(os.getpid())
        assert [it["item_id"] for it in body.json()["items"]] == ["a", "c"]  # b consumed
        first.stop()
        assert versions_answering(second.url, 20) == Counter({2: 20})  # the one left answers everything
    finally:
        for handle in (first, second):
            if handle.thread.is_alive():
                handle.stop()


def test_reuse_port_refuses_a_port_held_without_it_and_a_bound_socket_takes_no_connections() -> None:
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    try:
        with pytest.raises(OSError):
            reuse_port_socket("127.0.0.1", plain.getsockname()[1])
    finally:
        plain.close()
    # A socket bound with SO_REUSEPORT but not listening reserves the port (sitn serve --workers' parent
    # holds one) and is never handed a connection: every one goes to the listening server.
    reserved = reuse_port_socket("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    service = RecommendationService(dim=2, popularity_refresh_s=0.0)
    service.apply(batch(7))
    handle = serve_in_thread(create_app(service, ServingSettings(port=0, dim=2)), "127.0.0.1", port, reuse_port=True)
    try:
        assert versions_answering(handle.url, 30) == Counter({7: 30})
    finally:
        handle.stop()
        reserved.close()


# -- the pipeline with two serving replicas -------------------------------------------------------------------
FIRST_EVENTS = 1500
REPLICA_EVENTS = 3000
PACED_RATE = 300.0  # events/s of the second part, so that the kill lands mid-run


@dataclass
class Answer:
    start_s: float
    ok: bool
    pid: str | None
    served_by: str | None
    detail: str


def actor_pid(handle: Any) -> int:
    import ray

    pid: int = ray.get(handle.pid.remote(), timeout=30)
    return pid


def replica_versions(status: dict[str, Any]) -> list[float | None]:
    return [r["served_version"] if r["alive"] and r["listening"] else None for r in status["serving_replicas"]]


def all_at_published_version(pipeline: Any) -> bool:
    """Every replica alive, listening and at the learner's last published version, and that version > 0."""
    status = pipeline.status()
    published = status.get("published_version", 0)
    return bool(published > 0 and replica_versions(status) == [published] * len(pipeline.servings))


def answers_by_pid(url: str, user_id: str, pids: set[str], timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    """One ``/recommend`` answer from each replica in ``pids`` (new connections until each has answered)."""
    found: dict[str, dict[str, Any]] = {}
    deadline_s = time.monotonic() + timeout_s
    while set(found) != pids:
        assert time.monotonic() < deadline_s, f"only {sorted(found)} of {sorted(pids)} answered"
        r = httpx.get(f"{url}/recommend", params={"user_id": user_id, "k": 10}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        body["index"].pop("age_s")  # seconds since that replica's last index write
        found[r.headers[PID_HEADER]] = body
    return found


@pytest.fixture(scope="module")
def events(events_csv: Path) -> list[InteractionEvent]:
    return load_events(events_csv, "movie", "book", limit=REPLICA_EVENTS).events


@pytest.fixture
def two_replicas(tmp_path: Path, ray_cluster: Any) -> Iterator[Any]:
    p = make_pipeline(tmp_path, None, {"serving_replicas": 2}, {"popularity_refresh_s": 0.0})
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_serving_replicas_on_one_port_serve_the_same_versions_and_survive_a_kill(
    two_replicas: Any, events: list[InteractionEvent]
) -> None:
    p = two_replicas
    url = p.serving_url
    pids = [actor_pid(actor) for actor in p.servings]
    assert len(set(pids)) == 2
    user = events[0].user_id
    first, rest = events[:FIRST_EVENTS], events[FIRST_EVENTS:REPLICA_EVENTS]
    p.start_replay(first)
    wait_for(p.caught_up, 240, "the first part trained", p)
    wait_for(lambda: all_at_published_version(p), 60, "both replicas at the published version", p)

    # Many /recommend calls, each on a new connection, are answered by both replicas.
    answered: Counter[int] = Counter()
    for _ in range(REQUESTS):
        r = httpx.get(f"{url}/recommend", params={"user_id": user, "k": 10}, timeout=10)
        assert (r.status_code, r.json()["served_by"]) == (200, "model"), r.text
        answered[int(r.headers[PID_HEADER])] += 1
    assert set(answered) == set(pids), answered

    # Kill replica 1 mid-run; replica 0 keeps answering, the supervisor replaces 1, which catches up.
    answers: list[Answer] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            start_s = time.monotonic()
            try:
                r = httpx.get(f"{url}/recommend", params={"user_id": user, "k": 5}, timeout=5)
                answers.append(Answer(start_s, r.status_code == 200, r.headers.get(PID_HEADER),
                                      r.json().get("served_by"), str(r.status_code)))
            except httpx.HTTPError as exc:
                answers.append(Answer(start_s, False, None, None, repr(exc)))
            stop.wait(0.02)

    p.run_settings = p.run_settings.model_copy(update={"rate_events_per_s": PACED_RATE})
    p.start_replay(rest)
    prober = threading.Thread(target=probe, name="replica-prober", daemon=True)
    prober.start()
    try:
        wait_for(lambda: p.replay_progress.sent > 0, 30, "the paced replay under way", p)
        killed_s = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        assert p.replay_progress.sent < len(rest), "the replay ended before the kill"
        wait_for(lambda: p.serving_restarts >= 1, 60, "the supervisor to replace the killed replica", p)
        new_pid = actor_pid(p.servings[1])
        assert new_pid not in pids and actor_pid(p.servings[0]) == pids[0]  # replica 0 was not touched
        wait_for(lambda: p.replay_progress.done and p.status().get("events_applied", 0) >= REPLICA_EVENTS, 240,
                 "the second part trained", p)
        wait_for(lambda: all_at_published_version(p), 60, "the replacement at the published version", p)
        wait_for(lambda: any(a.pid == str(new_pid) for a in answers), 30, "the replacement to answer")
    finally:
        stop.set()
        prober.join(10)
    # Only requests already under way at the kill may fail (their connection was the dead process's); every
    # later one was answered, by the model, by replica 0 until the replacement listened, then by either.
    late = [a for a in answers if a.start_s > killed_s + 1.0]
    assert [a for a in late if not a.ok] == []
    assert {a.served_by for a in late} == {"model"}
    assert {a.pid for a in late} == {str(pids[0]), str(new_pid)}
    assert sum(1 for a in answers if not a.ok) <= 3, [a.detail for a in answers if not a.ok]
    status = p.status()
    assert [(r["replica"], r["alive"], r["pid"]) for r in status["serving_replicas"]] == [
        (0, True, pids[0]), (1, True, new_pid)]
    learner_replicas = p.learner_replicas()
    assert [r["awaiting_full"] for r in learner_replicas] == [False, False]
    assert learner_replicas[1]["versions_sent"] >= 1

    # Same version on both, and the same answer for a known user: through Ray and over HTTP. The learner may
    # still publish (its interval flush of the last batch) between the two reads, so compare only answers read
    # at one index version, reading again until they are.
    import ray

    deadline_s = time.monotonic() + 60
    while True:
        first_answer, second_answer = ray.get([p.servings[i].recommend.remote(user, 10) for i in range(2)],
                                              timeout=30)
        via_pipeline = p.recommend(user, 10)
        over_http = answers_by_pid(url, user, {str(pids[0]), str(new_pid)})
        versions = {first_answer["index_version"], second_answer["index_version"], via_pipeline["index_version"],
                    *(body["index"]["version"] for body in over_http.values())}
        if len(versions) == 1:
            break
        assert time.monotonic() < deadline_s, f"the replicas' index versions never settled: {sorted(versions)}"
        time.sleep(1.0)
    assert first_answer == second_answer
    assert via_pipeline == first_answer
    assert over_http[str(pids[0])] == over_http[str(new_pid)]
    assert [it["item_id"] for it in over_http[str(pids[0])]["items"]] == [item for item, _ in first_answer["items"]]
    summary = p.summary(wall_time_s=1.0)
    assert summary["serving_restarts"] == 1
    served = [r["served_version"] for r in summary["serving_replicas"]]
    assert served[0] == served[1] >= status["published_version"], (served, status["published_version"])
    print(f"replicas: {dict(answered)} answered {REQUESTS} requests; kill -> {len(answers)} probes, "
          f"{sum(1 for a in answers if not a.ok)} failed; version {status['published_version']:.0f} on both")



# -- sitn serve --workers 2, fed by a real Kafka broker -------------------------------------------------------
def serve_argv(port: int, bootstrap_servers: str, topic: str) -> list[str]:
    return [sys.executable, "-m", "sitn", "serve", "--workers", "2", "--port", str(port), "--dim", "2",
            "--index-factory", "Flat", "--kafka-bootstrap-servers", bootstrap_servers, "--updates-topic", topic]


def serve_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITN_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), SITN_SERVING_INDEX_SEARCH_PARAMS="{}",
               SITN_SERVING_POPULARITY_REFRESH_S="0")
    return env


def healthz_by_pid(url: str, requests: int = REQUESTS) -> dict[int, int]:
    """pid -> applied_version of each worker that answered one of ``requests`` new connections (none: down)."""
    seen: dict[int, int] = {}
    for _ in range(requests):
        try:
            body = httpx.get(f"{url}/healthz", timeout=5).json()
        except httpx.HTTPError:
            continue
        seen[int(body["pid"])] = int(body["applied_version"])
    return seen


def publish(producer: Any, topic: str, version: EmbeddingBatch) -> None:
    for key, value in encode_batch(version):
        producer.send(topic, key=key, value=value)
    producer.flush()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sitn_serve_workers_share_one_port_apply_the_same_versions_and_replace_a_killed_worker(
    kafka_broker: Any, tmp_path: Path
) -> None:
    from stream.producer import make_kafka_producer
    from stream.settings import StreamSettings
    from stream.topics import ensure_topics
    from tests.fixtures.kafka import free_ports

    suffix = uuid.uuid4().hex[:8]
    stream = StreamSettings(kafka_bootstrap_servers=kafka_broker.bootstrap_servers, topic_interactions=f"t-{suffix}",
                            topic_dead_letters=f"dl-{suffix}", topic_embedding_updates=f"up-{suffix}")
    ensure_topics(stream)
    topic = stream.topic_embedding_updates
    producer = make_kafka_producer(stream)
    publish(producer, topic, batch(1))
    publish(producer, topic, batch(2, full=False))
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        parent = subprocess.Popen(serve_argv(port, kafka_broker.bootstrap_servers, topic), env=serve_env(),
                                  stdout=log_file, stderr=subprocess.STDOUT)

    def two_workers_at(version: int, not_pids: frozenset[int] = frozenset()) -> bool:
        assert parent.poll() is None, f"sitn serve exited {parent.returncode}: {log_path.read_text()[-3000:]}"
        seen = healthz_by_pid(url, 30)
        return len(seen) == 2 and set(seen.values()) == {version} and not set(seen) & not_pids

    try:
        wait_for(lambda: two_workers_at(2), 120, "both workers at version 2")
        publish(producer, topic, EmbeddingBatch(
            version=3, full=False, item_ids=["d"], item_vectors=np.array([[0.8, 0.6]], dtype=np.float32),
            user_ids=[], user_vectors=np.zeros((0, 1, 2), dtype=np.float32), popularity=[], created_at_s=0.0))
        wait_for(lambda: two_workers_at(3), 60, "both workers at version 3")
        pids = set(healthz_by_pid(url))
        answers = answers_by_pid(url, "u1", {str(pid) for pid in pids})
        assert len({str(body) for body in answers.values()}) == 1
        assert [it["item_id"] for it in next(iter(answers.values()))["items"]] == ["a", "d", "c"]  # b consumed

        killed = min(pids)
        killed_s = time.monotonic()
        os.kill(killed, signal.SIGKILL)
        failed_late: list[str] = []
        survivor_answers = 0
        deadline_s = time.monotonic() + 120
        while True:  # the survivor answers every new connection; the replacement joins at version 3
            assert time.monotonic() < deadline_s, f"no replacement joined: {log_path.read_text()[-3000:]}"
            start_s = time.monotonic()
            try:
                body = httpx.get(f"{url}/healthz", timeout=5).json()
            except httpx.HTTPError as exc:
                if start_s > killed_s + 1.0:
                    failed_late.append(repr(exc))
                continue
            assert int(body["pid"]) != killed or start_s < killed_s + 1.0
            assert int(body["applied_version"]) == 3
            if int(body["pid"]) in pids:
                survivor_answers += 1
            else:
                break
        assert failed_late == []
        assert survivor_answers > 0
        wait_for(lambda: two_workers_at(3, frozenset({killed})), 60, "the survivor and the replacement at version 3")
        assert "worker died slot=" in log_path.read_text()

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        producer.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)


@pytest.mark.slow
def test_sitn_serve_workers_exit_1_when_a_worker_fails_before_joining(tmp_path: Path) -> None:
    """No broker on that port: the workers fail at start-up, which a restart would not fix."""
    from tests.fixtures.kafka import free_ports

    port, no_broker = free_ports(2)
    done = subprocess.run(serve_argv(port, f"127.0.0.1:{no_broker}", "up-nowhere"), env=serve_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "before joining the port" in done.stderr


def test_a_replica_on_a_shared_port_registers_a_metrics_endpoint_of_its_own(tmp_path: Path) -> None:
    """A scrape of the shared API port would reach any replica: the target written is this process's own
    exporter, which serves the serving metrics, and it is withdrawn when the replica stops."""
    import json

    from serving.actor import ServingCore
    from stream.exporter import TelemetrySettings

    targets = tmp_path / "targets"
    core = ServingCore(ServingSettings(port=0, dim=2, index_factory="Flat", index_search_params={}),
                       targets_dir=targets, reuse_port=True, metrics=TelemetrySettings(enabled=True, actor_port=0))
    try:
        core.apply_batch(batch(1))
        (target_file,) = targets.glob("serving-*.json")
        (address,) = json.loads(target_file.read_text())[0]["targets"]
        assert core.http is not None and int(address.rsplit(":", 1)[1]) != core.http.port
        exposition = httpx.get(f"http://{address}/metrics", timeout=10).text
        assert "sitn_serving_index_items 3.0" in exposition
    finally:
        core.stop()
    assert list(targets.glob("serving-*.json")) == []


def test_serving_replicas_is_validated_and_reaches_the_flag() -> None:
    from pydantic import ValidationError

    from sitn.cli import build_parser
    from sitn.settings import RunSettings

    assert RunSettings().serving_replicas == 1
    with pytest.raises(ValidationError, match="serving_replicas\n  Input should be greater than or equal to 1"):
        RunSettings(serving_replicas=0)
    args = build_parser().parse_args(["run", "--serving-replicas", "3"])
    assert args.serving_replicas == 3
