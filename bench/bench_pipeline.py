"""The live pipeline end to end, in one run: training throughput, freshness and /recommend latency.

Replays the shipped data set (or its first ``--limit`` rows) through the real pipeline — Kafka broker
(started here) or the embedded log -> consumer actors -> learner actor (all losses on) -> serving actor
-> HTTP — and reports:

- events/s trained end to end: replayed events / (time the last one was trained - replay start);
- events read twice and dropped by the learner (``redelivered_dropped``; 0 in a fault-free run);
- freshness, from an event's arrival at the learner to its user's vectors being served: p50 / p99;
- ``/recommend`` latency at a fixed open-loop rate while the replay streams updates, then the same load
  on the idle pipeline (after the last publish): p50 / p99 of each, and their ratio;
- quality next to speed: the prequential HR@10 / NDCG@10 of the run and the final loss terms.

    python bench/bench_pipeline.py [--backend kafka|embedded] [--limit N] [--rate 200] [--duration-s 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EVENTS = REPO.parent / "shared" / "data" / "amazon_movie_book_c2dsr" / "events.csv"


def load_driver() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serving_http", REPO / "bench" / "bench_serving_http.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.drive


def summarize(name: str, result: dict[str, Any]) -> dict[str, float]:
    lat_ms = np.asarray(result["latencies_s"]) * 1e3
    p50, p99 = np.percentile(lat_ms, [50, 99]) if len(lat_ms) else (np.nan, np.nan)
    print(f"  /recommend {name:<10} n={len(lat_ms):<5} errors={len(result['errors'])} "
          f"served_by={result['served_by']} p50_ms={p50:.2f} p99_ms={p99:.2f}")
    return {"p50_ms": float(p50), "p99_ms": float(p99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["kafka", "embedded"], default="kafka")
    parser.add_argument("--events", type=Path, default=EVENTS)
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--replay-rate", type=float, default=None, help="events/s (default: as fast as possible)")
    parser.add_argument("--rate", type=float, default=200.0, help="/recommend requests per second (open loop)")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from learner.config import SITNConfig
    from serving.settings import ServingSettings
    from sitn.pipeline import Pipeline
    from sitn.ray_cluster import init_ray
    from sitn.settings import RunSettings
    from stream.dataset import load_events
    from stream.settings import StreamSettings

    drive = load_driver()
    events = load_events(args.events, "movie", "book", limit=args.limit).events
    users = sorted({e.user_id for e in events})
    tmp = Path(tempfile.mkdtemp(prefix="sitn-bench-"))
    broker = None
    bootstrap = None
    if args.backend == "kafka":
        import socket

        from stream.broker import KafkaBroker

        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            port, controller = a.getsockname()[1], b.getsockname()[1]
        broker = KafkaBroker(tmp / "kafka", port=port, controller_port=controller)
        broker.start(timeout_s=120)
        bootstrap = broker.bootstrap_servers
    config = SITNConfig()  # the defaults: all losses on
    run = RunSettings(rate_events_per_s=args.replay_rate, batch_size=args.batch_size)
    stream = StreamSettings(kafka_bootstrap_servers=bootstrap, embedded_log_dir=tmp / "log")
    serving = ServingSettings(port=0)
    print(f"backend={args.backend} events={len(events)} users={len(users)} batch={args.batch_size} "
          f"config(dim={config.dim}, V={config.n_views}, L={config.max_len}, layers={config.n_layers}, "
          f"K={config.cluster_counts}, i2i={config.use_i2i}, i2c={config.use_i2c}) index={serving.index_factory}")
    init_ray()
    pipeline = Pipeline(run, stream, serving, config, tmp / "run")
    try:
        pipeline.start()
        url = pipeline.serving_url
        t0 = time.monotonic()
        pipeline.start_replay(events)
        while pipeline.status().get("served_version", 0) < 1:
            time.sleep(0.2)
        streaming: dict[str, Any] = {}

        def load() -> None:
            streaming.update(drive(url, args.rate, args.warmup_s, args.duration_s, users, args.seed))

        loader = threading.Thread(target=load)
        loader.start()
        while not pipeline.caught_up():
            pipeline.supervise()
            time.sleep(0.2)
        trained_s = time.monotonic() - t0
        load_outlived_training = loader.is_alive()  # then the tail of the load phase met an idle pipeline
        loader.join()
        status = pipeline.status()
        summary = pipeline.finish_training()
        pipeline.learner = None
        # Idle means idle: wait until serving has applied the last (full) publish and nothing more arrives.
        applied = -1.0
        while (now := pipeline.status().get("batches_applied", 0.0)) != applied:
            applied = now
            time.sleep(3.0)
        idle = drive(url, args.rate, args.warmup_s, args.duration_s, users, args.seed + 1)
        final = pipeline.status()
    finally:
        pipeline.stop()
        if broker is not None:
            broker.stop()
    print(f"  trained {len(events)} events in {trained_s:.1f} s: {len(events) / trained_s:,.0f} events/s end to end "
          f"(replay {status['replay_rate']:,.0f}/s, steps={int(summary['step'])}, restarts={status['restarts']})")
    print(f"  read twice and dropped by the learner: {int(summary['redelivered_dropped']):,} events "
          f"({summary['redelivered_dropped'] / len(events):.1%} of the stream)")
    print(f"  freshness p50_s={final['freshness_p50_s']:.2f} p99_s={final['freshness_p99_s']:.2f}")
    if load_outlived_training:
        print("  note: training caught up before the load phase ended; the tail of 'streaming' ran idle")
    s = summarize("streaming", streaming)
    i = summarize("idle", idle)
    print(f"  p99 streaming / idle = {s['p99_ms'] / i['p99_ms']:.2f}x")
    print(f"  quality: prequential HR@10={status.get('prequential_hr_at_10', float('nan')):.4f} "
          f"NDCG@10={status.get('prequential_ndcg_at_10', float('nan')):.4f}  final loss main="
          f"{summary.get('loss_main', float('nan')):.3f} i2i={summary.get('loss_i2i', float('nan')):.3f} "
          f"i2c={summary.get('loss_i2c', float('nan')):.3f}")


if __name__ == "__main__":
    main()
