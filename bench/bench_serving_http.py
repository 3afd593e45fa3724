"""/recommend capacity and latency of the serving processes, idle vs while embedding updates stream in.

The server runs in a child process shaped like production: one RecommendationService (63,937
items of dim 64, users with V=4 views and 20 consumed items each, seeded and clustered as in
bench_index.py; merge threshold and background merges as serving's settings), uvicorn in a thread, and,
in the "streaming" phase, a writer thread that applies published versions through
``RecommendationService.apply`` (item and user vectors, consumed pairs) at a set rate, ten a second, which
also triggers delta merges (base rebuilds in a background thread).
``--workers N`` starts N such children on one port (SO_REUSEPORT, as ``sitn serve --workers N``): each
builds the same seeded state and, streaming, runs its own writer thread at the full rate (every replica
applies every version); the kernel spreads the client's connections over them, and each child reports
how many requests it answered.
Each phase measures, in order:

- the model path in-process (no HTTP), thread CPU time per request: ``service.recommend`` against the
  FAISS search alone for the same queries, so what HTTP adds and what the search costs are visible;
- capacity (closed loop): ``wrk -t1 -c4 --latency`` for ``--capacity-s`` seconds, ``--repeats`` times,
  over ``--capacity-users`` users (all with vectors by default: every answer from the model path);
  prints req/s and p50/p99 per run, their medians and ranges, and the model-path share of the answers
  (the server's own ``sitn_serving_recommendations`` counter; with several workers, of the one that
  answered ``/metrics``). With 4 connections in flight a closed loop's p50 is about 4 requests' service
  time, so latency is also measured
- at a fixed open-loop rate (``--rate``): latency counts from the *scheduled* send time, so a stall
  shows up instead of slowing the sender; warms up, then measures.

The client shares the machine's cores with the server: run on an otherwise idle machine, or compare
before/after back to back and print ``uptime`` with the figures. ``wrk`` is a separate tool (Debian/
Ubuntu: ``apt-get install wrk``; macOS: ``brew install wrk``); without it the capacity runs are skipped.
``--json PATH`` writes every printed figure, the configuration and the load average at start and end
(``bench/report.py``).

    python bench/bench_serving_http.py [--rate 200 --duration-s 15 --updates-per-s 500 --capacity-s 10]
    python bench/bench_serving_http.py --workers 2 --connections 16 --duration-s 0 --json serving-2w.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402


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
    from stream.events import EmbeddingBatch

    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((512, args.dim))
    defaults = ServingSettings()
    service = RecommendationService(  # shaped like serving's settings: merge threshold, background merges
        args.dim,
        index_factory=args.factory,
        search_params={args.knob: args.knob_value} if args.knob else None,
        merge_threshold_rows=defaults.merge_threshold_rows,
        background_merge=defaults.index_background_merge,
        merge_max_duty=defaults.index_merge_max_duty,
    )
    item_ids = [f"item{n}" for n in range(args.items)]
    started = time.perf_counter()
    service.index.upsert(item_ids, make_vectors(rng, args.items, args.dim, centers), version=1)
    service.index.wait_for_merge()  # the first base (built in the background) before any measurement
    build_s = time.perf_counter() - started
    user_vectors = make_vectors(rng, args.users * args.views, args.dim, centers).reshape(
        args.users, args.views, -1
    )
    for n in range(args.users):
        service.users.upsert(f"user{n}", user_vectors[n], version=1)  # (V, D)
    for n in range(args.users):
        service.consumed.add(f"user{n}", [f"item{i}" for i in rng.integers(0, args.items, size=20)])
    service.record_popularity(f"item{i}" for i in rng.zipf(1.5, size=50_000) % args.items)
    recommend_us, search_us = time_model_path(service, [f"user{n}" for n in range(min(args.users, 500))])
    handle = serve_in_thread(create_app(service, ServingSettings(port=0)), port=args.port, reuse_port=args.reuse_port)

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
            users = writer_rng.integers(0, args.users, size=batch - batch // 2)
            service.apply(EmbeddingBatch(  # the one write path, as a published version reaches serving
                version=version, full=False,
                item_ids=[item_ids[i] for i in items],
                item_vectors=make_vectors(writer_rng, len(items), args.dim, centers),
                user_ids=[f"user{n}" for n in users],
                user_vectors=make_vectors(writer_rng, len(users) * args.views, args.dim, centers).reshape(
                    len(users), args.views, args.dim),  # (U, V, D)
                popularity=[], created_at_s=time.time(),
                consumed=[(f"user{n}", item_ids[i]) for n, i in zip(users, items, strict=False)],
            ))
            applied[0] += batch
            next_s += 0.1
            stop.wait(max(0.0, next_s - time.perf_counter()))

    writer = threading.Thread(target=stream_updates, daemon=True)
    if args.updates_per_s > 0:
        writer.start()
    print(f"PORT {handle.port} BUILD_S {build_s:.2f} RECOMMEND_US {recommend_us:.1f} SEARCH_US {search_us:.1f}",
          flush=True)
    sys.stdin.read()  # the parent closes stdin when done
    stop.set()
    if writer.is_alive():
        writer.join(timeout=60)
    from serving.metrics import RECOMMENDATIONS

    answered = sum(sample.value for family in RECOMMENDATIONS.collect() for sample in family.samples
                   if sample.name.endswith("_total"))
    print(f"UPDATES_APPLIED {applied[0]} INDEX_VERSION {service.index.version} ANSWERED {answered:.0f} "
          f"PID {os.getpid()}", flush=True)
    handle.stop()


def time_model_path(service: object, user_ids: Sequence[str], passes: int = 5) -> tuple[float, float]:
    """Thread CPU microseconds per request, median of ``passes`` passes over ``user_ids`` after one warm-up
    pass: ``service.recommend(user_id, 10)``, and the FAISS base search alone for the same query vectors and
    the ``fetch`` the index asks for (``k + len(consumed) + min(stale rows, k)``)."""
    from serving.index import set_faiss_threads
    from serving.service import RecommendationService

    assert isinstance(service, RecommendationService)
    snap = service.index.snapshot
    base = snap.base
    assert base is not None
    jobs = []
    for user_id in user_ids:
        queries = service.users.get(user_id)
        assert queries is not None
        fetch = min(snap.size, 10 + len(service.consumed.get(user_id)) + min(snap.n_stale, 10))
        jobs.append((user_id, queries, fetch))
    set_faiss_threads(1)

    def per_request_us(call: object) -> float:
        assert callable(call)
        for job in jobs:  # warm-up pass
            call(job)
        times = []
        for _ in range(passes):
            started = time.thread_time()
            for job in jobs:
                call(job)
            times.append((time.thread_time() - started) / len(jobs) * 1e6)
        return statistics.median(times)

    recommend_us = per_request_us(lambda job: service.recommend(job[0], 10))
    search_us = per_request_us(lambda job: base.search(job[1], job[2]))
    return recommend_us, search_us


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


WRK_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
WRK_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_SOCKET_ERRORS = re.compile(r"Socket errors: (.*)")
TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def served_by_counts(url: str) -> dict[str, float]:
    """The server's ``sitn_serving_recommendations_total`` counter, by ``served_by``."""
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    found = re.findall(r'^sitn_serving_recommendations_total\{served_by="(\w+)"\} ([\d.e+]+)$', text, re.MULTILINE)
    return {path: float(count) for path, count in found}


