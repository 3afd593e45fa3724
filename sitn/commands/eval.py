"""``sitn eval``: the offline, paper-style evaluation of SITN, its ablations and the baselines.

Rows: popularity, river's online MF, the single-domain model (same encoder, no source domain), SITN,
and SITN without I2I, without I2C, with V=1, with M=1. Every row runs once per seed; the table gives
mean ± standard deviation. The protocol is in ``learner.evaluate``'s docstring and in results.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import random
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from learner.baselines import OnlineMF, Popularity, Ranker
from learner.evaluate import (
    N_SAMPLED_NEGATIVES,
    SELECTION_METRIC,
    RunResult,
    SITNRanker,
    Split,
    aggregate,
    chronological_split,
    markdown_tables,
    train_and_test,
)
from stream.dataset import load_events

log = logging.getLogger(__name__)

ALL_ROWS = ("popularity", "online_mf", "single_domain", "sitn", "sitn_no_i2i", "sitn_no_i2c", "sitn_v1", "sitn_m1")
PROTOCOL_MD = """\
- Events: `stream.dataset.load_events` (chronological, same-day ties in file order).
- Split per user on the target domain: last target event = test, the target event before it =
  validation; training = the user's events (both domains) strictly before the validation event.
  Users with fewer than 3 target events give no query but their events train.
