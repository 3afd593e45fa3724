"""The paired bootstrap of ``learner.offline.significance``: what it must say on differences whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from learner.offline.significance import ndcg_per_query, paired_bootstrap

MISS = 2**31 - 1


def test_identical_rows_differ_by_nothing() -> None:
    ranks = np.random.default_rng(0).integers(1, 40, size=(3, 5000))
    out = paired_bootstrap(ranks, ranks)
    assert (out["diff"], out["lo"], out["hi"], out["se"]) == (0.0, 0.0, 0.0, 0.0)
    assert out["verdict"] == "within noise"


def test_a_row_that_hits_far_more_queries_is_better_and_the_reverse_is_worse() -> None:
    rng = np.random.default_rng(1)
    weak = np.where(rng.random((3, 8000)) < 0.02, 1, MISS)
    strong = np.where(rng.random((3, 8000)) < 0.06, 1, MISS)
    better = paired_bootstrap(strong, weak)
    assert better["verdict"] == "better (interval above 0)" and better["lo"] > 0
    assert better["diff"] == pytest.approx(ndcg_per_query(strong).mean() - ndcg_per_query(weak).mean())
    assert paired_bootstrap(weak, strong)["verdict"] == "worse (interval below 0)"


def test_two_rows_drawn_alike_are_within_noise_and_the_interval_covers_the_truth() -> None:
    rng = np.random.default_rng(2)
    a = np.where(rng.random((1, 4000)) < 0.03, rng.integers(1, 11, (1, 4000)), MISS)
    b = np.where(rng.random((1, 4000)) < 0.03, rng.integers(1, 11, (1, 4000)), MISS)
    out = paired_bootstrap(a, b)
    assert out["verdict"] == "within noise" and out["lo"] < 0 < out["hi"]
    # the standard error is the paired one: close to the per-query differences' std / sqrt(n)
    d = ndcg_per_query(a)[0] - ndcg_per_query(b)[0]
    assert out["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), rel=0.1)


def test_seeds_are_averaged_per_query_and_the_result_is_reproducible() -> None:
    a = np.array([[1, MISS], [MISS, MISS]])  # query 0 hit by one seed of two: 0.5 on average
    b = np.array([[MISS, MISS]])
    out = paired_bootstrap(a, b, n_boot=500, seed=3)
    assert out["diff"] == pytest.approx(0.25) and (out["seeds_a"], out["seeds_b"], out["queries"]) == (2, 1, 2)
    assert paired_bootstrap(a, b, n_boot=500, seed=3) == out


def test_rows_ranked_on_different_queries_are_refused() -> None:
    with pytest.raises(ValueError, match="different queries: 3 and 4"):
        paired_bootstrap(np.ones((1, 3)), np.ones((1, 4)))
