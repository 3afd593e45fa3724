"""``sitn serve``: standalone serving replicas fed by the compacted Kafka topic of embedding updates.

One replica (the default) is this process: it reads the topic from the beginning and keeps applying it,
and serves HTTP from the start (``/healthz`` says ``ready`` once the index has items).

``--workers N`` (N > 1) starts N worker processes that listen on one port with ``SO_REUSEPORT`` (Linux):
the kernel spreads connections over them. Each worker has its own ``RecommendationService`` and
``UpdateConsumer`` and applies the same versions independently, so every worker answers like the others
once at the same version (``/healthz``: ``pid``, ``applied_version``). A worker joins the port only once
it has caught up with the topic (its end offsets when it started), so a worker started next to others
never answers from a partial state. The parent holds the port (a bound socket that never listens, so it
is handed no connection), starts the workers and forwards SIGTERM/SIGINT to them.

Worker failure policy: a worker that dies after it joined the port (SIGKILL, out of memory, a crash) is
restarted; the others answer meanwhile, and the new one joins once caught up. A worker that dies before it
ever joined (a bad setting, an unreachable broker), or one restarted more than ``MAX_RESTARTS`` times
within ``RESTART_WINDOW_S``, stops the whole group: the parent stops the others and exits 1, since
restarting it would only fail again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from sitn.cli_settings import SettingsFlags
from sitn.commands.kafka import DEFAULT_PORT as KAFKA_PORT

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.synchronize import Event as EventType

    from serving.settings import ServingSettings
    from stream.settings import StreamSettings

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # of one worker slot within RESTART_WINDOW_S before the parent gives up
RESTART_WINDOW_S = 300.0
STOP_TIMEOUT_S = 30.0  # a worker that has not exited this long after SIGTERM is killed


DEFAULT_BOOTSTRAP_SERVERS = f"127.0.0.1:{KAFKA_PORT}"  # `sitn kafka start`'s; the stream's own default is no Kafka


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run a serving replica: FAISS index + HTTP API fed from the Kafka embedding-updates topic",
        description=(
            "Read the compacted embedding-updates topic from the beginning, keep applying it version by version "
            "(vectors, consumed items, ranker: what the in-cluster serving applies), and serve GET /recommend, "
            "/healthz, /metrics and /docs. A flag given wins over its environment variable, which wins over "
            "the default."
        ),
        epilog=("also read from the environment: SITN_SERVING_ADMIN_TOKEN (a secret: never a flag); Kafka "
                "security SITN_SECURITY_PROTOCOL, SITN_SASL_*, SITN_SSL_* (stream/settings.py)"),
    )
    serving, learner, stream = _flags()
    serving.add_to(p.add_argument_group("the replica (serving.settings.ServingSettings)"))
    published = p.add_argument_group("what the learner publishes, and where (the learner's and the stream's "
                                     "settings own these)")
    learner.add_to(published)
    stream.add_to(published)
    p.set_defaults(func=main)


def _flags() -> tuple[SettingsFlags, SettingsFlags, SettingsFlags]:
    """The options of ``sitn serve``: every serving setting but the derived width, which is the learner's
    (``--dim``), and the stream's broker and updates topic. The old variables of the two fields serving
    no longer owns are still read."""
    from serving.settings import ServingSettings
    from sitn.settings import RunSettings
    from stream.settings import StreamSettings

    return (SettingsFlags(ServingSettings, derived=("dim",)),
            SettingsFlags(RunSettings, ("learner_dim",), names={"learner_dim": "dim"},
                          env_aliases={"learner_dim": ("SITN_SERVING_DIM",)}),
            SettingsFlags(StreamSettings, ("kafka_bootstrap_servers", "topic_embedding_updates"),
                          names={"topic_embedding_updates": "updates-topic"},
                          env_aliases={"kafka_bootstrap_servers": ("SITN_SERVING_KAFKA_BOOTSTRAP_SERVERS",),
                                       "topic_embedding_updates": ("SITN_SERVING_UPDATES_TOPIC",)},
                          defaults={"kafka_bootstrap_servers": DEFAULT_BOOTSTRAP_SERVERS}))


def main(args: argparse.Namespace) -> int:
    from serving.threads import single_thread_blas_env

    os.environ.update(single_thread_blas_env())  # before numpy loads, here and in the workers (inherited)
    serving_flags, learner_flags, stream_flags = _flags()
    learner = learner_flags.build(args)
    settings = serving_flags.build(args, dim=learner.learner_dim)  # validated there, the environment included
    stream = stream_flags.build(args)
    if not stream.uses_kafka:  # set to nothing (a flag or variable given empty): a replica has no embedded log
        from stream.errors import ConfigError

        where = f"{stream_flags.flag('kafka_bootstrap_servers')} / {stream_flags.env_var('kafka_bootstrap_servers')}"
        raise ConfigError(f"{where}: sitn serve reads the updates topic from Kafka and needs host:port[,host:port], "
                          f"got an empty value")
    log.info("settings serving=%r stream=%r", settings, stream)
    from stream.kafka_login import check_kafka_login

    # Kafka security (SITN_SECURITY_PROTOCOL, SITN_SASL_*, SITN_SSL_*): a refused login fails here, before any worker.
    check_kafka_login(stream)
    if settings.workers == 1:
        return run_replica(settings, stream)
    return run_workers(settings, stream, settings.workers, logging.getLevelName(logging.getLogger().level))


def run_replica(settings: ServingSettings, stream: StreamSettings, reuse_port: bool = False,
                joined: EventType | None = None) -> int:
    """One replica in this process until SIGTERM/SIGINT, fed by ``stream``'s updates topic. With ``reuse_port``
    (a worker among several) it listens only once caught up with the topic, then sets ``joined``."""
    from serving.api import create_app, serve_in_thread
    from serving.service import RecommendationService
    from serving.update_consumer import UpdateConsumer
    from stream.settings import kafka_client_kwargs

    service = RecommendationService.from_settings(settings)
    security = kafka_client_kwargs(stream)  # SITN_SECURITY_PROTOCOL, SITN_SASL_*, SITN_SSL_*
    bootstrap_servers = security.pop("bootstrap_servers")
    updates = UpdateConsumer.connect(service, bootstrap_servers, stream.topic_embedding_updates,
                                     settings.update_batch_size, client_options=security)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    http = None
    try:
        if reuse_port:
            while not updates.caught_up.is_set() and not stop.is_set():
                updates.poll_once()
            if stop.is_set():
                return 0
        http = serve_in_thread(create_app(service, settings), settings.host, settings.port, reuse_port=reuse_port)
        log.info("serving url=%s topic=%s pid=%d applied_version=%d", http.url, stream.topic_embedding_updates, os.getpid(),
                 updates.max_version)
        if joined is not None:
            joined.set()
        updates.run(stop)
    finally:
        if http is not None:
            http.stop()
        updates.close()
    return 0


def _worker(settings: ServingSettings, stream: StreamSettings, log_level: str, joined: EventType) -> None:
    """A worker process's body (spawned: it imports everything afresh)."""
    from sitn.cli import configure_logging

    configure_logging(log_level)
    raise SystemExit(run_replica(settings, stream, reuse_port=True, joined=joined))


