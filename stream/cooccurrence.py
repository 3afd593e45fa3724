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
from typing import Any

import numpy as np

from stream.user_state import Example

MODES = ("target", "target+source", "source")
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


def _items(history: HistoryItems, domain: str, max_history: int) -> Sequence[str]:
    value = history.get(domain, ())
    if len(value) == 2 and isinstance(value[0], tuple):  # (item ids, timestamps)
        value = value[0]
    return tuple(value)[-max_history:]


class _Rows:
    """Item ids to dense rows, event counts per row, and a sparse neighbour dict per row."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self.counts = np.zeros(0, dtype=np.float64)
        self.neighbours: list[dict[int, float]] = []

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

    def state_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "counts": self.counts[: len(self.ids)].tolist(),
                "neighbours": [list(n.items()) for n in self.neighbours]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> _Rows:
        out = cls()
        for item_id in state["ids"]:
            out.add(item_id)
        out.counts[: len(out.ids)] = state["counts"]
        out.neighbours = [dict((int(k), float(v)) for k, v in pairs) for pairs in state["neighbours"]]
        return out


class ItemCooccurrence:
    """Item-to-item co-occurrence counts learnt one event at a time; see the module docstring."""

    def __init__(
        self, source: str, target: str, *, alpha: float = 0.5, max_history: int = 50, source_weight: float = 1.0
    ) -> None:
        if not source or not target or source == target:
            raise ValueError(f"source and target must be two different domain names, got {source!r} and {target!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history must be an int >= 1, got {max_history!r}")
        if source_weight < 0:
            raise ValueError(f"source_weight must be >= 0, got {source_weight}")
        self.source, self.target = source, target
        self.alpha = alpha
        self.max_history = max_history
        self.source_weight = source_weight
        self._target = _Rows()  # neighbours: target row -> {target row: C_tt}
        self._source = _Rows()  # neighbours: source row -> {target row: C_st}
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

    # -- learning ----------------------------------------------------------------------------------
    def learn(self, history: HistoryItems, domain: str, item_id: str) -> None:
        """Count one event of ``domain`` against the user's ``history`` before it."""
        if domain == self.target:
            j = self._target.add(item_id)
            self._target.counts[j] += 1.0
            self._stale.add(j)
            self._max_count = max(self._max_count, float(self._target.counts[j]))
            nj = self._target.neighbours[j]
            for other in set(_items(history, self.target, self.max_history)):
                i = self._target.add(other)
                if i == j:
                    continue
                ni = self._target.neighbours[i]
                ni[j] = ni.get(j, 0.0) + 1.0
                nj[i] = nj.get(i, 0.0) + 1.0
            for other in set(_items(history, self.source, self.max_history)):
                row = self._source.neighbours[self._source.add(other)]
                row[j] = row.get(j, 0.0) + 1.0
        elif domain == self.source:
            s = self._source.add(item_id)
            self._source.counts[s] += 1.0
            row = self._source.neighbours[s]
            for other in set(_items(history, self.target, self.max_history)):
                j = self._target.add(other)
                row[j] = row.get(j, 0.0) + 1.0
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
        n = len(self._target.ids)
        acc = np.zeros(n, dtype=np.float64)
        parts: list[tuple[_Rows, float, str]] = []
        if mode in ("target", "target+source"):
            parts.append((self._target, 1.0, self.target))
        if mode in ("source", "target+source"):
            parts.append((self._source, self.source_weight if mode == "target+source" else 1.0, self.source))
        for rows, weight, domain in parts:
            for item_id in set(_items(history, domain, self.max_history)):
                i = rows.index.get(item_id)
                if i is None or not rows.neighbours[i]:
                    continue
                neighbours = rows.neighbours[i]
                cols = np.fromiter(neighbours.keys(), dtype=np.int64, count=len(neighbours))
                values = np.fromiter(neighbours.values(), dtype=np.float64, count=len(neighbours))
                acc[cols] += values * (weight / max(rows.counts[i], 1.0) ** self.alpha)
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
            "source_weight": self.source_weight, "events": self.events,
            "target_rows": self._target.state_dict(), "source_rows": self._source.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ItemCooccurrence:
        out = cls(state["source"], state["target"], alpha=state["alpha"], max_history=state["max_history"],
                  source_weight=state["source_weight"])
        out._target = _Rows.from_state_dict(state["target_rows"])
        out._source = _Rows.from_state_dict(state["source_rows"])
        out.events = int(state["events"])
        out._stale = set(range(len(out._target.ids)))
        out._max_count = float(out.counts.max()) if len(out) else 0.0
        return out
