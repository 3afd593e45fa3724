"""``sitn eval`` end to end on a slice of the shipped data, and the SITN adapter's scoring rule."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.offline.eval_split import chronological_split
from learner.offline.evaluate import MISS_RANK, SETTINGS
from learner.offline.significance import ndcg_per_query
from learner.offline.sitn_ranker import SITNRanker
from sitn.cli import main
from stream.dataset import load_events
from stream.user_state import Example

LIMIT_ROWS = 2000
METRIC_KEYS = {"hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"}
ROWS = ["popularity", "itemknn_target", "itemknn_target_source", "itemknn_source", "online_mf", "single_domain",
        "sitn", "fused"]
DIAGNOSTICS = {"epoch", "train_s", "val_s", "val_hr@10", "val_ndcg@10", "val_no_source_ndcg@10", "val_cold_ndcg@10",
               "probe_hr@10", "probe_ndcg@10"}


def _rows(path: Path, limit: int) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return [r for _, r in zip(range(limit), csv.DictReader(fh), strict=False)]


def _reference_popularity(path: Path, limit: int) -> dict[str, float]:
    """The protocol written out again with plain loops: popularity refit on the validation events, full
    ranking among the known items minus consumed ones, ties against, unknown test items are misses."""
    rows = [r for r in _rows(path, limit) if r["domain"] in ("movie", "book")]
    rows.sort(key=lambda r: int(r["timestamp"]))  # stable: ties keep file order
    per_user: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        per_user.setdefault(r["user_id"], []).append(r)
    counts: dict[str, int] = {}
    tests = []
    for events in per_user.values():
        book_positions = [i for i, r in enumerate(events) if r["domain"] == "book"]
        learnt_until = book_positions[-1] if len(book_positions) >= 3 else len(events)  # training + refit
        for r in events[:learnt_until]:
            if r["domain"] == "book":
                counts[r["item_id"]] = counts.get(r["item_id"], 0) + 1
        if len(book_positions) >= 3:
            t = book_positions[-1]
            consumed = {r["item_id"] for r in events[:t] if r["domain"] == "book"}
            tests.append((events[t]["item_id"], consumed))
    ranks = []
    for positive, consumed in tests:
        if positive not in counts:
            ranks.append(MISS_RANK)
            continue
        ranks.append(sum(1 for c in set(counts) - consumed if counts[c] >= counts[positive]))
    return {
        "hr@10": sum(r <= 10 for r in ranks) / len(ranks),
        "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks if r <= 10) / len(ranks),
        "mrr": sum(1 / r for r in ranks) / len(ranks),
    }


@pytest.mark.timeout(300)
def test_sitn_eval_cli_writes_results(events_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main([
        "--log-level", "WARNING", "eval", "--events", str(events_csv), "--source", "movie", "--target", "book",
        "--limit", str(LIMIT_ROWS), "--seeds", "1", "--max-epochs", "1", "--patience", "1",
        "--rows", ",".join(ROWS), "--dim", "8", "--max-len", "16", "--probe-users", "50",
        "--batch-size", "64", "--cluster-counts", "4,8", "--i2c-warmup-steps", "0",
        "--recluster-every-steps", "5", "--mf-factors", "4", "--fusion-weights", "0,1", "--output", str(out),
    ])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["data"]["events"] == LIMIT_ROWS
    assert report["data"]["eval_users"] == 198  # users with >= 3 book events in the first 2000 rows
    assert report["data"]["probe_queries"] == 50 and report["data"]["probe_rankable"] == 50
    assert report["protocol"]["max_epochs"] == 1 and report["protocol"]["refit_passes"] == 1
    assert [r["name"] for r in report["rows"]] == ROWS
    for row in report["rows"]:
        assert set(row["summary"]) == set(SETTINGS)
        [run] = row["per_seed"]
        assert run["epoch"] == 1 and len(run["val_curve"]) == 1
        for setting, metrics in row["summary"].items():
            assert set(metrics) == METRIC_KEYS
            for name, stat in metrics.items():
                assert stat["std"] is None  # one seed: no spread
                assert 0.0 <= stat["mean"] <= 1.0, (row["name"], setting, name)
                assert stat["mean"] == run["test"][setting][name]
            assert metrics["hr@10"]["mean"] <= metrics["hr@20"]["mean"]
            assert metrics["ndcg@10"]["mean"] <= metrics["hr@10"]["mean"]
        # Misses count in the full figure, so the rankable-only figure is never lower.
        assert row["summary"]["full/overlap"]["hr@10"]["mean"] <= row["summary"]["full/overlap/rankable"]["hr@10"]["mean"]
        diagnosed = row["name"] in ("single_domain", "sitn", "fused")
        assert set(run["epochs"][0]) == (DIAGNOSTICS if diagnosed else DIAGNOSTICS - {
            "val_no_source_ndcg@10", "val_cold_ndcg@10", "probe_hr@10", "probe_ndcg@10"})
    by_name = {r["name"]: r for r in report["rows"]}
    # single_domain ignores the source history: blanking it changes nothing.
    [epoch] = by_name["single_domain"]["per_seed"][0]["epochs"]
    assert epoch["val_no_source_ndcg@10"] == epoch["val_ndcg@10"]
    fused = by_name["fused"]["per_seed"][0]["extra"]
    assert set(fused["val_grid"]) == {f"{m}@{w}" for m in ("target", "target+source", "source") for w in (0, 1)}
    assert fused["val_grid"][f"{fused['mode']}@{fused['weight']:g}"] == max(fused["val_grid"].values())

    popularity = by_name["popularity"]["summary"]
    expected = _reference_popularity(events_csv, LIMIT_ROWS)
    for name, value in expected.items():
        assert popularity["full/overlap"][name]["mean"] == pytest.approx(value, abs=1e-9)
    # Popularity ignores the user, so hiding the target history changes nothing.
    assert popularity["full/cold_start"] == popularity["full/overlap"]
    assert popularity["sampled/cold_start"] == popularity["sampled/overlap"]
    assert popularity["c2dsr/cold_start"] == popularity["c2dsr/overlap"]
    # itemknn_source never reads the target history: its cold-start row equals its overlap row.
    knn_source = by_name["itemknn_source"]["summary"]
    assert knn_source["full/cold_start"] == knn_source["full/overlap"]

    markdown = (out / "results.md").read_text()
    assert "| model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | MRR | epochs |" in markdown
    assert "### c2dsr/cold_start" in markdown and "### full/overlap/rankable" in markdown
    assert "- Budget: **shortened**: max_epochs 1 < 30, patience 1 < 3, seeds 1 < 3." in markdown
    assert "| sitn − single_domain | full/overlap |" in markdown and "| fused − sitn | full/overlap |" in markdown
    assert "## Per-epoch diagnostics" in markdown and "s / validation pass" in markdown
    assert f"--limit {LIMIT_ROWS}" in markdown  # the command line is recorded

    # Paired comparisons on the same test queries: each row's saved ranks give back its table figure, and the
    # bootstrap's mean difference is the difference of the two rows' figures.
    ranks = np.load(out / "test_ranks.npz")
    assert set(ranks.files) == {f"{r}/seed0/full/{v}" for r in ROWS for v in ("overlap", "cold_start")}
    for row in ROWS:
        got = ndcg_per_query(ranks[f"{row}/seed0/full/overlap"]).mean()
        assert got == pytest.approx(by_name[row]["summary"]["full/overlap"]["ndcg@10"]["mean"], abs=1e-12)
    paired = {c["key"]: c for c in report["paired_comparisons"]}
    sitn_sd = paired["sitn - single_domain @ full/overlap"]
    assert sitn_sd["queries"] == 198 and sitn_sd["lo"] <= sitn_sd["diff"] <= sitn_sd["hi"]
    assert sitn_sd["diff"] == pytest.approx(by_name["sitn"]["summary"]["full/overlap"]["ndcg@10"]["mean"]
                                            - by_name["single_domain"]["summary"]["full/overlap"]["ndcg@10"]["mean"])
    assert "paired bootstrap 95 % interval" in markdown and f"[{sitn_sd['lo']:+.5f}, {sitn_sd['hi']:+.5f}]" in markdown


@pytest.mark.timeout(300)
def test_sitn_eval_cli_runs_the_other_direction(events_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main([
        "--log-level", "WARNING", "eval", "--events", str(events_csv), "--source", "book", "--target", "movie",
        "--limit", str(LIMIT_ROWS), "--quick", "--max-epochs", "1", "--rows", "popularity,itemknn_target,sitn,fused",
        "--dim", "8", "--max-len", "16", "--probe-users", "20", "--batch-size", "64", "--cluster-counts", "4,8",
        "--fusion-weights", "0,1", "--output", str(out),
    ])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert (report["data"]["source"], report["data"]["target"]) == ("book", "movie")
    assert report["data"]["catalogue_items"] == len({r["item_id"] for r in _rows(events_csv, LIMIT_ROWS)
                                                      if r["domain"] == "movie"})
    assert [r["name"] for r in report["rows"]] == ["popularity", "itemknn_target", "sitn", "fused"]
    assert "# Offline evaluation: book → movie" in (out / "results.md").read_text()


def test_eval_cli_budget_defaults_are_the_full_budget() -> None:
    import argparse

    from sitn.commands.eval import register, resolve_budget

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--events", "x.csv", "--source", "movie", "--target", "book"])
    resolve_budget(args)
    assert (args.seeds, args.max_epochs, args.patience, args.val_users, args.refit_passes) == (3, 30, 3, 0, 1)
    quick = parser.parse_args(["eval", "--events", "x.csv", "--source", "m", "--target", "b", "--quick",
                               "--max-epochs", "5"])
    resolve_budget(quick)
    assert (quick.seeds, quick.max_epochs, quick.patience) == (1, 5, 1)


def test_eval_cli_rejects_unknown_row(events_csv: Path) -> None:
    with pytest.raises(ValueError, match="--rows got \\['nope'\\], allowed: popularity,itemknn_target,"):
        main(["eval", "--events", str(events_csv), "--source", "movie", "--target", "book", "--rows", "nope"])


def test_sitn_ranker_scores_match_the_learner(events_csv: Path, tmp_path: Path) -> None:
    from learner.core.config import SITNConfig

    torch.set_num_threads(1)
    log = load_events(events_csv, "movie", "book", limit=600)
    split = chronological_split(log.events, "movie", "book", max_len=16)
    config = SITNConfig(dim=8, max_len=16, n_views=2, cluster_counts=(4,), view_hidden=8, proj_dim=8,
                        n_sampled_negatives=16, reservoir_size=64, seed=3)
    ranker = SITNRanker("sitn", config, split, batch_size=32, workdir=tmp_path)
    ranker.learn_many(split.train_examples)
    histories = [q.history for q in split.test[:20]]
    ours = ranker.score([None] * len(histories), histories)
    learner = ranker.learner
    item_ids, _ = learner.embed_items("book")
    column = {item_id: j for j, item_id in enumerate(item_ids)}
    theirs = learner.score_items(learner.embed_histories(histories, "book"), "book")  # (N, rows)
    counts = learner.model.encoder("target").item_count[1 : len(item_ids) + 1].numpy()
    trained = np.array([i in column and counts[column[i]] > 0 for i in split.catalogue])  # (C,)
    assert 0 < trained.sum() < len(split.catalogue)  # the catalogue holds items training never reached
    trained_cols = [column[i] for i, t in zip(split.catalogue, trained, strict=True) if t]
    np.testing.assert_allclose(ours[:, trained], theirs[:, trained_cols], rtol=1e-5, atol=1e-6)
    # an item without a trained row ties with the row's lowest trained score
    np.testing.assert_allclose(ours[:, ~trained], np.repeat(ours[:, trained].min(axis=1, keepdims=True),
                                                            (~trained).sum(), axis=1), rtol=0, atol=0)
    # a subset of columns scores its trained columns exactly as the full scores do; its untrained ones tie
    # with the lowest trained score among the columns asked for
    columns = np.concatenate([np.flatnonzero(trained)[:3], np.flatnonzero(~trained)[:2]])
    subset = ranker.score([None] * len(histories), histories, columns)
    np.testing.assert_allclose(subset[:, :3], ours[:, columns[:3]], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(subset[:, 3:], np.repeat(subset[:, :3].min(axis=1, keepdims=True), 2, axis=1))
    # Snapshot and restore give back the same scores.
    state = ranker.snapshot()
    ranker.learn_many(split.train_examples)
    assert not np.allclose(ranker.score([None] * len(histories), histories), ours)
    ranker.restore(state)
    np.testing.assert_allclose(ranker.score([None] * len(histories), histories), ours, rtol=1e-6, atol=1e-7)


def test_a_stopped_evaluation_keeps_its_finished_rows(
    events_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sitn.commands.eval as eval_command

    real_run_seed = eval_command.run_seed

    def stop_at_knn(row: str, *args: object, **kwargs: object) -> object:
        if row == "itemknn_target":
            raise KeyboardInterrupt  # the user stops a long run
        return real_run_seed(row, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(eval_command, "run_seed", stop_at_knn)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["--log-level", "WARNING", "eval", "--events", str(events_csv), "--source", "movie", "--target", "book",
              "--limit", str(LIMIT_ROWS), "--seeds", "2", "--rows", "popularity,itemknn_target", "--output", str(out)])
    report = json.loads((out / "results.json").read_text())
    assert report["pending_rows"] == ["itemknn_target"]
    assert [row["name"] for row in report["rows"]] == ["popularity"]
    assert [run["seed"] for run in report["rows"][0]["per_seed"]] == [0, 1]
    assert "**Partial report**: rows still running or stopped before the end: itemknn_target." in (
        out / "results.md").read_text()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("batch_by", ["target", "examples"])
def test_sitn_ranker_batches_count_what_batch_by_says(events_csv: Path, tmp_path: Path, batch_by: str) -> None:
    from learner.core.config import SITNConfig

    log = load_events(events_csv, "movie", "book", limit=600)
    split = chronological_split(log.events, "movie", "book", max_len=16)
    config = SITNConfig(dim=8, max_len=16, cluster_counts=(4,), view_hidden=8, proj_dim=8, n_sampled_negatives=16,
                        reservoir_size=64, seed=3)
    ranker = SITNRanker("sitn", config, split, batch_size=16, workdir=tmp_path, batch_by=batch_by)
    seen: list[list[str]] = []

    def record(batch: Sequence[Example]) -> dict[str, float]:
        seen.append([ex.domain for ex in batch])
        return {}

    ranker.learner.learn_many = record  # type: ignore[method-assign]
    ranker.learn_many(split.train_examples)
    trained = sorted(d for batch in seen for d in batch)
    everything = sorted(ex.domain for ex in split.train_examples)
    assert len(everything) - 1 <= len(trained) <= len(everything)  # a last batch of one example is skipped
    assert not Counter(trained) - Counter(everything)
    assert {"movie", "book"} <= {d for batch in seen for d in batch}
    for batch in seen[:-1]:  # the last batch holds what is left
        if batch_by == "examples":
            assert len(batch) == 16
        else:  # 16 books, or 4 x 16 examples where books are too rare to fill a batch
            assert batch.count("book") == 16 or (len(batch) == 64 and batch.count("book") < 16)
            assert batch[-1] == "book" or len(batch) == 64
    with pytest.raises(ValueError, match="batch_by"):
        SITNRanker("sitn", config, split, batch_size=16, workdir=tmp_path, batch_by="users")
