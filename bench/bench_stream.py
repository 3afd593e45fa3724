"""Stream throughput: replay -> log -> decoded, validated events per second, one consumer process.

For each backend (the embedded log, and Kafka) the events are replayed once (producer rate reported),
then consumed ``--repeats`` times by a fresh consumer (all partitions, from the beginning) after one
warm-up run, per batch size (the swept knob). Each run times ``StreamConsumer.poll`` from the first poll
until every event came out decoded (histories are built by the learner, not here), and the count check
(events out == events in, no dead letters) is printed next to the
speed. Medians and the spread (min..max) over the repeats are printed.

    python bench/bench_stream.py [--events PATH] [--limit N] [--repeats R] [--batch-sizes 500,2000,5000]
                                 [--backends embedded,kafka] [--json PATH]

Kafka: ``SITN_KAFKA_BOOTSTRAP_SERVERS`` if set, else a local broker is started in a temporary directory.
The workload is the shipped events.csv (offline); without it, a seeded synthetic one of the same shape.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402
from stream.consumer import StreamConsumer  # noqa: E402
from stream.dataset import load_events  # noqa: E402
from stream.dead_letter import open_dead_letters  # noqa: E402
from stream.events import InteractionEvent  # noqa: E402
from stream.producer import open_producer, replay  # noqa: E402
from stream.settings import StreamSettings  # noqa: E402
from stream.source_factory import open_source  # noqa: E402

DEFAULT_EVENTS = REPO.parent / "shared" / "data" / "amazon_movie_book_c2dsr" / "events.csv"


def synthetic_events(n: int, seed: int = 0) -> list[InteractionEvent]:
    rng = random.Random(seed)
    out = [
        InteractionEvent(
            f"syn:{i}",
            f"u{rng.randrange(n // 10 + 1)}",
            f"i{rng.randrange(60_000)}",
            rng.choice(("movie", "book")),
            1_200_000_000 + i * 60,
        )
        for i in range(n)
    ]
    return out


def consume_once(
    settings: StreamSettings, expected: int, timeout_s: float = 300.0
) -> tuple[float, float, int, int]:
    """(records/s wall, records/s of process CPU time, events out, dead letters) for a fresh consumer reading all.

    CPU time covers every thread of this process (kafka-python's IO thread too): on a busy shared machine
    it estimates what one otherwise idle core would sustain, while wall time is what this run got.
    """
    consumer = StreamConsumer(
        open_source(settings),
        open_dead_letters(settings),
        settings.domains,
    )
    try:
        # Setup (first fetch) is outside the timed region: wait for the first records.
        out = 0
        deadline = time.monotonic() + timeout_s
        first = consumer.poll(1.0)
        while not first.read:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no records within {timeout_s}s")
            first = consumer.poll(1.0)
        out += len(first.events)
        records_before = consumer.stats.records_in
        start = time.perf_counter()
        start_cpu = time.process_time()
        while consumer.stats.records_in < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{consumer.stats.records_in} of {expected} records within {timeout_s}s")
            out += len(consumer.poll(0.5).events)
        elapsed_s = time.perf_counter() - start
        cpu_s = time.process_time() - start_cpu
        timed = consumer.stats.records_in - records_before
        return timed / elapsed_s, timed / cpu_s, out, consumer.stats.dead_letters
    finally:
        consumer.close()


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every run's value."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def run_backend(
    name: str, base: StreamSettings, events: list[InteractionEvent], batch_sizes: list[int], repeats: int
) -> dict[str, Any]:
    """Replay once, then per batch size a warm-up and ``repeats`` timed consumers; the figures, printed."""
    producer = open_producer(base)
    stats = replay(events, producer)
    producer.close()
    out: dict[str, Any] = {
        "replay": {"events": stats.events, "wall_s": stats.wall_s, "events_per_s": stats.events_per_s},
        "load_avg_1m_before": os.getloadavg()[0], "batches": [],
    }
    print(
        f"\n[{name}] replay: {stats.events:,} events in {stats.wall_s:.2f} s = {stats.events_per_s:,.0f} events/s"
    )
    print(f"[{name}] load average before: {out['load_avg_1m_before']:.1f} on {os.cpu_count()} cpus")
    print(
        f"[{name}] {'batch':>6} {'wall ev/s median':>17} {'min..max':>19} {'cpu ev/s median':>16} {'min..max':>19} "
        f"{'out/in':>16} {'dead':>5}"
    )
    for batch_size in batch_sizes:
        settings = base.model_copy(update={"batch_size": batch_size})
        consume_once(settings, len(events))  # warm-up: page cache, JIT-free but imports and allocators
        rates: list[float] = []
        cpu_rates: list[float] = []
        counts: list[tuple[int, int]] = []
        for _ in range(repeats):
            rate, cpu_rate, events_out, dead = consume_once(settings, len(events))
            rates.append(rate)
            cpu_rates.append(cpu_rate)
            counts.append((events_out, dead))
        row: dict[str, Any] = {
            "batch_size": batch_size, "wall_events_per_s": spread(rates), "cpu_events_per_s": spread(cpu_rates),
            "events_in": len(events), "events_out": sorted({n for n, _ in counts}),
            "dead_letters_max": max(d for _, d in counts),
            "ok": all(n == len(events) and dead == 0 for n, dead in counts),
        }
        out["batches"].append(row)
        wall, cpu = row["wall_events_per_s"], row["cpu_events_per_s"]
        print(
            f"[{name}] {batch_size:>6} {wall['median']:>17,.0f} {wall['min']:>9,.0f}..{wall['max']:<9,.0f} "
            f"{cpu['median']:>16,.0f} {cpu['min']:>9,.0f}..{cpu['max']:<9,.0f} "
            f"{'/'.join(map(str, row['events_out'])):>7}/{len(events):<8} "
            f"{row['dead_letters_max']:>5} {'OK' if row['ok'] else 'COUNT MISMATCH'}"
        )
    # On a shared machine wall rates follow the load: print it after the runs too, next to the figures.
    out["load_avg_1m_after"] = os.getloadavg()[0]
    print(f"[{name}] load average after: {out['load_avg_1m_after']:.1f} on {os.cpu_count()} cpus")
    return out


def with_kafka(fn: Callable[[str], None]) -> None:
    servers = os.environ.get("SITN_KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        fn(servers)
        return
    from sitn.broker import DEFAULT_CACHE_DIR, KafkaBroker, free_ports

    ports = free_ports(2)
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        broker = KafkaBroker(Path(tmp), port=ports[0], controller_port=ports[1], cache_dir=DEFAULT_CACHE_DIR)
        broker.start(timeout_s=180)
        try:
            fn(broker.bootstrap_servers)
        finally:
            broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=Path, default=DEFAULT_EVENTS)
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="500,2000,5000")
    parser.add_argument("--backends", default="embedded,kafka")
    parser.add_argument("--partitions", type=int, default=4)
    add_json_option(parser)
    args = parser.parse_args()
    record = BenchRecord("bench_stream", args)
    figures: dict[str, Any] = {}
    if args.events.is_file():
        events = load_events(args.events, "movie", "book", limit=args.limit).events
        figures["workload"] = str(args.events)
        print(f"workload: {args.events} ({len(events):,} events)")
    else:
        events = synthetic_events(args.limit or 148_205)
        figures["workload"] = "synthetic, seed 0"
        print(f"workload: synthetic, seed 0 ({len(events):,} events); {args.events} not found")
    figures["events"] = len(events)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    backends = args.backends.split(",")
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, partitions={args.partitions}, repeats={args.repeats}"
    )
    run = uuid.uuid4().hex[:8]
    if "embedded" in backends:
        with tempfile.TemporaryDirectory(prefix="bench-log-") as tmp:
            base = StreamSettings(embedded_log_dir=Path(tmp), partitions=args.partitions)
            figures["embedded"] = run_backend("embedded", base, events, batch_sizes, args.repeats)
    if "kafka" in backends:

        def kafka(servers: str) -> None:
            from stream.topics import ensure_topics

            base = StreamSettings(
                kafka_bootstrap_servers=servers,
                partitions=args.partitions,
                topic_interactions=f"bench-{run}",
                topic_dead_letters=f"bench-dlq-{run}",
                topic_embedding_updates=f"bench-up-{run}",
            )
            ensure_topics(base)
            figures["kafka"] = run_backend("kafka", base, events, batch_sizes, args.repeats)

        with_kafka(kafka)
    if args.json is not None:
        record.write(args.json, figures)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
