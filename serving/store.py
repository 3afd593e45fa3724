"""Per-user serving state: query vectors, consumed items (bounded), and item popularity.

Readers (the request path) take no lock that a bulk write can hold for long: user vectors are
immutable arrays swapped per user; consumed sets copy at most ``max_items_per_user`` ids under a
short lock; the popularity ranking is a precomputed tuple swapped by the writer.

Memory is bounded however many users the stream brings: the user stores keep at most ``max_users``
users each and evict the least recently *updated* one (a read does not refresh a user: a user who only
asks for recommendations has nothing new to serve). An evicted user is served like a stranger, by
popularity, until the learner publishes them again (their next event, or a full publish while the
learner still holds their history); an evicted consumed set is forgotten, so items consumed before
the eviction may be recommended again. Popularity holds one count per item: bounded by the catalogue.

>>> users = UserVectorStore(dim=2)
>>> users.upsert("u1", np.array([[1.0, 0.0]]), version=3)
True
>>> users.upsert("u1", np.array([[0.0, 1.0]]), version=2)  # older than what is stored: ignored
False
>>> users.get("u1").tolist()
[[1.0, 0.0]]
>>> consumed = ConsumedItems(max_items_per_user=2)
>>> consumed.add("u1", ["a", "b", "c"])
>>> sorted(consumed.get("u1")), consumed.history("u1")
(['b', 'c'], ('b', 'c'))
>>> capped = UserVectorStore(dim=1, max_users=2)
>>> for user_id in ("u1", "u2", "u1", "u3"):  # u1 updated again: u2 is now the least recently updated
...     _ = capped.upsert(user_id, np.ones((1, 1)), version=1)
>>> [user_id for user_id, _, _ in capped.export()], capped.evicted_users
(['u1', 'u3'], 1)
>>> popularity = PopularityCounter(refresh_s=0.0)
>>> popularity.add(["x", "y", "y"])
>>> popularity.top(2)
[('y', 2), ('x', 1)]
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable

import numpy as np

from stream.consumed import ConsumedItems, check_max_users

__all__ = ["ConsumedItems", "PopularityCounter", "UserVectorStore"]


class UserVectorStore:
    """``user_id -> (V, D)`` float32 query vectors, versioned; an older version never overwrites.

    At most ``max_users`` users; an upsert of a new user beyond that evicts the least recently updated
    one (``evicted_users`` counts them). An evicted user's version is forgotten with its vectors.
    """

    def __init__(self, dim: int, max_users: int = 1_000_000) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        check_max_users(max_users)
        self.dim = dim
        self.max_users = max_users
        self.evicted_users = 0
        self._lock = threading.Lock()  # serialises writers' version checks; get() does not take it
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently updated first
        self._versions: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._vectors)

    def upsert(self, user_id: str, vectors: np.ndarray, version: int) -> bool:
        """Store ``vectors`` (V, D); return False when a newer version is already stored."""
        array = np.array(vectors, dtype=np.float32)  # a private copy, frozen below
        if array.ndim != 2 or array.shape[1] != self.dim or array.shape[0] < 1:
            raise ValueError(f"user vectors must have shape (V>=1, {self.dim}), got {array.shape}")
        array.flags.writeable = False
        with self._lock:
            if self._versions.get(user_id, -1) > version:
                return False
            self._vectors[user_id] = array
            self._vectors.move_to_end(user_id)
            self._versions[user_id] = version
            while len(self._vectors) > self.max_users:
                evicted, _ = self._vectors.popitem(last=False)
                del self._versions[evicted]
                self.evicted_users += 1
        return True

    def get(self, user_id: str) -> np.ndarray | None:
        return self._vectors.get(user_id)

    def version_of(self, user_id: str) -> int | None:
        return self._versions.get(user_id)

    def export(self) -> list[tuple[str, int, np.ndarray]]:
        """``(user_id, version, vectors)`` for every user, least recently updated first (re-upserting them
        in this order restores the eviction order)."""
        with self._lock:
            return [(user_id, self._versions[user_id], v) for user_id, v in self._vectors.items()]

    def replace_all(self, rows: Iterable[tuple[str, int, np.ndarray]]) -> None:
        """Replace every user by ``rows`` (upserted in order, so beyond ``max_users`` the first go)."""
        fresh = UserVectorStore(self.dim, self.max_users)
        for user_id, version, vectors in rows:
            fresh.upsert(user_id, vectors, version)
        with self._lock:
            self._vectors, self._versions = fresh._vectors, fresh._versions
            self.evicted_users += fresh.evicted_users


class PopularityCounter:
    """Interaction counts per item and a ranking (count desc, then first seen) refreshed by writers.

    Only the top ``ranking_size`` items are ranked, so ``top(k, exclude)`` can return fewer than
    ``k`` when ``k + len(exclude)`` exceeds it. The ranking is recomputed on a write at most every ``refresh_s`` seconds, so a burst of writes
    costs one sort; a read recomputes only when the ranking is dirty and older than ``refresh_s``.
    """

    def __init__(
        self, refresh_s: float = 1.0, ranking_size: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if refresh_s < 0:
            raise ValueError(f"refresh_s must be >= 0, got {refresh_s}")
        if ranking_size < 1:
            raise ValueError(f"ranking_size must be >= 1, got {ranking_size}")
        self.refresh_s = refresh_s
        self.ranking_size = ranking_size
        self._clock = clock
        self._lock = threading.Lock()
        self._row: dict[str, int] = {}  # item_id -> row in _counts, in first-seen order
        self._item_ids: list[str] = []
        self._counts = np.zeros(1024, dtype=np.int64)
        self._ranking: tuple[tuple[str, int], ...] = ()
        self._dirty = False
        self._refreshed_at_s = -np.inf

    def add(self, item_ids: Iterable[str], count: int = 1) -> None:
        with self._lock:
            for item_id in item_ids:
                row = self._row.get(item_id)
                if row is None:
                    row = self._row[item_id] = len(self._item_ids)
                    self._item_ids.append(item_id)
                    if row == len(self._counts):
                        self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
                self._counts[row] += count
            self._dirty = True
            if self._clock() - self._refreshed_at_s >= self.refresh_s:
                self._refresh_locked()

    def refresh(self) -> None:
        """Re-rank now if counts changed since the last ranking, whatever the refresh period (after a bulk write
        that must be served at once, e.g. a replica's first version)."""
        with self._lock:
            if self._dirty:
                self._refresh_locked()

    def _refresh_locked(self) -> None:
        n = len(self._item_ids)
        # count desc, ties by first seen
        order = np.argsort(-self._counts[:n], kind="stable")[: self.ranking_size]
        self._ranking = tuple((self._item_ids[row], int(self._counts[row])) for row in order.tolist())
        self._dirty = False
        self._refreshed_at_s = self._clock()

    def top(self, k: int, exclude: Collection[str] = ()) -> list[tuple[str, int]]:
        """The ``k`` most popular items not in ``exclude``, as ``(item_id, count)``."""
        if self._dirty and self._clock() - self._refreshed_at_s >= self.refresh_s:
            with self._lock:
                if self._dirty:
                    self._refresh_locked()
        out: list[tuple[str, int]] = []
        for item_id, count in self._ranking:
            if item_id not in exclude:
                out.append((item_id, count))
                if len(out) == k:
                    break
        return out

    def total(self) -> int:
        """Consumptions counted, over every item."""
        with self._lock:
            return int(self._counts[: len(self._item_ids)].sum())

    def export(self) -> list[tuple[str, int]]:
        """``(item_id, count)`` in first-seen order."""
        with self._lock:
            return [(item_id, int(self._counts[row])) for row, item_id in enumerate(self._item_ids)]

    def replace_all(self, counts: Iterable[tuple[str, int]]) -> None:
        pairs = list(counts)
        item_ids = [item_id for item_id, _ in pairs]
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("popularity item_ids must be unique")
        with self._lock:
            self._item_ids = item_ids
            self._row = {item_id: row for row, item_id in enumerate(item_ids)}
            self._counts = np.zeros(max(1024, 2 * len(pairs)), dtype=np.int64)
            self._counts[: len(pairs)] = [count for _, count in pairs]
            self._refresh_locked()