def capacity(
    url: str, duration_s: float, repeats: int, user_ids: Sequence[str], known_share: float, seed: int,
    connections: int = 4,
) -> dict[str, Any] | None:
    """Closed-loop capacity: ``wrk -t1 -c{connections} --latency`` over a seeded list of paths (a share
    ``known_share`` of them name a user from ``user_ids``, the rest unknown users), ``repeats`` runs after a
    2 s warm-up run. None when wrk is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    rng = np.random.default_rng(seed)
    paths = []
    for n in range(max(len(user_ids), 500)):
        user_id = user_ids[int(rng.integers(0, len(user_ids)))] if rng.random() < known_share else f"stranger{n}"
        paths.append("/recommend?" + urllib.parse.urlencode({"user_id": user_id, "k": 10}))
    script = "paths = {" + ",".join(json.dumps(p) for p in paths) + "}\n" + (
        "i = 0\n"
        "request = function()\n"
        "  i = i % #paths + 1\n"
        "  return wrk.format(\"GET\", paths[i])\n"
        "end\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        def run(seconds: float) -> str:
            command = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", f.name, url + "/"]
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout

        run(2.0)  # warm-up
        before = served_by_counts(url)
        runs = []
        for _ in range(repeats):
            out = run(duration_s)
            latency = {q: float(v) * TO_MS[unit] for q, v, unit in WRK_LATENCY.findall(out)}
            rate = WRK_RATE.search(out)
            if rate is None or set(latency) != {"50", "99"}:
                raise RuntimeError(f"unexpected wrk output:\n{out}")
            non_2xx = WRK_NON_2XX.search(out)
            socket_errors = WRK_SOCKET_ERRORS.search(out)
            runs.append({"rps": float(rate.group(1)), "p50_ms": latency["50"], "p99_ms": latency["99"],
                         "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
                         "socket_errors": socket_errors.group(1).strip() if socket_errors else ""})
        after = served_by_counts(url)
    finally:
        os.unlink(f.name)
    answered = {path: after.get(path, 0.0) - before.get(path, 0.0) for path in after}
    total = sum(answered.values())
    return {"runs": runs, "model_share": answered.get("model", 0.0) / total if total else float("nan"),
            "answered": {path: int(n) for path, n in answered.items() if n}}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def median_and_range(values: Sequence[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}..{max(values):.{digits}f}]"


def uptime_load() -> str:
    try:
        return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load n/a"


def start_servers(args: argparse.Namespace, updates_per_s: int) -> list[tuple[subprocess.Popen[str], list[str]]]:
    """``args.workers`` server children on one port (the first picks it); each with its first output line."""
    child_args = [sys.executable, __file__, "--serve", f"--updates-per-s={updates_per_s}"]
    child_args += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("items", "users", "views", "dim", "factory", "knob", "knob_value", "seed")]  # fmt: skip
    if args.workers > 1:
        child_args.append("--reuse-port")
    from serving.threads import single_thread_blas_env

    servers: list[tuple[subprocess.Popen[str], list[str]]] = []
    port = 0
    for _ in range(args.workers):
        child = subprocess.Popen([*child_args, f"--port={port}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, **single_thread_blas_env()})  # as sitn serve
        assert child.stdout is not None
        first = child.stdout.readline().split()
        if not first:
            raise RuntimeError(f"server child exited {child.wait()} before listening")
        port = int(first[1])
        servers.append((child, first))
    return servers


def run_phase(args: argparse.Namespace, updates_per_s: int) -> dict[str, Any]:
    """One phase (idle or streaming) on fresh server children; prints its lines and returns their figures."""
    servers = start_servers(args, updates_per_s)
    port = int(servers[0][1][1])
    url = f"http://127.0.0.1:{port}"
    phase = "idle" if updates_per_s == 0 else f"streaming {updates_per_s}/s"
    figures: dict[str, Any] = {"updates_per_s": updates_per_s, "workers": args.workers, "port": port}
    recommend_us = [float(first[5]) for _, first in servers]
    search_us = [float(first[7]) for _, first in servers]
    figures["model_path_us"] = {"recommend": recommend_us, "search": search_us,
                                "build_s": [float(first[3]) for _, first in servers]}
    print(f"{phase:<18} model path in-process (thread CPU per request, {args.views} views, per worker): "
          f"service.recommend {' '.join(f'{us:.0f}' for us in recommend_us)} us, of which the FAISS search alone "
          f"{' '.join(f'{us:.0f}' for us in search_us)} us")
    if args.capacity_s > 0:
        users = [f"user{i}" for i in range(min(args.capacity_users, args.users))]
        load_before = os.getloadavg()
        found = capacity(url, args.capacity_s, args.repeats, users, args.capacity_known_share, args.seed,
                         args.connections)
        load_after = os.getloadavg()
        if found is None:
            figures["capacity"] = None
            print(f"{phase:<18} capacity: skipped, wrk is not installed (apt-get install wrk / brew install wrk)")
        else:
            runs: list[dict[str, Any]] = found["runs"]
            figures["capacity"] = {
                **found, "connections": args.connections, "load_avg_before": load_before, "load_avg_after": load_after,
                **{key: spread([r[key] for r in runs]) for key in ("rps", "p50_ms", "p99_ms")},
            }
            print(
                f"{phase:<18} capacity wrk -t1 -c{args.connections}, {args.workers} worker(s), {len(users)} users, "
                f"{args.repeats} x {args.capacity_s:g} s ({uptime_load()}): "
                f"req/s {median_and_range([r['rps'] for r in runs], 0)}  "
                f"p50_ms {median_and_range([r['p50_ms'] for r in runs], 2)}  "
                f"p99_ms {median_and_range([r['p99_ms'] for r in runs], 2)}  "
                f"non_2xx={sum(r['non_2xx'] for r in runs):g}  model-path share {found['model_share']:.3f} "
                f"answered={found['answered']}"
                + "".join(f" socket_errors=[{r['socket_errors']}]" for r in runs if r["socket_errors"])
            )
    if args.duration_s > 0:
        result = drive(url, args.rate, args.warmup_s, args.duration_s, [f"user{i}" for i in range(args.users)],
                       args.seed)
        lat_ms = result["latencies_s"] * 1e3  # type: ignore[operator]
        p50, p90, p99, p_max = np.percentile(lat_ms, [50, 90, 99, 100]) if len(lat_ms) else (np.nan,) * 4
        figures["open_loop"] = {"rate": args.rate, "n": len(lat_ms), "errors": len(result["errors"]),  # type: ignore[arg-type]
                                "served_by": result["served_by"], "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
                                "max_ms": p_max, "load_avg": os.getloadavg()}
        print(
            f"{phase:<18} open loop {args.rate:g}/s ({uptime_load()}) n={len(lat_ms):<5} "
            f"errors={len(result['errors']):<3} served_by={result['served_by']} "  # type: ignore[arg-type]
            f"p50_ms={p50:.2f} p90_ms={p90:.2f} p99_ms={p99:.2f} max_ms={p_max:.2f} "
            f"build_s={' '.join(first[3] for _, first in servers)}"
        )
    ends = []
    for child, _ in servers:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
    for child, _ in servers:
        assert child.stdout is not None
        last = child.stdout.readline().split()
        child.wait(timeout=120)
        ends.append({"updates_applied": int(last[1]), "index_version": int(last[3]), "answered": int(last[5]),
                     "pid": int(last[7])})
        print(f"{phase:<18} worker pid {last[7]}: updates applied {last[1]}, index version {last[3]}, "
              f"requests answered {last[5]}")
    figures["workers_at_end"] = ends
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)  # a server child's port
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a server child's binding
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes on one port (SO_REUSEPORT, Linux), each with its own writer")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections in the capacity runs")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop)")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=15.0, help="open-loop measurement; 0 skips it")
    parser.add_argument("--capacity-s", type=float, default=10.0, help="seconds per wrk run; 0 skips capacity")
    parser.add_argument("--repeats", type=int, default=3, help="wrk runs per phase")
    parser.add_argument("--capacity-users", type=int, default=500, help="distinct users in the capacity runs")
    parser.add_argument("--capacity-known-share", type=float, default=1.0,
                        help="share of capacity requests naming a user with vectors (the rest: unknown users)")
    parser.add_argument("--phases", default="idle,streaming", help="idle, streaming or both, comma separated")
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
    add_json_option(parser)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    phases = args.phases.split(",")
    if not phases or not set(phases) <= {"idle", "streaming"}:
        parser.error(f"--phases must name idle and/or streaming, got {args.phases!r}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.connections < 1:
        parser.error(f"--connections must be >= 1, got {args.connections}")
    record = BenchRecord("bench_serving_http", args)
    print(
        f"rate={args.rate}/s warmup_s={args.warmup_s} duration_s={args.duration_s} items={args.items} "
        f"users={args.users} views={args.views} dim={args.dim} index={args.factory} {args.knob}={args.knob_value} "
        f"workers={args.workers} connections={args.connections} cpus={os.cpu_count()} ({uptime_load()})"
    )
    figures: dict[str, Any] = {}
    if "idle" in phases:
        figures["idle"] = run_phase(args, updates_per_s=0)
    if "streaming" in phases:
        figures["streaming"] = run_phase(args, updates_per_s=args.updates_per_s)
    if args.json is not None:
        record.write(args.json, figures)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
