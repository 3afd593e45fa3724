"""A real, local Apache Kafka: fetch the release, format KRaft storage, start, probe, stop; one node or a cluster.

Each node is one process, both broker and controller (KRaft "combined" mode), listening on 127.0.0.1
only. Everything a node owns lives in one data directory::

    <data_dir>/server.properties   generated on every start from the constructor arguments
    <data_dir>/kafka-logs/         Kafka's log.dirs: the formatted KRaft metadata and the topic data
    <data_dir>/server.log          the broker's log (and the JVM's own errors), appended to
    <data_dir>/broker.pid          the running broker's process id, so another process can stop it

The data directory is formatted once; later starts reuse it, so topics and messages survive a
restart. The Kafka jars come from Maven Central through ``infra/kafka/fetch.sh`` into a cache
outside the repository, or from an existing installation (``kafka_home``).

Example (needs java and the network on first use)::

    broker = KafkaBroker(Path("runs/kafka"), port=9092)
    broker.start()
    ...  # clients use broker.bootstrap_servers
    broker.stop()

:class:`KafkaCluster` runs N such nodes as one cluster: every node is a voter of the KRaft controller
quorum (a dynamic quorum, formatted with ``--initial-controllers``: the same cluster id and voter set
on every node), node ``i`` in ``<data_dir>/node-<i>``, internal and new topics replicated to
min(3, N) nodes with min.insync.replicas min(2, N). With N=1 it is exactly the single node above, in
``<data_dir>`` itself.

Given a :class:`~sitn.broker_security.SaslSslListener`, a node (or every node of a cluster) listens for
clients on ``SASL_SSL`` instead of ``PLAINTEXT`` (SCRAM-SHA-512 over TLS, the users created at format
time); the controller listener stays ``PLAINTEXT`` on 127.0.0.1 and brokers talk to each other over the
``SASL_SSL`` listener. Clients then need :meth:`KafkaBroker.client_kwargs`' settings.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from sitn.broker_security import LISTENER_NAME as SASL_SSL_LISTENER
from sitn.broker_security import SaslSslListener
from stream.errors import BrokerError
from stream.topics import replication_for

logger = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
"""The Kafka release the project runs and tests against; infra/kafka/pom.xml names the same one."""

KAFKA_INFRA_DIR = Path(__file__).resolve().parents[1] / "infra" / "kafka"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "sitn-stream" / "kafka"
NODE_ID = 1
HOST = "127.0.0.1"

_BROKER_MAIN_CLASS = "kafka.Kafka"
_STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
_CONSOLE_PRODUCER_CLASS = "org.apache.kafka.tools.ConsoleProducer"
_CONSUMER_GROUPS_CLASS = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"  # kafka-consumer-groups.sh
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HEAP_SIZE = re.compile(r"^[1-9][0-9]*[kKmMgG]$")
_LOG_TAIL_LINES = 25


def ensure_kafka_distribution(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Fetch Kafka ``version`` into ``cache_dir/<version>/libs`` (once) and return that directory.

    Runs ``infra/kafka/fetch.sh``, which uses Maven against Maven Central and returns at once when
    the cache is already complete. Raises :class:`BrokerError` when java or Maven is missing or the
    download fails; the message carries the script's own explanation.
    """
    script = KAFKA_INFRA_DIR / "fetch.sh"
    cmd = ["bash", str(script), "--version", version, "--cache-dir", str(cache_dir)]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"fetching Kafka {version} took over {exc.timeout:.0f}s; run `{' '.join(cmd)}` by hand") from exc
    if done.returncode != 0:
        raise BrokerError(
            f"could not fetch Kafka {version} into {cache_dir} (exit {done.returncode}); "
            f"run `{' '.join(cmd)}` by hand to see why: {done.stderr.strip()[-2000:]}"
        )
    libs = Path(done.stdout.strip().splitlines()[-1])
    logger.debug("kafka distribution ready version=%s libs=%s fetch_s=%.2f", version, libs, time.monotonic() - started)
    return libs


