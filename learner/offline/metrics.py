"""Ranking metrics of the offline evaluation, as pure functions of 1-based ranks.

A rank is the position of the held-out item in a model's ranking of the candidates (1 = top).
Ties are broken *against* the held-out item: every other candidate scoring the same counts as ranked
above it, so a model that gives every item the same score ranks the held-out item last, never first.

>>> ranks = np.array([1, 3, 12, 40])
>>> hr_at_k(ranks, 10), round(ndcg_at_k(ranks, 10), 4), round(mrr(ranks), 4)
(0.5, 0.375, 0.3604)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_CUTOFFS = (10, 20)


def hr_at_k(ranks: np.ndarray, k: int) -> float:
    """Hit rate at ``k``: the fraction of ranks at most ``k``.

    >>> hr_at_k(np.array([1, 10, 11]), 10)
    0.6666666666666666
    """
    ranks = _check_ranks(ranks)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(np.mean(ranks <= k))


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """Normalised discounted cumulative gain at ``k`` with one relevant item: ``1 / log2(rank + 1)`` if
    ``rank <= k`` else 0, averaged.

    >>> ndcg_at_k(np.array([1, 3]), 10)
    0.75
    >>> ndcg_at_k(np.array([11]), 10)
    0.0
    """
    ranks = _check_ranks(ranks)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gains = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    return float(np.mean(gains))


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank, no cut-off.

    >>> mrr(np.array([1, 2, 4]))
    0.5833333333333334
    """
    ranks = _check_ranks(ranks)
    return float(np.mean(1.0 / ranks))


def summarize(ranks: np.ndarray, cutoffs: tuple[int, ...] = METRIC_CUTOFFS) -> dict[str, float]:
    """All reported metrics of one rank array, keys like ``"hr@10"``, ``"ndcg@10"``, ``"mrr"``.

    >>> summarize(np.array([1, 30]), cutoffs=(10,))
    {'hr@10': 0.5, 'ndcg@10': 0.5, 'mrr': 0.5166666666666667}
    """
    out: dict[str, float] = {}
    for k in cutoffs:
        out[f"hr@{k}"] = hr_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    out["mrr"] = mrr(ranks)
    return out


def ranks_full(scores: np.ndarray, positive: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
    """Rank of each row's positive column among all columns that are not excluded.

    ``scores`` is ``(N, C)``; ``positive`` ``(N,)`` column indices; ``excluded`` an optional ``(N, C)``
    boolean mask of candidates removed from the ranking (the positive must not be excluded).
    Rank = 1 + number of other kept candidates scoring at least as high (ties count against the positive).

    >>> s = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 0.0]])
    >>> ranks_full(s, np.array([2, 0])).tolist()
    [2, 2]
    >>> ranks_full(s, np.array([2, 0]), np.array([[False, True, False], [False, False, False]])).tolist()
    [1, 2]
    """
    scores = np.asarray(scores)
    positive = np.asarray(positive)
    if scores.ndim != 2 or positive.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (N, C) and positive (N,), got {scores.shape} and {positive.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows = np.arange(scores.shape[0])
    pos_scores = scores[rows, positive]  # (N,)
    at_least = scores >= pos_scores[:, None]  # (N, C)
    if excluded is not None:
        if excluded.shape != scores.shape:
            raise ValueError(f"excluded must be {scores.shape}, got {excluded.shape}")
        if excluded[rows, positive].any():
            raise ValueError("a positive item is in the excluded set")
        at_least &= ~excluded
    return at_least.sum(axis=1).astype(np.int64)  # counts the positive itself, so this is 1-based


def ranks_excluding(scores: np.ndarray, positive: np.ndarray, excluded: Sequence[np.ndarray]) -> np.ndarray:
    """``ranks_full`` with the excluded candidates given per row as column arrays (a user's few consumed
    items) instead of an ``(N, C)`` mask, which costs a full copy of the scores per batch.

    >>> s = np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 0.0]])
    >>> ranks_excluding(s, np.array([2, 0]), [np.array([1]), np.array([], dtype=np.int64)]).tolist()
    [1, 2]
    """
    scores = np.asarray(scores)
    positive = np.asarray(positive)
    if scores.ndim != 2 or positive.shape != (scores.shape[0],) or len(excluded) != scores.shape[0]:
        raise ValueError(f"scores must be (N, C), positive (N,) and excluded N arrays, got {scores.shape}, "
                         f"{positive.shape} and {len(excluded)}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows = np.arange(scores.shape[0])
    at_least = scores >= scores[rows, positive][:, None]  # (N, C), the positive itself included
    ranks = at_least.sum(axis=1).astype(np.int64)
    for row, cols in enumerate(excluded):
        if len(cols):
            if (cols == positive[row]).any():
                raise ValueError("a positive item is in the excluded set")
            ranks[row] -= int(at_least[row, np.unique(cols)].sum())
    return ranks


def ranks_sampled(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """Rank of the positive among itself and its sampled negatives: 1 + negatives scoring at least as high.

    >>> ranks_sampled(np.array([0.5, 0.2]), np.array([[0.1, 0.6, 0.5], [0.0, 0.1, 0.1]])).tolist()
    [3, 1]
    """
    pos_scores = np.asarray(pos_scores)
    neg_scores = np.asarray(neg_scores)
    if neg_scores.ndim != 2 or pos_scores.shape != (neg_scores.shape[0],):
        raise ValueError(f"neg_scores must be (N, S) and pos_scores (N,), got {neg_scores.shape}, {pos_scores.shape}")
    return 1 + (neg_scores >= pos_scores[:, None]).sum(axis=1).astype(np.int64)


def _check_ranks(ranks: np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-d array, got shape {ranks.shape}")
    if (ranks < 1).any():
        raise ValueError(f"ranks are 1-based, got minimum {ranks.min()}")
    return ranks
