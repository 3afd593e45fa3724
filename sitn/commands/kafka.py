"""``sitn kafka start|stop|status``: a local Apache Kafka for development and tests, one node or a cluster.

Each node (a broker and its KRaft controller in one process) listens on 127.0.0.1 and keeps
everything in its data directory, formatted on first start and reused after, so messages survive a
restart. ``--brokers 3`` runs a 3-node cluster: node i in <data dir>/node-<i> on ports
port + 2(i-1) and the next one, all three controllers voters of the quorum, topics replicated 3 ways
with min.insync.replicas 2, so one node may crash without losing an acknowledged write. The Kafka
release is fetched once from Maven Central into a cache outside the repository, unless KAFKA_HOME
names an installed one. ``stop`` and ``status`` find the nodes through the pid files in the data
directory (and the node count it records), so they work from any shell.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sitn.broker import DEFAULT_CACHE_DIR, KAFKA_VERSION, KafkaCluster
from stream.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
DEFAULT_DATA_DIR = Path.home() / ".cache" / "sitn-stream" / "kafka-data"
EXIT_NOT_RUNNING = 3  # as in LSB init scripts: `status` of a stopped service

ENVIRONMENT_HELP = f"""\
environment variables (a command-line option wins over its variable):
  SITN_KAFKA_PORT       client port on 127.0.0.1 (default {DEFAULT_PORT}; the controller takes the next one,
                        a cluster's node i the two ports from port + 2(i-1))
  SITN_KAFKA_BROKERS    nodes of the cluster (default: as many as the data directory last ran, else 1)
  SITN_KAFKA_DATA_DIR   data directory: KRaft metadata, topics, server.log, broker.pid
                        (default {DEFAULT_DATA_DIR})
  KAFKA_HOME            an unpacked Kafka release to run from its libs/ instead of fetching one
  SITN_KAFKA_CACHE_DIR  where the Kafka {KAFKA_VERSION} jars fetched from Maven Central are kept
                        (default {DEFAULT_CACHE_DIR})

exit status: 0 done / running, 1 a broker failed (the message names its log file) or `status`
             found only some of the nodes running, {EXIT_NOT_RUNNING} `status` found none running.
"""


@dataclass(frozen=True)
class KafkaCommandSettings:
    """Everything one ``sitn kafka`` invocation runs with, from options over environment over defaults."""

    action: str
    brokers: int
    port: int
    controller_port: int | None
    data_dir: Path
    kafka_home: Path | None
    cache_dir: Path
    heap: str
    timeout_s: float

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> KafkaCommandSettings:
        port_text = environ.get("SITN_KAFKA_PORT", str(DEFAULT_PORT)) if args.port is None else str(args.port)
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"the Kafka port must be an integer in 1..65535, got {port_text!r} (--port / SITN_KAFKA_PORT)")
        data_dir = Path(args.data_dir or environ.get("SITN_KAFKA_DATA_DIR", DEFAULT_DATA_DIR)).expanduser()
        brokers_text = environ.get("SITN_KAFKA_BROKERS") if args.brokers is None else str(args.brokers)
        recorded = KafkaCluster.recorded_brokers(data_dir)
        if brokers_text is None:
            brokers_text = str(recorded or 1)
        if not brokers_text.isdigit() or int(brokers_text) < 1:
            raise ConfigError(f"the number of brokers must be a positive integer, got {brokers_text!r} (--brokers / SITN_KAFKA_BROKERS)")
        if recorded is not None and recorded != int(brokers_text):
            raise ConfigError(
                f"{data_dir} holds a Kafka of {recorded} node(s), asked for {brokers_text} (--brokers / SITN_KAFKA_BROKERS); "
                "use its own node count, or another data directory"
            )
        if args.controller_port is not None and int(brokers_text) > 1:
            raise ConfigError(f"--controller-port is for a single node; a cluster of {brokers_text} takes port + 2(i-1) + 1 for node i")
        kafka_home = environ.get("KAFKA_HOME")
        if args.timeout_s <= 0:
            raise ConfigError(f"--timeout-s must be positive, got {args.timeout_s}")
        return cls(
            action=args.action,
            brokers=int(brokers_text),
            port=int(port_text),
            controller_port=args.controller_port,
            data_dir=data_dir,
            kafka_home=Path(kafka_home) if kafka_home else None,
            cache_dir=Path(environ.get("SITN_KAFKA_CACHE_DIR", DEFAULT_CACHE_DIR)),
            heap=args.heap,
            timeout_s=args.timeout_s,
        )

    def cluster(self) -> KafkaCluster:
        return KafkaCluster(
            self.data_dir,
            self.brokers,
            self.port,
            ports=None if self.controller_port is None else [(self.port, self.controller_port)],
            kafka_home=self.kafka_home,
            cache_dir=self.cache_dir,
            heap=self.heap,
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "kafka",
        help="start, stop or check the local Kafka (one node, or a cluster with --brokers 3)",
        description=__doc__,
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("start", "stop", "status"), help="what to do with the broker")
    p.add_argument(
        "--brokers",
        type=int,
        default=None,
        help="nodes of the cluster, each broker and controller [env SITN_KAFKA_BROKERS, default: as recorded in the data dir, else 1]",
    )
    p.add_argument("--port", type=int, default=None, help=f"client port on 127.0.0.1 [env SITN_KAFKA_PORT, default {DEFAULT_PORT}]")
    p.add_argument(
        "--controller-port",
        type=int,
        default=None,
        help="KRaft controller port of a single node [default: the one this data dir was started with, else --port + 1]",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the data directory (a cluster's nodes in node-<i>/) [env SITN_KAFKA_DATA_DIR, default {DEFAULT_DATA_DIR}]",
    )
    p.add_argument("--heap", default="512m", help="JVM maximum heap, -Xmx [default 512m]")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="start: seconds to wait until every node answers; stop: before SIGKILL [default 60]",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = KafkaCommandSettings.from_args(args, os.environ)
        cluster = settings.cluster()
    except (ConfigError, ValueError) as exc:
        print(f"sitn kafka: {exc}", file=sys.stderr)
        return 2
    log.info("sitn kafka settings=%s", settings)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.WARNING)  # the readiness probe's client chatter
    try:
        if settings.action == "start":
            return _start(cluster, settings.timeout_s)
        if settings.action == "stop":
            return _stop(cluster, settings.timeout_s)
        return _status(cluster)
    except BrokerError as exc:
        print(f"sitn kafka {settings.action}: {exc}", file=sys.stderr)
        return 1


def _start(cluster: KafkaCluster, timeout_s: float) -> int:
    if len(cluster.nodes) == 1:
        (broker,) = cluster.nodes
        status = broker.status()
        if status.running:
            print(f"already running: pid {status.pid}, bootstrap servers {status.bootstrap_servers}, log {status.log_path}")
            return 0
        cluster.start(timeout_s=timeout_s)  # checks the data dir holds no cluster first
        print(f"started: pid {broker.pid}, bootstrap servers {broker.bootstrap_servers}, data {broker.data_dir}, log {broker.log_path}")
        return 0
    started = cluster.start(timeout_s=timeout_s)
    bootstrap_servers = cluster.status().bootstrap_servers
    print(f"started nodes {started or 'none (all were running)'}: bootstrap servers {bootstrap_servers}, data {cluster.data_dir}")
    _print_nodes(cluster)
    return 0


def _stop(cluster: KafkaCluster, timeout_s: float) -> int:
    running = [status for status in cluster.status().nodes if status.running]
    if not running:
        print(f"not running (data {cluster.data_dir})")
        return 0
    cluster.stop(timeout_s=timeout_s)
    if len(cluster.nodes) == 1:
        print(f"stopped: pid {running[0].pid} (data {cluster.data_dir})")
    else:
        print(f"stopped: nodes {[s.node_id for s in running]}, pids {[s.pid for s in running]} (data {cluster.data_dir})")
    return 0


def _status(cluster: KafkaCluster) -> int:
    status = cluster.status()
    if len(cluster.nodes) == 1:
        (node,) = status.nodes
        if not node.running:
            print(f"stopped (data {node.data_dir}, log {node.log_path})")
            return EXIT_NOT_RUNNING
        print(f"running: pid {node.pid}, bootstrap servers {node.bootstrap_servers}, data {node.data_dir}, log {node.log_path}")
        return 0
    running = status.running_nodes
    state = "running" if running == len(status.nodes) else "stopped" if running == 0 else "degraded"
    print(f"{state}: {running}/{len(status.nodes)} nodes, bootstrap servers {status.bootstrap_servers}, data {cluster.data_dir}")
    _print_nodes(cluster)
    return 0 if state == "running" else EXIT_NOT_RUNNING if state == "stopped" else 1


def _print_nodes(cluster: KafkaCluster) -> None:
    for node in cluster.status().nodes:
        state = f"running, pid {node.pid}" if node.running else "stopped"
        print(f"  node {node.node_id}: {state}, port {node.port}, controller port {node.controller_port}, log {node.log_path}")
