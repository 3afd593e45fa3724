"""Faults, each SIGKILLed mid-replay on real processes: the learner actor, a consumer actor, the serving
actor, the Kafka broker (a private one, restarted on the same port and data directory).

After recovery every test counts against the replayed input, from the learner's audit log (each
incarnation's restored state, then the event ids of every batch it trained):

- events lost: replayed events the final model does not reflect (must be 0), and none reflected twice;
- events trained twice: trained by an incarnation that died after the last checkpoint holding them, and
  trained again after the restore (at most one checkpoint interval plus the delivered batch in hand per
  learner restart; none when only a consumer died, since it is replaced alone and the learner goes on);
- serving answers 200 throughout, except between the kill of its own process and its restart;
- consistency after restore: each incarnation's restored positions, id-map sizes and user counts match
  exactly the events its checkpoint holds; at the end the id maps hold exactly the distinct items and
  users replayed, the learner's history store (the only one) equals one rebuilt from the replayed events
  in order, and
  the prototypes have the configured shapes and finite values.

The per-fault numbers go to the test report (``record_property``), the log, and ``var/artifacts/faults.json``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from kafka.partitioner.default import murmur2

from learner.online.checkpoint_store import CheckpointStore
from serving.settings import ServingSettings
from sitn.broker import KafkaBroker
from sitn.pipeline import Pipeline
from sitn.settings import RunSettings
from stream.dataset import load_events
from stream.events import InteractionEvent
from stream.settings import StreamSettings
from stream.user_state import UserStateStore
from tests.fixtures.kafka import start_test_broker
from tests.test_pipeline import small_config, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.kafka]

log = logging.getLogger(__name__)

N_EVENTS = 3000
WARM_UP_EVENTS = 1000  # produced flat out; the kill comes after their first checkpoint is committed ...
RATE_EVENTS_PER_S = 300.0  # ... while the other 2000 are produced at this rate (~7 s)
PARTITIONS = 2
BATCH_SIZE = 64  # learner examples per step
CHECKPOINT_EVERY_STEPS = 5
POLL_BATCH_SIZE = 500  # records per consumer poll, i.e. the largest batch the learner trains at once
# What a restore may train again: the steps since the last checkpoint, plus the delivered batch in hand.
RETRAIN_BOUND = CHECKPOINT_EVERY_STEPS * BATCH_SIZE + POLL_BATCH_SIZE
CAUGHT_UP_TIMEOUT_S = 150.0
ARTIFACT = Path(__file__).resolve().parents[1] / "var" / "artifacts" / "faults.json"


@pytest.fixture(scope="module")
def events(events_csv: Path) -> list[InteractionEvent]:
    loaded = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
    assert len({e.event_id for e in loaded}) == len(loaded) == N_EVENTS
    return loaded


def partition_of(user_id: str, partitions: int = PARTITIONS) -> int:
    """Kafka's default partitioner (murmur2 of the key), as the replay producer applies it."""
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def make_fault_pipeline(tmp_path: Path, bootstrap_servers: str) -> Pipeline:
    run = RunSettings(events=None, rate_events_per_s=RATE_EVENTS_PER_S, batch_size=BATCH_SIZE,
                      checkpoint_every_steps=CHECKPOINT_EVERY_STEPS, publish_every_steps=3, publish_every_s=0.5,
                      full_publish_every=5, torch_threads=1, learner_dim=16, learner_views=2, learner_max_len=10,
                      consumers=2)
    tag = uuid.uuid4().hex[:8]
    stream = StreamSettings(
        kafka_bootstrap_servers=bootstrap_servers,
        topic_interactions=f"t-{tag}",
        topic_dead_letters=f"dl-{tag}",
        topic_embedding_updates=f"up-{tag}",
        consumer_group=f"g-{tag}",
        partitions=PARTITIONS,
        batch_size=POLL_BATCH_SIZE,
        poll_timeout_s=0.2,
    )
    serving = ServingSettings(port=0, dim=16, index_factory="Flat", index_search_params={})
    return Pipeline(run, stream, serving, small_config(), tmp_path / "run", audit_log=tmp_path / "trained.jsonl")


