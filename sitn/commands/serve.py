"""``sitn serve``: a standalone serving replica fed by the compacted Kafka topic of embedding updates."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run a serving replica: FAISS index + HTTP API fed from the Kafka embedding-updates topic",
        description=(
            "Read the compacted embedding-updates topic from the beginning, keep applying it version by version "
            "(vectors, consumed items, ranker: what the in-cluster serving applies), and serve GET /recommend, "
            "/healthz, /metrics and /docs. Every option also reads SITN_SERVING_<NAME>."
        ),
    )
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1) [env SITN_SERVING_HOST]")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000) [env SITN_SERVING_PORT]")
    p.add_argument("--kafka-bootstrap-servers", dest="kafka_bootstrap_servers", default=None,
                   help="Kafka brokers (default 127.0.0.1:9092) [env SITN_SERVING_KAFKA_BOOTSTRAP_SERVERS]")
    p.add_argument("--updates-topic", dest="updates_topic", default=None,
                   help="embedding-updates topic [env SITN_SERVING_UPDATES_TOPIC]")
    p.add_argument("--dim", type=int, default=None, help="embedding dimension D (default 64) [env SITN_SERVING_DIM]")
    p.add_argument("--index-factory", dest="index_factory", default=None,
                   help="FAISS index_factory string (default HNSW32) [env SITN_SERVING_INDEX_FACTORY]")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from serving.api import create_app, serve_in_thread
    from serving.service import RecommendationService
    from serving.settings import ServingSettings
    from serving.update_consumer import UpdateConsumer
    from stream.settings import StreamSettings, kafka_client_kwargs

    given = {k: getattr(args, k) for k in ("host", "port", "kafka_bootstrap_servers", "updates_topic", "dim",
                                           "index_factory") if getattr(args, k) is not None}
    settings = ServingSettings(**given)
    log.info("settings serving=%r", settings)
    service = RecommendationService.from_settings(settings)
    # Kafka security (SITN_SECURITY_PROTOCOL, SITN_SASL_*, SITN_SSL_*) comes from the stream settings.
    security = kafka_client_kwargs(StreamSettings(kafka_bootstrap_servers=settings.kafka_bootstrap_servers))
    security.pop("bootstrap_servers", None)
    updates = UpdateConsumer.connect(service, settings.kafka_bootstrap_servers, settings.updates_topic,
                                     settings.update_batch_size, client_options=security)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    http = serve_in_thread(create_app(service, settings), settings.host, settings.port)
    log.info("serving url=%s topic=%s", http.url, settings.updates_topic)
    try:
        updates.run(stop)
    finally:
        http.stop()
        updates.close()
    return 0
