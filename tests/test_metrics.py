"""Metrics from ranks, and the vectorised ranking against a slow, obviously-correct loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.offline.metrics import (
    hr_at_k,
    mrr,
    ndcg_at_k,
    ranks_excluding,
    ranks_full,
    ranks_sampled,
    summarize,
)


def test_metrics_exact_values() -> None:
    ranks = np.array([1, 2, 10, 11, 100])
    assert hr_at_k(ranks, 10) == pytest.approx(3 / 5, abs=1e-12)
    assert hr_at_k(ranks, 20) == pytest.approx(4 / 5, abs=1e-12)
    expected_ndcg10 = (1.0 + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert ndcg_at_k(ranks, 10) == pytest.approx(expected_ndcg10, abs=1e-12)
    expected_ndcg20 = expected_ndcg10 + (1 / math.log2(12)) / 5
    assert ndcg_at_k(ranks, 20) == pytest.approx(expected_ndcg20, abs=1e-12)
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 100) / 5, abs=1e-12)
    assert set(summarize(ranks)) == {"hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr"}


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="1-based"):
        mrr(np.array([0, 1]))
    with pytest.raises(ValueError, match="non-empty"):
        hr_at_k(np.array([], dtype=np.int64), 10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        ndcg_at_k(np.array([1]), 0)


def _slow_rank(scores: np.ndarray, positive: int, excluded: set[int]) -> int:
    rank = 1
    for j, s in enumerate(scores):
        if j != positive and j not in excluded and s >= scores[positive]:
            rank += 1
    return rank


def test_vectorised_ranks_match_slow_loop() -> None:
    rng = np.random.default_rng(7)
    n, c = 64, 50
    scores = rng.integers(0, 6, size=(n, c)).astype(np.float32)  # many ties on purpose
    positive = rng.integers(0, c, size=n)
    excluded = rng.random((n, c)) < 0.2
    excluded[np.arange(n), positive] = False
    fast = ranks_full(scores, positive, excluded)
    slow = [_slow_rank(scores[i], int(positive[i]), set(np.flatnonzero(excluded[i]).tolist())) for i in range(n)]
    assert fast.tolist() == slow

    per_row = [np.flatnonzero(excluded[i]) for i in range(n)]
    assert ranks_excluding(scores, positive, per_row).tolist() == slow

    negatives = rng.integers(0, c, size=(n, 9))
    rows = np.arange(n)
    fast_s = ranks_sampled(scores[rows, positive], scores[rows[:, None], negatives])
    slow_s = [1 + sum(scores[i, j] >= scores[i, positive[i]] for j in negatives[i]) for i in range(n)]
    assert fast_s.tolist() == slow_s


def test_constant_scores_rank_positive_last() -> None:
    scores = np.zeros((2, 5), dtype=np.float32)
    assert ranks_full(scores, np.array([0, 4])).tolist() == [5, 5]


def test_ranks_full_rejects_excluded_positive_and_nan() -> None:
    scores = np.array([[0.1, 0.2]])
    with pytest.raises(ValueError, match="excluded set"):
        ranks_full(scores, np.array([1]), np.array([[False, True]]))
    with pytest.raises(ValueError, match="NaN"):
        ranks_full(np.array([[np.nan, 0.2]]), np.array([1]))


def test_ranks_excluding_rejects_an_excluded_positive_and_counts_duplicates_once() -> None:
    scores = np.array([[0.5, 0.9, 0.9, 0.1]])
    # column 1 excluded twice: removed once; column 2 ties above the positive -> rank 2
    assert ranks_excluding(scores, np.array([0]), [np.array([1, 1])]).tolist() == [2]
    with pytest.raises(ValueError, match="excluded set"):
        ranks_excluding(scores, np.array([0]), [np.array([0])])
    with pytest.raises(ValueError, match="excluded N arrays"):
        ranks_excluding(scores, np.array([0]), [])
