"""Does cross-domain transfer work when the data has it? A sweep over the generator's shared interest.

The synthetic generator (``stream.synthetic``) gives every user interest clusters per domain; with
probability ``shared_interest`` a user's target clusters are their source clusters, otherwise they are
drawn independently. The workload here is built so that the source is informative and the target thin:
many source events per user, a few target events (the evaluation needs 3), moderate noise, every
(user, item) pair at most once (the offline protocol's assumption). For each strength and seed the
stream is split and evaluated exactly like ``sitn eval`` (``learner.offline.evaluate``: per-user chronological
split, full ranking, ties against the held-out item, consumed items excluded, epoch chosen on
validation) for three rows on the same events: SITN, the single-domain model (``use_source=False``, the
same encoder) and popularity.

What transfer must show: at strength 1, SITN clearly above single-domain on ``full/overlap``, and on
``full/cold_start`` (the target history hidden: only the source speaks) far above popularity; at
strength 0 both gains vanish. The table prints NDCG@10 and HR@10 per strength and model, median and
mean ± sample std over seeds, next to the training time per run.

    python bench/bench_transfer.py                                  # strengths 0, 0.5, 1; 3 seeds
    python bench/bench_transfer.py --strengths 0,1 --seeds 3 --users 1500 --max-epochs 6 --patience 2  # the test's size
    python bench/bench_transfer.py --json transfer.json   # also the figures, configuration and load as JSON

``tests/test_transfer_synthetic.py`` runs the same code (``run_strength``) at a small size.

Measured at the defaults (code of commit 4afd19c: the popularity prior, SITN mini-batches of 128 target
examples, ``init_history_items``; all strengths in one process, 293 s, beside a long ``sitn run`` on the other
of the 2 cores, 2026-12-08), full-ranking NDCG@10, mean ± sample std over seeds 0-2:

| strength | SITN overlap | single-domain | item-kNN t+s | SITN cold-start | popularity |
| --- | --- | --- | --- | --- | --- |
| 0 | 0.0953 ± 0.0113 | 0.0998 ± 0.0122 | 0.0693 ± 0.0047 | 0.0380 ± 0.0053 | 0.0366 ± 0.0066 |
| 0.5 | 0.1065 ± 0.0142 | 0.1013 ± 0.0091 | 0.1230 ± 0.0063 | 0.0671 ± 0.0101 | 0.0344 ± 0.0005 |
| 1 | 0.1614 ± 0.0075 | 0.1007 ± 0.0084 | 0.2212 ± 0.0052 | 0.1634 ± 0.0020 | 0.0353 ± 0.0050 |

Transfer shows and vanishes with the data: SITN / single-domain 1.54-1.66x per seed at strength 1, 0.99-1.08x
at 0.5 and 0.95-0.96x at 0; SITN's cold start 4.2-5.5x popularity at 1, 1.6-2.3x at 0.5, 0.99-1.08x at 0. At
commit 2c59133 (before ``init_history_items``) strength 1 gave SITN 0.1615 ± 0.0125 against single-domain
0.0887 ± 0.0071 (1.81-1.83x): the new default lifted the single-domain model (whose items are met mostly in
histories) and left SITN where it was. Item co-occurrence over both histories stays above SITN whenever the
source speaks. Validation chose the last epoch allowed (8) for SITN in 8 of 9 runs, so a larger budget would
likely raise SITN's figures (not measured).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402
from learner.offline.baselines import ItemKNN, Popularity, Ranker  # noqa: E402
from learner.offline.eval_split import chronological_split  # noqa: E402
from learner.offline.evaluate import RunResult, train_and_test  # noqa: E402
from learner.offline.sitn_ranker import DEFAULT_BATCH_BY, SITNRanker  # noqa: E402
from stream.synthetic import SyntheticConfig, SyntheticStream  # noqa: E402

MODELS = ("sitn", "single_domain", "popularity", "itemknn_target", "itemknn_target+source")
SETTINGS = ("full/overlap", "full/cold_start")
REPORTED = ("ndcg@10", "hr@10")


@dataclass(frozen=True)
class Workload:
    """The size of one run: the synthetic stream and the SITN training budget."""

    users: int = 2_000  # users, all present from the start (no arrivals: every user has a full history)
    events_per_user: int = 24  # events drawn per user on average, before repeats are dropped
    target_share: float = 0.15  # few target events per user: the target history is thin
    n_source_items: int = 1_000
    n_target_items: int = 1_000
    n_clusters: int = 16
    noise: float = 0.2  # share of uniformly drawn items
    dim: int = 32  # SITN width
    max_len: int = 16  # history length per domain
    cluster_counts: tuple[int, ...] = (8, 16, 32)  # prototype granularities, sized for a few thousand users
    lr: float = 3e-3  # SITN learning rate: a short budget needs a faster start than the model's default
    batch_size: int = 128
    batch_by: str = DEFAULT_BATCH_BY  # SITNRanker's rule: a batch holds batch_size target examples (at most 4x in all)
    max_epochs: int = 8  # SITN still gains at 6 epochs at 1,500 users
    patience: int = 3  # epochs without validation gain before stopping (issue 9: >= 3)

    def stream_config(self, shared_interest: float, seed: int) -> SyntheticConfig:
        """The synthetic stream of this workload at ``shared_interest``, seeded by ``seed``."""
        return SyntheticConfig(
            events=self.users * self.events_per_user, n_users=self.users, new_user_share=0.0,
            n_source_items=self.n_source_items, n_target_items=self.n_target_items, n_clusters=self.n_clusters,
            target_share=self.target_share, noise=self.noise, shared_interest=shared_interest,
            unique_pairs=True, seed=seed,
        )

    def sitn_settings(self) -> dict[str, Any]:
        """SITNConfig fields this workload sets; every other field keeps the model's default."""
        return {"dim": self.dim, "max_len": self.max_len, "view_hidden": self.dim, "proj_dim": self.dim,
                "cluster_counts": self.cluster_counts, "lr": self.lr}


