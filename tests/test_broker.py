"""The local Kafka broker: configuration (pure), then the real broker: restart, crash, status, tools.

The restart and crash tests run a private broker (module scope) so the session's shared broker is
never stopped under other tests; the console-producer test uses the shared one.
"""

from __future__ import annotations

import argparse
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from sitn.broker import (
    KAFKA_INFRA_DIR,
    KAFKA_VERSION,
    KafkaBroker,
    KafkaCluster,
    QuorumVoter,
    read_properties,
    server_properties,
)
from sitn.commands import kafka as kafka_command
from stream.errors import BrokerError
from tests.fixtures.kafka import DEFAULT_CACHE_DIR, free_ports, start_test_broker

IO_TIMEOUT_S = 60.0


# --- pure: configuration -------------------------------------------------------------------------


def test_kafka_version_is_the_one_the_pom_fetches() -> None:
    pom = ET.parse(KAFKA_INFRA_DIR / "pom.xml").getroot()
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    assert pom.findtext("m:properties/m:kafka.version", namespaces=namespace) == KAFKA_VERSION


def test_server_properties_single_node_combined_on_loopback() -> None:
    props = read_properties(server_properties(19092, 19093, Path("/d/kafka-logs"), auto_create_topics=False))
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["log.dirs"] == "/d/kafka-logs"
    assert props["auto.create.topics.enable"] == "false"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor", "min.insync.replicas"):
        assert props[key] == "1", key


def test_controller_port_defaults_to_recorded_then_port_plus_one(tmp_path: Path) -> None:
    assert KafkaBroker(tmp_path, port=19092).controller_port == 19093
    (tmp_path / "server.properties").write_text(server_properties(19092, 24000, tmp_path / "kafka-logs"))
    assert KafkaBroker(tmp_path, port=19100).controller_port == 24000
    assert KafkaBroker(tmp_path, port=19100, controller_port=25000).controller_port == 25000


def test_constructor_rejects_bad_arguments_with_what_was_received(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^port must be an integer in 1\.\.65535, got 0$"):
        KafkaBroker(tmp_path, port=0)
    with pytest.raises(ValueError, match=r"^controller_port must differ from port, both are 9092$"):
        KafkaBroker(tmp_path, port=9092, controller_port=9092)
    with pytest.raises(ValueError, match=r"^heap must look like 512m or 1g \(a JVM -Xmx size\), got 'lots'$"):
        KafkaBroker(tmp_path, heap="lots")
    with pytest.raises(ValueError, match=r"^topic must be 1-249 characters of \[A-Za-z0-9._-\], got 'a b'$"):
        KafkaBroker(tmp_path).console_producer_cmd("a b")


def test_kafka_home_without_kafka_jars_is_an_operator_error(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "data", kafka_home=tmp_path)
    with pytest.raises(BrokerError, match=r"kafka_home=.* has no libs/kafka_2\.13-\*\.jar"):
        broker.libs_dir()


def test_kafka_home_libs_are_used_instead_of_fetching(tmp_path: Path) -> None:
    libs = tmp_path / "kafka_2.13-4.4.0" / "libs"
    libs.mkdir(parents=True)
    (libs / "kafka_2.13-4.4.0.jar").write_bytes(b"")
    broker = KafkaBroker(tmp_path / "data", port=19092, kafka_home=libs.parent, cache_dir=tmp_path / "never-used")
    cmd = broker.console_producer_cmd("events")
    assert cmd[cmd.index("-cp") + 1] == f"{libs}/*"
    assert cmd[cmd.index("-cp") + 2 :] == [
        "org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server", "127.0.0.1:19092", "--topic", "events",
    ]
    assert not (tmp_path / "never-used").exists()


def test_status_of_a_never_started_data_dir_is_stopped(tmp_path: Path) -> None:
    status = KafkaBroker(tmp_path).status()
    assert (status.running, status.pid, status.bootstrap_servers) == (False, None, None)


VOTERS = (
    QuorumVoter(1, 19093, "AAAAAAAAAAAAAAAAAAAAAA"),
    QuorumVoter(2, 19095, "BBBBBBBBBBBBBBBBBBBBBB"),
    QuorumVoter(3, 19097, "CCCCCCCCCCCCCCCCCCCCCC"),
)


def test_server_properties_of_a_three_node_quorum_replicate_three_ways_two_in_sync() -> None:
    props = read_properties(server_properties(19094, 19095, Path("/d/node-2/kafka-logs"), node_id=2, quorum=VOTERS))
    assert props["node.id"] == "2"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19094,CONTROLLER://127.0.0.1:19095"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093,127.0.0.1:19095,127.0.0.1:19097"
    assert "controller.quorum.voters" not in props  # a dynamic quorum: the voters are in the formatted storage
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "share.coordinator.state.topic.replication.factor",
    ):
        assert props[key] == "3", key
    for key in ("min.insync.replicas", "transaction.state.log.min.isr", "share.coordinator.state.topic.min.isr"):
        assert props[key] == "2", key


