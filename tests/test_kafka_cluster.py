"""A real 3-node KRaft cluster on 127.0.0.1: SIGKILL the broker that leads the most partitions mid-stream.

The cluster (three combined broker+controller nodes, all voters) runs in a tmp dir for this module.
Topics are created by the project's own ``ensure_topics`` (replication 3 and min.insync.replicas 2,
read from the cluster) and written by the project's idempotent producer (acks=all). The test counts:

- every acknowledged record is read back exactly once (the count and the set of keys);
- the stall: the longest gap between two acknowledgements around the kill, and the time from the kill
  until every partition acknowledges again (the failover: the controller fences the dead node after
  ``broker.session.timeout.ms``, 9 s by default, and moves its leaderships and ISR places);
- the rejoin: the killed node restarts on its data directory and is back in every partition's ISR.

The figures go to the test report (``record_property``) and the log.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError

from sitn.broker import KafkaBroker, KafkaCluster
from stream.dataset import load_events
from stream.events import InteractionEvent
from stream.producer import make_kafka_producer
from stream.settings import StreamSettings, kafka_client_kwargs
from stream.topics import ensure_topics
from tests.fixtures.kafka import BROKER_START_TIMEOUT_S, DEFAULT_CACHE_DIR, free_ports
from tests.test_broker import run_cli
from tests.test_faults import N_EVENTS, FaultReport, make_fault_pipeline, run_fault
from tests.test_faults import PARTITIONS as PIPELINE_PARTITIONS

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

log = logging.getLogger(__name__)

NODES = 3
NODE_HEAP = "384m"  # three JVMs on a small shared machine
CLUSTER_START_TIMEOUT_S = 2 * BROKER_START_TIMEOUT_S  # three cold JVMs at once
PARTITIONS = 4
RECORDS = 20_000
CHUNK_RECORDS = 200  # sent every CHUNK_INTERVAL_S: ~4,000 records/s offered, so the kill lands mid-stream
CHUNK_INTERVAL_S = 0.05
IO_TIMEOUT_S = 120.0
REJOIN_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def kafka_cluster(kafka_libs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    ports = free_ports(2 * NODES)
    cluster = KafkaCluster(
        tmp_path_factory.mktemp("kafka-cluster"),
        brokers=NODES,
        ports=list(zip(ports[::2], ports[1::2], strict=True)),
        cache_dir=DEFAULT_CACHE_DIR,
        heap=NODE_HEAP,
    )
    try:
        cluster.start(timeout_s=CLUSTER_START_TIMEOUT_S, stop_with_parent=True)  # none left behind by a killed run
        yield cluster
    finally:
        cluster.stop(timeout_s=30)
        assert cluster.status().running_nodes == 0


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll ``condition`` every 0.2 s until true; return the seconds it took, or fail naming ``what``.

    A Kafka error counts as "not yet": until the controller fences a killed node, the metadata still
    names it, and a request routed to it fails.
    """
    start_s = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - start_s
        except KafkaError as exc:
            log.info("not yet: %s error=%r", what, exc)
        if time.monotonic() - start_s > timeout_s:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def describe_partitions(cluster: KafkaCluster, *topics: str) -> list[dict[str, Any]]:
    """Every partition of ``topics`` (leader, replicas, ISR), asked of the nodes that run."""
    live = ",".join(node.bootstrap_servers for node in cluster.nodes if node.is_running())
    admin = KafkaAdminClient(bootstrap_servers=live, client_id="sitn-test-describe")
    try:
        described = admin.describe_topics(list(topics))
    finally:
        admin.close()
    by_name = {topic["name"]: topic["partitions"] for topic in described}
    return [p for topic in topics for p in sorted(by_name[topic], key=lambda p: p["partition_index"])]


def topic_config(bootstrap_servers: str, topic: str, key: str) -> str:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="sitn-test-configs")
    try:
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])["topic"][topic]
        return str(configs[key]["value"])  # set on the topic: among the "modified" ones
    finally:
        admin.close()


def leader_counts(partitions: list[dict[str, Any]]) -> Counter[int]:
    return Counter(p["leader_id"] for p in partitions)