def actor_pid(handle: Any) -> int:
    pid: int = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    return pid


@dataclass
class Probe:
    start_s: float
    end_s: float
    ok: bool
    detail: str


class Prober:
    """GETs ``/recommend`` every 50 ms at the pipeline's current serving URL (it follows a restart)."""

    def __init__(self, pipeline: Pipeline, user_id: str) -> None:
        self.pipeline = pipeline
        self.user_id = user_id
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-prober", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            url = self.pipeline.serving_url
            start_s = time.monotonic()
            try:
                r = httpx.get(f"{url}/recommend", params={"user_id": self.user_id, "k": 5}, timeout=5)
                ok, detail = r.status_code == 200, f"{r.status_code}"
            except httpx.HTTPError as exc:
                ok, detail = False, repr(exc)
            self.probes.append(Probe(start_s, time.monotonic(), ok, detail))
            self._stop.wait(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def failures(self) -> list[Probe]:
        return [p for p in self.probes if not p.ok]


@dataclass
class FaultReport:
    fault: str
    replayed: int = 0
    sent_at_kill: int = 0
    lost: int = -1
    applied_twice_in_model: int = -1
    retrained: int = -1
    incarnations: int = 0
    restarts: int = 0  # of the learner
    consumer_restarts: int = 0  # of one consumer alone
    redelivered_dropped: int = 0  # events the learner dropped by offset: read twice, trained once
    restart_s: float = float("nan")  # kill -> the killed part replaced (supervisor, or broker start)
    recovered_s: float = float("nan")  # kill -> every event acknowledged before the kill trained
    serving_failures: int = 0
    serving_outage_s: float = 0.0  # first to last failed probe
    probes: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def report(record_property: Callable[[str, object], None], request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    rep = FaultReport(fault=request.node.name.removeprefix("test_"))
    start_s = time.monotonic()
    yield rep
    rep.wall_s = round(time.monotonic() - start_s, 1)
    values = {k: v for k, v in vars(rep).items() if k != "fault"}
    for key, value in values.items():
        record_property(key, value)
    log.warning("fault=%s %s", rep.fault, " ".join(f"{k}={v}" for k, v in values.items()))
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(ARTIFACT.read_text()) if ARTIFACT.is_file() else {}
    merged[rep.fault] = values | {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ARTIFACT.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


# -- the audit log: what the final model reflects ---------------------------------------------------------


@dataclass
class Incarnation:
    start: dict[str, Any]
    trained: list[str] = field(default_factory=list)


def read_audit(path: Path) -> list[Incarnation]:
    out: list[Incarnation] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed incarnation may be torn
            continue
        if record["kind"] == "start":
            out.append(Incarnation(record))
        else:
            out[-1].trained.extend(record["event_ids"])
    return out


def model_lineage(incarnations: list[Incarnation], by_id: dict[str, InteractionEvent]) -> list[str]:
    """Event ids the last incarnation's model reflects, in training order; checks each restore against it.

    An incarnation restored from a checkpoint holding ``restored_events_applied`` events: the first that
    many of its predecessors' lineage (events_applied counts examples in training order). Its restored
    positions, id maps and user counts must match exactly those events.
    """
    lineage: list[str] = []
    for inc in incarnations:
        held = int(inc.start["restored_events_applied"])
        assert held <= len(lineage), f"restored {held} events, only {len(lineage)} were trained before"
        lineage = lineage[:held]
        prefix = [by_id[i] for i in lineage]
        per_partition: dict[int, list[InteractionEvent]] = {}
        for e in prefix:
            per_partition.setdefault(partition_of(e.user_id), []).append(e)
        assert {int(p): o for p, o in inc.start["positions"].items()} == {
            p: len(es) for p, es in per_partition.items()
        }, "restored positions are not the counts of the events the checkpoint holds"
        assert inc.start["idmap_sizes"] == {
            "source": len({e.item_id for e in prefix if e.domain == "movie"}),
            "target": len({e.item_id for e in prefix if e.domain == "book"}),
        }
        assert inc.start["users"] == len({e.user_id for e in prefix})
        lineage = lineage + inc.trained
    return lineage


def count_against_replay(rep: FaultReport, audit_log: Path, events: list[InteractionEvent], events_applied: int) -> None:
    incarnations = read_audit(audit_log)
    by_id = {e.event_id: e for e in events}
    lineage = model_lineage(incarnations, by_id)
    rep.replayed = len(events)
    rep.incarnations = len(incarnations)
    rep.lost = len(set(by_id) - set(lineage))
    rep.applied_twice_in_model = len(lineage) - len(set(lineage))
    rep.retrained = sum(len(inc.trained) for inc in incarnations) - len(lineage)
    assert rep.lost == 0
    assert rep.applied_twice_in_model == 0
    assert set(lineage) == set(by_id)
    assert events_applied == len(lineage) == len(events)
    assert 0 <= rep.retrained <= RETRAIN_BOUND * rep.restarts


def check_final_state(pipeline: Pipeline, events: list[InteractionEvent]) -> None:
    """The last checkpoint (what the next restore loads): id maps, histories, prototypes, positions."""
    loaded = CheckpointStore(pipeline.run_dir / "checkpoints").load_latest()
    assert loaded is not None
    learner, extra = loaded
    for role, domain in (("source", "movie"), ("target", "book")):
        ids = learner.idmaps[role].ids()
        assert len(ids) == len(set(ids)), f"{role} id map holds an id twice"
        assert set(ids) == {e.item_id for e in events if e.domain == domain}
    assert set(learner.known_users()) == {e.user_id for e in events}
    reference = UserStateStore(("movie", "book"), learner.config.max_len)
    for e in events:
        reference.observe(e)
    # The one history store (the learner's) holds each user's last items exactly as replayed, in order.
    assert {u: learner.histories.get(u) for u in learner.known_users()} == {
        u: reference.history(u) for u in reference.user_ids()
    }
    partitions = {partition_of(e.user_id) for e in events}
    assert extra["positions"] == {p: sum(1 for e in events if partition_of(e.user_id) == p) for p in partitions}
    config = learner.config
    assert set(learner.prototypes.sets) == {(role, k) for role in ("source", "target") for k in config.cluster_counts}
    for (_role, k), proto in learner.prototypes.sets.items():
        assert proto.centroids.shape == (k, config.proj_dim)
        assert np.isfinite(proto.centroids).all()


# -- the harness ----------------------------------------------------------------------------------------------


def status_value(pipeline: Pipeline, key: str) -> float:
    return float(pipeline.status().get(key, 0.0))


def run_fault(
    pipeline: Pipeline,
    events: list[InteractionEvent],
    rep: FaultReport,
    kill: Callable[[], None],
    restarted: Callable[[], bool],
    serving_may_fail: bool = False,
    kill_between_checkpoints: bool = True,
) -> Prober:
    """Replay the first events; once their first checkpoint is committed, replay the rest at a paced rate
    and kill while it is being produced; wait for the restart and the catch-up; finish the learner."""
    first, rest = events[:WARM_UP_EVENTS], events[WARM_UP_EVENTS:]
    pipeline.start_replay(first)
    wait_for(lambda: status_value(pipeline, "commit_rounds") >= 1, 120, "a first checkpoint and commit", pipeline)
    wait_for(lambda: pipeline.replay_progress.done, 30, "the warm-up events produced", pipeline)
    with Prober(pipeline, events[0].user_id) as prober:
        pipeline.start_replay(rest)
        wait_for(lambda: pipeline.replay_progress.sent > 0 and len(prober.probes) > 0, 30,
                 "the paced replay under way and a first probe", pipeline)
        if kill_between_checkpoints:  # so that the kill has trained events to lose and the restore re-trains
            wait_for(lambda: status_value(pipeline, "events_applied") > status_value(pipeline, "events_checkpointed"),
                     60, "a batch trained after the last checkpoint", pipeline)
        rep.sent_at_kill = len(first) + pipeline.replay_progress.sent
        assert rep.sent_at_kill < len(events), "the replay ended before the kill"
        kill_s = time.monotonic()
        kill()
        wait_for(restarted, 120, "the killed part to be replaced", pipeline)
        rep.restart_s = round(time.monotonic() - kill_s, 2)
        wait_for(lambda: status_value(pipeline, "events_applied") >= rep.sent_at_kill, 120,
                 "every event acknowledged before the kill trained", pipeline)
        rep.recovered_s = round(time.monotonic() - kill_s, 2)
        wait_for(lambda: pipeline.replay_progress.done and status_value(pipeline, "events_applied") >= len(events),
                 CAUGHT_UP_TIMEOUT_S, "every replayed event trained", pipeline)
        wait_for(lambda: len(prober.probes) > 0 and prober.probes[-1].ok, 30, "serving to answer", pipeline)
    assert pipeline.replay_progress.error is None
    rep.restarts = pipeline.restarts
    rep.consumer_restarts = pipeline.consumer_restarts
    rep.probes = len(prober.probes)
    failures = prober.failures()
    rep.serving_failures = len(failures)
    if failures:
        rep.serving_outage_s = round(failures[-1].end_s - failures[0].start_s, 2)
    if not serving_may_fail:
        assert failures == []
    summary = pipeline.finish_training()
    pipeline.learner = None  # finished: stop() must not finish it again
    rep.redelivered_dropped = int(summary["redelivered_dropped"])
    assert pipeline.audit_log is not None
    count_against_replay(rep, pipeline.audit_log, events, int(summary["events_applied"]))
    check_final_state(pipeline, events)
    return prober


@pytest.fixture
def pipeline(tmp_path: Path, ray_cluster: Any, kafka_broker: KafkaBroker) -> Iterator[Pipeline]:
    p = make_fault_pipeline(tmp_path, kafka_broker.bootstrap_servers)
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.mark.timeout(300)
def test_learner_sigkill(pipeline: Pipeline, events: list[InteractionEvent], report: FaultReport) -> None:
    pid = actor_pid(pipeline.learner)
    run_fault(pipeline, events, report, lambda: os.kill(pid, signal.SIGKILL),
              lambda: pipeline.restarts >= 1 and pipeline.recovering is None)
    assert report.restarts == 1


@pytest.mark.timeout(300)
def test_consumer_sigkill(pipeline: Pipeline, events: list[InteractionEvent], report: FaultReport) -> None:
    assert pipeline.fleet is not None
    survivor = pipeline.fleet.actors["consumer-0"]
    pid = actor_pid(pipeline.fleet.actors["consumer-1"])
    run_fault(pipeline, events, report, lambda: os.kill(pid, signal.SIGKILL),
              lambda: pipeline.consumer_restarts >= 1)
    # Replaced alone: the other consumer and the learner went on (one incarnation, nothing trained twice).
    assert (report.consumer_restarts, report.restarts, report.incarnations, report.retrained) == (1, 0, 1, 0)
    assert pipeline.fleet is not None and pipeline.fleet.actors["consumer-0"] is survivor


@pytest.mark.timeout(300)
def test_serving_sigkill(pipeline: Pipeline, events: list[InteractionEvent], report: FaultReport) -> None:
    pid = actor_pid(pipeline.serving)
    url_before = pipeline.serving_url
    killed_s: list[float] = []
    restarted_s: list[float] = []

    def kill() -> None:
        killed_s.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        if pipeline.serving_restarts >= 1 and not restarted_s:
            restarted_s.append(time.monotonic())
        return bool(restarted_s)

    prober = run_fault(pipeline, events, report, kill, restarted, serving_may_fail=True)
    assert pipeline.serving_restarts == 1
    assert report.restarts == 0  # training went on: only serving was restarted
    assert pipeline.serving_url == url_before  # same port again
    # Failures only while serving's own process was down: between the kill and its restart.
    assert all(killed_s[0] <= p.end_s and p.start_s <= restarted_s[0] for p in prober.failures())
    assert any(p.ok and p.start_s > restarted_s[0] for p in prober.probes)
    # The new replica got the complete state: every replayed target item is in its index.
    n_books = len({e.item_id for e in events if e.domain == "book"})
    wait_for(lambda: pipeline.status().get("index_items") == n_books, 30, "the final full version in the new replica")
    # ... and every book event counted exactly once: those before the kill from its first full version's base,
    # the later ones from the versions after it (none twice, none missed).
    stats = ray.get(pipeline.serving.stats.remote(), timeout=30)
    assert stats["consumed_counted"] == sum(1 for e in events if e.domain == "book")


@pytest.mark.timeout(360)
def test_dead_letters_are_counted_once_across_a_consumer_and_a_learner_restart(
    pipeline: Pipeline, events: list[InteractionEvent]
) -> None:
    """Every 100th record is malformed (timestamp 0). A consumer that had dead-lettered some is SIGKILLed,
    then the learner: the run's tally is still exactly the malformed records, by reason, and the run still
    sees itself caught up (trained + dead-lettered = replayed), which ``--exit-after-replay`` waits for. A
    tally summed over the consumers alive lost the replaced consumers' letters, so the run never caught up."""
    mixed: list[InteractionEvent] = []
    for i, e in enumerate(events):
        mixed.append(e)
        if i % 100 == 50:
            mixed.append(replace(e, event_id=f"bad-{i}", timestamp=0))
    bad = len(mixed) - len(events)
    assert pipeline.fleet is not None
    pipeline.start_replay(mixed)
    wait_for(lambda: status_value(pipeline, "commit_rounds") >= 1, 120, "a first checkpoint and commit", pipeline)
    wait_for(lambda: pipeline.fleet is not None and pipeline.fleet.stats()["consumer-1"].dead_letters >= 2, 60,
             "consumer-1 to dead-letter two records", pipeline)
    os.kill(actor_pid(pipeline.fleet.actors["consumer-1"]), signal.SIGKILL)
    wait_for(lambda: pipeline.consumer_restarts >= 1, 120, "the killed consumer to be replaced", pipeline)
    wait_for(lambda: status_value(pipeline, "dead_letters") >= 6 and status_value(pipeline, "commit_rounds") >= 2,
             120, "more letters counted and a checkpoint after the consumer's restart", pipeline)
    os.kill(actor_pid(pipeline.learner), signal.SIGKILL)
    wait_for(lambda: pipeline.restarts >= 1 and pipeline.recovering is None, 120, "the learner to be replaced", pipeline)
    wait_for(lambda: pipeline.replay_progress.done and pipeline.caught_up(), CAUGHT_UP_TIMEOUT_S,
             "trained + dead-lettered = replayed", pipeline)
    status = pipeline.status()
    assert (pipeline.consumer_restarts, pipeline.restarts) == (1, 1)
    assert int(status["events_applied"]) == len(events)
    assert int(status["dead_letters"]) == bad == 30
    assert status["dead_letters_by_reason"] == {"bad_timestamp": bad}
    assert "offset" in status["dead_letter_examples"]["bad_timestamp"]
    assert int(status["records_in"]) == len(mixed)
    summary = pipeline.write_summary(pipeline.run_dir / "summary.json", 1.0)
    assert (summary["dead_letters"], summary["records_consumed"]) == (bad, len(mixed))
    assert summary["dead_letters_by_reason"] == {"bad_timestamp": bad}


@pytest.fixture
def private_broker(kafka_libs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = start_test_broker(tmp_path_factory.mktemp("kafka-faults"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.timeout(420)
def test_broker_sigkill(
    tmp_path: Path, ray_cluster: Any, private_broker: KafkaBroker, events: list[InteractionEvent], report: FaultReport
) -> None:
    p = make_fault_pipeline(tmp_path, private_broker.bootstrap_servers)
    p.start()
    port, data_dir = private_broker.port, private_broker.data_dir
    back: list[float] = []

    def kill_and_restart() -> None:
        pid = private_broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not private_broker.is_running(), 30, "the broker process to exit")
        private_broker.start(timeout_s=120, stop_with_parent=True)  # same port, same data directory
        back.append(time.monotonic())

    try:
        run_fault(p, events, report, kill_and_restart, lambda: bool(back))
    finally:
        p.stop()
    assert (private_broker.port, private_broker.data_dir) == (port, data_dir)
    # The replay producer, the consumers (transient Kafka errors: an empty poll, a commit left to the next
    # round) and the learner all ride out the outage: nothing had to be restarted.
    assert report.restarts == 0
