"""Recall-vs-latency sweep of FAISS index types for the serving item index (FAISS-bench style).

Seeded, offline workload shaped like the real book catalogue: ~64k items of dim 64. Vectors come
from a mixture of Gaussian clusters (learned embeddings cluster; uniform noise would make every ANN
index look worse than it will be), queries from the same mixture. Ground truth is exact inner
product. Each row sweeps one knob and prints recall@10 next to single-query latency p50/p99 (one
FAISS thread, the serving setting), plus build time, which bounds how often a base can be rebuilt.

    python bench/bench_index.py [--items 63937 --dim 64 --queries 2000 --seed 0]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np


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


def time_queries(
    index: faiss.Index, queries: np.ndarray, k: int, warmup: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Search one query at a time (as a request does); return (labels (Q, k), latencies_s (Q,))."""
    for q in queries[:warmup]:
        index.search(q[None, :], k)
    labels = np.empty((len(queries), k), dtype=np.int64)
    latencies_s = np.empty(len(queries))
    for row, q in enumerate(queries):
        started = time.perf_counter()
        _, found = index.search(q[None, :], k)
        latencies_s[row] = time.perf_counter() - started
        labels[row] = found[0]
    return labels, latencies_s


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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
        f"queries={args.queries} k={args.k} seed={args.seed} faiss_threads=1"
    )
    print(f"{'index':<14}{'knob':>14}{'recall@10':>11}{'p50_ms':>9}{'p99_ms':>9}{'build_s':>9}")
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
            labels, latencies_s = time_queries(index, queries, args.k)
            p50_ms, p99_ms = np.percentile(latencies_s, [50, 99]) * 1e3
            setting = f"{knob}={value}" if knob else "exact"
            print(
                f"{factory:<14}{setting:>14}{recall_at_k(labels, truth):>11.4f}"
                f"{p50_ms:>9.3f}{p99_ms:>9.3f}{build_s:>9.2f}"
            )


if __name__ == "__main__":
    main()
