"""``sitn eval`` end to end on a slice of the shipped data, and the SITN adapter's scoring rule."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.evaluate import SITNRanker, chronological_split
from sitn.cli import main
from stream.dataset import load_events

LIMIT_ROWS = 2000
METRIC_KEYS = {"hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"}
SETTINGS = {"full/overlap", "full/cold_start", "sampled/overlap", "sampled/cold_start"}


def _reference_popularity(path: Path, limit: int) -> dict[str, float]:
    """The protocol written out again with plain loops: popularity, full ranking, overlap users."""
    with path.open(newline="") as fh:
        rows = [r for _, r in zip(range(limit), csv.DictReader(fh), strict=False)]
    rows = [r for r in rows if r["domain"] in ("movie", "book")]
    rows.sort(key=lambda r: int(r["timestamp"]))  # stable: ties keep file order
    per_user: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        per_user.setdefault(r["user_id"], []).append(r)
    catalogue = {r["item_id"] for r in rows if r["domain"] == "book"}
    counts = dict.fromkeys(catalogue, 0)
    tests = []
    for events in per_user.values():
        book_positions = [i for i, r in enumerate(events) if r["domain"] == "book"]
        cut = book_positions[-2] if len(book_positions) >= 3 else len(events)
        for r in events[:cut]:
            if r["domain"] == "book":
                counts[r["item_id"]] += 1
        if len(book_positions) >= 3:
            t = book_positions[-1]
            consumed = {r["item_id"] for r in events[:t] if r["domain"] == "book"}
            tests.append((events[t]["item_id"], consumed))
    ranks = []
    for positive, consumed in tests:
        ranks.append(sum(1 for c in catalogue - consumed if counts[c] >= counts[positive]))
    return {
        "hr@10": sum(r <= 10 for r in ranks) / len(ranks),
        "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks if r <= 10) / len(ranks),
        "mrr": sum(1 / r for r in ranks) / len(ranks),
    }


@pytest.mark.timeout(120)
def test_sitn_eval_cli_writes_results(events_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main([
        "--log-level", "WARNING", "eval", "--events", str(events_csv), "--source", "movie", "--target", "book",
        "--limit", str(LIMIT_ROWS), "--seeds", "1", "--max-epochs", "1", "--mf-max-epochs", "1",
        "--rows", "popularity,online_mf,single_domain,sitn", "--dim", "8", "--max-len", "16",
        "--batch-size", "64", "--cluster-counts", "4,8", "--i2c-warmup-steps", "0",
        "--recluster-every-steps", "5", "--mf-factors", "4", "--output", str(out),
    ])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert report["data"]["events"] == LIMIT_ROWS
    assert report["data"]["eval_users"] == 198  # users with >= 3 book events in the first 2000 rows
    assert [r["name"] for r in report["rows"]] == ["popularity", "online_mf", "single_domain", "sitn"]
    for row in report["rows"]:
        assert set(row["summary"]) == SETTINGS
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

    popularity = report["rows"][0]["summary"]
    expected = _reference_popularity(events_csv, LIMIT_ROWS)
    for name, value in expected.items():
        assert popularity["full/overlap"][name]["mean"] == pytest.approx(value, abs=1e-9)
    # Popularity ignores the user, so hiding the target history changes nothing.
    assert popularity["full/cold_start"] == popularity["full/overlap"]
    assert popularity["sampled/cold_start"] == popularity["sampled/overlap"]

    markdown = (out / "results.md").read_text()
    assert "| model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | MRR | epochs |" in markdown
    assert "### sampled/cold_start" in markdown
    assert f"--limit {LIMIT_ROWS}" in markdown  # the command line is recorded


def test_eval_cli_rejects_unknown_row(events_csv: Path) -> None:
    with pytest.raises(ValueError, match="--rows got \\['nope'\\], allowed: popularity,online_mf"):
        main(["eval", "--events", str(events_csv), "--source", "movie", "--target", "book", "--rows", "nope"])


def test_sitn_ranker_scores_match_the_learner(events_csv: Path, tmp_path: Path) -> None:
    from learner.config import SITNConfig

    torch.set_num_threads(1)
    log = load_events(events_csv, "movie", "book", limit=600)
    split = chronological_split(log.events, "movie", "book", max_len=16)
    config = SITNConfig(dim=8, max_len=16, n_views=2, cluster_counts=(4,), view_hidden=8, proj_dim=8,
                        n_sampled_negatives=16, reservoir_size=64, seed=3)
    ranker = SITNRanker("sitn", config, split, batch_size=32, workdir=tmp_path)
    ranker.partial_fit(split.train_events)
    histories = [q.history for q in split.test[:20]]
    ours = ranker.score([None] * len(histories), histories)
    learner = ranker.learner
    item_ids, _ = learner.embed_items("book")
    column = {item_id: j for j, item_id in enumerate(item_ids)}
    theirs = learner.score_items(learner.embed_histories(histories, "book"), "book")
    theirs = theirs[:, [column[i] for i in split.catalogue]]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # Snapshot and restore give back the same scores.
    state = ranker.snapshot()
    ranker.partial_fit(split.train_events)
    assert not np.allclose(ranker.score([None] * len(histories), histories), ours)
    ranker.restore(state)
    np.testing.assert_allclose(ranker.score([None] * len(histories), histories), ours, rtol=1e-6, atol=1e-7)
