"""Partition-parallel ingest: decoded events/s with 1, 2 and 4 consumer actors over 8 partitions of a real broker.

The events are replayed once into a topic of ``--partitions`` (8) partitions on a real Kafka broker (keyed by
user, as ``sitn run`` does). Then, per consumer count (the swept knob), one warm-up run and ``--repeats``
timed runs, each a fresh :class:`stream.actors.ConsumerFleet`: the project's Ray consumer actors, partition
``p`` read by actor ``p % n`` from the beginning, batches through the fleet's bounded Ray queue
(``RunSettings``' default size), drained by this process the way the learner drains it (``fleet.get``).

A run is timed from the first batch out of the queue until every event is out (actor start and the first
fetch are outside the timed region). Next to the speed:

- the count check: every (partition, offset) out exactly once, as many as were replayed, no dead letter;
- CPU over the same window (psutil, user + system): each consumer actor's process, the queue actor, this
  process (the drain, standing in for the learner's ``get``) and the broker's JVM; as a share of one core
  and of the machine, and as CPU microseconds per event;
- the partition balance (events per partition) that a static ``p % n`` split inherits.

The learner's share is not measured here (no learner runs). What one event costs the consumers is; the
learner's cost per event is the inverse of its measured rate (README: 900-1,300 events/s end to end on one
core), and the printout puts the two side by side.

    python bench/bench_ingest_scaling.py [--events PATH] [--limit N] [--consumers 1,2,4] [--partitions 8]
                                         [--repeats 3] [--security plaintext|sasl_ssl] [--json PATH]

Kafka: ``SITN_KAFKA_BOOTSTRAP_SERVERS`` if set (plaintext only), else a local broker is started in a temporary
directory; with ``--security sasl_ssl`` its listener is SCRAM-SHA-512 over TLS (certificates from keytool),
so the same figures show what SASL_SSL costs the consumers. The workload is the shipped events.csv (offline).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402
from sitn.settings import RunSettings  # noqa: E402
from stream.actors import ConsumerFleet  # noqa: E402
from stream.dataset import load_events  # noqa: E402
from stream.producer import open_producer, replay  # noqa: E402
from stream.settings import StreamSettings  # noqa: E402

DEFAULT_EVENTS = REPO.parent / "shared" / "data" / "amazon_movie_book_c2dsr" / "events.csv"
LEARNER_EVENTS_PER_S = (900, 1_300)  # one learner end to end (README, docs/scaling.md); not measured here
QUEUE_MAXSIZE = RunSettings.model_fields["queue_maxsize"].default
RUN_TIMEOUT_S = 300.0


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every run's value."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def cpu_s(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds of each process so far (children not included)."""
    out = {}
    for name, process in processes.items():
        times = process.cpu_times()
        out[name] = times.user + times.system
    return out


def actor_pid(actor: Any) -> int:
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60))


def consume_once(settings: StreamSettings, consumers: int, expected: int, broker_pid: int | None) -> dict[str, Any]:
    """One fresh fleet reads the whole topic; its rate, CPU and count over the timed window."""
    fleet = ConsumerFleet(settings, consumers=consumers, queue_maxsize=QUEUE_MAXSIZE)
    try:
        processes = {cid: psutil.Process(actor_pid(actor)) for cid, actor in fleet.actors.items()}
        processes["queue"] = psutil.Process(actor_pid(fleet.queue.actor))
        processes["driver"] = psutil.Process()
        if broker_pid is not None:
            processes["broker"] = psutil.Process(broker_pid)
        seen: Counter[tuple[int, int]] = Counter()
        dead_letters = 0
        deadline_s = time.monotonic() + RUN_TIMEOUT_S

        def take(batch: Any) -> None:
            nonlocal dead_letters
            dead_letters += batch.dead_letters
            for partition, (start, end) in batch.spans.items():
                seen.update((partition, offset) for offset in batch.offsets[start:end])

        first = None
        while first is None:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"no batch from {consumers} consumers within {RUN_TIMEOUT_S:.0f}s")
            first = fleet.get(1.0)
        # The timed window starts here: the actors are up and fetching.
        start_s, start_cpu = time.perf_counter(), cpu_s(processes)
        out_before = len(first)
        take(first)
        while sum(seen.values()) < expected:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"{sum(seen.values())} of {expected} events within {RUN_TIMEOUT_S:.0f}s")
            batch = fleet.get(1.0)
            if batch is not None:
                take(batch)
        wall_s = time.perf_counter() - start_s
        end_cpu = cpu_s(processes)
    finally:
        fleet.stop()
    timed = sum(seen.values()) - out_before
    used = {name: end_cpu[name] - start_cpu[name] for name in processes}
    consumers_cpu_s = sum(v for k, v in used.items() if k.startswith("consumer-"))
    return {
        "events_per_s": timed / wall_s,
        "wall_s": wall_s,
        "events_out": sum(seen.values()),
        "distinct": len(seen),
        "twice": sum(1 for n in seen.values() if n > 1),
        "dead_letters": dead_letters,
        "per_partition": dict(sorted(Counter(p for p, _ in seen).items())),
        "cpu_s": used,
        # CPU over the window per second of wall time: 1.0 = one core busy the whole window
        "consumers_cores": consumers_cpu_s / wall_s,
        "consumer_cores_max": max(v for k, v in used.items() if k.startswith("consumer-")) / wall_s,
        "queue_cores": used["queue"] / wall_s,
        "driver_cores": used["driver"] / wall_s,
        "broker_cores": used.get("broker", float("nan")) / wall_s,
        "machine_share": sum(used.values()) / wall_s / (os.cpu_count() or 1),
        "consumers_cpu_us_per_event": consumers_cpu_s / timed * 1e6,
    }


