"""/recommend latency at a fixed open-loop request rate, idle vs while embedding updates stream in.

The server runs in a child process shaped like production: one RecommendationService (63,937
items of dim 64, users with V=4 views, seeded and clustered as in bench_index.py), uvicorn in a
thread, and, in the "streaming" phase, a writer thread that applies item and user updates at a set
rate (which also triggers delta merges, i.e. off-to-the-side base rebuilds). This process sends
requests on a fixed schedule (open loop: latency counts from the *scheduled* send time, so a stall
shows up instead of slowing the sender), warms up, then measures.

    python bench/bench_serving_http.py [--rate 200 --duration-s 15 --updates-per-s 500]
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_vectors(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    labels = rng.integers(0, len(centers), size=n)
    points = centers[labels] + rng.standard_normal((n, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)  # (n, dim)


def serve(args: argparse.Namespace) -> None:
    """Child process: build the service, start HTTP, stream updates if asked, run until stdin closes."""
    from serving.api import create_app, serve_in_thread
    from serving.service import RecommendationService
    from serving.settings import ServingSettings

    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((512, args.dim))
    service = RecommendationService(
        args.dim,
        index_factory=args.factory,
        search_params={args.knob: args.knob_value} if args.knob else None,
    )
    item_ids = [f"item{n}" for n in range(args.items)]
    started = time.perf_counter()
    service.index.upsert(item_ids, make_vectors(rng, args.items, args.dim, centers), version=1)
    build_s = time.perf_counter() - started
    user_vectors = make_vectors(rng, args.users * args.views, args.dim, centers).reshape(
        args.users, args.views, -1
    )
    for n in range(args.users):
        service.users.upsert(f"user{n}", user_vectors[n], version=1)  # (V, D)
    for n in range(args.users):
        service.consumed.add(f"user{n}", [f"item{i}" for i in rng.integers(0, args.items, size=20)])
    service.record_popularity(f"item{i}" for i in rng.zipf(1.5, size=50_000) % args.items)
    handle = serve_in_thread(create_app(service, ServingSettings(port=0)))

    stop = threading.Event()
    applied = [0]

    def stream_updates() -> None:
        writer_rng = np.random.default_rng(args.seed + 1)
        batch = max(1, args.updates_per_s // 10)  # ten batches a second, half items, half users
        version = 1
        next_s = time.perf_counter()
        while not stop.is_set():
            version += 1
            items = writer_rng.integers(0, args.items, size=batch // 2)
            service.index.upsert(
                [item_ids[i] for i in items], make_vectors(writer_rng, len(items), args.dim, centers), version
            )
            vectors = make_vectors(writer_rng, (batch - batch // 2) * args.views, args.dim, centers)
            for row, n in enumerate(writer_rng.integers(0, args.users, size=batch - batch // 2)):
                service.users.upsert(f"user{n}", vectors[row * args.views : (row + 1) * args.views], version)
            applied[0] += batch
            next_s += 0.1
            stop.wait(max(0.0, next_s - time.perf_counter()))

    writer = threading.Thread(target=stream_updates, daemon=True)
    if args.updates_per_s > 0:
        writer.start()
    print(f"PORT {handle.port} BUILD_S {build_s:.2f}", flush=True)
    sys.stdin.read()  # the parent closes stdin when done
    stop.set()
    if writer.is_alive():
        writer.join(timeout=60)
    print(f"UPDATES_APPLIED {applied[0]} INDEX_VERSION {service.index.version}", flush=True)
    handle.stop()


def drive(
    url: str, rate: float, warmup_s: float, duration_s: float, user_ids: Sequence[str], seed: int,
    workers: int = 16,
) -> dict[str, object]:
    """Open-loop load: request i is due at start + i / rate; latency = done - due.

    A dispatcher thread hands each request to a pool of ``workers`` threads, each holding one
    keep-alive ``http.client`` connection (cheap per request, so the client is not the bottleneck; an
    httpx AsyncClient here cost more CPU than the server and its queueing swamped the measurement).
    90% of requests name a user from ``user_ids``, 10% an unknown user (the popularity path).
    """
    host, _, port = url.removeprefix("http://").partition(":")
    rng = np.random.default_rng(seed)
    latencies_s: list[float] = []
    served_by: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    jobs: queue.Queue[tuple[float, str, bool] | None] = queue.Queue()

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        while (job := jobs.get()) is not None:
            due_s, user_id, measured = job
            try:
                conn.request("GET", "/recommend?" + urllib.parse.urlencode({"user_id": user_id, "k": 10}))
                response = conn.getresponse()
                body = response.read()
                done_s = time.perf_counter()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                continue
            with lock:
                if response.status != 200:
                    errors.append(f"status {response.status}")
                elif measured:
                    latencies_s.append(done_s - due_s)
                    path = json.loads(body)["served_by"]
                    served_by[path] = served_by.get(path, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    start_s = time.perf_counter() + 0.1
    total = int((warmup_s + duration_s) * rate)
    for i in range(total):
        due_s = start_s + i / rate
        delay_s = due_s - time.perf_counter()
        if delay_s > 0:
            time.sleep(delay_s)  # the open-loop schedule itself, not a synchronisation
        known = rng.random() < 0.9
        user_id = user_ids[int(rng.integers(0, len(user_ids)))] if known else f"stranger{i}"
        jobs.put((due_s, user_id, i >= warmup_s * rate))
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join()
    return {"latencies_s": np.array(latencies_s), "served_by": served_by, "errors": errors}


def run_phase(args: argparse.Namespace, updates_per_s: int) -> None:
    child_args = [sys.executable, __file__, "--serve", f"--updates-per-s={updates_per_s}"]
    child_args += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("items", "users", "views", "dim", "factory", "knob", "knob_value", "seed")]  # fmt: skip
    child = subprocess.Popen(child_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    first = child.stdout.readline().split()
    port, build_s = int(first[1]), first[3]
    result = drive(f"http://127.0.0.1:{port}", args.rate, args.warmup_s, args.duration_s,
                   [f"user{i}" for i in range(args.users)], args.seed)
    child.stdin.close()
    last = child.stdout.readline().strip()
    child.wait(timeout=120)
    lat_ms = result["latencies_s"] * 1e3  # type: ignore[operator]
    p50, p90, p99, p_max = np.percentile(lat_ms, [50, 90, 99, 100]) if len(lat_ms) else (np.nan,) * 4
    phase = "idle" if updates_per_s == 0 else f"streaming {updates_per_s}/s"
    print(
        f"{phase:<18} n={len(lat_ms):<5} errors={len(result['errors']):<3} served_by={result['served_by']} "  # type: ignore[arg-type]
        f"p50_ms={p50:.2f} p90_ms={p90:.2f} p99_ms={p99:.2f} max_ms={p_max:.2f} build_s={build_s} {last}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop)")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument(
        "--updates-per-s", type=int, default=500, help="item+user updates per second while streaming"
    )
    parser.add_argument("--items", type=int, default=63_937)
    parser.add_argument("--users", type=int, default=15_352)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--factory", default="HNSW32")
    parser.add_argument("--knob", default="efSearch")
    parser.add_argument("--knob-value", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    print(
        f"rate={args.rate}/s warmup_s={args.warmup_s} duration_s={args.duration_s} items={args.items} "
        f"users={args.users} views={args.views} dim={args.dim} index={args.factory} {args.knob}={args.knob_value}"
    )
    run_phase(args, updates_per_s=0)
    run_phase(args, updates_per_s=args.updates_per_s)


if __name__ == "__main__":
    main()
