"""Recall-vs-latency sweep of FAISS index types for the serving item index (FAISS-bench style).

Seeded, offline workload shaped like the real book catalogue: ~64k items of dim 64 (the shipped data's
39,412 books: ``--items 39412``). Vectors come from a mixture of Gaussian clusters (learned embeddings
cluster; uniform noise would make every ANN index look worse than it will be), queries from the same
mixture. Ground truth is exact inner product. Each row sweeps one knob and prints recall@10 next to
latency p50/p99 (one FAISS thread, the serving setting) of one request: one search call with the user's
V views at once and ``k + 20`` rows fetched (the index over-fetches by the user's consumed items, 20 in
bench_serving_http.py), for each V of ``--views``; plus build time, which bounds how often a base can be
rebuilt.

    python bench/bench_index.py [--items 63937 --dim 64 --queries 2000 --views 1,4 --seed 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402


def make_vectors(
    rng: np.random.Generator, n: int, dim: int, centers: np.ndarray, spread: float
) -> np.ndarray:
    """Points around random cluster centres (overlapping when ``spread`` ~ 1), unit norm, float32 (n, dim)."""
    labels = rng.integers(0, len(centers), size=n)
    points = centers[labels] + spread * rng.standard_normal((n, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k present in the found top-k.

    >>> recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]))
    0.6666666666666666
    """
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def time_requests(
    index: faiss.Index, queries: np.ndarray, views: int, fetch: int, warmup: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``views`` queries per call, as a request searches a user's views; return (labels (Q, fetch)
    in query order, latencies_s (Q // views,) per call)."""
    requests = queries[: len(queries) // views * views].reshape(-1, views, queries.shape[1])  # (R, V, D)
    for request in requests[:warmup]:
        index.search(request, fetch)
    labels = np.empty((len(requests), views, fetch), dtype=np.int64)
    latencies_s = np.empty(len(requests))
    for row, request in enumerate(requests):
        started = time.perf_counter()
        _, found = index.search(request, fetch)
        latencies_s[row] = time.perf_counter() - started
        labels[row] = found
    return labels.reshape(-1, fetch), latencies_s


def measure_config(
    index: faiss.Index, queries: np.ndarray, truth: np.ndarray, views: list[int], fetch: int
) -> dict[str, Any]:
    """Recall@k of the first k rows and request latency p50/p99 (ms) per V, at the index's current knob."""
    k = truth.shape[1]
    latency_ms: dict[str, dict[str, float]] = {}
    recall = None
    for v in views:
        labels, latencies_s = time_requests(index, queries, v, fetch)
        if v == 1:  # per-query recall of the first k rows; the same for every V (queries are independent)
            recall = recall_at_k(labels[:, :k], truth)
        p50_ms, p99_ms = np.percentile(latencies_s, [50, 99]) * 1e3
        latency_ms[str(v)] = {"p50": float(p50_ms), "p99": float(p99_ms), "requests": len(latencies_s)}
    if recall is None:
        labels, _ = time_requests(index, queries, 1, fetch, warmup=0)
        recall = recall_at_k(labels[:, :k], truth)
    return {"recall_at_k": recall, "latency_ms_by_views": latency_ms}


def print_row(row: dict[str, Any]) -> None:
    latencies = "".join(f"{lat['p50']:>13.3f}{lat['p99']:>13.3f}" for lat in row["latency_ms_by_views"].values())
    setting = f"{row['knob']}={row['value']}" if row["knob"] else "exact"
    print(f"{row['index']:<14}{setting:>14}{row['recall_at_k']:>11.4f}{latencies}{row['build_s']:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=63_937, help="catalogue size (book catalogue: 63,937)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=512)
    parser.add_argument("--spread", type=float, default=1.0, help="within-cluster noise / centre scale")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--consumed", type=int, default=20, help="rows over-fetched per view (excluded items)")
    parser.add_argument("--views", default="1,4", help="query vectors per request (V), comma separated")
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args()
    record = BenchRecord("bench_index", args)
    views = [int(v) for v in args.views.split(",")]
    fetch = args.k + args.consumed
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, args.dim))
    items = make_vectors(rng, args.items, args.dim, centers, args.spread)  # (N, D)
    queries = make_vectors(rng, args.queries, args.dim, centers, args.spread)  # (Q, D)
    truth = np.argsort(-(queries @ items.T), axis=1)[:, : args.k]  # exact top-k, (Q, k)

    configs: list[tuple[str, str, list[int]]] = [
        ("Flat", "", [0]),
        ("HNSW16", "efSearch", [16, 32, 64, 128]),
        ("HNSW32", "efSearch", [16, 32, 64, 128]),
        ("IVF256,Flat", "nprobe", [1, 4, 8, 16, 32]),
        ("IVF1024,Flat", "nprobe", [4, 8, 16, 32, 64]),
    ]
    print(
        f"items={args.items} dim={args.dim} clusters={args.clusters} spread={args.spread} "
        f"queries={args.queries} k={args.k} fetch={fetch} seed={args.seed} faiss_threads=1; "
        "latency per request of V views"
    )
    latency_columns = "".join(f"{f'p50_ms V={v}':>13}{f'p99_ms V={v}':>13}" for v in views)
    print(f"{'index':<14}{'knob':>14}{f'recall@{args.k}':>11}{latency_columns}{'build_s':>9}")
    rows: list[dict[str, Any]] = []
    for factory, knob, values in configs:
        started = time.perf_counter()
        index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(items)
        index.add(items)
        build_s = time.perf_counter() - started
        params = faiss.ParameterSpace()
        for value in values:
            if knob:
                params.set_index_parameter(index, knob, value)
            row = {"index": factory, "knob": knob or None, "value": value if knob else None,
                   **measure_config(index, queries, truth, views, fetch), "build_s": build_s}
            rows.append(row)
            print_row(row)
    if args.json is not None:
        record.write(args.json, {"k": args.k, "fetch": fetch, "faiss_threads": 1, "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
