"""Prequential (test-then-train) evaluation: the served model, and the tallies every ranker is judged by.

Each target-domain event is first ranked with the vectors *then served* (the last published item
matrix and the user's last published query vectors), then the model learns from it. A user with no
published vectors is ranked by the served popularity order (serving's fallback). The measurement is
honest, the same for every ranker (``learner.online.shadow`` ranks the baselines on the same events):

- ranks are 1-based and ties count *against* the held-out item: rank = 1 + the other candidates scoring
  at least as high, so a query that scores every item alike ranks the item last, never first;
- the items the user consumed before the event are excluded from the candidates (the held-out item
  itself stays a candidate, even when it is a repeat). Which items: the user's target history that the
  event's :class:`stream.user_state.Example` carries, the last ``max_len`` target items before it. The
  consumers keep it, the checkpoint holds it, and serving's consumed sets exclude the same items
  (serving keeps up to ``max_consumed_per_user``, so a user with more than ``max_len`` target events
  has a few older items excluded there and not here);
- an event whose item the ranker cannot rank (not in the served index yet; never seen by a baseline)
  counts as a miss. :class:`RankTally` reports HR@k and NDCG@k over *all* target events and over the
  *rankable* ones (the item occurred in the target stream before: the same events for every ranker),
  with the rankable fraction; each whole-stream (cumulative) and over the last ``window`` target events.
  ``all = rankable fraction * rankable`` holds exactly for both spans.

The served users are mirrored in a bounded :class:`RowTable`: at most ``max_users`` (set it to serving's
``max_users``), the least recently published evicted, as serving evicts them; an evicted user is then
ranked by popularity here too. Items are bounded by the catalogue and not capped.

>>> import numpy as np
>>> ev = PrequentialEvaluator()
>>> ev.set_served(version=1, item_ids=["a", "b", "c"], item_vectors=np.eye(3, dtype=np.float32),
...               user_ids=["u"], user_vectors=np.array([[[0.0, 1.0, 0.5]]], dtype=np.float32),
...               popularity=["c", "a", "b"])
>>> ev.rank_many([("u", "b"), ("u", "c"), ("u", "c"), ("new", "a"), ("new", "a"), ("u", "zzz")],
...              consumed=[(), (), ("b",), (), ("c",), ()])
[1, 2, 1, 2, 1, None]
>>> tally = RankTally(k=1, window=4)
>>> for rank, rankable in [(1, True), (2, True), (None, False), (1, True), (None, True)]:
...     _ = tally.record(rank, rankable)
>>> f = tally.figures()
>>> f["stream"]["hr"], f["stream"]["hr_rankable"], f["stream"]["rankable_ratio"], f["window"]["hr"]
(0.4, 0.5, 0.8, 0.25)
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from stream.events import EmbeddingBatch

SPANS = ("stream", "window")  # whole stream (cumulative), the last ``window`` target events


def ranks_event(event_id: str, share: float) -> bool:
    """Whether the event is among the ``share`` of target events the prequential evaluation tests: a hash of
    its id, so every ranker tests the same events, a restarted or repeated run the same ones too, and the
    sample is uniform whatever the ids look like.

    >>> ranks_event("events:0:17", 1.0)
    True
    >>> sum(ranks_event(f"events:0:{i}", 0.1) for i in range(10_000))
    1036
    """
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < share * 2.0**64


class RankTally:
    """HR@k and NDCG@k of one ranker over the target events it was asked to rank, whole-stream and windowed.

    ``record(rank, rankable)`` takes the 1-based rank (None: the ranker could not rank the item, a miss)
    and whether the event is rankable (its item occurred in the target stream before). Each span keeps
    integer counts only (events, rankable events, and hits by rank 1..k, over all and over rankable
    events), so sliding the window never accumulates rounding and every figure is exact.
    """

    def __init__(self, k: int = 10, window: int = 2000) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.k = k
        self.window = window
        self._gains = [0.0] + [1.0 / math.log2(r + 1) for r in range(1, k + 1)]  # NDCG@k gain by rank bin
        self._gain = np.array(self._gains)  # (k + 1,)
        # per span: 2 x (k + 1) counts: row 0 all events, row 1 rankable ones; column = rank (0: outside the
        # top k). Python ints: a per-event increment costs a fraction of a numpy scalar update.
        self._counts = {span: [[0] * (k + 1), [0] * (k + 1)] for span in SPANS}
        self._recent: deque[tuple[bool, int]] = deque()  # (rankable, rank bin), oldest first

    def record(self, rank: int | None, rankable: bool) -> float:
        """Count one event; returns its NDCG@k gain (0 for a miss)."""
        rank_bin = rank if rank is not None and rank <= self.k else 0
        entry = (bool(rankable), rank_bin)
        for span in SPANS:
            self._add(self._counts[span], entry, 1)
        self._recent.append(entry)
        if len(self._recent) > self.window:
            self._add(self._counts["window"], self._recent.popleft(), -1)
        return self._gains[rank_bin]

    @staticmethod
    def _add(counts: list[list[int]], entry: tuple[bool, int], sign: int) -> None:
        rankable, rank_bin = entry
        counts[0][rank_bin] += sign
        if rankable:
            counts[1][rank_bin] += sign

    @property
    def events(self) -> int:
        """Target events recorded over the whole stream."""
        return sum(self._counts["stream"][0])

    def figures(self, span: str | None = None) -> dict[str, Any]:
        """``{span: {"events", "rankable", "rankable_ratio", "hr", "ndcg", "hr_rankable", "ndcg_rankable"}}``
        for both spans (or the one named); a ratio over no events is nan."""
        if span is not None and span not in SPANS:
            raise ValueError(f"span must be one of {SPANS}, got {span!r}")
        out = {}
        for name in SPANS if span is None else (span,):
            counts = np.asarray(self._counts[name], dtype=np.int64)  # (2, k + 1)
            n, n_rankable = (int(x) for x in counts.sum(axis=1))
            hits = counts[:, 1:].sum(axis=1)  # (2,)
            gains = counts @ self._gain  # (2,)
            out[name] = {
                "events": n,
                "rankable": n_rankable,
                "rankable_ratio": _ratio(n_rankable, n),
                "hr": _ratio(hits[0], n),
                "ndcg": _ratio(gains[0], n),
                "hr_rankable": _ratio(hits[1], n_rankable),
                "ndcg_rankable": _ratio(gains[1], n_rankable),
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        recent = np.array(self._recent, dtype=np.int64).reshape(-1, 2)  # (n, 2): rankable, rank bin
        return {"k": self.k, "window": self.window, "stream": [list(row) for row in self._counts["stream"]],
                "recent": recent}  # one array, not a pair object per event of the window

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], window: int | None = None) -> RankTally:
        """The tally of ``state``; ``window``: a new window length (its newest events are kept)."""
        out = cls(int(state["k"]), int(state["window"]) if window is None else window)
        out._counts["stream"] = [[int(c) for c in row] for row in state["stream"]]
        for rankable, rank_bin in np.asarray(state["recent"], dtype=np.int64).reshape(-1, 2)[-out.window :].tolist():
            entry = (bool(rankable), int(rank_bin))
            out._recent.append(entry)
            out._add(out._counts["window"], entry, 1)
        return out


def _ratio(num: float, den: float) -> float:
    return float(num) / den if den else math.nan


class StreamQuality:
    """One :class:`RankTally` per ranker, all fed the same target events, and the model's lift.

    >>> q = StreamQuality(("model", "popularity"), k=10, window=100)
    >>> q.record([True, True], {"model": [1, 20], "popularity": [3, None]})
    {'model': [1.0, 0.0], 'popularity': [0.5, 0.0]}
    >>> q.lift()  # model NDCG@10 / best baseline NDCG@10, whole stream
    2.0
    """

    def __init__(self, rankers: Sequence[str], k: int = 10, window: int = 2000, model: str = "model",
                 learnt: Sequence[str] = ()) -> None:
        """``learnt``: rankers built on the model (e.g. ``fused``), tallied like it and never a baseline."""
        if model not in rankers or not set(learnt) <= set(rankers) or model in learnt:
            raise ValueError(f"rankers must hold {model!r} and every learnt ranker {list(learnt)}, got {list(rankers)}")
        if len(rankers) - len(set(learnt)) < 2:
            raise ValueError(f"rankers must hold at least one baseline, got {list(rankers)} (learnt {list(learnt)})")
        self.rankers = tuple(rankers)
        self.model = model
        self.learnt = (model, *learnt)
        self.k = k
        self.tallies = {name: RankTally(k, window) for name in self.rankers}

    @property
    def baselines(self) -> tuple[str, ...]:
        return tuple(r for r in self.rankers if r not in self.learnt)

    def record(self, rankable: Sequence[bool], ranks: Mapping[str, Sequence[int | None]]) -> dict[str, list[float]]:
        """Record the ranks every ranker gave the same events; returns the NDCG@k gains, by ranker."""
        if set(ranks) != set(self.rankers):
            raise ValueError(f"ranks must be given for every ranker {sorted(self.rankers)}, got {sorted(ranks)}")
        gains: dict[str, list[float]] = {}
        for name in self.rankers:
            if len(ranks[name]) != len(rankable):
                raise ValueError(f"{name}: {len(ranks[name])} ranks for {len(rankable)} events")
            tally = self.tallies[name]
            gains[name] = [tally.record(r, flag) for r, flag in zip(ranks[name], rankable, strict=True)]
        return gains

    def best_baseline(self, span: str = "stream") -> str:
        """The baseline with the highest NDCG@k over all events of ``span`` (ties: the first listed)."""
        scores = {b: self.tallies[b].figures(span)[span]["ndcg"] for b in self.baselines}
        return max(self.baselines, key=lambda b: -math.inf if math.isnan(scores[b]) else scores[b])

    def lift(self, span: str = "stream", ranker: str | None = None) -> float:
        """NDCG@k of ``ranker`` (default the model) divided by the best baseline's, over all events of
        ``span`` (nan while undefined)."""
        best = self.tallies[self.best_baseline(span)].figures(span)[span]["ndcg"]
        mine = self.tallies[ranker or self.model].figures(span)[span]["ndcg"]
        if math.isnan(best) or math.isnan(mine) or best == 0.0:
            return math.nan
        return mine / best

    def figures(self) -> dict[str, Any]:
        """Everything, JSON-ready: per ranker and span the tally's figures, the best baseline, the model's
        lift and every learnt ranker's (``lifts``: ranker -> span -> lift)."""
        return {
            "k": self.k,
            "rankers": {name: tally.figures() for name, tally in self.tallies.items()},
            "best_baseline": self.best_baseline(),
            "lift": self.lift(),
            "lift_window": self.lift("window"),
            "lifts": {name: {span: self.lift(span, name) for span in SPANS} for name in self.learnt},
        }

    def stats(self) -> dict[str, float]:
        """Flat figures for a learner step's statistics. ``prequential_hr_at_<k>`` and
        ``prequential_ndcg_at_<k>`` are the served model's, windowed, over all target events."""
        k = self.k
        model = self.tallies[self.model].figures("window")["window"]
        out = {f"prequential_hr_at_{k}": model["hr"], f"prequential_ndcg_at_{k}": model["ndcg"],
               "prequential_rankable_ratio": model["rankable_ratio"],
               "prequential_events_total": float(self.tallies[self.model].events),
               "prequential_lift": self.lift()}
        for name in self.learnt[1:]:
            out[f"{name}_lift"] = self.lift(ranker=name)
        for name, tally in self.tallies.items():
            for span, f in tally.figures().items():
                for metric in ("hr", "ndcg"):
                    out[f"{name}_{metric}_at_{k}_{span}"] = f[metric]
                    out[f"{name}_{metric}_at_{k}_{span}_rankable"] = f[f"{metric}_rankable"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rankers": list(self.rankers), "model": self.model, "k": self.k,
                "tallies": {name: t.state_dict() for name, t in self.tallies.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the tallies of a checkpoint (rankers it does not have start from zero)."""
        for name, tally_state in state["tallies"].items():
            if name in self.tallies:
                self.tallies[name] = RankTally.from_state_dict(tally_state, self.tallies[name].window)


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
    """Ranks incoming target events with what serving holds (the model path, else popularity)."""

    def __init__(self, max_users: int = 1_000_000) -> None:
        self.version = 0
        self.ranked_total = 0  # events whose item the served index holds
        self.unrankable_total = 0  # the item is not in the served index yet: a miss
        self.max_users = max_users
        self._items = RowTable()  # (N, D) rows, dense: items are never evicted
        self._users = RowTable(max_users)  # (capacity <= max_users, V, D)
        self._pop_rank: dict[str, int] = {}  # item -> 1-based position in the served popularity order
        self._ids: tuple[str, ...] = ()  # served item ids in row order, cached per (table, size)
        self._ids_key: tuple[int, int] | None = None
        self._generation = 0  # bumped whenever the item rows are rebuilt (a full publish)

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
        self._generation += 1
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

    def item_row(self, item_id: str) -> int | None:
        """The served item's row (its column in ``served_item_ids`` order), None when it is not served."""
        return self._items.get(item_id)

    def served_item_ids(self) -> tuple[str, ...]:
        """The served items in row order (the columns of the score rows ``rank_many`` hands out). The same
        tuple object while the served items are unchanged, so callers can cache on its identity."""
        key = (self._generation, len(self._items))
        if self._ids_key != key:
            ids = [""] * len(self._items)
            for item_id, row in self._items.rows.items():
                ids[row] = item_id
            self._ids, self._ids_key = tuple(ids), key
        return self._ids

    def rank_many(
        self, pairs: Sequence[tuple[str, str]], consumed: Sequence[Collection[str]] | None = None,
        scores_out: dict[int, np.ndarray] | None = None,
    ) -> list[int | None]:
        """Rank each (user_id, item_id) with the served state, ``consumed[i]`` excluded (ties against the
        item); None when the served index does not hold the item (a miss). ``scores_out``: filled with
        ``i -> (N,)`` served model scores of every served item (``served_item_ids`` order) for each pair
        whose item is served and whose user has vectors."""
        if consumed is not None and len(consumed) != len(pairs):
            raise ValueError(f"consumed must have one entry per pair ({len(pairs)}), got {len(consumed)}")
        ranks: list[int | None] = []
        model_rows: list[int] = []
        model_pos: list[int] = []
        model_slots: list[int] = []
        for i, (user_id, item_id) in enumerate(pairs):
            row = self._items.get(item_id)
            if row is None:
                ranks.append(None)
                self.unrankable_total += 1
                continue
            self.ranked_total += 1
            user_row = self._users.get(user_id)
            if user_row is None:
                ranks.append(self._popularity_rank(item_id, consumed[i] if consumed is not None else ()))
            else:
                model_rows.append(user_row)
                model_pos.append(row)
                model_slots.append(i)
                ranks.append(0)
        if model_rows:
            queries = self._users.matrix[model_rows]  # (B, V, D)
            b, v, d = queries.shape
            scores = (queries.reshape(b * v, d) @ self._items.dense().T).reshape(b, v, -1).max(axis=1)  # (B, N), BLAS
            positive = scores[np.arange(b), model_pos]  # (B,)
            at_least = scores >= positive[:, None]  # (B, N), the positive itself included: ties against it
            if consumed is not None:
                for j, slot in enumerate(model_slots):
                    excluded = [r for r in map(self._items.get, consumed[slot]) if r is not None and r != model_pos[j]]
                    at_least[j, excluded] = False
            for slot, r in zip(model_slots, at_least.sum(axis=1).tolist(), strict=True):
                ranks[slot] = int(r)
            if scores_out is not None:
                for j, slot in enumerate(model_slots):
                    scores_out[slot] = scores[j]
        return ranks

    def _popularity_rank(self, item_id: str, consumed: Collection[str]) -> int:
        """Rank in the served popularity order, ``consumed`` removed; an item outside the published order
        ties with every other unlisted item of the index, so it ranks after all candidates."""
        excluded = {c for c in consumed if c != item_id and c in self._items}
        position = self._pop_rank.get(item_id)
        if position is None:
            return len(self._items) - len(excluded)
        return position - sum(1 for c in excluded if self._pop_rank.get(c, position) < position)

    def stats(self) -> dict[str, float]:
        return {
            "served_version": float(self.version),
            "prequential_users": float(len(self._users)),
            "prequential_users_evicted": float(self._users.evicted),
        }