def run_strength(
    workload: Workload, shared_interest: float, seed: int, workdir: Path, models: tuple[str, ...] = MODELS
) -> dict[str, RunResult]:
    """Generate, split and evaluate one stream: model name -> its run (test metrics per setting).

    Counting models (popularity, item-kNN) learn the training examples once (``iterative = False``);
    the SITN rows train up to ``max_epochs`` epochs, the epoch chosen on validation.
    """
    from learner.core.config import SITNConfig

    config = workload.stream_config(shared_interest, seed)
    events = list(SyntheticStream(config).events())
    split = chronological_split(events, config.source, config.target, max_len=workload.max_len)
    logging.getLogger(__name__).info("strength=%s seed=%d split %s", shared_interest, seed, split.stats)
    out: dict[str, RunResult] = {}
    for name in models:
        ranker: Ranker
        if name == "popularity":
            ranker = Popularity(split.target, split.catalogue)
        elif name.startswith("itemknn_"):
            ranker = ItemKNN(name, name.removeprefix("itemknn_"), split.source, split.target, split.catalogue)
        else:
            sitn = SITNConfig(**workload.sitn_settings(), use_source=name == "sitn", seed=seed)
            if name == "single_domain":
                sitn = sitn.replace(use_i2i=False, use_i2c=False)
            ranker = SITNRanker(name, sitn, split, workload.batch_size, workdir / f"{name}-{shared_interest}-{seed}",
                                batch_by=workload.batch_by)
        out[name] = train_and_test(ranker, split, max_epochs=workload.max_epochs, patience=workload.patience,
                                   seed=seed)
    return out


def seed_stats(values: list[float]) -> dict[str, Any]:
    """Median, mean and sample std (ddof=1; None for one seed) of per-seed values, and the values.

    >>> {k: round(v, 4) if isinstance(v, float) else v for k, v in seed_stats([0.1, 0.2, 0.6]).items()}
    {'median': 0.2, 'mean': 0.3, 'std': 0.2646, 'per_seed': [0.1, 0.2, 0.6]}
    """
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if len(a) > 1 else None, "per_seed": [float(x) for x in a]}


def _stat(stats: dict[str, Any]) -> str:
    """``median (mean ± std)`` of ``seed_stats``; the median alone for one seed.

    >>> _stat(seed_stats([0.1, 0.2, 0.6]))
    '0.2000 (0.3000 ± 0.2646)'
    >>> _stat(seed_stats([0.25]))
    '0.2500'
    """
    if stats["std"] is None:
        return f"{stats['median']:.4f}"
    return f"{stats['median']:.4f} ({stats['mean']:.4f} ± {stats['std']:.4f})"


