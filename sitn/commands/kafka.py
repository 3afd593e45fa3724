"""``sitn kafka start|stop|status``: a local single-node Apache Kafka for development and tests.

The broker (and its KRaft controller) listens on 127.0.0.1 and keeps everything in one data
directory, formatted on first start and reused after, so messages survive a restart. The Kafka
release is fetched once from Maven Central into a cache outside the repository, unless KAFKA_HOME
names an installed one. ``stop`` and ``status`` find the broker through the pid file in the data
directory, so they work from any shell.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sitn.errors import BrokerError, ConfigError
from stream.broker import DEFAULT_CACHE_DIR, KAFKA_VERSION, KafkaBroker

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
DEFAULT_DATA_DIR = Path.home() / ".cache" / "sitn-stream" / "kafka-data"
EXIT_NOT_RUNNING = 3  # as in LSB init scripts: `status` of a stopped service

ENVIRONMENT_HELP = f"""\
environment variables (a command-line option wins over its variable):
  SITN_KAFKA_PORT       client port on 127.0.0.1 (default {DEFAULT_PORT}; the controller takes the next one)
  SITN_KAFKA_DATA_DIR   data directory: KRaft metadata, topics, server.log, broker.pid
                        (default {DEFAULT_DATA_DIR})
  KAFKA_HOME            an unpacked Kafka release to run from its libs/ instead of fetching one
  SITN_KAFKA_CACHE_DIR  where the Kafka {KAFKA_VERSION} jars fetched from Maven Central are kept
                        (default {DEFAULT_CACHE_DIR})

exit status: 0 done / running, 1 the broker failed (the message names its log file),
             {EXIT_NOT_RUNNING} `status` found no broker running.
"""


@dataclass(frozen=True)
class KafkaCommandSettings:
    """Everything one ``sitn kafka`` invocation runs with, from options over environment over defaults."""

    action: str
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
        data_dir = args.data_dir or Path(environ.get("SITN_KAFKA_DATA_DIR", DEFAULT_DATA_DIR))
        kafka_home = environ.get("KAFKA_HOME")
        if args.timeout_s <= 0:
            raise ConfigError(f"--timeout-s must be positive, got {args.timeout_s}")
        return cls(
            action=args.action,
            port=int(port_text),
            controller_port=args.controller_port,
            data_dir=Path(data_dir).expanduser(),
            kafka_home=Path(kafka_home) if kafka_home else None,
            cache_dir=Path(environ.get("SITN_KAFKA_CACHE_DIR", DEFAULT_CACHE_DIR)),
            heap=args.heap,
            timeout_s=args.timeout_s,
        )

    def broker(self) -> KafkaBroker:
        return KafkaBroker(
            self.data_dir,
            port=self.port,
            controller_port=self.controller_port,
            kafka_home=self.kafka_home,
            cache_dir=self.cache_dir,
            heap=self.heap,
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "kafka",
        help="start, stop or check the local single-node Kafka broker",
        description=__doc__,
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=("start", "stop", "status"), help="what to do with the broker")
    p.add_argument("--port", type=int, default=None, help=f"client port on 127.0.0.1 [env SITN_KAFKA_PORT, default {DEFAULT_PORT}]")
    p.add_argument(
        "--controller-port",
        type=int,
        default=None,
        help="KRaft controller port [default: the one this data dir was started with, else --port + 1]",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the broker's data directory [env SITN_KAFKA_DATA_DIR, default {DEFAULT_DATA_DIR}]",
    )
    p.add_argument("--heap", default="512m", help="JVM maximum heap, -Xmx [default 512m]")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="start: seconds to wait until the broker answers; stop: before SIGKILL [default 60]",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        settings = KafkaCommandSettings.from_args(args, os.environ)
    except ConfigError as exc:
        print(f"sitn kafka: {exc}", file=sys.stderr)
        return 2
    log.info("sitn kafka settings=%s", settings)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.WARNING)  # the readiness probe's client chatter
    broker = settings.broker()
    try:
        if settings.action == "start":
            return _start(broker, settings.timeout_s)
        if settings.action == "stop":
            return _stop(broker, settings.timeout_s)
        return _status(broker)
    except BrokerError as exc:
        print(f"sitn kafka {settings.action}: {exc}", file=sys.stderr)
        return 1


def _start(broker: KafkaBroker, timeout_s: float) -> int:
    status = broker.status()
    if status.running:
        print(f"already running: pid {status.pid}, bootstrap servers {status.bootstrap_servers}, log {status.log_path}")
        return 0
    broker.start(timeout_s=timeout_s)
    print(f"started: pid {broker.pid}, bootstrap servers {broker.bootstrap_servers}, data {broker.data_dir}, log {broker.log_path}")
    return 0


def _stop(broker: KafkaBroker, timeout_s: float) -> int:
    status = broker.status()
    if not status.running:
        print(f"not running (data {status.data_dir})")
        return 0
    broker.stop(timeout_s=timeout_s)
    print(f"stopped: pid {status.pid} (data {status.data_dir})")
    return 0


def _status(broker: KafkaBroker) -> int:
    status = broker.status()
    if not status.running:
        print(f"stopped (data {status.data_dir}, log {status.log_path})")
        return EXIT_NOT_RUNNING
    print(f"running: pid {status.pid}, bootstrap servers {status.bootstrap_servers}, data {status.data_dir}, log {status.log_path}")
    return 0
