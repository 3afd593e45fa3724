"""``sitn eval``: the offline, paper-style evaluation of SITN, its ablations and the baselines.

Rows: popularity, item-kNN (target history; target + source history; source history only), river's
online MF, the single-domain model (same encoder, no source domain), SITN, SITN fused with item-kNN,
and SITN without I2I, without I2C, with V=1, with M=1. Every row runs once per seed; the table gives
mean ± standard deviation. The protocol is in ``learner.offline.evaluate``'s docstring and in results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import platform
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from learner.core.config import SITNConfig
from learner.offline.baselines import ItemKNN, OnlineMF, Popularity, Ranker
from learner.offline.eval_report import (
    FULL_BUDGET,
    comparison_pairs,
    markdown_tables,
    paired_key,
    render_markdown,
)
from learner.offline.eval_split import (
    N_C2DSR_NEGATIVES,
    N_SAMPLED_NEGATIVES,
    Split,
    chronological_split,
    subsample_queries,
    update_query_stats,
)
from learner.offline.evaluate import REFIT_MODES, SELECTION_METRIC, RunResult, aggregate, train_and_test
from learner.offline.fusion import FUSION_WEIGHTS
from learner.offline.significance import paired_bootstrap
from learner.offline.sitn_ranker import BATCH_BY, DEFAULT_BATCH_BY
from sitn.commands import learner_shape_flags
from stream.dataset import load_events

log = logging.getLogger(__name__)

ITEMKNN_MODES = {"itemknn_target": "target", "itemknn_target_source": "target+source", "itemknn_source": "source"}
SITN_ROWS = ("single_domain", "sitn", "sitn_no_i2i", "sitn_no_i2c", "sitn_v4", "sitn_m1")
ALL_ROWS = ("popularity", *ITEMKNN_MODES, "online_mf", "single_domain", "sitn", "fused",
            "sitn_no_i2i", "sitn_no_i2c", "sitn_v4", "sitn_m1")
QUICK = {"seeds": 1, "max_epochs": 3, "patience": 1}  # --quick; the report then says "shortened"
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SITNConfig)}

# SITNConfig fields exposed as flags when the config has them; their defaults are the config's own.
NO_AUTO_DEFAULT = "%(default).0s"  # renders as nothing and stops ArgumentDefaultsHelpFormatter's "(default: None)"
SITN_FLAGS = ("dropout", "source_dropout", "gate_init_bias", "weight_decay", "item_weight_decay",
              "init_new_items_from_history", "item_bias", "own_history_dropout")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="offline evaluation: chronological split, refit, full/sampled/C2DSR ranking, ablations, baselines",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--events", required=True, type=Path, help="events.csv in the shared generic format")
    p.add_argument("--source", required=True, help="source domain name, e.g. movie")
    p.add_argument("--target", required=True, help="target domain name, e.g. book")
    p.add_argument("--output", type=Path, default=None, help="directory for results.json and results.md")
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows of the file")
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated rows out of {','.join(ALL_ROWS)}")
    p.add_argument("--quick", action="store_true",
                   help=f"a shortened budget ({', '.join(f'{k}={v}' for k, v in QUICK.items())} unless given); "
                        "the report marks it as shortened")
    # NO_AUTO_DEFAULT: these defaults depend on --quick, so the help says them instead of "(default: None)".
    p.add_argument("--seeds", type=int, default=None,
                   help=f"runs per row, seeds 0..N-1 (default: {FULL_BUDGET['seeds']}, {QUICK['seeds']} with --quick)"
                        + NO_AUTO_DEFAULT)
    p.add_argument("--max-epochs", type=int, default=None,
                   help=f"epochs at most per iterative model (default: {FULL_BUDGET['max_epochs']}, "
                        f"{QUICK['max_epochs']} with --quick)" + NO_AUTO_DEFAULT)
    p.add_argument("--patience", type=int, default=None,
                   help=f"epochs without validation gain before stopping (default: {FULL_BUDGET['patience']}, "
                        f"{QUICK['patience']} with --quick)" + NO_AUTO_DEFAULT)
    p.add_argument("--refit", choices=REFIT_MODES, default="retrain",
                   help="how an iterative model learns the refit examples (the validation-period events) before "
                        "test: retrain = from its initial state, the selected number of epochs over training + "
                        "refit examples (a refit-period item gets as many passes as a training item); continue = "
                        "--refit-passes more passes over the refit examples from the selected epoch")
    p.add_argument("--refit-passes", type=int, default=1,
                   help="passes over the refit examples with --refit continue; 0 = no refit in either mode")
    p.add_argument("--val-users", type=int, default=0,
                   help="rank only this many validation queries (a fixed seeded subset; 0 = all; shortens the budget)")
    p.add_argument("--test-users", type=int, default=0,
                   help="rank only this many test queries (a fixed seeded subset; 0 = all; shortens the budget)")
    p.add_argument("--probe-users", type=int, default=2000,
                   help="training queries ranked per epoch for the memorisation diagnostics of SITN rows")
    p.add_argument("--fusion-weights", default=",".join(f"{w:g}" for w in FUSION_WEIGHTS),
                   help="grid of w in s = z_sitn + w * z_cooc for the fused row (tuned on validation)")
    p.add_argument("--knn-alpha", type=float, default=0.5, help="item-kNN normalisation exponent (0.5 = cosine)")
    p.add_argument("--batch-size", type=int, default=512, help="SITN mini-batch size (the defaults were tuned at 512)")
    p.add_argument("--batch-by", choices=BATCH_BY, default=DEFAULT_BATCH_BY,
                   help="what --batch-size counts in a SITN mini-batch: target-domain examples (the source ones "
                        "shuffled among them come on top, so the target path steps as the single-domain row's "
                        "does) or examples of either domain (default: %(default)s)")
    shape = p.add_argument_group(
        "the model's shape: the learner settings of sitn run and sitn train (sitn.settings.RunSettings)",
        "--max-len is item-kNN's history length too; the row sitn_v4 uses 4 views whatever --n-views says")
    for action in learner_shape_flags().add_to(shape):
        action.help = f"{action.help}{NO_AUTO_DEFAULT}"  # the generated help says the default and its variable
    p.add_argument("--cluster-counts", default="16,64,256", help="prototype cluster counts (the M=1 row keeps the middle one)")
    p.add_argument("--lr", type=float, default=_CONFIG_DEFAULTS["lr"], help="SITN learning rate")
    p.add_argument("--lambda-i2i", type=float, default=0.1, help="I2I loss weight")
    p.add_argument("--lambda-i2c", type=float, default=0.1, help="I2C loss weight")
    p.add_argument("--tau", type=float, default=0.1, help="I2I temperature and I2C fallback temperature")
    p.add_argument("--i2c-warmup-steps", type=int, default=200, help="steps before the I2C loss switches on")
    p.add_argument("--recluster-every-steps", type=int, default=100, help="k-means of the prototypes every R steps")
    defaults = {f.name: f.default for f in dataclasses.fields(SITNConfig)}
    for name in SITN_FLAGS:
        if name not in defaults:
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(defaults[name], bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"SITNConfig.{name} (default: the config's, {defaults[name]})" + NO_AUTO_DEFAULT)
        else:
            p.add_argument(flag, type=type(defaults[name]), default=None,
                           help=f"SITNConfig.{name} (default: the config's, {defaults[name]})" + NO_AUTO_DEFAULT)
    p.add_argument("--sitn-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other SITNConfig field for every SITN row (JSON value), repeatable")
    p.add_argument("--mf-factors", type=int, default=32, help="online MF latent factors")
    p.add_argument("--mf-lr", type=float, default=0.05, help="online MF SGD learning rate")
    p.add_argument("--mf-negatives", type=int, default=4, help="online MF sampled negatives per positive")
    p.add_argument("--mf-max-epochs", type=int, default=None,
                   help="online MF epochs at most (default: --max-epochs)" + NO_AUTO_DEFAULT)
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared 2-core machine)")
    p.set_defaults(func=run)


def resolve_budget(args: argparse.Namespace) -> None:
    """Fill the budget flags left unset: ``QUICK`` values with ``--quick``, else the full budget."""
    for name, full in FULL_BUDGET.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else full)
    if args.mf_max_epochs is None:
        args.mf_max_epochs = args.max_epochs


def resolve_shape(args: argparse.Namespace) -> None:
    """Fill ``--dim``, ``--n-views`` and ``--max-len`` from the learner's settings: each flag, else its
    ``SITN_RUN_LEARNER_*`` variable, else the default, so the recorded command spells out the shape used."""
    shape = learner_shape_flags().build(args)
    args.dim, args.n_views, args.max_len = shape.learner_dim, shape.learner_views, shape.learner_max_len


def _validate(args: argparse.Namespace) -> list[str]:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown or not rows:
        raise ValueError(f"--rows got {unknown or rows}, allowed: {','.join(ALL_ROWS)}")
    for name in ("val_users", "test_users", "probe_users", "refit_passes"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("seeds", "max_epochs", "patience", "mf_max_epochs", "torch_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    fusion_weights(args)
    sitn_overrides(args)
    return rows


def fusion_weights(args: argparse.Namespace) -> tuple[float, ...]:
    try:
        weights = tuple(float(w) for w in args.fusion_weights.split(","))
    except ValueError:
        raise ValueError(f"--fusion-weights must be comma-separated numbers, got {args.fusion_weights!r}") from None
    if not weights or any(w < 0 for w in weights):
        raise ValueError(f"--fusion-weights must be numbers >= 0, got {args.fusion_weights!r}")
    return weights


def sitn_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """SITNConfig fields set by the SITN flags and ``--sitn-set FIELD=VALUE``."""
    known = {f.name for f in dataclasses.fields(SITNConfig)}
    out: dict[str, Any] = {n: getattr(args, n) for n in SITN_FLAGS if getattr(args, n, None) is not None}
    for item in args.sitn_set:
        name, sep, raw = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--sitn-set got {item!r}; expected FIELD=VALUE with FIELD one of {sorted(known)}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def sitn_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The SITNConfig fields of every SITN row (fused uses sitn's)."""
    counts = tuple(int(k) for k in args.cluster_counts.split(","))
    base: dict[str, Any] = {
        "dim": args.dim, "max_len": args.max_len, "n_views": args.n_views, "cluster_counts": counts,
        "lr": args.lr, "lambda_i2i": args.lambda_i2i, "lambda_i2c": args.lambda_i2c,
        "tau_i2i": args.tau, "tau_proto": args.tau, "i2c_warmup_steps": args.i2c_warmup_steps,
        "recluster_every_steps": args.recluster_every_steps,
        "view_hidden": args.dim, "proj_dim": args.dim, **sitn_overrides(args),
    }
    return {
        "single_domain": {**base, "use_source": False, "use_i2i": False, "use_i2c": False},
        "sitn": base,
        "sitn_no_i2i": {**base, "use_i2i": False},
        "sitn_no_i2c": {**base, "use_i2c": False},
        "sitn_v4": {**base, "n_views": 4},
        "sitn_m1": {**base, "cluster_counts": (counts[len(counts) // 2],)},
    }


def make_ranker(
    row: str, seed: int, args: argparse.Namespace, split: Split, workdir: Path
) -> tuple[Ranker, int, dict[str, Any]]:
    """The ranker of ``row`` for ``seed``, its epoch limit and the settings that describe it."""
    if row == "popularity":
        return Popularity(split.target, split.catalogue), 1, {}
    if row in ITEMKNN_MODES:
        settings = {"mode": ITEMKNN_MODES[row], "alpha": args.knn_alpha, "max_history": args.max_len}
        knn = ItemKNN(row, ITEMKNN_MODES[row], split.source, split.target, split.catalogue,
                      alpha=args.knn_alpha, max_history=args.max_len)
        return knn, 1, settings
    if row == "online_mf":
        settings = {"n_factors": args.mf_factors, "learning_rate": args.mf_lr,
                    "negatives_per_positive": args.mf_negatives}
        return OnlineMF(split.target, split.catalogue, seed=seed, **settings), args.mf_max_epochs, settings
    from learner.offline.sitn_ranker import SITNRanker  # torch only when SITN rows run

    config = SITNConfig(**sitn_configs(args)["sitn" if row == "fused" else row], seed=seed)
    ranker = SITNRanker(row, config, split, args.batch_size, workdir / f"{row}-{seed}", batch_by=args.batch_by)
    return ranker, args.max_epochs, config.to_dict()


def _epoch_reporter(progress: Progress, task: TaskID, name: str) -> Callable[[int, float], None]:
    def on_epoch(epoch: int, value: float) -> None:
        progress.update(task, completed=epoch, description=f"{name} val {SELECTION_METRIC}={value:.4f}")

    return on_epoch


def run_seed(
    row: str, seed: int, args: argparse.Namespace, split: Split, workdir: Path, on_epoch: Callable[[int, float], None]
) -> tuple[dict[str, RunResult], dict[str, Any]]:
    """Train and test ``row`` for ``seed``; the sitn row also yields the fused row when asked for."""
    rows = args.row_list
    ranker, max_epochs, settings = make_ranker(row, seed, args, split, workdir)
    common: dict[str, Any] = {"max_epochs": max_epochs, "patience": args.patience, "seed": seed,
                              "refit_passes": args.refit_passes, "refit_mode": args.refit, "diagnostics": row in SITN_ROWS or row == "fused",
                              "on_epoch": on_epoch}
    if row in ("sitn", "fused") and "fused" in rows:
        from learner.offline.fusion import train_and_test_with_fusion

        knn = ItemKNN("itemknn", "target", split.source, split.target, split.catalogue, alpha=args.knn_alpha,
                      max_history=args.max_len)
        model_run, fused_run = train_and_test_with_fusion(ranker, knn, split, weights=fusion_weights(args), **common)
        return {"sitn": model_run, "fused": fused_run} if "sitn" in rows else {"fused": fused_run}, settings
    return {row: train_and_test(ranker, split, **common)}, settings


def run(args: argparse.Namespace) -> int:
    resolve_budget(args)
    resolve_shape(args)
    rows = _validate(args)
    args.row_list = list(rows)  # the report's row order
    if "sitn" in rows and "fused" in rows:
        rows.remove("fused")  # the sitn runs yield the fused row as well
    import torch

    torch.set_num_threads(args.torch_threads)
    console = Console(stderr=True)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    log_ = load_events(args.events, args.source, args.target, limit=args.limit)
    split = chronological_split(log_.events, args.source, args.target, max_len=args.max_len,
                                probe_users=args.probe_users)
    if not split.test:
        raise ValueError(f"no user has 3 or more {args.target!r} events in {args.events}: nothing to evaluate")
    split = subsample_queries(split, args.val_users, args.test_users)
    update_query_stats(split, refit=args.refit_passes > 0)
    console.print(f"split: {split.stats}")
    runs: dict[str, list[RunResult]] = {}
    per_seed: dict[str, list[dict[str, Any]]] = {}
    settings: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sitn-eval-") as tmp, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        overall = progress.add_task("runs", total=len(rows) * args.seeds)
        for position, row in enumerate(rows):
            for seed in range(args.seeds):
                epoch_task = progress.add_task(f"{row} seed={seed}", total=args.max_epochs)
                t_run = time.perf_counter()
                results, row_settings = run_seed(row, seed, args, split, Path(tmp),
                                                 _epoch_reporter(progress, epoch_task, f"{row} seed={seed}"))
                wall_s = round(time.perf_counter() - t_run, 1)
                progress.update(epoch_task, completed=args.max_epochs)
                progress.advance(overall)
                for name, result in results.items():
                    settings[name] = row_settings
                    runs.setdefault(name, []).append(result)
                    per_seed.setdefault(name, []).append({
                        "seed": seed, "epoch": result.epoch, "train_s": round(result.train_s, 1),
                        "refit_s": round(result.refit_s, 1), "wall_s": wall_s, "val_curve": result.val_curve,
                        "val": result.val, "test": result.test, "epochs": result.epochs, "extra": result.extra,
                    })
                    log.info("run done row=%s seed=%d epoch=%d test_ndcg10=%.5f", name, seed, result.epoch,
                             result.test["full/overlap"]["ndcg@10"])
            pending = rows[position + 1:]
            if pending:
                write_report(args, split, started, t0, runs, per_seed, settings, console, pending=pending)
    write_report(args, split, started, t0, runs, per_seed, settings, console)
    return 0


def write_report(
    args: argparse.Namespace, split: Split, started: dt.datetime, t0: float, runs: dict[str, list[RunResult]],
    per_seed: dict[str, list[dict[str, Any]]], settings: dict[str, dict[str, Any]], console: Console,
    *, pending: Sequence[str] = (),
) -> None:
    """Print the tables and write results.json and results.md; with rows ``pending`` (still to run) the
    report is marked partial, so a long run leaves its finished rows behind if it is stopped."""
    done = [name for name in args.row_list if name in runs and name not in pending]
    results_rows = [{"name": name, "settings": settings[name], "per_seed": per_seed[name],
                     "summary": aggregate(runs[name])} for name in done]
    paired = paired_comparisons(results_rows, runs)
    report = {
        "command": command_line(args),
        "argv": vars(args) | {"events": str(args.events), "output": str(args.output), "func": None},
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()} "
                   f"torch {importlib.metadata.version('torch')}",
        "data": {"path": str(args.events), "source": args.source, "target": args.target, **split.stats},
        "protocol": {"split": "per-user chronological on the target domain, val = 2nd-to-last, test = last",
                     "sampled_negatives": N_SAMPLED_NEGATIVES, "c2dsr_negatives": N_C2DSR_NEGATIVES,
                     "selection_metric": f"validation full {SELECTION_METRIC} over every validation query",
                     "consumed_excluded": True, "unknown_item": "miss", "ties": "against the held-out item",
                     "std": "sample, ddof=1", "max_epochs": args.max_epochs, "patience": args.patience,
                     "seeds": args.seeds, "val_users": args.val_users, "test_users": args.test_users,
                     "refit_passes": args.refit_passes, "refit_mode": args.refit,
                     "fusion_weights": list(fusion_weights(args))},
        "pending_rows": list(pending),
        "paired_comparisons": paired,
        "rows": results_rows,
    }
    markdown = render_markdown(report)
    if not pending:
        Console().print(markdown_tables(results_rows))
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        save_ranks(args.output / "test_ranks.npz", {name: runs[name] for name in done})
        (args.output / "results.md").write_text(markdown)
        console.print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'}"
                      + (f" (partial: {', '.join(pending)} still to run)" if pending else ""))


def paired_comparisons(rows: Sequence[dict[str, Any]], runs: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    """``learner.offline.significance.paired_bootstrap`` of every comparison of the report, on the test
    queries' full-protocol ranks of each row's seeds."""
    out = []
    for a, b, setting in comparison_pairs(rows):
        ranks_a = [r.test_ranks[setting] for r in runs[a] if setting in r.test_ranks]
        ranks_b = [r.test_ranks[setting] for r in runs[b] if setting in r.test_ranks]
        if len(ranks_a) == len(runs[a]) and len(ranks_b) == len(runs[b]):
            out.append({"key": paired_key(a, b, setting), "a": a, "b": b, "setting": setting,
                        **paired_bootstrap(np.stack(ranks_a), np.stack(ranks_b))})
    return out


def save_ranks(path: Path, runs: dict[str, list[RunResult]]) -> None:
    """Every row's full-protocol test ranks per seed and view (``<row>/seed<n>/<setting>``, in the split's
    test-query order; a miss is 2^31 - 1), so a comparison can be recomputed without training again."""
    arrays = {f"{name}/seed{seed}/{setting}": np.minimum(ranks, np.iinfo(np.int32).max).astype(np.int32)
              for name, results in runs.items() for seed, result in enumerate(results)
              for setting, ranks in result.test_ranks.items()}
    if arrays:
        np.savez_compressed(path, **arrays)


def command_line(args: argparse.Namespace) -> str:
    """The full ``sitn eval`` command with every option spelled out, so a run can be repeated exactly."""
    parts = ["sitn", "eval"]
    for name, value in vars(args).items():
        if name in ("func", "command", "log_level", "row_list", "quick") or value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if value is False:
            parts.append(f"--no-{name.replace('_', '-')}")
        elif value is True:
            parts.append(flag)
        elif isinstance(value, list):
            parts += [part for v in value for part in (flag, shlex.quote(str(v)))]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)
