"""Shadow baselines: simple rankers scored on exactly the target events the served model is scored on.

Test-then-train, per event (``observe``): in stream order, each target example is ranked by every
baseline with what it learnt from the events before it, then learnt; a source example is learnt. (The
served model ranks the same target events with what serving holds: the last publish.) Each baseline ranks
the item among the target items seen so far, the user's consumed items excluded (the example's target
history, as for the model), ties against the item; an item never seen before is a miss. The rankers:

- ``popularity``: running counts of target events (``ItemCooccurrence.counts``);
- ``cooc_target``: item co-occurrence with the user's target history (``mode="target"``);
- ``cooc_target_source``: the same plus the user's source history (``mode="target+source"``).

All three read one :class:`stream.cooccurrence.ItemCooccurrence`, fed with every example (both domains).
An event is *rankable* when its item occurred in the target stream before (the co-occurrence has a row
for it); that flag is the same for every ranker, the model included (``learner.online.prequential``). Cost, measured on the full Movie->Book replay
(148,205 events, 74,629 book events, 39,412 books at the end; one core): about 0.2 ms per target event
for the three ranks together (two score vectors over every book seen so far), 7 us per learnt event;
the state pickles to about 12 MB at the end of the replay.

>>> from stream.user_state import Example
>>> shadow = ShadowBaselines("movie", "book")
>>> def ex(user, item, domain, books=(), movies=()):
...     return Example("e", user, domain, item, 0, {"book": (books, ()), "movie": (movies, ())})
>>> shadow.learn([ex("u1", "m1", "movie"), ex("u1", "b1", "book", movies=("m1",)),
...               ex("u1", "b2", "book", books=("b1",), movies=("m1",)), ex("u2", "b3", "book"),
...               ex("u2", "b3", "book", books=("b3",))])
>>> shadow.rank([ex("u3", "b2", "book", books=("b1",)), ex("u3", "b9", "book")])
([True, False], {'popularity': [2, None], 'cooc_target': [1, None], 'cooc_target_source': [1, None]})
>>> shadow.observe([ex("u4", "b9", "book"), ex("u4", "m1", "movie"), ex("u4", "b9", "book", books=("b9",))])
([False, True], {'popularity': [None, 4], 'cooc_target': [None, 4], 'cooc_target_source': [None, 4]})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from learner.online.prequential import RankTally
from serving.fused import FUSED_WEIGHTS, CoocAlignment, standardise
from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS, ItemCooccurrence, ranks_with_ties_against
from stream.user_state import Example

BASELINES = ("popularity", "cooc_target", "cooc_target_source")
_MODES = {"cooc_target": "target", "cooc_target_source": "target+source"}
# Called for each target example before it is learnt: (its position among the target examples, the
# example, rankable, its target-history co-occurrence scores, one per co-occurrence row; None when not
# rankable).
TargetHook = Callable[[int, Example, bool, "np.ndarray | None"], None]


class ShadowBaselines:
    """Popularity and item co-occurrence rankers over the stream, ranked before they learn an event."""

    def __init__(
        self, source: str, target: str, max_history: int = 50, max_neighbours: int | None = DEFAULT_MAX_NEIGHBOURS
    ) -> None:
        self.source, self.target = source, target
        self.cooc = ItemCooccurrence(source, target, max_history=max_history, max_neighbours=max_neighbours)

    def rank(self, examples: Sequence[Example]) -> tuple[list[bool], dict[str, list[int | None]]]:
        """Rank each target-domain example's item with every baseline; returns the rankable flags and the
        ranks by baseline (None: never seen, a miss). Learns nothing."""
        rankable: list[bool] = []
        ranks: dict[str, list[int | None]] = {name: [] for name in BASELINES}
        for ex in examples:
            flag, _ = self._rank_one(ex, ranks)
            rankable.append(flag)
        return rankable, ranks

    def _rank_one(self, ex: Example, ranks: dict[str, list[int | None]]) -> tuple[bool, np.ndarray | None]:
        """Append ``ex``'s rank by every baseline to ``ranks``; returns whether it is rankable and its
        target-history co-occurrence scores (None when not rankable)."""
        if ex.domain != self.target:
            raise ValueError(f"only {self.target!r} events are ranked, got an event of {ex.domain!r}")
        cooc = self.cooc
        positive = cooc.row(ex.item_id)
        if positive is None:
            for name in BASELINES:
                ranks[name].append(None)
            return False, None
        excluded = [r for r in map(cooc.row, consumed_items(ex, self.target)) if r is not None]
        target_scores, both_scores = cooc.scores_target_and_both(ex.history)
        by_baseline = ranks_with_ties_against(np.stack([cooc.counts, target_scores, both_scores]), positive, excluded)
        for name, rank in zip(("popularity", "cooc_target", "cooc_target_source"), by_baseline.tolist(), strict=True):
            ranks[name].append(rank)
        return True, target_scores

    def observe(
        self, examples: Sequence[Example], on_target: TargetHook | None = None, ranked: Sequence[bool] | None = None
    ) -> tuple[list[bool], dict[str, list[int | None]]]:
        """Test-then-train over ``examples`` in order: rank each target example (as ``rank``; ``on_target``
        sees it then, with its co-occurrence scores), then learn it; learn each source example. With
        ``ranked`` (one flag per example) only the flagged target examples are ranked; every example is
        learnt. Returns the ranked target examples' rankable flags and ranks."""
        rankable: list[bool] = []
        ranks: dict[str, list[int | None]] = {name: [] for name in BASELINES}
        for i, ex in enumerate(examples):
            if ex.domain == self.target and (ranked is None or ranked[i]):
                flag, target_scores = self._rank_one(ex, ranks)
                if on_target is not None:
                    on_target(len(rankable), ex, flag, target_scores)
                rankable.append(flag)
            self.cooc.learn_example(ex)
        return rankable, ranks

    def learn(self, examples: Iterable[Example]) -> None:
        """Learn each example (both domains) against the history before it, in order."""
        self.cooc.learn_many(examples)

    def state_dict(self) -> dict[str, Any]:
        return {"cooc": self.cooc.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cooc = ItemCooccurrence.from_state_dict(state["cooc"])


def consumed_items(example: Example, domain: str) -> tuple[str, ...]:
    """The items of ``domain`` the example's user consumed before it (its history, oldest first).

    >>> consumed_items(Example("e", "u", "book", "b3", 5, {"book": (("b1", "b2"), (1, 2))}), "book")
    ('b1', 'b2')
    >>> consumed_items(Example("e", "u", "book", "b3", 5, {}), "book")
    ()
    """
    items, _ = example.history.get(domain, ((), ()))
    return tuple(items)


class FusedShadow:
    """The fused ranker (:mod:`serving.fused`), ranked test-then-train on the target events, for a grid of
    weights; serving is told the weight to use (``weight``, chosen by ``choose`` at each publish).

    Per target event (``rank``): the served model's scores of every served item (None for a user without
    published vectors) and the target-history co-occurrence scores the shadow baselines rank with (before
    the event is learnt), aligned on the served items, are each standardised over all served items, then
    ``z_model + w * z_cooc`` ranks the held-out item for every ``w`` of ``weights``: ties against it, the
    user's earlier target items excluded, an item that is not served is a miss. Each weight has its own
    :class:`RankTally`; ``rank`` returns the rank at the weight served then, which the trainer tallies as
    the ``fused`` ranker: so the ``fused`` figures are exactly what ``/recommend`` answers with (the weight
    is chosen on events before the ones it ranks, never on the same ones).

    Events of users with no target history (cold) are tallied apart, over ``(0, *weights)``, and get their own
    weight (``weight_cold``; 0: the model's score alone): for them co-occurrence holds nothing but its
    popularity tie-break, which the model may already rank with (its popularity prior), so the weight the
    users with history deserve is no guide. Serving tells the two apart the same way (an empty consumed
    history; ``EmbeddingBatch.fused_weight_cold``).

    ``choose()`` picks the weight with the best NDCG@k over the last ``window`` target events (the current
    one kept on ties, and while no event was ranked), and the cold one over the last ``window`` cold events. A window, not the whole stream: the model learns as
    the stream goes on, so the weight it deserves falls, and the first events (an untrained model) should
    not decide it; 10,000 target events hold over 100 hits at NDCG@10 ~0.015, and the weights' ranks are
    paired on the same events, so neighbouring weights are told apart by far fewer than that.

    >>> fused = FusedShadow(weights=(0.5, 2.0), k=1, window=100)
    >>> co = ItemCooccurrence("movie", "book")
    >>> for history, item in [((), "a"), (("a",), "b"), ((), "c"), ((), "c")]:
    ...     co.learn({"book": history}, "book", item)
    >>> ex = Example("e", "u", "book", "b", 0, {"book": (("a",), ())})  # u read a, now b
    >>> served = ("c", "b", "a")  # z(model [3, 1, 0]) = [1.34, -0.27, -1.07]; z(cooc with a) = [-0.71, 1.41, -0.71]
    >>> fused.weight, fused.rank(ex, served, np.array([3.0, 1.0, 0.0]), 1, [2], co, None, True)
    (2.0, 1)
    >>> {w: t.figures("window")["window"]["hr"] for w, t in fused.tallies.items()}  # w=0.5: c (0.98) beats b (0.44)
    {0.5: 0.0, 2.0: 1.0}
    """

    def __init__(self, weights: Sequence[float] = FUSED_WEIGHTS, k: int = 10, window: int = 10_000,
                 name: str = "fused") -> None:
        """``name``: the prefix of its ``stats`` keys."""
        if not weights or len(set(weights)) != len(weights) or not all(0 < w < math.inf for w in weights):
            raise ValueError(f"weights must be distinct finite numbers > 0, got {list(weights)}")
        self.name = name
        self.weights = tuple(float(w) for w in weights)
        self.tallies = {w: RankTally(k, window) for w in self.weights}
        self.weight = self.weights[len(self.weights) // 2]  # served before any evidence: the grid's middle
        self.weights_cold = (0.0, *self.weights)
        self.tallies_cold = {w: RankTally(k, window) for w in self.weights_cold}
        self.weight_cold = self.weight  # as the others' until the cold events say otherwise
        self._align: CoocAlignment | None = None
        self._weights_column = np.array(self.weights, dtype=np.float64)[:, None]  # (W, 1), tallies' order
        self._weights_column_cold = np.array(self.weights_cold, dtype=np.float64)[:, None]  # (W + 1, 1)

    def rank(
        self,
        ex: Example,
        served_ids: Sequence[str],
        model_scores: np.ndarray | None,  # (N,) over served_ids, None: the user has no published vectors
        positive: int | None,  # the item's position in served_ids, None: not served (a miss)
        excluded: Sequence[int],  # positions of the user's earlier target items
        cooc: ItemCooccurrence,
        cooc_scores: np.ndarray | None,  # (n_cooc_items,) target-history scores, None: compute them
        rankable: bool,
    ) -> int | None:
        """Rank ``ex`` with every weight of its slot (each tallied); returns the rank at the slot's served weight
        (``weight``, or ``weight_cold`` for a user with no target history)."""
        cold = not consumed_items(ex, cooc.target)  # as serving: no consumed target items
        tallies = self.tallies_cold if cold else self.tallies
        if positive is None:
            for tally in tallies.values():
                tally.record(None, rankable)
            return None
        if self._align is None:
            self._align = CoocAlignment(served_ids)
        elif self._align.item_ids is not served_ids:  # served items grew (or changed): catch up, not redo
            self._align = self._align.extended(served_ids)
        if cooc_scores is None:
            cooc_scores = cooc.scores(ex.history, "target")
        z_cooc = standardise(self._align.gather(cooc, cooc_scores))  # (N,)
        z_model = None if model_scores is None else standardise(model_scores)  # (N,)
        # Every weight at once: row w of (W, N) is combine(z_model, z_cooc, w), element for element the same
        # arithmetic (serving's), ranked in one pass (a loop per weight cost twice as much).
        weights = self._weights_column_cold if cold else self._weights_column  # (W, 1)
        fused = (np.broadcast_to(z_cooc, (len(weights), len(z_cooc))) if z_model is None  # serving.fused.combine
                 else z_model[None, :] + weights * z_cooc[None, :])
        ranks = ranks_with_ties_against(fused, positive, excluded).tolist()
        served_rank = None
        served_weight = self.weight_cold if cold else self.weight
        for (w, tally), r in zip(tallies.items(), ranks, strict=True):
            tally.record(r, rankable)
            if w == served_weight:
                served_rank = r
        return served_rank

    def ndcg(self, weight: float, cold: bool = False) -> float:
        return float((self.tallies_cold if cold else self.tallies)[weight].figures("window")["window"]["ndcg"])

    def choose(self) -> float:
        """The weight to serve from now on: the best windowed NDCG@k (the current one on ties); the cold
        weight likewise from the cold events (``weight_cold``)."""
        self.weight = self._best(self.weights, self.weight, cold=False)
        self.weight_cold = self._best(self.weights_cold, self.weight_cold, cold=True)
        return self.weight

    def _best(self, grid: tuple[float, ...], current: float, cold: bool) -> float:
        scores = {w: self.ndcg(w, cold) for w in grid}
        valid = {w: v for w, v in scores.items() if not math.isnan(v)}
        if valid:
            best = max(valid.values())
            if valid.get(current, -math.inf) < best:
                return next(w for w in grid if valid.get(w) == best)
        return current

    def stats(self) -> dict[str, float]:
        out = {f"{self.name}_weight": self.weight, f"{self.name}_weight_cold": self.weight_cold}
        for w in self.weights:
            out[f"{self.name}_w{w:g}_ndcg_at_{self.tallies[w].k}_window"] = self.ndcg(w)
        for w in self.weights_cold:
            out[f"{self.name}_cold_w{w:g}_ndcg_at_{self.tallies_cold[w].k}_window"] = self.ndcg(w, cold=True)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "tallies": {str(w): t.state_dict() for w, t in self.tallies.items()},
                "weight_cold": self.weight_cold,
                "tallies_cold": {str(w): t.state_dict() for w, t in self.tallies_cold.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: the served weights (if still in the grids) and each weight's tally (a
        checkpoint from before the cold slot: the cold weight follows the other until cold events choose)."""
        for tallies, key in ((self.tallies, "tallies"), (self.tallies_cold, "tallies_cold")):
            for weight, tally_state in (state.get(key) or {}).items():
                if float(weight) in tallies:
                    tallies[float(weight)] = RankTally.from_state_dict(tally_state, tallies[float(weight)].window)
        if float(state["weight"]) in self.tallies:
            self.weight = float(state["weight"])
        cold = state.get("weight_cold", self.weight)  # older checkpoints: the cold weight follows the other
        if float(cold) in self.tallies_cold:
            self.weight_cold = float(cold)