class Reader:
    """Reads every partition of ``topic`` from the start in a thread, keeping each record's key."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.keys: list[bytes] = []
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                       client_id="sitn-test-reader")
        self._consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        self._consumer.seek_to_beginning()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-reader", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for records in self._consumer.poll(timeout_ms=500).values():
                    self.keys.extend(record.key for record in records)
        except BaseException as exc:  # re-raised by the test through ``error``
            self.error = exc
            raise

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(IO_TIMEOUT_S)
        self._consumer.close()


def test_cluster_status_lists_three_voters_and_replicates_topics_three_ways(kafka_cluster: KafkaCluster) -> None:
    status = kafka_cluster.status()
    assert status.running_nodes == NODES
    assert [(n.node_id, n.port, n.controller_port) for n in status.nodes] == [
        (n.node_id, n.port, n.controller_port) for n in kafka_cluster.nodes
    ]
    assert len({n.port for n in status.nodes} | {n.controller_port for n in status.nodes}) == 2 * NODES
    assert len({n.data_dir for n in status.nodes}) == NODES
    admin = KafkaAdminClient(bootstrap_servers=kafka_cluster.bootstrap_servers, client_id="sitn-test-cluster")
    try:
        described = admin.describe_cluster()
    finally:
        admin.close()
    assert sorted(b["broker_id"] for b in described["brokers"]) == [1, 2, 3]
    assert {n.formatted_ids()[0] for n in kafka_cluster.nodes} == {described["cluster_id"]}
    assert described["controller_id"] in (1, 2, 3)


def node_lines(cluster: KafkaCluster) -> str:
    return "".join(
        f"  node {n.node_id}: running, pid {n.pid}, port {n.port}, controller port {n.controller_port}, log {n.log_path}\n"
        for n in cluster.nodes
    )


def test_sitn_kafka_status_and_start_find_the_cluster_from_its_data_dir(
    kafka_cluster: KafkaCluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("SITN_KAFKA_PORT", "SITN_KAFKA_DATA_DIR", "SITN_KAFKA_BROKERS", "KAFKA_HOME"):
        monkeypatch.delenv(name, raising=False)
    data_dir = str(kafka_cluster.data_dir)
    capsys.readouterr()
    # No --brokers and no --port: the node count and the ports come from what the data dir recorded.
    assert run_cli("status", "--data-dir", data_dir) == 0
    header = f"bootstrap servers {kafka_cluster.bootstrap_servers}, data {data_dir}\n"
    assert capsys.readouterr().out == f"running: 3/3 nodes, {header}{node_lines(kafka_cluster)}"
    assert run_cli("start", "--brokers", "3", "--data-dir", data_dir) == 0
    assert capsys.readouterr().out == f"started nodes none (all were running): {header}{node_lines(kafka_cluster)}"
    for action in ("start", "status", "stop"):  # refused before anything runs or stops
        assert run_cli(action, "--brokers", "1", "--data-dir", data_dir) == 2
        assert capsys.readouterr().err == (
            f"sitn kafka: {data_dir} holds a Kafka of 3 node(s), asked for 1 (--brokers / SITN_KAFKA_BROKERS); "
            "use its own node count, or another data directory\n"
        )
    assert kafka_cluster.status().running_nodes == NODES
    assert not (kafka_cluster.data_dir / "server.properties").exists()  # no single node started beside them


@pytest.mark.timeout(900)
def test_sigkill_of_the_busiest_leader_loses_nothing_duplicates_nothing_and_it_rejoins(
    kafka_cluster: KafkaCluster, record_property: Callable[[str, object], None]
) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = StreamSettings(
        kafka_bootstrap_servers=kafka_cluster.bootstrap_servers,
        topic_interactions=f"kill-{tag}",
        topic_dead_letters=f"kill-dl-{tag}",
        topic_embedding_updates=f"kill-up-{tag}",
        partitions=PARTITIONS,
    )
    topic = settings.topic_interactions
    created = ensure_topics(settings, timeout_s=60)
    assert sorted(created) == sorted([topic, settings.topic_dead_letters, settings.topic_embedding_updates])
    # a new topic's partitions reach every node's metadata shortly after creation returns
    wait_for(lambda: len(describe_partitions(kafka_cluster, topic)) == PARTITIONS, IO_TIMEOUT_S,
             "the new topic's partitions in the metadata")
    before = describe_partitions(kafka_cluster, topic)
    assert [sorted(p["replica_nodes"]) for p in before] == [[1, 2, 3]] * PARTITIONS
    assert topic_config(kafka_cluster.bootstrap_servers, topic, "min.insync.replicas") == "2"
    wait_for(lambda: all(len(p["isr_nodes"]) == NODES for p in describe_partitions(kafka_cluster, topic)),
             IO_TIMEOUT_S, "a full ISR before the kill")

    producer = make_kafka_producer(settings, client_id="sitn-test-cluster-producer")
    assert kafka_client_kwargs(settings)["bootstrap_servers"] == kafka_cluster.bootstrap_servers
    acked_at: list[tuple[float, int]] = []  # (monotonic time, partition) of each acknowledgement, in order
    failures: list[BaseException] = []
    acked_keys: list[bytes] = []
    lock = threading.Lock()

    def on_ack(key: bytes) -> Callable[[Any], None]:
        def record(metadata: Any) -> None:
            with lock:
                acked_at.append((time.monotonic(), metadata.partition))
                acked_keys.append(key)
        return record

    keys = [f"user-{i:06d}".encode() for i in range(RECORDS)]
    victim: KafkaBroker | None = None
    killed_s = float("nan")
    with Reader(kafka_cluster.bootstrap_servers, topic) as reader:
        for start in range(0, RECORDS, CHUNK_RECORDS):
            for key in keys[start : start + CHUNK_RECORDS]:
                future = producer.send(topic, key=key, value=key)
                future.add_callback(on_ack(key))
                future.add_errback(failures.append)
            if victim is None and len(acked_at) >= RECORDS // 2:
                leaders = leader_counts(describe_partitions(kafka_cluster, topic))
                victim = kafka_cluster.node(leaders.most_common(1)[0][0])
                killed_s = time.monotonic()
                victim.kill()
                log.warning("killed node_id=%d leading partitions=%d acked=%d", victim.node_id, leaders[victim.node_id], len(acked_at))
                assert run_cli("status", "--data-dir", str(kafka_cluster.data_dir)) == 1  # degraded: 2 of 3 run
            time.sleep(CHUNK_INTERVAL_S)
        producer.flush(timeout=IO_TIMEOUT_S)
        producer.close(timeout=IO_TIMEOUT_S)
        assert victim is not None, "every record was acknowledged before half were: no kill happened mid-stream"
        assert failures == []
        wait_for(lambda: len(reader.keys) >= RECORDS or reader.error is not None, IO_TIMEOUT_S, "every record read back")
        time.sleep(2.0)  # a duplicate would arrive with (or right after) the last original: read on a little
    assert reader.error is None

    # Exactly once: every acknowledged record read back, none twice.
    duplicated = len(reader.keys) - len(set(reader.keys))
    lost = len(set(keys) - set(reader.keys))
    assert sorted(acked_keys) == keys
    assert (len(reader.keys), lost, duplicated) == (RECORDS, 0, 0)
    assert set(reader.keys) == set(keys)

    # The stall: acknowledgements stop for every partition whose leader or ISR held the dead node.
    times = [t for t, _ in acked_at]
    gaps = [(b - a, a) for a, b in pairwise(times) if b > killed_s - 1.0]
    stall_s, stall_from_s = max(gaps)
    after_kill = {p: min(t for t, q in acked_at if q == p and t > killed_s) for p in range(PARTITIONS)}
    every_partition_acks_again_s = max(after_kill.values()) - killed_s
    during = describe_partitions(kafka_cluster, topic)
    assert all(p["leader_id"] != victim.node_id for p in during)  # its leaderships moved to the survivors
    assert all(victim.node_id not in p["isr_nodes"] for p in during)

    # The rejoin: same data directory and ports; its replicas catch up and are back in every ISR.
    restart_s = time.monotonic()
    victim.start(timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True)
    wait_for(
        lambda: all(victim.node_id in p["isr_nodes"] for p in describe_partitions(kafka_cluster, topic)),
        REJOIN_TIMEOUT_S, f"node {victim.node_id} back in every partition's ISR",
    )
    rejoin_s = time.monotonic() - restart_s  # from the restart: the JVM's start, then the replicas' catch-up
    assert kafka_cluster.status().running_nodes == NODES

    figures = {
        "records": RECORDS, "lost": lost, "duplicated": duplicated, "killed_node": victim.node_id,
        "stall_s": round(stall_s, 2), "stall_began_after_kill_s": round(stall_from_s - killed_s, 2),
        "every_partition_acks_again_s": round(every_partition_acks_again_s, 2), "rejoin_s": round(rejoin_s, 2),
    }
    for name, value in figures.items():
        record_property(name, value)
    log.warning("broker kill %s", " ".join(f"{k}={v}" for k, v in figures.items()))
    print(f"\nbroker kill: {figures}")
    assert stall_s < 60.0  # the failover: a session timeout (9 s) plus an election, not a hang


@pytest.fixture(scope="module")
def replayed(events_csv: Path) -> list[InteractionEvent]:
    """The first events of the shipped data set, as tests/test_faults.py replays them."""
    return load_events(events_csv, "movie", "book", limit=N_EVENTS).events


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_pipeline_rides_out_the_busiest_leader_sigkill(
    tmp_path: Path, ray_cluster: Any, kafka_cluster: KafkaCluster, replayed: list[InteractionEvent],
    record_property: Callable[[str, object], None],
) -> None:
    """The whole pipeline on the cluster (tests/test_faults.py's harness): SIGKILL the node leading most of the
    pipeline's partitions mid-replay; 0 lost, 0 trained twice (the audit log), serving 200 throughout, no
    restart of anything; the node restarts and rejoins every ISR while the replay goes on."""
    report = FaultReport(fault="cluster_broker_sigkill")
    started_s = time.monotonic()
    pipeline = make_fault_pipeline(tmp_path, kafka_cluster.bootstrap_servers)
    stream = pipeline.stream
    topics = [stream.topic_interactions, stream.topic_dead_letters, stream.topic_embedding_updates]
    killed: list[tuple[KafkaBroker, float]] = []
    rejoined: list[float] = []

    def partitions() -> list[dict[str, Any]]:
        return describe_partitions(kafka_cluster, *topics)

    def kill() -> None:
        leaders = leader_counts(partitions())
        victim = kafka_cluster.node(leaders.most_common(1)[0][0])
        report.extra["killed_node_leading"] = f"{leaders[victim.node_id]}/{sum(leaders.values())}"
        killed.append((victim, time.monotonic()))
        victim.kill()

    def restart_and_rejoin() -> bool:
        """Called by the harness until true: once the survivors lead everything, restart the node, wait for its ISRs."""
        if rejoined:
            return True
        victim, kill_s = killed[0]
        wait_for(lambda: all(p["leader_id"] != victim.node_id for p in partitions()), IO_TIMEOUT_S, "the failover")
        report.extra["failover_s"] = round(time.monotonic() - kill_s, 2)
        restart_s = time.monotonic()
        victim.start(timeout_s=BROKER_START_TIMEOUT_S, stop_with_parent=True)
        wait_for(lambda: all(victim.node_id in p["isr_nodes"] for p in partitions()), REJOIN_TIMEOUT_S,
                 f"node {victim.node_id} back in every ISR of the pipeline's topics")
        report.extra["rejoin_s"] = round(time.monotonic() - restart_s, 2)
        rejoined.append(time.monotonic())
        return True

    pipeline.start()
    try:
        assert [sorted(p["replica_nodes"]) for p in partitions()] == [[1, 2, 3]] * (PIPELINE_PARTITIONS + 2)
        run_fault(pipeline, replayed, report, kill, restart_and_rejoin)
    finally:
        pipeline.stop()
        report.wall_s = round(time.monotonic() - started_s, 1)
        for name, value in vars(report).items():
            record_property(name, value)
    assert report.restarts == 0  # the producer, the consumers and the learner rode it out
    assert report.retrained == 0  # nothing trained twice (run_fault: 0 lost, serving answered throughout)
    assert kafka_cluster.status().running_nodes == NODES
    print(f"\npipeline broker kill: {vars(report)}")
