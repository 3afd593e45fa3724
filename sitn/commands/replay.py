"""``sitn replay``: produce an events.csv to the interactions topic in event-time order.

Where to: Kafka when ``--kafka-bootstrap-servers`` / ``SITN_KAFKA_BOOTSTRAP_SERVERS`` is set (topics are
created if missing, the producer is idempotent), else the embedded log in ``--embedded-log-dir``. Messages are keyed by user_id.

``--speed X`` is a time-compression factor: X seconds of event time per wall-clock second (86400 = one
day per second; the shipped data spans 17 years, about 72 minutes at that speed). ``--max`` (default)
sends as fast as the producer accepts.

``--time-unit`` says how the timestamp column is written: ``s``, ``ms``, ``iso``, ``ordinal`` (positions that
only order events), or ``auto`` (the default: detected from the data; the choice is printed). It is converted
to the wire's unix seconds here; see ``stream/time_unit.py``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from sitn.cli_settings import SettingsFlags
from sitn.commands import events_file_flags

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="produce an events.csv to the interactions topic in event-time order",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="also read from the environment: the secrets SITN_SASL_PLAIN_PASSWORD, SITN_SSL_PASSWORD (never flags)",
    )
    parser.add_argument("--events", type=Path, required=True, help="events.csv in the shared format")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed", type=float, default=None, metavar="X",
        help="event-time seconds per wall-clock second (e.g. 86400 = one day per second)",
    )
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    events_file_flags().add_to(
        parser.add_argument_group("how the file is read: as sitn run reads it (sitn.settings.RunSettings)"))
    _stream_flags().add_to(parser.add_argument_group("where to: the event stream (stream.settings.StreamSettings)"))
    parser.set_defaults(func=run)


def _stream_flags() -> SettingsFlags:
    """Every stream setting but the consuming side's, which a producer does not use."""
    from stream.settings import StreamSettings

    return SettingsFlags(StreamSettings, exclude=("consumer_group", "batch_size", "poll_timeout_s"))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stream.dataset import load_events
    from stream.producer import open_producer, replay

    if args.speed is not None and args.speed <= 0:
        raise SystemExit(f"--speed must be > 0 (event-time seconds per wall second), got {args.speed}")
    read = events_file_flags().build(args)
    settings = _stream_flags().build(args)
    log.info("replay settings=%r limit=%s time_unit=%s", settings, read.limit, read.time_unit)
    source, target = settings.domains
    loaded = load_events(args.events, source, target, limit=read.limit, time_unit=read.time_unit)
    events = loaded.events
    if settings.uses_kafka:
        from stream.kafka_login import check_kafka_login
        from stream.topics import ensure_topics

        check_kafka_login(settings)  # a refused login fails here with the broker's reason, not in a 30 s timeout
        ensure_topics(settings)
    producer = open_producer(settings)
    console = Console(stderr=True)
    assert loaded.time is not None
    console.print(f"timestamps of {args.events}: {loaded.time.describe()}")
    backend = settings.kafka_bootstrap_servers or f"embedded log at {settings.embedded_log_dir}"
    try:
        with Progress(
            TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), console=console, disable=args.no_progress,
        ) as progress:
            task = progress.add_task("replay", total=len(events), rate="")

            def advance(n: int) -> None:
                elapsed_s = progress.tasks[task].elapsed or 0.0
                done = progress.tasks[task].completed + n
                progress.update(task, advance=n, rate=f"{done / elapsed_s:,.0f} ev/s" if elapsed_s else "")

            stats = replay(events, producer, speed=None if args.max else args.speed, on_progress=advance)
    finally:
        producer.close()
    console.print(
        f"replayed {stats.events:,} events to {settings.topic_interactions} ({backend}) "
        f"in {stats.wall_s:.2f} s: {stats.events_per_s:,.0f} events/s"
    )
    return 0