def new_cluster_id() -> str:
    """A fresh KRaft cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's ``Uuid``).

    >>> cluster_id = new_cluster_id()
    >>> len(cluster_id), cluster_id.startswith("-")
    (22, False)
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):  # Kafka never issues these: they read as CLI options
            return cluster_id


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago (all held open together while
    picked, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclass(frozen=True)
class QuorumVoter:
    """One controller of a multi-node KRaft quorum, as ``kafka-storage format --initial-controllers`` names it.

    ``directory_id`` is the Kafka ``Uuid`` that the node's metadata directory is formatted with; it
    matters only when formatting (afterwards the node's ``meta.properties`` holds it).

    >>> str(QuorumVoter(node_id=2, controller_port=9095, directory_id="AAAAAAAAAAAAAAAAAAAAAA"))
    '2@127.0.0.1:9095:AAAAAAAAAAAAAAAAAAAAAA'
    """

    node_id: int
    controller_port: int
    directory_id: str

    def __str__(self) -> str:
        return f"{self.node_id}@{HOST}:{self.controller_port}:{self.directory_id}"


def server_properties(
    port: int,
    controller_port: int,
    log_dir: Path,
    auto_create_topics: bool = True,
    *,
    node_id: int = NODE_ID,
    quorum: Sequence[QuorumVoter] = (),
    sasl_ssl: SaslSslListener | None = None,
) -> str:
    """The ``server.properties`` of a combined broker and controller on 127.0.0.1.

    With no ``quorum`` the node is alone: every internal topic has replication factor 1 and
    min.insync.replicas 1. With a ``quorum`` (every voter, this node among them) the controllers are
    found through all the voters' ports, and internal and new topics get :func:`stream.topics.replication_for` the
    cluster's size. With ``sasl_ssl`` the client listener on ``port`` is ``SASL_SSL`` (and the inter-broker
    one), not ``PLAINTEXT``; the controller listener stays ``PLAINTEXT``.

    >>> text = server_properties(9092, 9093, Path("/data/kafka-logs"))
    >>> print("\\n".join(text.splitlines()[:5]))
    process.roles=broker,controller
    node.id=1
    listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
    advertised.listeners=PLAINTEXT://127.0.0.1:9092
    controller.quorum.bootstrap.servers=127.0.0.1:9093
    """
    if quorum and not any(v.node_id == node_id and v.controller_port == controller_port for v in quorum):
        raise ValueError(f"node {node_id} with controller port {controller_port} is not one of the quorum's voters {list(quorum)}")
    controllers = [v.controller_port for v in quorum] or [controller_port]
    replication_factor, min_insync = (str(n) for n in replication_for(len(controllers)))
    client = SASL_SSL_LISTENER if sasl_ssl is not None else "PLAINTEXT"
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "listeners": f"{client}://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"{client}://{HOST}:{port}",
        "controller.quorum.bootstrap.servers": ",".join(f"{HOST}:{p}" for p in controllers),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": client,
        "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{client}:{client}",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "default.replication.factor": replication_factor,
        "min.insync.replicas": min_insync,
        "offsets.topic.replication.factor": replication_factor,
        "transaction.state.log.replication.factor": replication_factor,
        "transaction.state.log.min.isr": min_insync,
        "share.coordinator.state.topic.replication.factor": replication_factor,
        "share.coordinator.state.topic.min.isr": min_insync,
        # A development broker: producers may write to a topic before anyone created it.
        "auto.create.topics.enable": "true" if auto_create_topics else "false",
        # A local cluster, nobody else to wait for: consumer groups form at once.
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "2",
        **(sasl_ssl.server_properties() if sasl_ssl is not None else {}),
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def read_properties(text: str) -> dict[str, str]:
    """Parse Java properties text (``key=value`` lines, ``#`` comments).

    >>> read_properties("# comment\\nnode.id=1\\nlisteners = PLAINTEXT://127.0.0.1:9092\\n")
    {'node.id': '1', 'listeners': 'PLAINTEXT://127.0.0.1:9092'}
    """
    properties = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "!")) and "=" in stripped:
            key, value = stripped.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


@dataclass(frozen=True)
class BrokerStatus:
    """What ``sitn kafka status`` reports about the broker of one data directory."""

    running: bool
    pid: int | None
    bootstrap_servers: str | None
    data_dir: Path
    log_path: Path
    node_id: int = NODE_ID
    port: int | None = None
    controller_port: int | None = None


class KafkaBroker:
    """One local Kafka node (broker and controller) owning ``data_dir``: alone, or one of a :class:`KafkaCluster`.

    ``port`` is the client listener on 127.0.0.1. ``controller_port`` defaults to the one recorded in
    the data directory by an earlier start (the KRaft voter set remembers it), else ``port + 1``.
    ``kafka_home`` points at an unpacked Kafka release (its ``libs/`` are used); without it the
    release is fetched from Maven Central into ``cache_dir``. ``heap`` is the JVM's -Xmx.

    A cluster's node has its ``node_id``, the whole ``quorum`` (this node among the voters) and the
    ``cluster_id`` its storage is formatted with; a node alone has node id 1, formats itself as a
    standalone quorum and draws a fresh cluster id. ``sasl_ssl`` secures the client listener (the SCRAM
    users are created when the storage is formatted, so a data directory keeps the users it began with).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 9092,
        controller_port: int | None = None,
        kafka_home: Path | None = None,
        cache_dir: Path | None = None,
        heap: str = "512m",
        *,
        node_id: int = NODE_ID,
        quorum: Sequence[QuorumVoter] = (),
        cluster_id: str | None = None,
        sasl_ssl: SaslSslListener | None = None,
    ) -> None:
        _check_port("port", port)
        if not _HEAP_SIZE.match(heap):
            raise ValueError(f"heap must look like 512m or 1g (a JVM -Xmx size), got {heap!r}")
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.kafka_home = kafka_home
        self.cache_dir = cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR
        self.heap = heap
        self.config_path = self.data_dir / "server.properties"
        self.log_dir = self.data_dir / "kafka-logs"
        self.log_path = self.data_dir / "server.log"
        self.pid_path = self.data_dir / "broker.pid"
        if controller_port is None:
            controller_port = self._recorded_controller_port() or port + 1
        _check_port("controller_port", controller_port)
        if controller_port == port:
            raise ValueError(f"controller_port must differ from port, both are {port}")
        self.controller_port = controller_port
        self.node_id = node_id
        self.quorum = tuple(quorum)
        self.cluster_id = cluster_id
        self.sasl_ssl = sasl_ssl
        # Fails here, at construction, when this node is not among the voters.
        self._properties = server_properties(port, controller_port, self.log_dir, node_id=node_id, quorum=self.quorum,
                                             sasl_ssl=sasl_ssl)
        self._process: subprocess.Popen[bytes] | None = None
        self._libs_dir: Path | None = None
        self._launch_log_offset = 0

    def __repr__(self) -> str:
        return f"KafkaBroker(data_dir={str(self.data_dir)!r}, bootstrap_servers={self.bootstrap_servers!r})"

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    def client_kwargs(self) -> dict[str, Any]:
        """kafka-python settings to reach this broker: the bootstrap servers and, when its listener is
        ``SASL_SSL``, the broker's own SCRAM user and the CA file (see :meth:`SaslSslListener.client_kwargs`)."""
        security = self.sasl_ssl.client_kwargs() if self.sasl_ssl is not None else {}
        return {"bootstrap_servers": self.bootstrap_servers, **security}

    @property
    def pid(self) -> int | None:
        """The process id of the broker running from this data directory, or None."""
        if self._process is not None and self._process.poll() is not None:
            self._process = None  # our own child exited: reaped, so no zombie lingers
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if self._process is not None and self._process.pid == pid:
            # Our own live child. The command-line check below is for pids read from the file by
            # another process; right after start it can also fail spuriously, while ``setpriv`` execs
            # the JVM (/proc/<pid>/cmdline is briefly empty), which killed good brokers at start.
            return pid
        return pid if self._is_our_broker(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def status(self) -> BrokerStatus:
        """Running or not, and the ports recorded by the last start (the bootstrap servers only while it runs)."""
        pid = self.pid
        bootstrap = None
        port, controller_port = self.port, self.controller_port
        if self.config_path.is_file():
            recorded = read_properties(self.config_path.read_text())
            port = _listener_port(recorded, "PLAINTEXT") or _listener_port(recorded, SASL_SSL_LISTENER) or port
            controller_port = _listener_port(recorded, "CONTROLLER") or controller_port
            if pid is not None:
                bootstrap = recorded.get("advertised.listeners", "").partition("://")[2] or None
        return BrokerStatus(pid is not None, pid, bootstrap, self.data_dir, self.log_path, self.node_id, port, controller_port)

    def is_formatted(self) -> bool:
        """True once the KRaft storage of this data directory is formatted (``meta.properties`` written)."""
        return (self.log_dir / "meta.properties").is_file()

    def formatted_ids(self) -> tuple[str | None, str | None]:
        """(cluster id, metadata directory id) this data directory is formatted with; (None, None) before."""
        meta = self.log_dir / "meta.properties"
        if not meta.is_file():
            return None, None
        properties = read_properties(meta.read_text())
        return properties.get("cluster.id"), properties.get("directory.id")

    def libs_dir(self) -> Path:
        """The directory of Kafka's jars: ``kafka_home/libs``, else the fetched release (fetched now if needed)."""
        if self._libs_dir is None:
            if self.kafka_home is not None:
                libs = Path(self.kafka_home) / "libs"
                if not any(libs.glob("kafka_2.13-*.jar")):
                    raise BrokerError(f"kafka_home={self.kafka_home} has no libs/kafka_2.13-*.jar; point it at an unpacked Kafka release")
                self._libs_dir = libs
            else:
                self._libs_dir = ensure_kafka_distribution(self.cache_dir)
        return self._libs_dir

    def start(self, timeout_s: float = 60, *, stop_with_parent: bool = False) -> None:
        """Format the data directory if new, start the broker in the background, wait until it answers.

        The broker outlives this process (``sitn kafka start`` returns while it runs) unless
        ``stop_with_parent``: then it gets SIGTERM when the calling thread's process dies, even by
        SIGKILL, so a killed test run leaves no broker behind (Linux, util-linux ``setpriv``).
        """
        started = time.monotonic()
        self.launch(stop_with_parent=stop_with_parent)
        try:
            self.wait_ready(max(0.0, timeout_s - (time.monotonic() - started)))
        except BrokerError:
            self.kill()
            raise
        logger.info(
            "kafka broker started node_id=%d pid=%s bootstrap_servers=%s data_dir=%s start_s=%.1f",
            self.node_id, self.pid, self.bootstrap_servers, self.data_dir, time.monotonic() - started,
        )

    def launch(self, *, stop_with_parent: bool = False) -> None:
        """Format the data directory if new and start the JVM in the background, without waiting for it.

        :meth:`start` is this and :meth:`wait_ready`; a cluster launches all its nodes first, since
        none is ready before a majority of the controller quorum runs.
        """
        running = self.pid
        if running is not None:
            raise BrokerError(f"a broker is already running from {self.data_dir} (pid {running}); stop it first")
        self.pid_path.unlink(missing_ok=True)  # stale: its process is gone
        for name, port in (("port", self.port), ("controller port", self.controller_port)):
            if not _port_is_free(port):
                raise BrokerError(
                    f"the Kafka {name} {HOST}:{port} is already in use by another process (another broker? "
                    f"`sitn kafka status`); choose another port or stop that process. Broker log: {self.log_path}"
                )
        java = _java()
        libs = self.libs_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._properties)
        if not self.is_formatted():
            self._format(java, libs)
        with self.log_path.open("ab") as log:
            self._launch_log_offset = log.tell()
            log.write(f"==== sitn: starting Kafka broker at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
            log.flush()
            cmd = [
                *_parent_death_signal_prefix(stop_with_parent),
                java,
                f"-Xmx{self.heap}",
                "-XX:+UseSerialGC",  # a small heap on a small machine: no concurrent GC threads
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={KAFKA_INFRA_DIR / 'log4j2-broker.properties'}",
                "-cp",
                f"{libs}/*",
                _BROKER_MAIN_CLASS,
                str(self.config_path),
            ]
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # outlives `sitn kafka start` and ignores the terminal's Ctrl-C
            )
        self.pid_path.write_text(f"{self._process.pid}\n")

    def wait_ready(self, timeout_s: float, log_offset: int | None = None) -> None:
        """Block until the broker answers a metadata request with itself unfenced, or raise BrokerError.

        A failure quotes the broker's log from ``log_offset``, by default from the last launch.
        """
        if log_offset is None:
            log_offset = self._launch_log_offset
        deadline = time.monotonic() + timeout_s
        while True:
            pid = self.pid
            if pid is None:
                raise BrokerError(
                    f"the Kafka broker from {self.data_dir} is not running (it exited or never started); "
                    f"see {self.log_path}:\n{self._log_tail(log_offset)}"
                )
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise BrokerError(
                    f"the Kafka broker (pid {pid}) did not answer on {self.bootstrap_servers} within {timeout_s:.0f}s; "
                    f"see {self.log_path}:\n{self._log_tail(log_offset)}"
                )
            if self._answers(min(remaining_s, 5.0)):
                return
            _wait_for_exit(pid, min(0.25, max(0.0, deadline - time.monotonic())), self._process)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (Kafka's clean shutdown), wait up to ``timeout_s``, then SIGKILL. No-op when not running."""
        pid = self.pid
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return
        started = time.monotonic()
        _signal(pid, signal.SIGTERM)
        if not _wait_for_exit(pid, timeout_s, self._process):
            logger.warning("kafka broker did not stop on SIGTERM pid=%d timeout_s=%.0f; sending SIGKILL", pid, timeout_s)
            self._kill_and_reap(pid)
        self.pid_path.unlink(missing_ok=True)
        self._process = None
        logger.info("kafka broker stopped pid=%d stop_s=%.1f", pid, time.monotonic() - started)

    def kill(self) -> None:
        """SIGKILL the broker at once (a crash, for fault tests). No-op when not running."""
        pid = self.pid
        if pid is not None:
            self._kill_and_reap(pid)
            logger.info("kafka broker killed pid=%d", pid)
        self.pid_path.unlink(missing_ok=True)
        self._process = None

    def console_producer_cmd(self, topic: str) -> list[str]:
        """The command line of Kafka's own console producer writing stdin's lines to ``topic``."""
        if not _TOPIC_NAME.match(topic):
            raise ValueError(f"topic must be 1-249 characters of [A-Za-z0-9._-], got {topic!r}")
        return self._tool_cmd(_CONSOLE_PRODUCER_CLASS, "--topic", topic)

    def consumer_groups_cmd(self, *args: str) -> list[str]:
        """The command line of Kafka's own ``kafka-consumer-groups`` tool with ``args`` (e.g. ``--describe
        --group G``), against this broker."""
        return self._tool_cmd(_CONSUMER_GROUPS_CLASS, *args)

    def _tool_cmd(self, main_class: str, *args: str) -> list[str]:
        """A Kafka command-line tool (``main_class``) against this broker, with the tools' log config."""
        if self.sasl_ssl is not None:
            # The tools would need a client properties file with the SCRAM login; not built, so refuse
            # rather than hand out a command that fails at its first request.
            raise BrokerError(f"Kafka's command-line tools are not set up for the SASL_SSL listener of {self.data_dir}")
        return [
            _java(),
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={KAFKA_INFRA_DIR / 'log4j2-tools.properties'}",
            "-cp",
            f"{self.libs_dir()}/*",
            main_class,
            "--bootstrap-server",
            self.bootstrap_servers,
            *args,
        ]

    def _format(self, java: str, libs: Path) -> None:
        """A node alone formats a standalone quorum; a cluster's node the whole voter set (the same on every node)."""
        cluster_id = self.cluster_id or new_cluster_id()
        voters = ["--initial-controllers", ",".join(map(str, self.quorum))] if self.quorum else ["--standalone"]
        cmd = [
            java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={KAFKA_INFRA_DIR / 'log4j2-tools.properties'}",
            "-cp",
            f"{libs}/*",
            _STORAGE_TOOL_CLASS,
            "format",
            *voters,
            *(self.sasl_ssl.format_args() if self.sasl_ssl is not None else []),
            "--cluster-id",
            cluster_id,
            "--config",
            str(self.config_path),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        with self.log_path.open("a") as log:
            log.write(f"==== sitn: formatted {self.log_dir} cluster_id={cluster_id} exit={done.returncode}\n")
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage in {self.log_dir} failed (exit {done.returncode}); "
                f"see {self.log_path}: {(done.stderr or done.stdout).strip()[-1500:]}"
            )
        logger.info("kafka storage formatted log_dir=%s cluster_id=%s voters=%d", self.log_dir, cluster_id, len(self.quorum) or 1)

    def _answers(self, timeout_s: float) -> bool:
        """True when the listener takes a connection and the cluster metadata shows this node unfenced."""
        try:
            with socket.create_connection((HOST, self.port), timeout=timeout_s):
                pass
        except OSError:
            return False  # not listening yet: skip the client, whose retries would log errors
        admin = None
        try:
            admin = KafkaAdminClient(
                **self.client_kwargs(),
                client_id="sitn-broker-probe",
                bootstrap_timeout_ms=int(timeout_s * 1000),
                request_timeout_ms=int(timeout_s * 1000),
            )
            cluster = admin.describe_cluster()
        except (KafkaError, OSError) as exc:
            logger.debug("kafka broker not ready yet bootstrap_servers=%s error=%r", self.bootstrap_servers, exc)
            return False
        finally:
            if admin is not None:
                admin.close()
        if cluster["cluster_id"] != self._cluster_id():
            return False  # some other broker answers on this port, not the one formatted here
        return any(b["broker_id"] == self.node_id and not b.get("is_fenced", False) for b in cluster["brokers"])

    def _cluster_id(self) -> str | None:
        return self.formatted_ids()[0]

    def _is_our_broker(self, pid: int) -> bool:
        """Guards against a reused pid: the process must be Kafka started with this data dir's config."""
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            cmdline = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return _BROKER_MAIN_CLASS in cmdline and str(self.config_path) in cmdline

    def _kill_and_reap(self, pid: int) -> None:
        _signal(pid, signal.SIGKILL)
        if not _wait_for_exit(pid, 10.0, self._process):
            raise BrokerError(f"the Kafka broker (pid {pid}) survived SIGKILL for 10s; see {self.log_path}")

    def _recorded_controller_port(self) -> int | None:
        """This node's own controller port, from the listeners of the last start's ``server.properties``."""
        if not self.config_path.is_file():
            return None
        return _listener_port(read_properties(self.config_path.read_text()), "CONTROLLER")

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                lines = log.read().decode("utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


@dataclass(frozen=True)
class ClusterStatus:
    """What ``sitn kafka status`` reports about a cluster: every node, and where clients connect."""

    nodes: tuple[BrokerStatus, ...]
    bootstrap_servers: str

    @property
    def running_nodes(self) -> int:
        return sum(node.running for node in self.nodes)


class KafkaCluster:
    """``brokers`` local Kafka nodes on 127.0.0.1, each broker and controller, forming one KRaft quorum.

    Node ``i`` (1..N) listens for clients on ``port + 2 * (i - 1)`` and for controllers on the next
    port (or the one its data directory recorded), unless ``ports`` lists every node's ``(port,
    controller_port)``. With one node it is exactly ``KafkaBroker(data_dir, port)``; with more, node
    ``i`` lives in ``data_dir/node-<i>``, every node is a voter (a majority, 2 of 3, must run for the
    cluster to work), and topics are replicated per :func:`stream.topics.replication_for`.

    The first :meth:`start` formats every node with one fresh cluster id and the same voter set.
    """

    def __init__(
        self,
        data_dir: Path,
        brokers: int = 1,
        port: int = 9092,
        *,
        ports: Sequence[tuple[int, int]] | None = None,
        kafka_home: Path | None = None,
        cache_dir: Path | None = None,
        heap: str = "512m",
        sasl_ssl: SaslSslListener | None = None,
    ) -> None:
        if not isinstance(brokers, int) or brokers < 1:
            raise ValueError(f"brokers must be a positive integer, got {brokers!r}")
        if ports is not None and len(ports) != brokers:
            raise ValueError(f"ports must list (port, controller_port) for each of the {brokers} brokers, got {list(ports)}")
        _check_port("port", port)
        self.data_dir = Path(data_dir).resolve()
        self.brokers = brokers

        def make(node_dir: Path, node_ports: tuple[int, int | None], **membership: Any) -> KafkaBroker:
            return KafkaBroker(node_dir, *node_ports, kafka_home=kafka_home, cache_dir=cache_dir, heap=heap,
                               sasl_ssl=sasl_ssl, **membership)

        if brokers == 1:
            self.nodes: tuple[KafkaBroker, ...] = (make(self.data_dir, ports[0] if ports is not None else (port, None)),)
            return
        # Probes of each node's own directory: the ports it recorded, the ids it was formatted with.
        probes = [
            make(self.data_dir / f"node-{i + 1}", ports[i] if ports is not None else (port + 2 * i, None))
            for i in range(brokers)
        ]
        cluster_ids = {probe.formatted_ids()[0] for probe in probes} - {None}
        if len(cluster_ids) > 1:
            raise BrokerError(
                f"the nodes under {self.data_dir} were formatted for different clusters {sorted(map(str, cluster_ids))}; "
                "Operator action: stop them and remove the data directory to start afresh"
            )
        cluster_id = cluster_ids.pop() if cluster_ids else new_cluster_id()
        quorum = [
            QuorumVoter(node_id, probe.controller_port, probe.formatted_ids()[1] or new_cluster_id())
            for node_id, probe in enumerate(probes, start=1)
        ]
        self.nodes = tuple(
            make(probe.data_dir, (probe.port, probe.controller_port), node_id=node_id, quorum=quorum, cluster_id=cluster_id)
            for node_id, probe in enumerate(probes, start=1)
        )

    def __repr__(self) -> str:
        return f"KafkaCluster(data_dir={str(self.data_dir)!r}, bootstrap_servers={self.bootstrap_servers!r})"

    @staticmethod
    def recorded_brokers(data_dir: Path) -> int | None:
        """How many nodes an earlier start in ``data_dir`` ran (None when none did), so stop/status need no flag."""
        data_dir = Path(data_dir)
        nodes = [d for d in data_dir.glob("node-*") if (d / "server.properties").is_file()]
        if nodes:
            return len(nodes)
        return 1 if (data_dir / "server.properties").is_file() else None

    @property
    def bootstrap_servers(self) -> str:
        """Every node's client address: clients find the partition leaders through whichever answers."""
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def node(self, node_id: int) -> KafkaBroker:
        for candidate in self.nodes:
            if candidate.node_id == node_id:
                return candidate
        raise ValueError(f"node_id must be one of {[n.node_id for n in self.nodes]}, got {node_id!r}")

    def status(self) -> ClusterStatus:
        """Every node's status; the bootstrap servers as the running nodes recorded them, else as configured."""
        nodes = tuple(node.status() for node in self.nodes)
        return ClusterStatus(nodes, ",".join(n.bootstrap_servers or f"{HOST}:{n.port}" for n in nodes))

    def start(self, timeout_s: float = 120, *, stop_with_parent: bool = False) -> list[int]:
        """Start every node that is not running; wait until each answers unfenced. Returns the node ids started.

        All are launched before any is waited for: no node is ready before a majority of the quorum
        runs. When one fails, the nodes started here are killed and :class:`BrokerError` names its log.
        Launches happen in the calling thread (``stop_with_parent`` follows that thread).
        """
        started = time.monotonic()
        self._check_layout()
        if len(self.nodes) > 1 and len({node.is_formatted() for node in self.nodes}) > 1:
            unformatted = [node.data_dir for node in self.nodes if not node.is_formatted()]
            raise BrokerError(
                f"only some nodes under {self.data_dir} are formatted ({unformatted} are not); a voter formatted "
                "afresh could elect a leader without the cluster's metadata. Operator action: stop the cluster "
                "and remove the data directory to start afresh"
            )
        launched: list[KafkaBroker] = []
        try:
            for node in self.nodes:
                if not node.is_running():
                    node.launch(stop_with_parent=stop_with_parent)
                    launched.append(node)
            for node in launched:
                node.wait_ready(max(0.0, timeout_s - (time.monotonic() - started)))
        except BrokerError:
            for node in launched:
                node.kill()
            raise
        logger.info(
            "kafka cluster started nodes=%s bootstrap_servers=%s start_s=%.1f",
            [node.node_id for node in launched], self.bootstrap_servers, time.monotonic() - started,
        )
        return [node.node_id for node in launched]

    def stop(self, timeout_s: float = 30, quorum_lost_grace_s: float = 5) -> None:
        """Stop every node: SIGTERM to all at once, each SIGKILLed after ``timeout_s`` as in :meth:`KafkaBroker.stop`.

        A node's clean shutdown waits for the active controller to approve it; once a majority of the
        nodes has exited there is no controller, and the nodes left would wait out ``timeout_s`` (Kafka's
        own limit is minutes). They are given ``quorum_lost_grace_s``, then killed: their acknowledged
        writes are in their log files (and on the replicas that did stop), recovered at the next start.
        """
        majority = len(self.nodes) // 2 + 1
        with ThreadPoolExecutor(max_workers=len(self.nodes), thread_name_prefix="kafka-stop") as pool:
            stopping = {pool.submit(node.stop, timeout_s): node for node in self.nodes}
            deadline = time.monotonic() + timeout_s
            pending = set(stopping)
            while pending and len(pending) >= majority and time.monotonic() < deadline:
                _, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
            if pending and len(pending) < majority:
                _, pending = wait(pending, timeout=quorum_lost_grace_s)
                for future in pending:
                    logger.warning(
                        "kafka node left without a controller quorum, killing it node_id=%d grace_s=%.0f",
                        stopping[future].node_id, quorum_lost_grace_s,
                    )
                    stopping[future].kill()
            for future in stopping:
                future.result()

    def kill(self) -> None:
        """SIGKILL every node (cleanup after a failed test; :meth:`stop` is the clean way)."""
        for node in self.nodes:
            node.kill()

    def _check_layout(self) -> None:
        recorded = self.recorded_brokers(self.data_dir)
        if recorded is not None and recorded != len(self.nodes):
            raise BrokerError(
                f"{self.data_dir} holds a Kafka of {recorded} node(s), asked for {len(self.nodes)}; "
                "start it with its own node count, or use another data directory"
            )


def _listener_port(properties: dict[str, str], name: str) -> int | None:
    """The port of listener ``name`` in ``server.properties``' ``listeners``.

    >>> _listener_port({"listeners": "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"}, "CONTROLLER")
    9093
    """
    for listener in properties.get("listeners", "").split(","):
        if listener.startswith(f"{name}://"):
            _, _, port = listener.rpartition(":")
            return int(port) if port.isdigit() else None
    return None


def _check_port(name: str, port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{name} must be an integer in 1..65535, got {port!r}")


def _port_is_free(port: int) -> bool:
    """True when a listener could bind ``HOST:port`` now (SO_REUSEADDR, as the JVM's acceptors use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _parent_death_signal_prefix(enabled: bool) -> list[str]:
    """``setpriv --pdeathsig TERM --``: the exec'd broker gets SIGTERM when its parent dies."""
    setpriv = shutil.which("setpriv") if enabled else None
    if enabled and setpriv is None:
        logger.warning("setpriv not found: the broker will outlive this process if it is killed")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError("no `java` on PATH; Kafka needs a JDK 17+ (apt-get install openjdk-17-jdk-headless)")
    return java


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).send_signal(sig)


def _wait_for_exit(pid: int, timeout_s: float, child: subprocess.Popen[bytes] | None) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit (reaping it when it is our child); True if it did."""
    try:
        if child is not None and child.pid == pid:
            child.wait(timeout=timeout_s)
        else:
            psutil.Process(pid).wait(timeout=timeout_s)
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        return False
    except psutil.NoSuchProcess:
        pass
    return True
