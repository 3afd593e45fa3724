"""Prequential (test-then-train) evaluation against what serving currently holds.

Each target-domain event is first ranked with the vectors *then served* (the last published item
matrix and the user's last published query vectors), then the model learns from it. Windowed HR@K
and NDCG@K over the most recent ``window`` ranked events are the stream's quality signal.

A user with no published vectors is ranked by the served popularity order (the serving fallback).

>>> import numpy as np
>>> ev = PrequentialEvaluator(k=2, window=10)
>>> ev.set_served(version=1, item_ids=["a", "b", "c"], item_vectors=np.eye(3, dtype=np.float32),
...               user_ids=["u"], user_vectors=np.array([[[0.0, 1.0, 0.5]]], dtype=np.float32),
...               popularity=["c", "a", "b"])
>>> ev.rank_many([("u", "b"), ("u", "c"), ("new", "c"), ("u", "zzz")])
[1, 2, 1, None]
>>> round(ev.hr, 3), round(ev.ndcg, 3)
(1.0, 0.877)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from learner.publisher import EmbeddingBatch


def rank_of(scores: np.ndarray, positive: int) -> int:
    """1-based rank of column ``positive`` in ``scores`` (N,): one plus the number scoring strictly higher.

    >>> rank_of(np.array([0.1, 0.9, 0.8, 0.3]), 2)
    2
    """
    return int((scores > scores[positive]).sum()) + 1


def _upsert(rows: dict[str, int], matrix: np.ndarray, keys: Sequence[str], values: np.ndarray) -> np.ndarray:
    """Write ``values`` at the rows of ``keys``, appending rows for new keys; returns the matrix.

    >>> rows = {"a": 0}
    >>> _upsert(rows, np.zeros((1, 2), np.float32), ["b", "a"], np.array([[1, 1], [2, 2]], np.float32))
    array([[2., 2.],
           [1., 1.]], dtype=float32)
    """
    if len(keys) == 0:
        return matrix
    new = [k for k in keys if k not in rows]
    if new:
        start = len(rows)
        rows.update({k: start + i for i, k in enumerate(new)})
        pad = np.zeros((len(new), *values.shape[1:]), dtype=np.float32)
        matrix = pad if matrix.size == 0 else np.concatenate([matrix, pad])
    matrix[[rows[k] for k in keys]] = values
    return matrix


class PrequentialEvaluator:
    """Ranks incoming target events with the served vectors; keeps windowed HR@k / NDCG@k."""

    def __init__(self, k: int = 10, window: int = 2000) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.k = k
        self.window = window
        self._hits: deque[float] = deque(maxlen=window)
        self._gains: deque[float] = deque(maxlen=window)
        self.version = 0
        self.ranked_total = 0
        self.unrankable_total = 0  # the item is not in the served index yet
        self._item_row: dict[str, int] = {}
        self._items = np.zeros((0, 0), dtype=np.float32)
        self._user_row: dict[str, int] = {}
        self._users = np.zeros((0, 0, 0), dtype=np.float32)
        self._pop_rank: dict[str, int] = {}

    def set_served(
        self,
        version: int,
        item_ids: Sequence[str],
        item_vectors: np.ndarray,  # (N, D)
        user_ids: Sequence[str],
        user_vectors: np.ndarray,  # (U, V, D)
        popularity: Sequence[str],  # item ids, most popular first
    ) -> None:
        """Replace the served state (called after each publish with exactly what was published)."""
        self.version = version
        self._item_row = {item: row for row, item in enumerate(item_ids)}
        self._items = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self._user_row = {user: row for row, user in enumerate(user_ids)}
        self._users = np.ascontiguousarray(user_vectors, dtype=np.float32)
        self._pop_rank = {item: rank for rank, item in enumerate(popularity, start=1)}

    def set_served_delta(self, batch: EmbeddingBatch) -> None:
        """Apply a delta publish: upsert the batch's items and users, replace popularity."""
        self.version = batch.version
        self._items = _upsert(self._item_row, self._items, batch.item_ids, batch.item_vectors)
        self._users = _upsert(self._user_row, self._users, batch.user_ids, batch.user_vectors)
        self._pop_rank = {item: rank for rank, item in enumerate(batch.popularity, start=1)}

    def serves_user(self, user_id: str) -> bool:
        """True when the user has published vectors (ranked by the model, not the popularity fallback)."""
        return user_id in self._user_row

    def rank_many(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """Rank each (user_id, item_id) with the served state and record it; None if unrankable."""
        ranks: list[int | None] = []
        model_rows: list[int] = []
        model_pos: list[int] = []
        model_slots: list[int] = []
        for user_id, item_id in pairs:
            row = self._item_row.get(item_id)
            if row is None:
                ranks.append(None)
                self.unrankable_total += 1
                continue
            user_row = self._user_row.get(user_id)
            if user_row is None:
                ranks.append(self._pop_rank.get(item_id, len(self._pop_rank) + 1))
            else:
                model_rows.append(user_row)
                model_pos.append(row)
                model_slots.append(len(ranks))
                ranks.append(0)
        if model_rows:
            queries = self._users[model_rows]  # (B, V, D)
            b, v, d = queries.shape
            scores = (queries.reshape(b * v, d) @ self._items.T).reshape(b, v, -1).max(axis=1)  # (B, N), BLAS
            positive = scores[np.arange(len(model_pos)), model_pos]  # (B,)
            model_ranks = (scores > positive[:, None]).sum(axis=1) + 1
            for slot, r in zip(model_slots, model_ranks, strict=True):
                ranks[slot] = int(r)
        for r in ranks:
            if r is not None:
                self._record(r)
        return ranks

    def _record(self, rank: int) -> None:
        self.ranked_total += 1
        hit = rank <= self.k
        self._hits.append(1.0 if hit else 0.0)
        self._gains.append(1.0 / math.log2(rank + 1) if hit else 0.0)

    @property
    def hr(self) -> float:
        """Windowed HR@k (nan before anything was ranked)."""
        return sum(self._hits) / len(self._hits) if self._hits else math.nan

    @property
    def ndcg(self) -> float:
        """Windowed NDCG@k (nan before anything was ranked)."""
        return sum(self._gains) / len(self._gains) if self._gains else math.nan

    def stats(self) -> dict[str, float]:
        return {
            f"prequential_hr_at_{self.k}": self.hr,
            f"prequential_ndcg_at_{self.k}": self.ndcg,
            "prequential_ranked_total": float(self.ranked_total),
            "prequential_unrankable_total": float(self.unrankable_total),
            "served_version": float(self.version),
        }