def sweep(settings: StreamSettings, consumer_counts: list[int], repeats: int, expected: int,
          broker_pid: int | None) -> list[dict[str, Any]]:
    rows = []
    print(f"{'consumers':>9} {'events/s median':>16} {'min..max':>21} {'count check':>22} "
          f"{'consumers cores':>15} {'max one':>7} {'queue':>6} {'drain':>6} {'broker':>6} {'machine':>7} "
          f"{'us/event':>8} {'load 1m':>7}")
    for consumers in consumer_counts:
        consume_once(settings, consumers, expected, broker_pid)  # warm-up: Ray workers, imports, page cache
        runs = [consume_once(settings, consumers, expected, broker_pid) for _ in range(repeats)]
        ok = all(r["events_out"] == r["distinct"] == expected and r["twice"] == 0 and r["dead_letters"] == 0
                 for r in runs)
        row: dict[str, Any] = {
            "consumers": consumers,
            "events_per_s": spread([r["events_per_s"] for r in runs]),
            "count_ok": ok,
            "events_in": expected,
            "events_out": sorted({r["events_out"] for r in runs}),
            "read_twice_max": max(r["twice"] for r in runs),
            "dead_letters_max": max(r["dead_letters"] for r in runs),
            **{key: spread([r[key] for r in runs]) for key in (
                "consumers_cores", "consumer_cores_max", "queue_cores", "driver_cores", "broker_cores",
                "machine_share", "consumers_cpu_us_per_event")},
            "load_avg_1m_after": os.getloadavg()[0],
            "runs": runs,
        }
        rows.append(row)
        rate = row["events_per_s"]
        med = {key: row[key]["median"] for key in row if isinstance(row[key], dict) and "median" in row[key]}
        check = f"{'/'.join(map(str, row['events_out']))}/{expected} twice {row['read_twice_max']}"
        print(f"{consumers:>9} {rate['median']:>16,.0f} {rate['min']:>10,.0f}..{rate['max']:<9,.0f} "
              f"{check + (' OK' if ok else ' MISMATCH'):>22} {med['consumers_cores']:>15.2f} "
              f"{med['consumer_cores_max']:>7.2f} {med['queue_cores']:>6.2f} {med['driver_cores']:>6.2f} "
              f"{med['broker_cores']:>6.2f} {med['machine_share']:>7.0%} {med['consumers_cpu_us_per_event']:>8.1f} "
              f"{row['load_avg_1m_after']:>7.1f}")
    return rows


