"""Incremental item co-occurrence over the event stream: the item-kNN baseline every quality figure
is measured against, and a ranker serving can fall back to. Torch-free (serving imports it).

Counting. Each event is counted against the user's history *before* it (the causal history an
:class:`stream.user_state.Example` carries), last ``max_history`` items per domain:

- a target event ``j``: ``C_tt[i, j] += 1`` and ``C_tt[j, i] += 1`` for every distinct target item ``i``
  of the history, ``C_st[s, j] += 1`` for every distinct source item ``s``;
- a source event ``s``: ``C_st[s, j] += 1`` for every distinct target item ``j`` of the history.

``n_x`` is the number of events of item ``x``. Scoring a history against every target item seen so far:

    score(j) = sum_{i in target history} C_tt[i, j] / (n_i^alpha * n_j^(1 - alpha))
             + source_weight * sum_{s in source history} C_st[s, j] / (n_s^alpha * n_j^(1 - alpha))

(``alpha = 0.5`` is cosine similarity of the items' user sets, summed over the history), plus a
popularity tie-break far below any co-occurrence score (``1e-9 * n_j / max n``), so items without a
co-occurrence signal, and every item of a history without one, fall back to the popularity order.
``mode`` picks the history used: ``"target"``, ``"target+source"`` or ``"source"``.

Bounded memory: at most ``max_neighbours`` neighbours per row, kept by count. Every row (a target item's
``C_tt`` row, a source item's ``C_st`` row) may grow to ``2 * max_neighbours`` distinct neighbours; the
insertion that takes it past that keeps the ``max_neighbours`` largest counts (equal counts: the neighbour
seen first, the lower row) and drops the rest, an O(log max_neighbours) cost per insertion amortised. A
dropped pair starts again from 0 if it recurs. While no row has gone past ``2 * max_neighbours`` every count
above is exact (``pruned_rows == 0``); afterwards a row holds its strongest neighbours by count, and
``C_tt`` may lose its symmetry (``i`` may keep ``j`` while ``j`` dropped ``i``). Memory is then
O(items x max_neighbours) (a full row, 100 neighbours, is about 5 KB at the default), against O(distinct pairs) uncapped,
which grows with every long history: an event adds up to 2 * ``max_history`` pairs.

The default, :data:`DEFAULT_MAX_NEIGHBOURS` = 50, is the neighbourhood size item-kNN is commonly run with
(tens of neighbours per item), and a row keeps 50 to 100 of them: a history's score sums its items' rows,
so a row's tail of count-1 pairs adds little next to its head. Measured (``bench/bench_memory.py``,
1M synthetic events over 500k items, the shadow baselines' counts): 1,289 MiB growing 129 MiB per 100k
events uncapped, 633 MiB growing 45 MiB per 100k (and slowing) at 50. On the shipped Movie->Book data
the offline item-kNN rows score the same NDCG@10 at caps from 20 to none. ``None`` keeps every pair.
Counts are ints: CPython caches small ints, so a count costs its dict slot only, not a float object
(a third less memory than float counts).

>>> co = ItemCooccurrence("movie", "book")
>>> co.learn({"book": (), "movie": ("m1",)}, "book", "b1")       # u1: m1 then b1
>>> co.learn({"book": ("b1",), "movie": ("m1",)}, "book", "b2")  # u1: then b2
>>> co.learn({"book": (), "movie": ()}, "book", "b3")            # u2: b3
>>> co.learn({"book": ("b3",), "movie": ()}, "book", "b3")       # u2: b3 again (no self pair)
>>> co.item_ids, co.counts.tolist()
(['b1', 'b2', 'b3'], [1.0, 1.0, 2.0])
>>> [round(s, 3) for s in co.scores({"book": ("b1",)}, "target").tolist()]
[0.0, 1.0, 0.0]
>>> co.rank({"book": ("b1",)}, "b2", "target", consumed=("b1",))  # b2 co-occurs with b1: first
1
>>> co.rank({"movie": ("m1",)}, "b3", "source", consumed=())  # m1 -> b1, b2; b3 only by popularity
3
>>> co.rank({"book": ()}, "b9", "target", consumed=()) is None  # never seen: a miss
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from stream.user_state import Example

MODES = ("target", "target+source", "source")
DEFAULT_MAX_NEIGHBOURS = 50  # neighbours kept per row (a row prunes back to this at twice it); see above
TIE_BREAK = 1e-9  # popularity tie-break scale; co-occurrence scores are >= 1 / max n, far above it

HistoryItems = Mapping[str, Any]  # domain -> item ids, or (item ids, timestamps) as Example carries


def rank_with_ties_against(scores: np.ndarray, positive_row: int, excluded_rows: Iterable[int] = ()) -> int:
    """1-based rank of ``positive_row``: 1 + the other non-excluded rows scoring at least as high.

    >>> rank_with_ties_against(np.array([0.5, 0.5, 0.9, 0.1]), 0)
    3
    >>> rank_with_ties_against(np.array([0.5, 0.5, 0.9, 0.1]), 0, excluded_rows=[2, 0])
    2
    """
    at_least = scores >= scores[positive_row]  # (N,) includes the positive itself
    excluded = np.unique(np.fromiter(excluded_rows, dtype=np.int64))
    excluded = excluded[excluded != positive_row]
    return int(at_least.sum()) - int(at_least[excluded].sum())


def ranks_with_ties_against(scores: np.ndarray, positive_row: int, excluded_rows: Iterable[int] = ()) -> np.ndarray:
    """:func:`rank_with_ties_against` of each row of ``scores`` (R, N) at once: (R,) int64.

    >>> ranks_with_ties_against(np.array([[0.5, 0.5, 0.9, 0.1], [0.5, 0.1, 0.2, 0.3]]), 0, [2, 0]).tolist()
    [2, 1]
    """
    at_least = scores >= scores[:, positive_row : positive_row + 1]  # (R, N) includes the positive itself
    excluded = np.unique(np.fromiter(excluded_rows, dtype=np.int64))
    excluded = excluded[excluded != positive_row]
    counts = at_least.sum(axis=1)
    if excluded.size:
        counts -= at_least[:, excluded].sum(axis=1)
    return counts


def _items(history: HistoryItems, domain: str, max_history: int) -> Sequence[str]:
    value = history.get(domain, ())
    if len(value) == 2 and isinstance(value[0], tuple):  # (item ids, timestamps)
        value = value[0]
    return tuple(value)[-max_history:]


class _Rows:
    """Item ids to dense rows, event counts per row, and a sparse neighbour dict per row (pruned back to
    ``cap`` entries when it passes ``2 * cap``; ``cap=None``: never)."""

    def __init__(self, cap: int | None = None) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self.counts = np.zeros(0, dtype=np.float64)
        self.neighbours: list[dict[int, int]] = []
        self.cap = cap
        self.limit = 2 * cap if cap is not None else None  # a row longer than this is pruned
        self.pruned_rows = 0  # prunings so far (a row can be pruned many times)

    def add(self, item_id: str) -> int:
        row = self.index.get(item_id)
        if row is None:
            row = self.index[item_id] = len(self.ids)
            self.ids.append(item_id)
            self.neighbours.append({})
            if row == len(self.counts):
                grown = np.zeros(max(1024, 2 * len(self.counts)), dtype=np.float64)
                grown[: len(self.counts)] = self.counts
                self.counts = grown
        return row

    def bump(self, row: dict[int, int], col: int) -> None:
        """``row[col] += 1``, then prune the row if it just went past the limit."""
        count = row.get(col)
        if count is not None:
            row[col] = count + 1
            return
        row[col] = 1
        if self.limit is not None and len(row) > self.limit:
            self.prune(row)

    def prune(self, row: dict[int, int]) -> None:
        """Keep the ``cap`` largest counts of ``row`` (equal counts: the lower column, seen first), in place.

        >>> rows = _Rows(cap=2)
        >>> row = {5: 1, 3: 2, 9: 2, 1: 1, 7: 4}
        >>> rows.prune(row); row
        {7: 4, 3: 2}
        """
        assert self.cap is not None
        items = list(row.items())  # kept as they are: the column ints are the ones ``index`` holds
        cols = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        counts = np.fromiter(row.values(), dtype=np.int64, count=len(row))
        keep = np.lexsort((cols, -counts))[: self.cap]  # by count descending, then column ascending
        row.clear()  # clear() frees the table: deleting keys would leave it at its largest size
        row.update(items[k] for k in keep.tolist())
        self.pruned_rows += 1

    def n_pairs(self) -> int:
        """Stored (row, neighbour) counts."""
        return sum(map(len, self.neighbours))

    def state_dict(self) -> dict[str, Any]:
        """Neighbours as three flat arrays (row ``r``'s pairs are ``cols[ptr[r]:ptr[r + 1]]`` with their
        counts, in the row's insertion order), not a list of pairs per row: a checkpoint pickles a handful
        of arrays instead of millions of small objects."""
        sizes = np.fromiter(map(len, self.neighbours), dtype=np.int64, count=len(self.neighbours))
        ptr = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=ptr[1:])
        cols = np.fromiter((c for n in self.neighbours for c in n), dtype=np.int64, count=int(ptr[-1]))
        counts = np.fromiter((v for n in self.neighbours for v in n.values()), dtype=np.int64, count=int(ptr[-1]))
        return {"ids": list(self.ids), "counts": self.counts[: len(self.ids)].copy(),
                "neighbour_ptr": ptr, "neighbour_cols": cols, "neighbour_counts": counts,
                "pruned_rows": self.pruned_rows}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], cap: int | None = None) -> _Rows:
        out = cls(cap)
        for item_id in state["ids"]:
            out.add(item_id)
        out.counts[: len(out.ids)] = state["counts"]
        if "neighbours" in state:  # saved before the flat arrays: a list of (col, count) pairs per row
            out.neighbours = [{int(k): int(v) for k, v in pairs} for pairs in state["neighbours"]]
        else:
            ptr = np.asarray(state["neighbour_ptr"]).tolist()
            cols, counts = np.asarray(state["neighbour_cols"]).tolist(), np.asarray(state["neighbour_counts"]).tolist()
            out.neighbours = [dict(zip(cols[a:b], counts[a:b], strict=True)) for a, b in pairwise(ptr)]
        out.pruned_rows = int(state.get("pruned_rows", 0))
        if out.limit is not None:  # a state saved uncapped, or with a larger cap
            for row in out.neighbours:
                if len(row) > out.limit:
                    out.prune(row)
        return out


class ItemCooccurrence:
    """Item-to-item co-occurrence counts learnt one event at a time; see the module docstring."""

    def __init__(
        self,
        source: str,
        target: str,
        *,
        alpha: float = 0.5,
        max_history: int = 50,
        source_weight: float = 1.0,
        max_neighbours: int | None = DEFAULT_MAX_NEIGHBOURS,
    ) -> None:
        if not source or not target or source == target:
            raise ValueError(f"source and target must be two different domain names, got {source!r} and {target!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history must be an int >= 1, got {max_history!r}")
        if source_weight < 0:
            raise ValueError(f"source_weight must be >= 0, got {source_weight}")
        if max_neighbours is not None and (
            isinstance(max_neighbours, bool) or not isinstance(max_neighbours, int) or max_neighbours < 1
        ):
            raise ValueError(f"max_neighbours must be None (no cap) or an int >= 1, got {max_neighbours!r}")
        self.source, self.target = source, target
        self.alpha = alpha
        self.max_history = max_history
        self.source_weight = source_weight
        self.max_neighbours = max_neighbours
        self._target = _Rows(max_neighbours)  # neighbours: target row -> {target row: C_tt}
        self._source = _Rows(max_neighbours)  # neighbours: source row -> {target row: C_st}
        self.events = 0
        # max(n_j, 1)^-(1 - alpha) per target row, kept between scores() calls: only the rows whose count
        # changed since the last call are recomputed (a power over every item per call was most of its cost)
        self._scale = np.ones(0, dtype=np.float64)
        self._stale: set[int] = set()
        self._max_count = 0.0

    # -- catalogue ---------------------------------------------------------------------------------
    @property
    def item_ids(self) -> list[str]:
        """Target items seen so far, in row order."""
        return self._target.ids

    @property
    def counts(self) -> np.ndarray:
        """(n_target_items,) events per target item (running popularity)."""
        return self._target.counts[: len(self._target.ids)]

    def row(self, item_id: str) -> int | None:
        return self._target.index.get(item_id)

    def __len__(self) -> int:
        return len(self._target.ids)

    def n_pairs(self) -> dict[str, int]:
        """Stored counts by matrix: ``{"target": C_tt entries, "source": C_st entries}``."""
        return {"target": self._target.n_pairs(), "source": self._source.n_pairs()}

    @property
    def pruned_rows(self) -> int:
        """Row prunings so far (0: every count is exact)."""
        return self._target.pruned_rows + self._source.pruned_rows

    # -- learning ----------------------------------------------------------------------------------
    def add_items(self, item_ids: Iterable[str]) -> None:
        """Give target items their rows in this order, counting nothing (a rebuild that must list its items,
        and so break ties, as the original that learnt them one event at a time did)."""
        for item_id in item_ids:
            self._target.add(item_id)

    def learn(self, history: HistoryItems, domain: str, item_id: str) -> None:
        """Count one event of ``domain`` against the user's ``history`` before it."""
        if domain == self.target:
            target = self._target
            j = target.add(item_id)
            target.counts[j] += 1.0
            self._stale.add(j)
            self._max_count = max(self._max_count, float(target.counts[j]))
            nj = target.neighbours[j]
            for other in dict.fromkeys(_items(history, self.target, self.max_history)):
                i = target.add(other)
                if i == j:
                    continue
                target.bump(target.neighbours[i], j)
                target.bump(nj, i)
            source = self._source
            for other in dict.fromkeys(_items(history, self.source, self.max_history)):
                source.bump(source.neighbours[source.add(other)], j)
        elif domain == self.source:
            source = self._source
            s = source.add(item_id)
            source.counts[s] += 1.0
            row = source.neighbours[s]
            for other in dict.fromkeys(_items(history, self.target, self.max_history)):
                source.bump(row, self._target.add(other))
        else:
            raise ValueError(f"domain must be {self.source!r} or {self.target!r}, got {domain!r}")
        self.events += 1

    def learn_example(self, example: Example) -> None:
        self.learn(example.history, example.domain, example.item_id)

    def learn_many(self, examples: Iterable[Example]) -> None:
        for example in examples:
            self.learn_example(example)

    # -- scoring -----------------------------------------------------------------------------------
    def scores(self, history: HistoryItems, mode: str = "target") -> np.ndarray:
        """(n_target_items,) score of every target item seen so far for ``history`` (module docstring)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        acc = np.zeros(len(self._target.ids), dtype=np.float64)
        if mode in ("target", "target+source"):
            self._accumulate(acc, self._target, 1.0, self.target, history)
        if mode in ("source", "target+source"):
            weight = self.source_weight if mode == "target+source" else 1.0
            self._accumulate(acc, self._source, weight, self.source, history)
        return self._finish(acc)

    def scores_target_and_both(self, history: HistoryItems) -> tuple[np.ndarray, np.ndarray]:
        """``scores(history, "target")`` and ``scores(history, "target+source")``, the target part summed
        once (the same arithmetic, so the same values)."""
        target = np.zeros(len(self._target.ids), dtype=np.float64)
        self._accumulate(target, self._target, 1.0, self.target, history)
        both = target.copy()
        self._accumulate(both, self._source, self.source_weight, self.source, history)
        return self._finish(target), self._finish(both)

    def _accumulate(self, acc: np.ndarray, rows: _Rows, weight: float, domain: str, history: HistoryItems) -> None:
        """Add the neighbours of ``history``'s ``domain`` items (in history order), each row normalised, to ``acc``."""
        for item_id in dict.fromkeys(_items(history, domain, self.max_history)):
            i = rows.index.get(item_id)
            if i is None or not rows.neighbours[i]:
                continue
            neighbours = rows.neighbours[i]
            cols = np.fromiter(neighbours.keys(), dtype=np.int64, count=len(neighbours))
            values = np.fromiter(neighbours.values(), dtype=np.float64, count=len(neighbours))
            acc[cols] += values * (weight / max(rows.counts[i], 1.0) ** self.alpha)

    def _finish(self, acc: np.ndarray) -> np.ndarray:
        """The column normaliser and the popularity tie-break on accumulated scores (in place)."""
        n = len(acc)
        if n:
            acc *= self._column_scale(n)
            acc += self.counts * (TIE_BREAK / max(self._max_count, 1.0))
        return acc

    def _column_scale(self, n: int) -> np.ndarray:
        """(n,) ``max(n_j, 1)^-(1 - alpha)`` of the first ``n`` target rows, brought up to date."""
        if len(self._scale) < n:  # rows added since: a row never counted has n_j = 0, scale 1
            grown = np.ones(len(self._target.counts), dtype=np.float64)
            grown[: len(self._scale)] = self._scale
            self._scale = grown
        if self._stale:
            rows = np.fromiter(self._stale, dtype=np.int64, count=len(self._stale))
            self._scale[rows] = np.maximum(self._target.counts[rows], 1.0) ** -(1.0 - self.alpha)
            self._stale.clear()
        return self._scale[:n]

    def rank(self, history: HistoryItems, item_id: str, mode: str, consumed: Iterable[str]) -> int | None:
        """1-based rank of ``item_id`` among the target items seen so far minus ``consumed``, ties
        against it; None when the item was never seen (a miss)."""
        positive = self.row(item_id)
        if positive is None:
            return None
        index = self._target.index
        excluded = (index[c] for c in consumed if c in index)
        return rank_with_ties_against(self.scores(history, mode), positive, excluded)

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "alpha": self.alpha, "max_history": self.max_history,
            "source_weight": self.source_weight, "max_neighbours": self.max_neighbours, "events": self.events,
            "target_rows": self._target.state_dict(), "source_rows": self._source.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ItemCooccurrence:
        cap = state.get("max_neighbours", DEFAULT_MAX_NEIGHBOURS)  # absent: saved before the cap existed
        out = cls(state["source"], state["target"], alpha=state["alpha"], max_history=state["max_history"],
                  source_weight=state["source_weight"], max_neighbours=cap)
        out._target = _Rows.from_state_dict(state["target_rows"], cap)
        out._source = _Rows.from_state_dict(state["source_rows"], cap)
        out.events = int(state["events"])
        out._stale = set(range(len(out._target.ids)))
        out._max_count = float(out.counts.max()) if len(out) else 0.0
        return out
