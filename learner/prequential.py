"""Prequential (test-then-train) evaluation against what serving currently holds.

Each target-domain event is first ranked with the vectors *then served* (the last published item
matrix and the user's last published query vectors), then the model learns from it. Windowed HR@K
and NDCG@K over the most recent ``window`` ranked events are the stream's quality signal.

A user with no published vectors is ranked by the served popularity order (the serving fallback).

The served users are mirrored in a bounded :class:`RowTable`: at most ``max_users`` (set it to serving's
``max_users``), the least recently published evicted, as serving evicts them; an evicted user is then
ranked by popularity here too. Items are bounded by the catalogue and not capped.

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
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np

from learner.publisher import EmbeddingBatch


def rank_of(scores: np.ndarray, positive: int) -> int:
    """1-based rank of column ``positive`` in ``scores`` (N,): one plus the number scoring strictly higher.

    >>> rank_of(np.array([0.1, 0.9, 0.8, 0.3]), 2)
    2
    """
    return int((scores > scores[positive]).sum()) + 1


class RowTable:
    """Vectors by key in one preallocated matrix, for batched lookups; at most ``max_rows`` keys.

    Writing a new key beyond ``max_rows`` evicts the least recently written key and reuses its row, so the
    matrix never outgrows ``max_rows`` rows. Capacity doubles as keys arrive (up to ``max_rows``). Without
    evictions rows are dense (``0 .. len - 1``, in first-write order) and :meth:`dense` is the whole table.

    >>> table = RowTable(max_rows=2)
    >>> table.upsert(["a", "b"], np.array([[1.0], [2.0]]))
    >>> table.upsert(["a"], np.array([[3.0]]))  # "a" written again: "b" is now the least recently written
    >>> table.upsert(["c"], np.array([[4.0]]))  # evicts "b", reuses its row 1
    >>> sorted(table.rows.items()), table.evicted, table.matrix[:2].tolist()
    ([('a', 0), ('c', 1)], 1, [[3.0], [4.0]])
    """

    def __init__(self, max_rows: int | None = None, initial_capacity: int = 1024) -> None:
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be None or an int >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        self.initial_capacity = initial_capacity
        self.rows: OrderedDict[str, int] = OrderedDict()  # key -> row, least recently written first
        self.matrix = np.zeros((0,), dtype=np.float32)  # (capacity, *shape) once the first values arrive
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def get(self, key: str) -> int | None:
        return self.rows.get(key)

    def upsert(self, keys: Sequence[str], values: np.ndarray) -> None:
        """Write ``values[i]`` (``values``: (len(keys), *shape)) for ``keys[i]``; the last write of a key wins."""
        if len(keys) == 0:
            return
        values = np.asarray(values, dtype=np.float32)
        if self.matrix.ndim == 1:
            self.matrix = np.zeros((0, *values.shape[1:]), dtype=np.float32)
        assert values.shape[1:] == self.matrix.shape[1:], (values.shape, self.matrix.shape)
        assigned: dict[str, int] = {}  # key -> position in keys of its last write
        for position, key in enumerate(keys):
            if key in self.rows:
                self.rows.move_to_end(key)
            else:
                self.rows[key] = self._new_row()
            assigned[key] = position
        # Keys of this call evicted by later keys of the same call are not written (their row is reused).
        live = [(self.rows[key], position) for key, position in assigned.items() if key in self.rows]
        rows, positions = zip(*live, strict=True)
        self.matrix[list(rows)] = values[list(positions)]

    def _new_row(self) -> int:
        if self.max_rows is not None and len(self.rows) >= self.max_rows:
            _, row = self.rows.popitem(last=False)  # the evicted key's row is reused
            self.evicted += 1
            return row
        high_water = len(self.rows)  # keys are never removed below the cap: rows 0 .. len - 1 are taken
        if high_water == len(self.matrix):
            capacity = max(self.initial_capacity, 2 * len(self.matrix))
            if self.max_rows is not None:
                capacity = min(capacity, self.max_rows)
            grown = np.zeros((capacity, *self.matrix.shape[1:]), dtype=np.float32)
            grown[: len(self.matrix)] = self.matrix
            self.matrix = grown
        return high_water

    def dense(self) -> np.ndarray:
        """The written rows, ``(len, *shape)``; only for a table that never evicted (rows are ``0 .. len - 1``)."""
        assert self.evicted == 0, "dense() needs a table without evictions"
        return self.matrix[: len(self.rows)]

    @classmethod
    def of(cls, keys: Sequence[str], values: np.ndarray, max_rows: int | None = None) -> RowTable:
        """A table holding ``keys`` -> ``values`` (beyond ``max_rows``, the last ``max_rows`` keys)."""
        table = cls(max_rows, initial_capacity=max(1, len(keys)))
        table.upsert(keys, values)
        return table


class PrequentialEvaluator:
    """Ranks incoming target events with the served vectors; keeps windowed HR@k / NDCG@k."""

    def __init__(self, k: int = 10, window: int = 2000, max_users: int = 1_000_000) -> None:
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
        self.max_users = max_users
        self._items = RowTable()  # (N, D) rows, dense: items are never evicted
        self._users = RowTable(max_users)  # (capacity <= max_users, V, D)
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
        self._items = RowTable.of(item_ids, item_vectors)
        evicted = self._users.evicted
        self._users = RowTable.of(user_ids, user_vectors, self.max_users)
        self._users.evicted += evicted
        self._pop_rank = {item: rank for rank, item in enumerate(popularity, start=1)}

    def set_served_delta(self, batch: EmbeddingBatch) -> None:
        """Apply a delta publish: upsert the batch's items and users, replace popularity."""
        self.version = batch.version
        self._items.upsert(batch.item_ids, batch.item_vectors)
        self._users.upsert(batch.user_ids, batch.user_vectors)
        self._pop_rank = {item: rank for rank, item in enumerate(batch.popularity, start=1)}

    def serves_user(self, user_id: str) -> bool:
        """True when the user has published vectors (ranked by the model, not the popularity fallback)."""
        return user_id in self._users

    def rank_many(self, pairs: Sequence[tuple[str, str]]) -> list[int | None]:
        """Rank each (user_id, item_id) with the served state and record it; None if unrankable."""
        ranks: list[int | None] = []
        model_rows: list[int] = []
        model_pos: list[int] = []
        model_slots: list[int] = []
        for user_id, item_id in pairs:
            row = self._items.get(item_id)
            if row is None:
                ranks.append(None)
                self.unrankable_total += 1
                continue
            user_row = self._users.get(user_id)
            if user_row is None:
                ranks.append(self._pop_rank.get(item_id, len(self._pop_rank) + 1))
            else:
                model_rows.append(user_row)
                model_pos.append(row)
                model_slots.append(len(ranks))
                ranks.append(0)
        if model_rows:
            queries = self._users.matrix[model_rows]  # (B, V, D)
            b, v, d = queries.shape
            scores = (queries.reshape(b * v, d) @ self._items.dense().T).reshape(b, v, -1).max(axis=1)  # (B, N), BLAS
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
            "prequential_users": float(len(self._users)),
            "prequential_users_evicted": float(self._users.evicted),
        }
