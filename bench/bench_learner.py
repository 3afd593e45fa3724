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
    python bench/bench_learner.py --json learner.json   # also the figures, configuration and load as JSON
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402
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


def run(workload: str, max_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """One workload at one L: examples/s per timed step (p10/median/p90, mean over the run) and the losses
    of the last 10 steps next to the speed."""
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
    return {
        "workload": workload, "max_len": max_len, "batch": args.batch, "history_items_per_example": float(tokens),
        "steps": len(rates), "warmup_steps": warmup_steps,
        "examples_per_s": {"median": float(q[1]), "p10": float(q[0]), "p90": float(q[2]),
                           "mean": len(rates) * args.batch / elapsed_s, "per_step": rates},
        "after_step": int(learner.step),
        "quality_last_10_steps": {name: float(np.mean([t[name] for t in tail]))
                                  for name in ("loss", "loss_main", "loss_i2i", "loss_i2c")}
        | {"proto_agreement": float(np.nanmean([t["proto_agreement"] for t in tail]))},
        "load_avg_1m": os.getloadavg()[0],
    }


def print_run(r: dict[str, Any]) -> None:
    rate, quality = r["examples_per_s"], r["quality_last_10_steps"]
    print(
        f"workload={r['workload']:9s} L={r['max_len']:2d} batch={r['batch']} "
        f"history_items_per_example={r['history_items_per_example']:5.1f} "
        f"steps={r['steps']} median_ex_per_s={rate['median']:8.0f} p10={rate['p10']:8.0f} p90={rate['p90']:8.0f} "
        f"mean_ex_per_s={rate['mean']:8.0f} | "
        f"after_step={r['after_step']} loss={quality['loss']:.3f} loss_main={quality['loss_main']:.3f} "
        f"loss_i2i={quality['loss_i2i']:.3f} loss_i2c={quality['loss_i2c']:.3f} "
        f"proto_agreement={quality['proto_agreement']:.3f} | load_avg_1m={r['load_avg_1m']:.1f}",
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
    add_json_option(parser)
    args = parser.parse_args()
    record = BenchRecord("bench_learner", args)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    figures: dict[str, Any] = {"model_config": SITNConfig().to_dict(), "threads": args.threads, "runs": []}
    print(f"config: {figures['model_config']}")
    print(f"threads={args.threads} torch={torch.__version__} cpus={os.cpu_count()}")
    workloads = ["real", "synthetic"] if args.workload == "both" else [args.workload]
    for workload in workloads:
        for max_len in args.lengths:
            figures["runs"].append(run(workload, max_len, args))
            print_run(figures["runs"][-1])
    if args.json is not None:
        record.write(args.json, figures)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
