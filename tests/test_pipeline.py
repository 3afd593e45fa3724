"""The main job end to end on real Ray and real HTTP (embedded log, and the real Kafka broker):
fresh recommendations after publishing, cold-start users served from the source side, recovery from a
killed learner actor with no event lost or applied twice while serving keeps answering; the run's
summary (``summary.json``) against the run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from learner.core.config import SITNConfig
from learner.online.prequential import ranks_event
from serving.settings import ServingSettings
from sitn.pipeline import Pipeline
from sitn.settings import RunSettings
from stream.dataset import load_events
from stream.events import InteractionEvent
from stream.producer import open_producer, send_event
from stream.settings import StreamSettings

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_EVENTS = 4000
DEADLINE_S = 240.0


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, pipeline: Pipeline | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if pipeline is not None:
            pipeline.supervise()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def small_config() -> SITNConfig:
    return SITNConfig(dim=16, max_len=10, n_views=2, cluster_counts=(4, 8), n_item_clusters=8,
                      n_sampled_negatives=32, i2c_warmup_steps=5, recluster_every_steps=10, reservoir_size=512,
                      initial_item_capacity=256, popularity_half_lives=(100, 1000))


@pytest.fixture(scope="module")
def events(events_csv: Path) -> list[InteractionEvent]:
    return load_events(events_csv, "movie", "book", limit=N_EVENTS).events


def make_pipeline(tmp_path: Path, kafka: str | None, run_overrides: dict[str, Any] | None = None,
                  serving_overrides: dict[str, Any] | None = None) -> Pipeline:
    # These tests check the model path of /recommend; the ranker fallback has its own (tests/test_fallback.py,
    # tests/test_publish_gate.py) and runs in tests/test_dashboard.py's live pipeline.
    run = RunSettings(events=None, rate_events_per_s=None, batch_size=64, checkpoint_every_steps=5,
                      publish_every_steps=3, publish_every_s=0.5, full_publish_every=5, torch_threads=1,
                      learner_dim=16, learner_views=2, learner_max_len=10, consumers=2,
                      **{"fallback_enabled": False, **(run_overrides or {})})
    stream = StreamSettings(
        kafka_bootstrap_servers=kafka,
        embedded_log_dir=tmp_path / "log",
        topic_interactions=f"t-{uuid.uuid4().hex[:8]}",
        topic_dead_letters=f"dl-{uuid.uuid4().hex[:8]}",
        topic_embedding_updates=f"up-{uuid.uuid4().hex[:8]}",
        consumer_group=f"g-{uuid.uuid4().hex[:8]}",
        partitions=2,
        batch_size=500,
        poll_timeout_s=0.2,
    )
    serving = ServingSettings(port=0, dim=16, index_factory="Flat", index_search_params={},
                              **(serving_overrides or {}))
    return Pipeline(run, stream, serving, small_config(), tmp_path / "run")


@pytest.fixture(params=["embedded", "kafka"])
def pipeline(request: pytest.FixtureRequest, tmp_path: Path, ray_cluster: Any) -> Iterator[Pipeline]:
    kafka = request.getfixturevalue("kafka_broker").bootstrap_servers if request.param == "kafka" else None
    p = make_pipeline(tmp_path, kafka)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def recommend(url: str, user_id: str, k: int = 10) -> dict[str, Any]:
    r = httpx.get(f"{url}/recommend", params={"user_id": user_id, "k": k}, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_live_pipeline_serves_fresh_recommendations(pipeline: Pipeline, events: list[InteractionEvent]) -> None:
    pipeline.start_replay(events)
    wait_for(pipeline.caught_up, DEADLINE_S, "every replayed event trained", pipeline)
    wait_for(lambda: pipeline.status().get("served_version", 0) > 0, 30, "a publish")
    check_summary(pipeline, events)
    url = pipeline.serving_url
    assert url is not None
    books = {e.item_id for e in events if e.domain == "book"}
    consumed: dict[str, set[str]] = {}
    for e in events:
        consumed.setdefault(e.user_id, set()).add(e.item_id)
    domains_of: dict[str, set[str]] = {}
    for e in events:
        domains_of.setdefault(e.user_id, set()).add(e.domain)
    with_target = next(u for u, d in domains_of.items() if d == {"movie", "book"})
    source_only = next(u for u, d in domains_of.items() if d == {"movie"})
    # Wait until the final full publish has reached serving.
    wait_for(lambda: recommend(url, source_only)["served_by"] == "model", 30, "source-only user published")
    for user in (with_target, source_only):
        body = recommend(url, user)
        assert body["served_by"] == "model"
        items = [it["item_id"] for it in body["items"]]
        assert len(items) == 10
        assert set(items) <= books  # target-domain items only
        assert not set(items) & consumed[user]  # nothing the user already consumed
    # New target events for a user change that user's recommendations after the next publish.
    before_body = recommend(url, with_target)
    before = [it["item_id"] for it in before_body["items"]]
    version = before_body["index"]["version"]  # read before producing: the publish can beat the next line
    producer = open_producer(pipeline.stream)
    new_events = [InteractionEvent(f"new-{i}", with_target, item, "book", events[-1].timestamp + i)
                  for i, item in enumerate(before[:3])]
    for e in new_events:
        send_event(producer, e)
    producer.close()
    wait_for(lambda: recommend(url, with_target)["index"]["version"] > version
             and not set(before[:3]) & {it["item_id"] for it in recommend(url, with_target)["items"]},
             60, "the user's new events to reach serving", pipeline)
    after = [it["item_id"] for it in recommend(url, with_target)["items"]]
    assert after != before
    assert not set(before[:3]) & set(after)  # just consumed, so excluded now


def test_a_sampled_prequential_and_a_publish_budget_still_train_and_serve_every_event(
        tmp_path: Path, ray_cluster: Any, events: list[InteractionEvent]) -> None:
    """The large-replay settings through the real pipeline, flat out (a backlog: the budget applies): every
    event trains, only the hashed share of the book events is tested, and every user reaches serving."""
    p = make_pipeline(tmp_path, None, {"publish_max_share": 0.2, "prequential_sample": 0.5})
    p.start()
    try:
        p.start_replay(events)
        wait_for(p.caught_up, DEADLINE_S, "every replayed event trained", p)
        summary = p.write_summary(tmp_path / "summary.json", wall_time_s=1.0)
        assert (summary["events_trained"], summary["dead_letters"], summary["restarts"]) == (N_EVENTS, 0, 0)
        tested = [e for e in events if e.domain == "book" and ranks_event(e.event_id, 0.5)]
        pq = summary["prequential"]
        assert (pq["target_events"], pq["prequential_sample"]) == (len(tested), 0.5)
        assert 0.3 * sum(e.domain == "book" for e in events) < len(tested) < 0.7 * sum(e.domain == "book" for e in events)
        url = p.serving_url
        assert url is not None
        users = {e.user_id for e in events}
        wait_for(lambda: p.status().get("users", 0) >= len(users), 60, "every user published", p)
        last = events[-1].user_id
        assert recommend(url, last)["served_by"] == "model"
    finally:
        p.stop()


def test_learner_killed_mid_stream_recovers_without_loss(pipeline: Pipeline, events: list[InteractionEvent]) -> None:
    import ray

    url = pipeline.serving_url
    assert url is not None
    pipeline.run_settings = pipeline.run_settings.model_copy(update={"rate_events_per_s": 1500.0})
    pipeline.start_replay(events)
    wait_for(lambda: pipeline.status().get("commit_rounds", 0) >= 1, 120, "a first checkpoint and commit", pipeline)
    stop = threading.Event()
    failures: list[str] = []
    answered = [0]

    def probe() -> None:  # serving must answer throughout the recovery
        while not stop.is_set():
            try:
                r = httpx.get(f"{url}/recommend", params={"user_id": events[0].user_id, "k": 5}, timeout=5)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:100]}")
                answered[0] += 1
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    ray.kill(pipeline.learner, no_restart=True)
    wait_for(lambda: pipeline.restarts >= 1, 60, "the supervisor to restart the learner", pipeline)
    wait_for(pipeline.caught_up, DEADLINE_S, "every replayed event trained after recovery", pipeline)
    stop.set()
    prober.join(10)
    summary = pipeline.finish_training()
    assert failures == []
    assert answered[0] > 10
    # Exactly once in effect: restored count + re-delivered count == what was replayed.
    assert int(summary["events_applied"]) == len(events)
    pipeline.learner = None  # finished; stop() must not finish it again


REPLICA_EVENTS = 3000
# Both servings re-sort popularity on every write (default: at most every second), so that a read right after
# the last version sees the same ranking on both.
REPLICA_SERVING = {"popularity_refresh_s": 0.0}
# The ranker fallback on, judged early and switching easily: the learner may move serving to the fused ranker
# or a baseline during the slice, and the replica must follow the same switches from the topic.
REPLICA_RUN = {"fallback_enabled": True, "fallback_min_events": 50, "fallback_z_critical": 0.5}


@pytest.fixture
def kafka_pipeline(tmp_path: Path, ray_cluster: Any, kafka_broker: Any) -> Iterator[Pipeline]:
    p = make_pipeline(tmp_path, kafka_broker.bootstrap_servers, REPLICA_RUN, REPLICA_SERVING)
    p.start()
    try:
        yield p
    finally:
        p.stop()


def test_standalone_replica_answers_like_the_in_cluster_serving(
    kafka_pipeline: Pipeline, events: list[InteractionEvent], tmp_path: Path
) -> None:
    """A ``sitn serve`` replica in its own process, fed only by the Kafka updates topic, answers ``/recommend``
    exactly like the in-cluster serving actor at the same version: same items, same order, same scores, same
    ``served_by``, for users with consumed books (excluded), source-only users and a user nobody knows."""
    from tests.fixtures.kafka import free_ports
    from tests.fixtures.serving import replica_at_version

    p = kafka_pipeline
    replayed = events[:REPLICA_EVENTS]
    p.start_replay(replayed)
    wait_for(p.caught_up, DEADLINE_S, "the slice trained", p)
    p.finish_training()  # the last, full publish is on the topic now
    p.learner = None
    url = p.serving_url
    assert url is not None and p.stream.kafka_bootstrap_servers is not None
    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITN_")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), SITN_SERVING_INDEX_SEARCH_PARAMS="{}",
               SITN_SERVING_POPULARITY_REFRESH_S=str(REPLICA_SERVING["popularity_refresh_s"]))
    argv = [sys.executable, "-m", "sitn", "serve", "--port", str(port), "--dim", "16", "--index-factory", "Flat",
            "--kafka-bootstrap-servers", p.stream.kafka_bootstrap_servers,
            "--updates-topic", p.stream.topic_embedding_updates]
    log_path = tmp_path / "replica.log"
    with log_path.open("w") as log_file:
        replica = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    replica_url = f"http://127.0.0.1:{port}"
    try:
        in_cluster_health = httpx.get(f"{url}/healthz", timeout=10).json()
        version = in_cluster_health["applied_version"]
        assert version > 0

        wait_for(replica_at_version(replica, replica_url, version, log_path), 120,
                 f"the replica to apply version {version}")
        replica_health = httpx.get(f"{replica_url}/healthz", timeout=10).json()
        for key in ("applied_version", "index_version", "index_items", "users", "ranker", "fused_weight"):
            assert replica_health[key] == in_cluster_health[key], key
        books: dict[str, list[str]] = {}
        domains_of: dict[str, set[str]] = {}
        for e in replayed:
            domains_of.setdefault(e.user_id, set()).add(e.domain)
            if e.domain == "book":
                books.setdefault(e.user_id, []).append(e.item_id)
        with_books = [u for u in domains_of if u in books][:25]
        source_only = [u for u, d in domains_of.items() if d == {"movie"}][:5]
        stranger = "nobody-the-model-has-seen"
        served_by: dict[str, str] = {}
        for user in [*with_books, *source_only, stranger]:
            want, got = recommend(url, user), recommend(replica_url, user)
            want["index"].pop("age_s"), got["index"].pop("age_s")  # seconds since each one's last index write
            # Same items in the same order; scores equal to 1e-9 relative: the vectors are bit-identical, but
            # numpy's BLAS may sum in another order in another process (seen: last-digit differences).
            want_scores = [it.pop("score") for it in want["items"]]
            got_scores = [it.pop("score") for it in got["items"]]
            assert got == want, user
            assert got_scores == pytest.approx(want_scores, rel=1e-9, abs=1e-12), user
            assert len(got["items"]) == 10
            assert not {it["item_id"] for it in got["items"]} & set(books.get(user, ())), user  # excluded
            served_by[user] = got["served_by"]
        assert served_by[stranger] != "model"  # the fallback: popularity, or co-occurrence alone when fused
        assert {served_by[u] for u in with_books} == {in_cluster_health["ranker"]}
    finally:
        replica.terminate()
        replica.wait(30)
    print(f"replica equivalence: version {version}, ranker {in_cluster_health['ranker']}, "
          f"{len(served_by)} users, served_by {sorted(set(served_by.values()))}")


def check_summary(pipeline: Pipeline, events: list[InteractionEvent]) -> None:
    """``summary.json`` holds what this run did: every event replayed and trained, every book event ranked by
    the model and each baseline, the rankable share exactly the events whose book occurred before."""
    path = pipeline.run_dir / "summary.json"
    summary = pipeline.write_summary(path, wall_time_s=12.5)
    assert json.loads(path.read_text()) == summary
    assert (summary["events_replayed"], summary["events_to_replay"], summary["events_trained"]) == (N_EVENTS,) * 3
    assert (summary["dead_letters"], summary["restarts"], summary["caught_up"]) == (0, 0, True)
    assert summary["wall_time_s"] == 12.5
    # resident memory per component: the test process (driver) and the Ray actors below it
    peaks = summary["rss_peak_mb"]
    assert peaks["driver"] > 0 and peaks["learner"] > 0 and peaks["serving"] > 0 and peaks["consumers"] > 0
    assert summary["rss_peak_total_mb"] >= max(peaks.values())
    assert summary["events_per_s"] == pytest.approx(N_EVENTS / summary["replay_to_trained_s"], rel=1e-12)
    assert 0 < summary["freshness_p50_s"] <= summary["freshness_p99_s"]
    assert (summary["served_by"], summary["learner_served_by"], summary["serving_ranker_switches"]) == (
        "model", "model", 0)
    books = [e.item_id for e in events if e.domain == "book"]
    pq = summary["prequential"]
    # Each book's first occurrence is the only unrankable event, whatever order the partitions interleave in.
    assert (pq["k"], pq["target_events"], pq["rankable_events"]) == (10, len(books), len(books) - len(set(books)))
    assert pq["window_events"] == min(2000, len(books))
    assert pq["rankable_ratio"]["stream"] == pytest.approx(pq["rankable_events"] / len(books), rel=1e-12)
    assert set(pq["rankers"]) == {"model", "model_live", "fused", "fused_live", "popularity", "cooc_target",
                                  "cooc_target_source"}
    assert pq["fused"]["weight"] in pq["fused"]["weights"] == [0.25, 0.5, 1.0, 2.0, 4.0]
    scales = pq["transfer_scale"]  # chosen online; every book event of the run was ranked at each scale
    assert scales["warm"] in (1.0, 0.5, 0.25, 0.0) and scales["cold"] in (1.0, 0.5, 0.25, 0.0)
    assert set(scales["ndcg_window_by_scale"]) == {"warm", "cold"}
    assert all(set(per) == {"1", "0.5", "0.25", "0"} for per in scales["ndcg_window_by_scale"].values())
    prior = pq["popularity_half_life"]  # chosen online among all-time counts and the model's half-lives
    assert prior["half_life"] in (0, 100, 1000)
    assert set(prior["ndcg_window_by_half_life"]) == {"0", "100", "1000"}
    assert set(pq["lifts"]) == {"model", "model_live", "fused", "fused_live"}
    assert pq["lifts"]["model"]["stream"] == pq["lift"]
    for name, spans in pq["rankers"].items():
        for span in ("stream", "window"):
            f = spans[span]
            assert set(f) == {"hr", "ndcg", "hr_rankable", "ndcg_rankable"}, name
            assert 0.0 <= f["ndcg"] <= f["hr"] <= 1.0, (name, span)
            assert f["ndcg"] == pytest.approx(pq["rankable_ratio"][span] * f["ndcg_rankable"], abs=1e-12)
    best = max(("popularity", "cooc_target", "cooc_target_source"), key=lambda b: pq["rankers"][b]["stream"]["ndcg"])
    assert pq["best_baseline"] == best
    best_ndcg = pq["rankers"][best]["stream"]["ndcg"]
    expected_lift = pq["rankers"]["model"]["stream"]["ndcg"] / best_ndcg if best_ndcg > 0 else None
    assert pq["lift"] == (pytest.approx(expected_lift, rel=1e-12) if expected_lift is not None else None)
    assert not any(isinstance(v, float) and math.isnan(v) for v in pq["rankable_ratio"].values())
