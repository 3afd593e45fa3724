"""Item co-occurrence over what serving's users consumed: the ranker ``/recommend`` falls back to while the
learner reports the model significantly worse than it (``served_by="cooccurrence"``).

It is the learner's ``cooc_target`` shadow baseline (``learner.online.shadow``), computed here from what serving
receives: each published batch's consumed (user, target item) pairs, counted in arrival order against the
user's consumed items before them (serving's consumed set, oldest first, the last ``max_history`` used).
It differs from the learner's only in what the history holds (serving's consumed set of up to
``max_consumed_per_user`` items, not the example's last ``max_len`` target events) and in arriving once per
publish. A user's recommendations score every item against their consumed items; the items without a
co-occurrence signal follow in popularity order.

Memory: the counts keep at most ``max_neighbours`` neighbours per item (the same pruning as the learner's,
``stream.cooccurrence``; default :data:`stream.cooccurrence.DEFAULT_MAX_NEIGHBOURS`), so what serving holds
grows with its catalogue, not with every pair its users ever consumed together.

Thread safety: learning (the publish path) and scoring (the request path) take one lock; scoring the
39k books of the shipped catalogue takes well under a millisecond.

>>> ranker = CooccurrenceRanker()
>>> ranker.learn([((), "a"), (("a",), "b"), ((), "c"), (("c",), "a")])
>>> [(item_id, round(score, 3)) for item_id, score in ranker.top(("a",), k=3, exclude={"a"})]  # ties: first seen
[('b', 0.707), ('c', 0.707)]
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence

import numpy as np

from serving.fused import CoocAlignment
from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS, ItemCooccurrence

# ItemCooccurrence counts events of two named domains; serving only sees the target domain.
_SOURCE, _TARGET = "source", "target"


class CooccurrenceRanker:
    """Target-history item co-occurrence, learnt from consumed pairs, ranked for a user's consumed items."""

    def __init__(self, max_history: int = 50, max_neighbours: int | None = DEFAULT_MAX_NEIGHBOURS) -> None:
        self.max_history = max_history
        self.max_neighbours = max_neighbours  # per item; None: every pair (see ``stream.cooccurrence``)
        self._cooc = ItemCooccurrence(_SOURCE, _TARGET, max_history=max_history, max_neighbours=max_neighbours)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cooc)

    def add_items(self, item_ids: Iterable[str]) -> None:
        """Rows for these items in this order, nothing counted (see ``ItemCooccurrence.add_items``)."""
        with self._lock:
            self._cooc.add_items(item_ids)

    def learn(self, events: Iterable[tuple[Sequence[str], str]]) -> None:
        """Count each ``(consumed before, item)`` event, in order."""
        with self._lock:
            for before, item_id in events:
                self._cooc.learn({_TARGET: tuple(before)[-self.max_history :]}, _TARGET, item_id)

    def aligned_scores(self, history: Sequence[str], alignments: Sequence[CoocAlignment]) -> list[np.ndarray]:
        """The co-occurrence scores for a user who consumed ``history`` (as ``top`` ranks them), read in the
        item order of each alignment (0 for items never consumed here); for the fused ranker."""
        with self._lock:
            scores = self._cooc.scores({_TARGET: tuple(history)}, "target")  # (N,)
            return [alignment.gather(self._cooc, scores) for alignment in alignments]

    def top(self, history: Sequence[str], k: int, exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` best items for a user who consumed ``history`` (oldest first), ``exclude`` left out,
        as ``(item_id, score)``, best first (equal scores: the item seen first)."""
        with self._lock:
            scores = self._cooc.scores({_TARGET: tuple(history)}, "target")  # (N,)
            item_ids = self._cooc.item_ids
            rows = [r for r in map(self._cooc.row, exclude) if r is not None]
            scores[rows] = -np.inf
            n = min(k, len(item_ids) - len(set(rows)))
            if n <= 0:
                return []
            kth = -np.partition(-scores, n - 1)[n - 1]  # the n-th highest score
            above = np.flatnonzero(scores > kth)
            best = np.concatenate([above, np.flatnonzero(scores == kth)[: n - len(above)]])  # ties: first rows
            best = best[np.lexsort((best, -scores[best]))]  # by score, then row (first seen)
            return [(item_ids[r], float(scores[r])) for r in best.tolist()]