def test_a_node_outside_its_quorum_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^node 4 with controller port 19099 is not one of the quorum's voters"):
        server_properties(19098, 19099, Path("/d"), node_id=4, quorum=VOTERS)
    with pytest.raises(ValueError, match=r"^node 2 with controller port 19093 is not one of the quorum's voters"):
        server_properties(19092, 19093, Path("/d"), node_id=2, quorum=VOTERS)


def test_one_node_cluster_is_the_single_broker_in_the_data_dir_itself(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path, brokers=1, port=19092)
    (node,) = cluster.nodes
    single = KafkaBroker(tmp_path, port=19092)
    assert (node.data_dir, node.port, node.controller_port, node.node_id, node.quorum) == (tmp_path, 19092, 19093, 1, ())
    assert node.status() == single.status()
    assert cluster.bootstrap_servers == single.bootstrap_servers == "127.0.0.1:19092"


def test_three_node_cluster_layout_ports_dirs_and_one_quorum(tmp_path: Path) -> None:
    cluster = KafkaCluster(tmp_path, brokers=3, port=19092)
    assert [(n.node_id, n.data_dir, n.port, n.controller_port) for n in cluster.nodes] == [
        (1, tmp_path / "node-1", 19092, 19093),
        (2, tmp_path / "node-2", 19094, 19095),
        (3, tmp_path / "node-3", 19096, 19097),
    ]
    assert cluster.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    quorum = cluster.nodes[0].quorum
    assert [(v.node_id, v.controller_port) for v in quorum] == [(1, 19093), (2, 19095), (3, 19097)]
    assert len({v.directory_id for v in quorum}) == 3
    assert all(n.quorum == quorum and n.cluster_id == cluster.nodes[0].cluster_id for n in cluster.nodes)
    explicit = KafkaCluster(tmp_path / "x", brokers=2, ports=[(20000, 20100), (20001, 20101)])
    assert [(n.port, n.controller_port) for n in explicit.nodes] == [(20000, 20100), (20001, 20101)]
    assert cluster.node(3) is cluster.nodes[2]
    with pytest.raises(ValueError, match=r"^node_id must be one of \[1, 2, 3\], got 4$"):
        cluster.node(4)


def test_cluster_constructor_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^brokers must be a positive integer, got 0$"):
        KafkaCluster(tmp_path, brokers=0)
    with pytest.raises(ValueError, match=r"^ports must list \(port, controller_port\) for each of the 3 brokers, got \[\(1, 2\)\]$"):
        KafkaCluster(tmp_path, brokers=3, ports=[(1, 2)])


