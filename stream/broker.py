"""A real, local Apache Kafka broker: fetch the release, format KRaft storage, start, probe, stop.

One process is both broker and controller (KRaft "combined" mode), listening on 127.0.0.1 only.
Everything it owns lives in one data directory::

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
from dataclasses import dataclass
from pathlib import Path

import psutil
from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from sitn.errors import BrokerError

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


def server_properties(port: int, controller_port: int, log_dir: Path, auto_create_topics: bool = True) -> str:
    """The ``server.properties`` of a single-node combined broker and controller on 127.0.0.1.

    Every internal topic has replication factor 1 and min.insync.replicas 1: there is one node.

    >>> text = server_properties(9092, 9093, Path("/data/kafka-logs"))
    >>> print("\\n".join(text.splitlines()[:5]))
    process.roles=broker,controller
    node.id=1
    listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
    advertised.listeners=PLAINTEXT://127.0.0.1:9092
    controller.quorum.bootstrap.servers=127.0.0.1:9093
    """
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # A development broker: producers may write to a topic before anyone created it.
        "auto.create.topics.enable": "true" if auto_create_topics else "false",
        # One node, no one to wait for: consumer groups form at once.
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "2",
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


class KafkaBroker:
    """One local single-node Kafka (broker and controller) owning ``data_dir``.

    ``port`` is the client listener on 127.0.0.1. ``controller_port`` defaults to the one recorded in
    the data directory by an earlier start (the KRaft voter set remembers it), else ``port + 1``.
    ``kafka_home`` points at an unpacked Kafka release (its ``libs/`` are used); without it the
    release is fetched from Maven Central into ``cache_dir``. ``heap`` is the JVM's -Xmx.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 9092,
        controller_port: int | None = None,
        kafka_home: Path | None = None,
        cache_dir: Path | None = None,
        heap: str = "512m",
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
        self._process: subprocess.Popen[bytes] | None = None
        self._libs_dir: Path | None = None

    def __repr__(self) -> str:
        return f"KafkaBroker(data_dir={str(self.data_dir)!r}, bootstrap_servers={self.bootstrap_servers!r})"

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

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
        """Running or not, and where it listens (as recorded by the start that is running)."""
        pid = self.pid
        bootstrap = None
        if pid is not None and self.config_path.is_file():
            advertised = read_properties(self.config_path.read_text()).get("advertised.listeners", "")
            bootstrap = advertised.removeprefix("PLAINTEXT://") or None
        return BrokerStatus(pid is not None, pid, bootstrap, self.data_dir, self.log_path)

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
        self.config_path.write_text(server_properties(self.port, self.controller_port, self.log_dir))
        if not (self.log_dir / "meta.properties").is_file():
            self._format(java, libs)
        with self.log_path.open("ab") as log:
            log_offset = log.tell()
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
        try:
            self.wait_ready(max(0.0, timeout_s - (time.monotonic() - started)), log_offset=log_offset)
        except BrokerError:
            self.kill()
            raise
        logger.info(
            "kafka broker started pid=%d bootstrap_servers=%s data_dir=%s start_s=%.1f",
            self._process.pid, self.bootstrap_servers, self.data_dir, time.monotonic() - started,
        )

    def wait_ready(self, timeout_s: float, log_offset: int = 0) -> None:
        """Block until the broker answers a metadata request with itself unfenced, or raise BrokerError."""
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
        cluster_id = new_cluster_id()
        cmd = [
            java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={KAFKA_INFRA_DIR / 'log4j2-tools.properties'}",
            "-cp",
            f"{libs}/*",
            _STORAGE_TOOL_CLASS,
            "format",
            "--standalone",
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
        logger.info("kafka storage formatted log_dir=%s cluster_id=%s", self.log_dir, cluster_id)

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
                bootstrap_servers=self.bootstrap_servers,
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
        return any(b["broker_id"] == NODE_ID and not b.get("is_fenced", False) for b in cluster["brokers"])

    def _cluster_id(self) -> str | None:
        meta = self.log_dir / "meta.properties"
        return read_properties(meta.read_text()).get("cluster.id") if meta.is_file() else None

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
        if not self.config_path.is_file():
            return None
        bootstrap = read_properties(self.config_path.read_text()).get("controller.quorum.bootstrap.servers", "")
        _, _, port = bootstrap.rpartition(":")
        return int(port) if port.isdigit() else None

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                lines = log.read().decode("utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])


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