- Query history: the last `max_len` events per domain strictly before the held-out event
  (`UserStateStore`, the stream's causal example builder); the test history includes the validation item.
- Catalogue: every target item id in the file. Candidates: the catalogue minus the target items the
  user consumed before the held-out event (the data never repeats a user-item pair, so the held-out
  item always stays); cold-start rows use the same candidates.
- Full protocol: rank among all candidates. Sampled protocol: the held-out item + 99 negatives drawn
  uniformly without replacement from the candidates, seeded by the run seed (same for all models).
- Ranks are 1-based, ties count against the held-out item. HR@K, NDCG@K (K = 10, 20), MRR (no cut-off).
- overlap = every test user (all users of this data set have both domains), both histories in the query;
  cold_start = the same users and items, the target history emptied and the user id withheld.
- Model selection on validation only: full-protocol NDCG@10 on the validation queries after each epoch;
  stop after `patience` epochs without improvement or at `max_epochs`; the best epoch's state is
  restored and the test queries are ranked once. Mean ± sample standard deviation (ddof = 1) over seeds.
- SITN rows train on the causal examples of the training events, shuffled per epoch (seeded), one
  `learn_many` step per mini-batch; single_domain trains on target-domain examples only.
- online_mf: `river.reco.BiasedMF`, one user vector over both domains, each training event a positive
  (y = 1) plus `mf_negatives` same-domain items seen so far (y = 0), squared loss, SGD; score = item bias +
  <user, item>. Cold start: the user vector is folded in from the query history by ridge regression.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="offline evaluation: chronological split, full and sampled ranking, ablations, baselines",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--events", required=True, type=Path, help="events.csv in the shared generic format")
    p.add_argument("--source", required=True, help="source domain name, e.g. movie")
    p.add_argument("--target", required=True, help="target domain name, e.g. book")
    p.add_argument("--seeds", type=int, default=3, help="runs per row, seeds 0..N-1")
    p.add_argument("--output", type=Path, default=None, help="directory for results.json and results.md")
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows of the file")
    p.add_argument("--val-users", type=int, default=0,
                   help="rank only this many validation queries (a fixed seeded subset; 0 = all) for epoch selection")
    p.add_argument("--test-users", type=int, default=0,
                   help="rank only this many test queries (a fixed seeded subset, the same for every row; 0 = all)")
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated rows out of {','.join(ALL_ROWS)}")
    p.add_argument("--max-epochs", type=int, default=10, help="epochs at most per model (early stopping)")
    p.add_argument("--patience", type=int, default=2, help="epochs without validation gain before stopping")
    p.add_argument("--batch-size", type=int, default=256, help="SITN mini-batch size")
    p.add_argument("--dim", type=int, default=64, help="SITN width d")
    p.add_argument("--max-len", type=int, default=50, help="history length L per domain")
    p.add_argument("--n-views", type=int, default=4, help="SITN interest views V (the V=1 row uses 1)")
    p.add_argument("--cluster-counts", default="16,64,256", help="prototype cluster counts (the M=1 row keeps the middle one)")
    p.add_argument("--lr", type=float, default=1e-3, help="SITN learning rate")
    p.add_argument("--lambda-i2i", type=float, default=0.1, help="I2I loss weight")
    p.add_argument("--lambda-i2c", type=float, default=0.1, help="I2C loss weight")
    p.add_argument("--tau", type=float, default=0.1, help="I2I temperature and I2C fallback temperature")
    p.add_argument("--i2c-warmup-steps", type=int, default=200, help="steps before the I2C loss switches on")
    p.add_argument("--recluster-every-steps", type=int, default=100, help="k-means of the prototypes every R steps")
    p.add_argument("--mf-factors", type=int, default=32, help="online MF latent factors")
    p.add_argument("--mf-lr", type=float, default=0.05, help="online MF SGD learning rate")
    p.add_argument("--mf-negatives", type=int, default=4, help="online MF sampled negatives per positive")
    p.add_argument("--mf-max-epochs", type=int, default=5, help="online MF epochs at most (pure Python, slow)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared 2-core machine)")
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> list[str]:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown or not rows:
        raise ValueError(f"--rows got {unknown or rows}, allowed: {','.join(ALL_ROWS)}")
    for name in ("val_users", "test_users"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("seeds", "max_epochs", "patience", "mf_max_epochs", "torch_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    return rows


def _sitn_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    counts = tuple(int(k) for k in args.cluster_counts.split(","))
    base: dict[str, Any] = {
        "dim": args.dim, "max_len": args.max_len, "n_views": args.n_views, "cluster_counts": counts,
        "lr": args.lr, "lambda_i2i": args.lambda_i2i, "lambda_i2c": args.lambda_i2c,
        "tau_i2i": args.tau, "tau_proto": args.tau, "i2c_warmup_steps": args.i2c_warmup_steps,
        "recluster_every_steps": args.recluster_every_steps,
        "view_hidden": args.dim, "proj_dim": args.dim,
    }
    return {
        "single_domain": {**base, "use_source": False, "use_i2i": False, "use_i2c": False},
        "sitn": base,
        "sitn_no_i2i": {**base, "use_i2i": False},
        "sitn_no_i2c": {**base, "use_i2c": False},
        "sitn_v1": {**base, "n_views": 1},
        "sitn_m1": {**base, "cluster_counts": (counts[len(counts) // 2],)},
    }


def _make_ranker(
    row: str, seed: int, args: argparse.Namespace, split: Split, workdir: Path
) -> tuple[Ranker, int, dict[str, Any]]:
    """The ranker of ``row`` for ``seed``, its epoch limit and the settings that describe it."""
    if row == "popularity":
        return Popularity(split.target, split.catalogue), 1, {}
    if row == "online_mf":
        settings = {"n_factors": args.mf_factors, "learning_rate": args.mf_lr,
                    "negatives_per_positive": args.mf_negatives}
        return OnlineMF(split.target, split.catalogue, seed=seed, **settings), args.mf_max_epochs, settings
    from learner.config import SITNConfig

    settings = _sitn_configs(args)[row]
    config = SITNConfig(**settings, seed=seed)
    ranker = SITNRanker(row, config, split, args.batch_size, workdir / f"{row}-{seed}")
    return ranker, args.max_epochs, config.to_dict()


def _epoch_reporter(progress: Progress, task: TaskID, name: str) -> Callable[[int, float], None]:
    def on_epoch(epoch: int, value: float) -> None:
        progress.update(task, completed=epoch, description=f"{name} val {SELECTION_METRIC}={value:.4f}")

    return on_epoch


def run(args: argparse.Namespace) -> int:
    rows = _validate(args)
    import torch

    torch.set_num_threads(args.torch_threads)
    console = Console(stderr=True)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    log_ = load_events(args.events, args.source, args.target, limit=args.limit)
    split = chronological_split(log_.events, args.source, args.target, max_len=args.max_len)
    if not split.test:
        raise ValueError(f"no user has 3 or more {args.target!r} events in {args.events}: nothing to evaluate")
    split = subsample_queries(split, args.val_users, args.test_users)
    console.print(f"split: {split.stats}")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sitn-eval-") as tmp, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        overall = progress.add_task("runs", total=len(rows) * args.seeds)
        for row in rows:
            runs: list[RunResult] = []
            settings: dict[str, Any] = {}
            per_seed: list[dict[str, Any]] = []
            for seed in range(args.seeds):
                ranker, max_epochs, settings = _make_ranker(row, seed, args, split, Path(tmp))
                epoch_task = progress.add_task(f"{row} seed={seed}", total=max_epochs)
                on_epoch = _epoch_reporter(progress, epoch_task, f"{row} seed={seed}")
                t_run = time.perf_counter()
                result = train_and_test(ranker, split, max_epochs=max_epochs, patience=args.patience,
                                        seed=seed, on_epoch=on_epoch)
                progress.update(epoch_task, completed=max_epochs)
                progress.advance(overall)
                runs.append(result)
                per_seed.append({
                    "seed": seed, "epoch": result.epoch, "train_s": round(result.train_s, 1),
                    "wall_s": round(time.perf_counter() - t_run, 1), "val_curve": result.val_curve,
                    "val": result.val, "test": result.test,
                })
                log.info("run done row=%s seed=%d epoch=%d test_ndcg10=%.5f", row, seed, result.epoch,
                         result.test["full/overlap"]["ndcg@10"])
            results.append({"name": row, "settings": settings, "per_seed": per_seed, "summary": aggregate(runs)})
    report = {
        "command": command_line(args),
        "argv": vars(args) | {"events": str(args.events), "output": str(args.output), "func": None},
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()} torch {torch.__version__}",
        "data": {"path": str(args.events), "source": args.source, "target": args.target, **split.stats},
        "protocol": {"split": "per-user chronological on the target domain, val = 2nd-to-last, test = last",
                     "sampled_negatives": N_SAMPLED_NEGATIVES, "selection_metric": f"validation full {SELECTION_METRIC}",
                     "consumed_excluded": True, "ties": "against the held-out item", "std": "sample, ddof=1",
                     "max_epochs": args.max_epochs, "patience": args.patience},
        "rows": results,
    }
    markdown = render_markdown(report)
    Console().print(markdown_tables(results))
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.output / "results.md").write_text(markdown)
        console.print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'}")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The full ``sitn eval`` command with every option spelled out, so a run can be repeated exactly."""
    parts = ["sitn", "eval"]
    for name, value in vars(args).items():
        if name in ("func", "command", "log_level") or value is None:
            continue
        parts += [f"--{name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(parts)


def subsample_queries(split: Split, val_users: int, test_users: int) -> Split:
    """Keep a fixed subset (seed 0, the same for every row and seed) of the validation/test queries."""
    rng = random.Random(0)
    if 0 < val_users < len(split.validation):
        split.validation = sorted(rng.sample(split.validation, val_users), key=split.validation.index)
    if 0 < test_users < len(split.test):
        split.test = sorted(rng.sample(split.test, test_users), key=split.test.index)
    split.stats["val_queries"] = len(split.validation)
    split.stats["test_queries"] = len(split.test)
    return split


def sitn_vs_single(rows: list[dict[str, Any]]) -> list[str]:
    """Lines comparing SITN and its ablations with the single-domain model on full/overlap NDCG@10."""
    by_name = {r["name"]: r["summary"]["full/overlap"]["ndcg@10"] for r in rows}
    if "sitn" not in by_name:
        return []
    sitn = by_name["sitn"]
    lines = []
    for other in ("single_domain", "sitn_no_i2i", "sitn_no_i2c", "sitn_v1", "sitn_m1"):
        if other not in by_name:
            continue
        ref = by_name[other]
        diff = sitn["mean"] - ref["mean"]
        stds = [s for s in (sitn["std"], ref["std"]) if s is not None]
        bound = 2 * max(stds) if stds else None
        verdict = "n/a (one seed)" if bound is None else ("yes" if diff > bound else "no")
        bound_text = "n/a" if bound is None else f"{bound:.5f}"
        lines.append(f"| sitn − {other} | {diff:+.5f} | {bound_text} | {verdict} |")
    return ["| comparison (full/overlap NDCG@10) | difference of means | 2 × max std | beyond 2 std? |",
            "| --- | --- | --- | --- |", *lines]


def render_markdown(report: dict[str, Any]) -> str:
    data = report["data"]
    parts = [
        f"# Offline evaluation: {data['source']} → {data['target']}",
        "",
        f"- Command: `{report['command']}`",
        f"- Started (UTC): {report['started_utc']}; wall time {report['wall_s']:.0f} s; machine: {report['machine']}",
        f"- Data: `{data['path']}`: {data['events']} events, {data['users']} users, {data['eval_users']} with a "
        f"validation/test query ({data['val_queries']} validation and {data['test_queries']} test queries ranked), {data['train_events']} training events, {data['catalogue_items']} target items "
        f"(catalogue), {data['source_items']} source items.",
        f"- Cells: mean ± sample std over seeds; `epochs` = the epoch chosen on validation per seed "
        f"(max {report['protocol']['max_epochs']}, patience {report['protocol']['patience']}).",
        "",
        "## Protocol",
        "",
        PROTOCOL_MD,
        "## Results",
        "",
        markdown_tables(report["rows"]),
        "",
    ]
    comparison = sitn_vs_single(report["rows"])
    if comparison:
        parts += ["## SITN against the single-domain model and its ablations", "", *comparison, ""]
    return "\n".join(parts)