def _ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (a tiny run can score 0), printed ``nan`` and recorded as null."""
    return a / b if b else float("nan")


def summarize(results: dict[float, list[dict[str, RunResult]]]) -> dict[str, Any]:
    """The figures the tables print, per strength: per model NDCG@10 and HR@10 per setting over seeds,
    the chosen epochs and training time; and the per-seed ratios SITN / single-domain (overlap) and SITN
    cold-start / popularity (NDCG@10)."""
    out: dict[str, Any] = {}
    for strength, runs in results.items():
        models = {
            name: {
                "test": {s: {m: seed_stats([r[name].test[s][m] for r in runs]) for m in REPORTED} for s in SETTINGS},
                "epochs": [r[name].epoch for r in runs],
                "train_s": seed_stats([r[name].train_s for r in runs]),
            }
            for name in runs[0]
        }
        ratios = {
            "sitn_over_single_domain_overlap_ndcg@10": [
                _ratio(r["sitn"].test["full/overlap"]["ndcg@10"], r["single_domain"].test["full/overlap"]["ndcg@10"])
                for r in runs],
            "sitn_cold_start_over_popularity_ndcg@10": [
                _ratio(r["sitn"].test["full/cold_start"]["ndcg@10"], r["popularity"].test["full/cold_start"]["ndcg@10"])
                for r in runs],
        }
        out[f"{strength:g}"] = {"shared_interest": strength, "models": models, "ratios": ratios}
    return out


def table(summary: dict[str, Any]) -> str:
    """Markdown: strength x model rows, NDCG@10 and HR@10 per setting, then epochs and training time."""
    head = [f"{s} {m.upper()}" for s in SETTINGS for m in REPORTED]
    lines = ["| strength | model | " + " | ".join(head) + " | epochs | train s |",
             "| --- | --- |" + " --- |" * (len(head) + 2)]
    for strength, figures in summary.items():
        for name, model in figures["models"].items():
            cells = [_stat(model["test"][s][m]) for s in SETTINGS for m in REPORTED]
            epochs = ",".join(str(e) for e in model["epochs"])
            lines.append(f"| {strength} | {name} | " + " | ".join(cells)
                         + f" | {epochs} | {model['train_s']['median']:.4f} |")
    return "\n".join(lines)


def ratios(summary: dict[str, Any]) -> str:
    """Per strength, per seed: SITN / single-domain (overlap) and SITN cold-start / popularity, NDCG@10."""
    lines = ["| strength | SITN / single-domain, overlap NDCG@10 | SITN cold-start / popularity NDCG@10 |",
             "| --- | --- | --- |"]
    for strength, figures in summary.items():
        over, cold = figures["ratios"].values()
        lines.append(f"| {strength} | {', '.join(f'{x:.2f}' for x in over)} | "
                     f"{', '.join(f'{x:.2f}' for x in cold)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strengths", default="0,0.5,1", help="comma-separated shared_interest values")
    parser.add_argument("--seeds", type=int, default=3, help="runs per strength, seeds 0..N-1")
    parser.add_argument("--users", type=int, default=Workload.users)
    parser.add_argument("--events-per-user", type=int, default=Workload.events_per_user)
    parser.add_argument("--max-epochs", type=int, default=Workload.max_epochs)
    parser.add_argument("--patience", type=int, default=Workload.patience)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_json_option(parser)
    args = parser.parse_args()
    record = BenchRecord("bench_transfer", args)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    strengths = [float(s) for s in args.strengths.split(",")]
    for s in strengths:
        if not 0.0 <= s <= 1.0:
            raise SystemExit(f"--strengths: each must be in [0, 1], got {s}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    workload = Workload(users=args.users, events_per_user=args.events_per_user, max_epochs=args.max_epochs,
                        patience=args.patience)
    print(f"workload: {workload}")
    print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}, torch threads {args.threads}")
    t0 = time.perf_counter()
    results: dict[float, list[dict[str, RunResult]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        for strength in strengths:
            for seed in range(args.seeds):
                run = run_strength(workload, strength, seed, Path(tmp))
                results.setdefault(strength, []).append(run)
                print(f"strength {strength:g} seed {seed}: " + ", ".join(
                    f"{n} {run[n].test['full/overlap']['ndcg@10']:.4f}/{run[n].test['full/cold_start']['ndcg@10']:.4f}"
                    for n in run) + f"  (overlap/cold NDCG@10; {time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarize(results)
    print("\ncells: median (mean ± sample std) over seeds\n")
    print(table(summary))
    print()
    print(ratios(summary))
    wall_s = time.perf_counter() - t0
    print(f"\nwall {wall_s:.0f} s")
    if args.json is not None:
        record.write(args.json, {"workload": workload, "strengths": summary, "wall_s": wall_s})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
