"""``results.md`` of ``sitn eval``: protocol text, result tables, comparisons, diagnostics and timings."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from learner.core.config import TRANSFER_SCALES
from learner.offline.evaluate import SETTINGS

METRICS_ORDER = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr")
ITEMKNN_ROWS = ("itemknn_target", "itemknn_target_source", "itemknn_source")
ABLATIONS = ("sitn_no_i2i", "sitn_no_i2c", "sitn_v4", "sitn_m1")
FULL_BUDGET = {"max_epochs": 30, "patience": 3, "seeds": 3}

PROTOCOL_MD = """\
- Events: `stream.dataset.load_events` (chronological, same-day ties in file order).
- Split per user on the target domain: last target event = test, the target event before it =
  validation; training = the user's events (both domains) strictly before the validation event;
  refit = the user's events from the validation event up to, not including, the test event (the
  validation event and any source events between the two). Users with fewer than 3 target events give
  no query but all their events train.
- Examples and query histories: one causal pass of `UserStateStore` (the stream's example builder) over
  all events; each carries the last `max_len` events per domain strictly before it, so the test
  history includes the validation item.
- Known items: the target items of the events a model has learnt (training events for validation
  queries; training + refit events for test queries). Candidates = known items minus the target items
  the user consumed before the held-out event. A held-out item that is not known is a **miss** in every
  protocol (0 in HR and NDCG, 2e-19 in MRR); the `/rankable` tables rank only the queries whose item is
  known, and the rankable fraction is given above.
- Ranks are 1-based, ties count against the held-out item. HR@K, NDCG@K (K = 10, 20), MRR (no cut-off).
- Protocols: **full** = rank among all candidates; **sampled** = the held-out item + 99 negatives drawn
  uniformly without replacement from the candidates; **c2dsr** = the held-out item + 999 negatives, each
  drawn independently and uniformly (with replacement) from the candidates. Negatives are seeded by the
  run seed and identical for every model of a seed.
- What C2DSR does (read in github.com/cjx96/C2DSR, `C2DSR_src/utils/loader.py` `preprocess_for_predict`,
  `model/trainer.py` `test_batch`, `train_rec.py`): for each evaluation sequence 999 negatives, each an
  independent `random.randint` over the **whole** target item list (every id of `Blist.txt`), redrawn only
  when it equals the held-out item; so draws are with replacement, the user's own earlier items are
  not excluded, and items never trained may be drawn. Its rank is 1 + the negatives scoring above the
  positive by more than 1e-5 (ties favour the positive), and it selects epochs by validation MRR. We
  copy the draw (999 independent uniform draws) and keep this project's rules: candidates are the known
  items minus consumed ones, ties count against the positive, selection by NDCG@10. C2DSR also splits
  differently (its validation and test sequences belong to different users, the target is each
  sequence's last event in either domain), so its published figures are comparable in kind, not digit
  for digit.
- Views: overlap = every test user (all users of this data set have both domains), both histories and
  the user id in the query; cold_start = the same users, items and candidates, the target history emptied
  and the user id withheld.
- Model selection on validation only: full-protocol NDCG@10 over the validation queries after each
  epoch; stop after `patience` epochs without improvement or at `max_epochs`; the best epoch's state is
  restored. Counting models (popularity, item-kNN) learn the training examples exactly once (a second
  pass would double-count) and are validated once.
- Refit before test, every row alike: after selection each model learns the refit examples, then the
  test queries are ranked once. Popularity and item-kNN count them once. Iterative rows (online_mf, SITN
  rows) with `refit_mode = retrain` (the default) go back to their untrained initial state and train
  the epoch count chosen on validation over the training and refit examples together (shuffled,
  seeded; the standard "retrain on train + validation with the selected budget", so an item first seen
  in the refit period gets as many passes as a training item); with `refit_mode = continue` they take
  `refit_passes` more passes over the refit examples from the selected epoch's weights and optimizer
  state. single_domain learns only the target-domain examples. With `refit_passes = 0` nothing is refit
  and test queries are ranked among the training-known items.
- SITN rows train on the causal examples of the training events, shuffled per epoch (seeded), one
  `learn_many` step per mini-batch; single_domain trains on target-domain examples only. With
  `--batch-by target` (the default) a mini-batch holds `--batch-size` target-domain examples and the
  source-domain examples shuffled among them (at most 4 x `--batch-size` in all), so the SITN rows' target
  path takes as many steps of as many target examples as single_domain; `--batch-by examples` counts
  examples of either domain. Per epoch they
  log validation NDCG@10, validation NDCG@10 with the source history blanked at query time, and HR@10 /
  NDCG@10 on a fixed probe of training queries (the last training target event of sampled users, history
  before it, ranked among the training-known items): a probe far above validation means memorisation.
- item-kNN (`stream.cooccurrence.ItemCooccurrence`, alpha 0.5: cosine of item user sets summed over the
  history, popularity tie-break): `itemknn_target` scores from the target history, `itemknn_target_source`
  from both histories, `itemknn_source` from the source history only. Each training example is counted
  against the causal history it carries.
- fused: the sitn row's model (same run, selected epoch) fused with item-kNN: per query both score vectors
  are standardised over the known items, s = z_sitn + w * z_cooc; the kNN mode and w are chosen on the
  validation queries only (grid: every mode × w in {fusion_weights}, w = 0 is SITN alone), then both
  parts are refit and the test queries ranked once.
- online_mf: `river.reco.BiasedMF`, one user vector over both domains, each training event a positive
  (y = 1) plus `mf_negatives` same-domain items seen so far (y = 0), squared loss, SGD; score = item bias +
  <user, item>. Cold start: the user vector is folded in from the query history by ridge regression.
- Cells: mean ± sample standard deviation (ddof = 1) over seeds.
"""


def _cell(stat: dict[str, float | None]) -> str:
    mean, std = stat["mean"], stat["std"]
    assert mean is not None
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per setting; ``rows`` are the ``rows`` entries of results.json.

    >>> row = {"name": "pop", "summary": {"full/overlap": {m: {"mean": 0.5, "std": None} for m in METRICS_ORDER}},
    ...        "per_seed": [{"epoch": 1}]}
    >>> print(markdown_tables([row]))
    ### full/overlap
    <BLANKLINE>
    | model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | MRR | epochs |
    | --- | --- | --- | --- | --- | --- | --- |
    | pop | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 1 |
    """
    parts: list[str] = []
    for setting in SETTINGS:
        having = [row for row in rows if setting in row["summary"]]
        if not having:
            continue
        parts.append(f"### {setting}\n")
        parts.append("| model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | MRR | epochs |")
        parts.append("| --- | --- | --- | --- | --- | --- | --- |")
        for row in having:
            cells = [_cell(row["summary"][setting][m]) for m in METRICS_ORDER]
            epochs = ",".join(str(r["epoch"]) for r in row["per_seed"])
            parts.append(f"| {row['name']} | {' | '.join(cells)} | {epochs} |")
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def compare(a: dict[str, float | None], b: dict[str, float | None]) -> tuple[float, float | None, str]:
    """Difference of means ``a - b``, 2 × the larger of the two standard deviations, and the verdict.

    >>> compare({"mean": 0.03, "std": 0.002}, {"mean": 0.02, "std": 0.001})
    (0.009999999999999998, 0.004, 'better beyond 2 std')
    >>> compare({"mean": 0.02, "std": None}, {"mean": 0.03, "std": None})[1:]
    (None, 'n/a (one seed)')
    """
    assert a["mean"] is not None and b["mean"] is not None
    diff = a["mean"] - b["mean"]
    stds = [s for s in (a["std"], b["std"]) if s is not None]
    if not stds:
        return diff, None, "n/a (one seed)"
    bound = 2 * max(stds)
    verdict = "better beyond 2 std" if diff > bound else "worse beyond 2 std" if diff < -bound else "within noise"
    return diff, bound, verdict


def best_itemknn(rows: Sequence[dict[str, Any]], setting: str = "full/overlap") -> str | None:
    """The item-kNN row with the highest mean test NDCG@10 in ``setting`` (the strongest such baseline)."""
    scored = [(r["summary"][setting]["ndcg@10"]["mean"], r["name"]) for r in rows if r["name"] in ITEMKNN_ROWS]
    return max(scored)[1] if scored else None


def comparison_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The issue's questions, ``(a, b, setting)`` with both rows present: fused (served candidate) vs the best
    item-kNN, sitn vs the best item-kNN and single_domain, cold-start sitn vs popularity, sitn vs its
    ablations."""
    names = {r["name"] for r in rows}
    knn = best_itemknn(rows)
    pairs: list[tuple[str, str, str]] = []
    if knn is not None:
        pairs += [("fused", knn, "full/overlap"), ("sitn", knn, "full/overlap"), ("single_domain", knn, "full/overlap")]
    pairs += [("fused", "sitn", "full/overlap"), ("sitn", "single_domain", "full/overlap"),
              ("sitn", "popularity", "full/cold_start"), ("fused", "popularity", "full/cold_start")]
    pairs += [("sitn", other, "full/overlap") for other in ABLATIONS]
    return [(a, b, setting) for a, b, setting in pairs if a in names and b in names]


def paired_key(a: str, b: str, setting: str) -> str:
    return f"{a} - {b} @ {setting}"


def comparisons(rows: Sequence[dict[str, Any]], paired: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """:func:`comparison_pairs` as a table on NDCG@10: the difference of the seed means judged against the
    seeds' spread, and, where ``paired`` holds it (``paired_key`` -> ``learner.offline.significance.
    paired_bootstrap``), the paired bootstrap interval over the test queries."""
    by_name = {r["name"]: r["summary"] for r in rows}
    paired = paired or {}
    lines = []
    for a, b, setting in comparison_pairs(rows):
        diff, bound, verdict = compare(by_name[a][setting]["ndcg@10"], by_name[b][setting]["ndcg@10"])
        bound_text = "n/a" if bound is None else f"{bound:.5f}"
        boot = paired.get(paired_key(a, b, setting))
        boot_text = (f"[{boot['lo']:+.5f}, {boot['hi']:+.5f}] | {boot['verdict']}" if boot is not None
                     else "n/a | n/a")
        lines.append(f"| {a} − {b} | {setting} | {diff:+.5f} | {bound_text} | {verdict} | {boot_text} |")
    if not lines:
        return []
    knn = best_itemknn(rows)
    note = f"Best item-kNN row on test full/overlap NDCG@10: `{knn}`." if knn else ""
    return [note, "",
            "Two kinds of noise: *2 × max std* is over training seeds (how much a row moves when trained again); "
            "the *paired bootstrap* resamples the test queries (each query's NDCG@10 averaged over the row's "
            "seeds, the two rows subtracted query by query, 2,000 resamples, 95 % percentile interval; "
            "`learner.offline.significance`), i.e. how much the difference would move on another sample of "
            "users. A difference is significant only where its interval excludes 0.", "",
            "| comparison (NDCG@10) | setting | difference of means | 2 × max std | verdict (seeds) "
            "| paired bootstrap 95 % interval | verdict (queries) |",
            "| --- | --- | --- | --- | --- | --- | --- |", *lines]


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "n/a"


def timing_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per row: median seconds per training epoch and per validation pass, refit and wall seconds."""
    lines = ["| model | s / training epoch (median) | s / validation pass (median) | refit s (median) | wall s per seed (median) |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        epochs = [e for run in row["per_seed"] for e in run.get("epochs", [])]
        lines.append(f"| {row['name']} | {_median([e['train_s'] for e in epochs])} | "
                     f"{_median([e['val_s'] for e in epochs])} | "
                     f"{_median([run.get('refit_s', 0.0) for run in row['per_seed']])} | "
                     f"{_median([run['wall_s'] for run in row['per_seed']])} |")
    return lines


def diagnostics_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per-epoch diagnostics of the first seed of every row that logged them."""
    parts: list[str] = []
    for row in rows:
        run = row["per_seed"][0]
        epochs = run.get("epochs", [])
        if not epochs or "val_no_source_ndcg@10" not in epochs[0] or row["name"] == "fused":
            continue
        parts += [f"### {row['name']} (seed {run['seed']}, chosen epoch {run['epoch']})", "",
                  "| epoch | val NDCG@10 | val NDCG@10, source blanked | val NDCG@10, cold start | train-probe HR@10 | "
                  "train-probe NDCG@10 | train s | val s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in epochs:
            parts.append(f"| {int(e['epoch'])} | {e['val_ndcg@10']:.4f} | {e['val_no_source_ndcg@10']:.4f} | "
                         f"{e.get('val_cold_ndcg@10', float('nan')):.4f} | "
                         f"{e.get('probe_hr@10', float('nan')):.4f} | {e.get('probe_ndcg@10', float('nan')):.4f} | "
                         f"{e['train_s']:.1f} | {e['val_s']:.1f} |")
        parts.append("")
    return parts


def budget_line(protocol: dict[str, Any]) -> str:
    """Says whether the run used the full budget, and if not, what was shortened.

    >>> budget_line({"max_epochs": 30, "patience": 3, "seeds": 3, "val_users": 0, "test_users": 0, "refit_passes": 1})
    '- Budget: full (max 30 epochs, patience 3, 3 seeds, every validation and test query, refit 1 pass).'
    >>> budget_line({"max_epochs": 30, "patience": 3, "seeds": 3, "val_users": 0, "test_users": 0, "refit_passes": 1,
    ...              "refit_mode": "retrain"})[-79:]
    'query, refit by retraining on training + refit events for the selected epochs).'
    >>> budget_line({"max_epochs": 2, "patience": 3, "seeds": 1, "val_users": 0, "test_users": 0, "refit_passes": 1})
    '- Budget: **shortened**: max_epochs 2 < 30, seeds 1 < 3. Not a publishable table.'
    """
    short = [f"{k} {protocol[k]} < {v}" for k, v in FULL_BUDGET.items() if protocol[k] < v]
    if protocol["val_users"]:
        short.append(f"validation subsampled to {protocol['val_users']} queries")
    if protocol["test_users"]:
        short.append(f"test subsampled to {protocol['test_users']} queries")
    if protocol["refit_passes"] == 0:
        short.append("no refit before test")
    if short:
        return f"- Budget: **shortened**: {', '.join(short)}. Not a publishable table."
    if protocol.get("refit_mode", "continue") == "retrain":
        refit = "refit by retraining on training + refit events for the selected epochs"
    else:
        refit = f"refit {protocol['refit_passes']} pass{'es' if protocol['refit_passes'] > 1 else ''}"
    return (f"- Budget: full (max {protocol['max_epochs']} epochs, patience {protocol['patience']}, "
            f"{protocol['seeds']} seeds, every validation and test query, {refit}).")


def _fraction(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f}%)" if whole else "0/0"


def render_markdown(report: dict[str, Any]) -> str:
    data, protocol = report["data"], report["protocol"]
    rows = report["rows"]
    parts = [
        f"# Offline evaluation: {data['source']} → {data['target']}",
        "",
        f"- Command: `{report['command']}`",
        f"- Started (UTC): {report['started_utc']}; wall time {report['wall_s']:.0f} s; machine: {report['machine']}",
        f"- Data: `{data['path']}`: {data['events']} events, {data['users']} users, {data['eval_users']} with a "
        f"validation/test query ({data['val_queries']} validation and {data['test_queries']} test queries ranked), "
        f"{data['train_events']} training events, {data['refit_events']} refit events, {data['catalogue_items']} "
        f"target items in the file ({data['known_items_validation']} known at validation, "
        f"{data['known_items_test']} at test), {data['source_items']} source items.",
        f"- Rankable (held-out item known): validation {_fraction(data['val_rankable'], data['val_queries'])}, "
        f"test {_fraction(data['test_rankable'], data['test_queries'])}; training probe "
        f"{data['probe_queries']} queries.",
        budget_line(protocol),
        *([f"- **Partial report**: rows still running or stopped before the end: {', '.join(report['pending_rows'])}."]
          if report.get("pending_rows") else []),
        f"- `epochs` column = the epoch chosen on validation per seed (max {protocol['max_epochs']}, patience "
        f"{protocol['patience']}; counting models have one pass).",
        "",
        "## Protocol",
        "",
        PROTOCOL_MD.replace("{fusion_weights}", ", ".join(f"{w:g}" for w in protocol["fusion_weights"])),
        "## Results",
        "",
        markdown_tables(rows),
        "",
    ]
    comparison = comparisons(rows, {c["key"]: c for c in report.get("paired_comparisons", [])})
    if comparison:
        parts += ["## Comparisons", "", *comparison, ""]
    fused = next((r for r in rows if r["name"] == "fused"), None)
    if fused is not None:
        chosen = "; ".join(f"seed {r['seed']}: mode {r['extra']['mode']}, w = {r['extra']['weight']:g} "
                           f"(validation NDCG@10 {r['val']['ndcg@10']:.4f})" for r in fused["per_seed"])
        parts += ["## Fusion weights chosen on validation", "", chosen, ""]
    scaled = [r for r in rows if r["name"] != "fused" and any(s.get("extra", {}).get("transfer_scale")
                                                              for s in r["per_seed"])]
    if scaled:
        parts += ["## Query-time transfer scale chosen on validation", "",
                  "The transferred (source) part of a target query is multiplied by *warm* for a user with target "
                  "history and by *cold* for one without; training uses 1, the grid is "
                  f"{', '.join(f'{g:g}' for g in TRANSFER_SCALES)} (`learner.offline.evaluate.tune_transfer_scale`), a later value must beat the earlier "
                  "ones on validation NDCG@10.", ""]
        for r in scaled:
            chosen = "; ".join(
                f"seed {s['seed']}: warm {s['extra']['transfer_scale'][0]:g}, cold {s['extra']['transfer_scale'][1]:g}"
                f" (validation NDCG@10 at warm 1: {s['extra']['val_overlap_by_scale']['1']:.4f}, chosen: "
                f"{s['val']['ndcg@10']:.4f})"
                for s in r["per_seed"] if s.get("extra", {}).get("transfer_scale")
            )
            parts += [f"- {r['name']}: {chosen}"]
        parts += [""]
    diagnostics = diagnostics_tables(rows)
    if diagnostics:
        parts += ["## Per-epoch diagnostics", "", *diagnostics]
    parts += ["## Time", "", *timing_table(rows), ""]
    return "\n".join(parts)