def test_node_count_is_recorded_and_a_data_dir_is_not_restarted_with_another(tmp_path: Path) -> None:
    assert KafkaCluster.recorded_brokers(tmp_path) is None
    single = tmp_path / "single"
    single.mkdir()
    (single / "server.properties").write_text(server_properties(19092, 19093, single / "kafka-logs"))
    assert KafkaCluster.recorded_brokers(single) == 1
    with pytest.raises(BrokerError, match=r"holds a Kafka of 1 node\(s\), asked for 3; start it with its own node count"):
        KafkaCluster(single, brokers=3, port=19092).start()
    trio = tmp_path / "trio"
    for node_id, voter in enumerate(VOTERS, start=1):
        (trio / f"node-{node_id}").mkdir(parents=True)
        config = server_properties(19090 + 2 * node_id, voter.controller_port, trio / "kafka-logs", node_id=node_id, quorum=VOTERS)
        (trio / f"node-{node_id}" / "server.properties").write_text(config)
    assert KafkaCluster.recorded_brokers(trio) == 3
    with pytest.raises(BrokerError, match=r"holds a Kafka of 3 node\(s\), asked for 1"):
        KafkaCluster(trio, brokers=1).start()
    # The controller ports come back from each node's own recorded listeners, whatever the new --port.
    assert [n.controller_port for n in KafkaCluster(trio, brokers=3, port=30000).nodes] == [19093, 19095, 19097]
    # A stopped cluster's status shows where each node last listened, whatever the new --port.
    assert [(n.running, n.port, n.controller_port) for n in KafkaCluster(trio, brokers=3, port=30000).status().nodes] == [
        (False, 19092, 19093), (False, 19094, 19095), (False, 19096, 19097),
    ]


def test_a_partly_formatted_cluster_is_an_operator_error(tmp_path: Path) -> None:
    meta = tmp_path / "node-1" / "kafka-logs" / "meta.properties"
    meta.parent.mkdir(parents=True)
    meta.write_text("version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id=1\ndirectory.id=DDDDDDDDDDDDDDDDDDDDDD\n")
    cluster = KafkaCluster(tmp_path, brokers=3, port=19092)
    assert cluster.nodes[1].cluster_id == "AAAAAAAAAAAAAAAAAAAAAA"  # taken from the formatted node
    assert cluster.nodes[0].quorum[0].directory_id == "DDDDDDDDDDDDDDDDDDDDDD"
    with pytest.raises(BrokerError, match=r"^only some nodes under .* are formatted .*Operator action: stop the cluster"):
        cluster.start()


# --- the real broker -----------------------------------------------------------------------------