@contextmanager
def kafka_broker(security: str, workdir: Path) -> Iterator[tuple[str, dict[str, Any], int | None]]:
    """(bootstrap servers, client security settings, broker pid or None): a broker of our own unless one is set."""
    servers = os.environ.get("SITN_KAFKA_BOOTSTRAP_SERVERS")
    if servers and security == "plaintext":
        yield servers, {}, None
        return
    from sitn.broker import DEFAULT_CACHE_DIR, KafkaBroker, free_ports
    from sitn.broker_security import SaslSslListener, ScramUser, make_tls_stores

    ports = free_ports(2)
    listener = None
    if security == "sasl_ssl":
        tls = make_tls_stores(workdir / "tls", "bench-Store-1")
        listener = SaslSslListener(tls, (ScramUser("broker", "broker-Bench-1"), ScramUser("bench", "bench-Secret-1")))
    broker = KafkaBroker(workdir / "kafka", port=ports[0], controller_port=ports[1], cache_dir=DEFAULT_CACHE_DIR,
                         sasl_ssl=listener)
    broker.start(timeout_s=180, stop_with_parent=True)
    try:
        client: dict[str, Any] = {}
        if listener is not None:
            kwargs = listener.client_kwargs("bench")
            client = {key: kwargs[key] for key in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                                   "sasl_plain_password", "ssl_cafile")}
        yield broker.bootstrap_servers, client, broker.pid
    finally:
        broker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=Path, default=DEFAULT_EVENTS)
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--consumers", default="1,2,4", help="consumer actor counts to sweep")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--security", choices=("plaintext", "sasl_ssl"), default="plaintext")
    add_json_option(parser)
    args = parser.parse_args()
    consumer_counts = [int(c) for c in args.consumers.split(",")]
    if any(not 1 <= c <= args.partitions for c in consumer_counts) or args.repeats < 1:
        parser.error(f"each consumer count must be in 1..{args.partitions} and --repeats >= 1, "
                     f"got {consumer_counts} and {args.repeats}")
    if not args.events.is_file():
        parser.error(f"--events {args.events} not found (the shipped data set lives in ../shared/data)")
    record = BenchRecord("bench_ingest_scaling", args)
    events = load_events(args.events, "movie", "book", limit=args.limit).events
    figures: dict[str, Any] = {"workload": str(args.events), "events": len(events), "partitions": args.partitions,
                               "security": args.security, "queue_maxsize": QUEUE_MAXSIZE,
                               "load_avg_start": list(os.getloadavg())}
    print(f"workload: {args.events} ({len(events):,} events), {args.partitions} partitions, {args.security}, "
          f"{args.repeats} repeats, queue {QUEUE_MAXSIZE} batches, {os.cpu_count()} cpus, "
          f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    from sitn.ray_cluster import init_ray

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, \
            kafka_broker(args.security, Path(tmp)) as (servers, client, broker_pid):
        run = uuid.uuid4().hex[:8]
        settings = StreamSettings(kafka_bootstrap_servers=servers, partitions=args.partitions,
                                  topic_interactions=f"bench-ingest-{run}", topic_dead_letters=f"bench-ingest-dlq-{run}",
                                  topic_embedding_updates=f"bench-ingest-up-{run}", **client)
        from stream.topics import ensure_topics

        ensure_topics(settings)
        producer = open_producer(settings)
        stats = replay(events, producer)
        producer.close()
        figures["replay"] = {"events": stats.events, "wall_s": stats.wall_s, "events_per_s": stats.events_per_s}
        print(f"replay: {stats.events:,} events in {stats.wall_s:.2f} s = {stats.events_per_s:,.0f} events/s")
        init_ray(None, Path(tempfile.mkdtemp(prefix="sitn-ray-", dir="/tmp")))
        try:
            figures["sweep"] = sweep(settings, consumer_counts, args.repeats, len(events), broker_pid)
        finally:
            import ray

            ray.shutdown()
    balance = figures["sweep"][0]["runs"][0]["per_partition"]
    figures["per_partition"] = balance
    print(f"events per partition: {', '.join(f'{p}: {n:,}' for p, n in balance.items())}")
    learner_us = [1e6 / r for r in LEARNER_EVENTS_PER_S]
    figures["learner_cpu_us_per_event_derived"] = learner_us
    for row in figures["sweep"]:
        us = row["consumers_cpu_us_per_event"]["median"]
        print(f"{row['consumers']} consumer(s): {us:.0f} us of consumer CPU per event against the learner's "
              f"{learner_us[1]:,.0f}-{learner_us[0]:,.0f} us (one core at {LEARNER_EVENTS_PER_S[0]:,}-"
              f"{LEARNER_EVENTS_PER_S[1]:,} events/s, not measured here): ingest is "
              f"{us / learner_us[0]:.1%}-{us / learner_us[1]:.1%} of the work per event")
    figures["load_avg_end"] = list(os.getloadavg())
    print(f"load average at the end: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json is not None:
        record.write(args.json, figures)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
