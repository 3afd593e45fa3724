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
for it); that flag is the same for every ranker, the model included (``learner.prequential``). Cost, measured on the full Movie->Book replay
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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from stream.cooccurrence import ItemCooccurrence, rank_with_ties_against
from stream.user_state import Example

BASELINES = ("popularity", "cooc_target", "cooc_target_source")
_MODES = {"cooc_target": "target", "cooc_target_source": "target+source"}


class ShadowBaselines:
    """Popularity and item co-occurrence rankers over the stream, ranked before they learn an event."""

    def __init__(self, source: str, target: str, max_history: int = 50) -> None:
        self.source, self.target = source, target
        self.cooc = ItemCooccurrence(source, target, max_history=max_history)

    def rank(self, examples: Sequence[Example]) -> tuple[list[bool], dict[str, list[int | None]]]:
        """Rank each target-domain example's item with every baseline; returns the rankable flags and the
        ranks by baseline (None: never seen, a miss). Learns nothing."""
        rankable: list[bool] = []
        ranks: dict[str, list[int | None]] = {name: [] for name in BASELINES}
        cooc = self.cooc
        for ex in examples:
            if ex.domain != self.target:
                raise ValueError(f"only {self.target!r} events are ranked, got an event of {ex.domain!r}")
            positive = cooc.row(ex.item_id)
            rankable.append(positive is not None)
            if positive is None:
                for name in BASELINES:
                    ranks[name].append(None)
                continue
            excluded = [r for r in map(cooc.row, consumed_items(ex, self.target)) if r is not None]
            ranks["popularity"].append(rank_with_ties_against(cooc.counts, positive, excluded))
            for name, mode in _MODES.items():
                ranks[name].append(rank_with_ties_against(cooc.scores(ex.history, mode), positive, excluded))
        return rankable, ranks

    def observe(self, examples: Sequence[Example]) -> tuple[list[bool], dict[str, list[int | None]]]:
        """Test-then-train over ``examples`` in order: rank each target example (as ``rank``), then learn
        it; learn each source example. Returns the target examples' rankable flags and ranks."""
        rankable: list[bool] = []
        ranks: dict[str, list[int | None]] = {name: [] for name in BASELINES}
        for ex in examples:
            if ex.domain == self.target:
                flags, one = self.rank((ex,))
                rankable += flags
                for name in BASELINES:
                    ranks[name] += one[name]
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