def produce(bootstrap_servers: str, topic: str, payloads: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    try:
        futures = [producer.send(topic, value=payload) for payload in payloads]
        producer.flush(timeout=IO_TIMEOUT_S)
        for future in futures:
            future.get(timeout=IO_TIMEOUT_S)
    finally:
        producer.close()


def consume_all(bootstrap_servers: str, topic: str, expected_count: int) -> list[bytes]:
    """Read partition 0 of ``topic`` from the start until ``expected_count`` messages or the timeout."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        values: list[bytes] = []
        deadline = time.monotonic() + IO_TIMEOUT_S
        while len(values) < expected_count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                values.extend(record.value for record in records)
        return values
    finally:
        consumer.close()


def create_topic(bootstrap_servers: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics({topic: {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True)
    finally:
        admin.close()


def unique_topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def private_broker(kafka_libs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = start_test_broker(tmp_path_factory.mktemp("kafka-private"))
    try:
        yield broker
    finally:
        broker.stop()


def run_cli(*argv: str) -> int:
    """``sitn kafka ...`` in-process, through the command module's own parser (no environment)."""
    parser = argparse.ArgumentParser()
    kafka_command.register(parser.add_subparsers())
    args = parser.parse_args(["kafka", *argv])
    return int(args.func(args))


@pytest.mark.kafka
def test_messages_survive_a_clean_restart_and_status_follows(
    private_broker: KafkaBroker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("SITN_KAFKA_PORT", "SITN_KAFKA_DATA_DIR", "KAFKA_HOME"):
        monkeypatch.delenv(name, raising=False)
    topic = unique_topic("restart")
    payloads = [f"message-{i}".encode() for i in range(50)] + [b"", b"\x00\xff binary"]
    create_topic(private_broker.bootstrap_servers, topic)
    produce(private_broker.bootstrap_servers, topic, payloads)
    old_pid = private_broker.pid
    data_dir = str(private_broker.data_dir)

    assert run_cli("status", "--data-dir", data_dir) == 0
    assert capsys.readouterr().out == (
        f"running: pid {old_pid}, bootstrap servers {private_broker.bootstrap_servers}, "
        f"data {data_dir}, log {private_broker.log_path}\n"
    )
    # Stopped through the pid file, as another process (`sitn kafka stop`) would.
    assert run_cli("stop", "--data-dir", data_dir) == 0
    assert not private_broker.is_running()
    assert not private_broker.pid_path.exists()
    assert run_cli("status", "--data-dir", data_dir) == kafka_command.EXIT_NOT_RUNNING
    assert capsys.readouterr().out == (
        f"stopped: pid {old_pid} (data {data_dir})\nstopped (data {data_dir}, log {private_broker.log_path})\n"
    )

    private_broker.start(timeout_s=120, stop_with_parent=True)
    assert private_broker.pid not in (None, old_pid)
    assert consume_all(private_broker.bootstrap_servers, topic, len(payloads)) == payloads
    assert private_broker.log_path.read_text().count("==== sitn: formatted") == 1  # reused, not reformatted


@pytest.mark.kafka
def test_messages_acknowledged_before_a_crash_survive_it(private_broker: KafkaBroker) -> None:
    topic = unique_topic("crash")
    payloads = [f"before-crash-{i}".encode() for i in range(20)]
    create_topic(private_broker.bootstrap_servers, topic)
    produce(private_broker.bootstrap_servers, topic, payloads)

    private_broker.kill()
    assert private_broker.status().running is False
    private_broker.start(timeout_s=120, stop_with_parent=True)

    assert consume_all(private_broker.bootstrap_servers, topic, len(payloads)) == payloads


@pytest.mark.kafka
def test_starting_twice_on_one_data_dir_is_refused(kafka_broker: KafkaBroker) -> None:
    other = KafkaBroker(kafka_broker.data_dir, port=kafka_broker.port, controller_port=kafka_broker.controller_port)
    with pytest.raises(BrokerError, match=rf"^a broker is already running from {kafka_broker.data_dir} \(pid {kafka_broker.pid}\)"):
        other.start()


@pytest.mark.kafka
def test_a_port_in_use_is_refused_before_the_jvm_starts(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    (controller_port,) = free_ports(1)
    clash = KafkaBroker(tmp_path / "clash", port=kafka_broker.port, controller_port=controller_port)
    with pytest.raises(BrokerError) as failure:
        clash.start(timeout_s=120)
    assert str(failure.value) == (
        f"the Kafka port 127.0.0.1:{kafka_broker.port} is already in use by another process (another broker? "
        f"`sitn kafka status`); choose another port or stop that process. Broker log: {clash.log_path}"
    )
    assert not clash.pid_path.exists()
    assert kafka_broker.is_running()


@pytest.mark.kafka
def test_a_broker_that_exits_during_start_fails_with_its_log(kafka_libs_dir: Path, tmp_path: Path) -> None:
    port, controller_port = free_ports(2)
    doomed = KafkaBroker(tmp_path / "doomed", port=port, controller_port=controller_port, cache_dir=DEFAULT_CACHE_DIR, heap="1k")
    with pytest.raises(BrokerError) as failure:
        doomed.start(timeout_s=120)
    message = str(failure.value)
    assert message.startswith(
        f"the Kafka broker from {doomed.data_dir} is not running (it exited or never started); see {doomed.log_path}:\n"
    )
    assert "Too small maximum heap" in message  # the JVM's own complaint, from the log's tail
    assert not doomed.is_running()
    assert not doomed.pid_path.exists()


@pytest.mark.kafka
def test_kafka_console_producer_lines_arrive_exactly(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("console")
    create_topic(kafka_broker.bootstrap_servers, topic)
    lines = ["first line", '{"user_id": 7, "item_id": 42}', "third ünïcode line"]

    done = subprocess.run(
        kafka_broker.console_producer_cmd(topic),
        input="".join(f"{line}\n" for line in lines).encode(),
        capture_output=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert consume_all(kafka_broker.bootstrap_servers, topic, len(lines)) == [line.encode() for line in lines]