def run_workers(settings: ServingSettings, stream: StreamSettings, workers: int, log_level: str = "INFO") -> int:
    """Start ``workers`` replicas on one port, restart those that die after joining (see the module docstring),
    forward SIGTERM/SIGINT; returns 0 after a requested stop, 1 when the group gave up."""
    import multiprocessing
    from multiprocessing.connection import wait

    from serving.api import reuse_port_socket

    # Held, never listening: the port stays ours (port 0 resolved once) while workers come and go.
    reserved = reuse_port_socket(settings.host, settings.port)
    settings = settings.model_copy(update={"port": reserved.getsockname()[1]})
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads and FAISS state
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal=%s: stopping the workers", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(slot: int) -> tuple[SpawnProcess, EventType]:
        joined = context.Event()
        process = context.Process(target=_worker, args=(settings, stream, log_level, joined), name=f"sitn-serve-{slot}")
        process.start()
        log.info("worker started slot=%d pid=%s port=%d", slot, process.pid, settings.port)
        return process, joined

    slots = [start(slot) for slot in range(workers)]
    restarts: list[deque[float]] = [deque() for _ in range(workers)]
    failure: str | None = None
    try:
        while not stopping.is_set() and failure is None:
            wait([process.sentinel for process, _ in slots], timeout=0.5)
            for slot, (process, joined) in enumerate(slots):
                if process.is_alive() or stopping.is_set():
                    continue
                now_s = time.monotonic()
                while restarts[slot] and now_s - restarts[slot][0] > RESTART_WINDOW_S:
                    restarts[slot].popleft()
                if not joined.is_set():
                    failure = f"worker slot={slot} pid={process.pid} exited {process.exitcode} before joining the port"
                elif len(restarts[slot]) >= MAX_RESTARTS:
                    failure = (f"worker slot={slot} died {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:g} s "
                               f"(last pid={process.pid} exit {process.exitcode})")
                if failure is not None:
                    break
                log.error("worker died slot=%d pid=%s exit=%s; restarting it", slot, process.pid, process.exitcode)
                restarts[slot].append(now_s)
                slots[slot] = start(slot)
    finally:
        for process, _ in slots:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker stops its server and its consumer
        deadline_s = time.monotonic() + STOP_TIMEOUT_S
        for process, _ in slots:
            process.join(max(0.0, deadline_s - time.monotonic()))
            if process.is_alive():
                log.error("worker did not stop within timeout_s=%s pid=%s; killing it", STOP_TIMEOUT_S, process.pid)
                process.kill()
                process.join()
        reserved.close()
    if failure is not None:
        log.error("serving workers stopped: %s", failure)
        return 1
    return 0
