"""learn_many throughput: examples/s per step, batch 256, every loss on, sequence lengths 20 and 50.

Two workloads, each in stream order:

- ``real``: the shipped Amazon movie->book events (../shared/data), examples from UserStateStore. Users
  there have at most 15 events, so histories are short (a few items per domain) whatever max_len is.
- ``synthetic``: seeded examples whose histories are *full*: exactly L items in each domain (Zipf
  item popularity). This is the worst case for the encoder at a given L.

Each run builds a fresh learner, warms up past the first prototype clustering (so I2C is on), then
times ``--steps`` steps, which include one re-clustering. It prints the median and p10/p90 of
examples/s, the mean (which carries the amortised re-clustering), the loss after the run next to the
speed, and the machine's load average (the machine may be shared).

    python bench/bench_learner.py                     # both workloads, L = 20 and 50
    python bench/bench_learner.py --workload real --lengths 20 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from learner import SITNConfig, SITNLearner  # noqa: E402
from stream.dataset import load_events  # noqa: E402
from stream.user_state import Example, UserStateStore  # noqa: E402

EVENTS_CSV = REPO.parent / "shared" / "data" / "amazon_movie_book_c2dsr" / "events.csv"


def real_examples(max_len: int, n_needed: int, path: Path) -> list[Example]:
    log = load_events(path, "movie", "book")
    store = UserStateStore(("movie", "book"), max_len=max_len)
    examples = store.observe_many(log.events)
    start = max(0, len(examples) - n_needed)  # the later part of the stream: users with history
    return examples[start:]


def synthetic_examples(max_len: int, n: int, seed: int, n_users: int = 15_000, n_items: int = 20_000) -> list[Example]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    p /= p.sum()
    movie = rng.choice(n_items, size=(n, max_len), p=p)  # (n, L) item draws, Zipf-like popularity
    book = rng.choice(n_items, size=(n, max_len), p=p)
    labels = rng.choice(n_items, size=n, p=p)
    users = rng.integers(n_users, size=n)
    is_book = rng.random(n) < 0.5
    out = []
    for i in range(n):
        ts = 1_400_000_000 + i * 60
        times = tuple(ts - 86_400 * k for k in range(max_len, 0, -1))
        domain = "book" if is_book[i] else "movie"
        out.append(Example(
            event_id=f"syn:{i}", user_id=f"u{users[i]}", domain=domain, item_id=f"{domain[0]}{labels[i]}",
            timestamp=ts,
            history={"movie": (tuple(f"m{j}" for j in movie[i]), times),
                     "book": (tuple(f"b{j}" for j in book[i]), times)},
        ))
    return out


def run(workload: str, max_len: int, args: argparse.Namespace) -> None:
    config = SITNConfig(max_len=max_len, i2c_warmup_steps=0, seed=args.seed)
    warmup_steps = config.recluster_every_steps + 5  # past the first clustering: prototypes and I2C on
    n_steps = warmup_steps + args.steps
    n = n_steps * args.batch
    examples = (real_examples(max_len, n, args.events) if workload == "real"
                else synthetic_examples(max_len, n, args.seed))
    batches = [examples[i : i + args.batch] for i in range(0, len(examples) - args.batch + 1, args.batch)]
    if len(batches) < n_steps:
        raise SystemExit(f"{workload}: only {len(batches)} batches, need {n_steps}")
    tokens = np.mean([sum(min(len(h[0]), max_len) for h in ex.history.values()) for ex in examples])
    learner = SITNLearner(config, "movie", "book")
    for batch in batches[:warmup_steps]:
        learner.learn_many(batch)
    rates, stats = [], []
    started_s = time.perf_counter()
    for batch in batches[warmup_steps:n_steps]:
        s = learner.learn_many(batch)
        rates.append(s["examples_per_s"])
        stats.append(s)
    elapsed_s = time.perf_counter() - started_s
    q = np.percentile(rates, [10, 50, 90])
    tail = stats[-10:]
    print(
        f"workload={workload:9s} L={max_len:2d} batch={args.batch} history_items_per_example={tokens:5.1f} "
        f"steps={len(rates)} median_ex_per_s={q[1]:8.0f} p10={q[0]:8.0f} p90={q[2]:8.0f} "
        f"mean_ex_per_s={len(rates) * args.batch / elapsed_s:8.0f} | "
        f"after_step={learner.step} loss={np.mean([t['loss'] for t in tail]):.3f} "
        f"loss_main={np.mean([t['loss_main'] for t in tail]):.3f} "
        f"loss_i2i={np.mean([t['loss_i2i'] for t in tail]):.3f} loss_i2c={np.mean([t['loss_i2c'] for t in tail]):.3f} "
        f"proto_agreement={np.nanmean([t['proto_agreement'] for t in tail]):.3f} | load_avg_1m={os.getloadavg()[0]:.1f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["real", "synthetic", "both"], default="both")
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="timed steps after warm-up (default 100; one re-clustering)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and faiss threads (default 1: the ops are small; 2 threads lose under load)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--events", type=Path, default=EVENTS_CSV)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"config: {SITNConfig().to_dict()}")
    print(f"threads={args.threads} torch={torch.__version__} cpus={os.cpu_count()}")
    workloads = ["real", "synthetic"] if args.workload == "both" else [args.workload]
    for workload in workloads:
        for max_len in args.lengths:
            run(workload, max_len, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
