"""The offline evaluation's data split: per user chronological, with causal examples and queries.

- Events come from ``stream.dataset.load_events``: chronological, same-second ties in file order. A
  user's order is the order of their events in that list.
- Split, per user, on the target domain: the user's last target event is the *test* event, the target
  event before it the *validation* event. Training events are all of the user's events (both domains)
  strictly before the validation event (SASRec's ``seq[:-2]``). *Refit* events are the user's events
  from the validation event up to, not including, the test event (the validation event and the source
  events between the two). Events from the test event on are never learnt. Users with fewer than 3
  target events have no validation/test query; all their events train.
- Examples and query histories come from one ``stream.user_state.UserStateStore`` pass over all events
  (the stream's causal example builder): an example or query carries the user's last ``max_len`` events
  per domain strictly before it, so the test history contains the validation item.
- Known items: the target items of the events a model has learnt: the training events when ranking
  validation queries, the training and refit events when ranking test queries.
- Sampled negatives come from the known items minus the held-out item and the user's consumed items:
  99 distinct ones (our sampled protocol) or 999 independent draws (C2DSR's rule), seeded by the run
  seed, the same for every model of a seed.
- Views of a query: *overlap* (both histories, the user id), *cold_start* (the target history emptied,
  the user id withheld), and for diagnostics *no_source* (the source history emptied).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from learner.offline.baselines import History
from stream.events import InteractionEvent
from stream.user_state import Example, UserStateStore

log = logging.getLogger(__name__)

N_SAMPLED_NEGATIVES = 99
N_C2DSR_NEGATIVES = 999
DEFAULT_PROBE_USERS = 2000


@dataclass(frozen=True, slots=True)
class Query:
    """One held-out target event and what a model may see of the user before it."""

    user_id: str
    item_id: str  # the held-out target item
    history: History  # per domain, the last max_len (item_ids, timestamps) before the held-out event
    consumed: frozenset[str]  # every target item of the user before the held-out event (not truncated), but the
    #                           held-out item itself: a repeat stays rankable, as in the stream's prequential


@dataclass
class Split:
    """Training and refit examples, the validation/test queries and a probe of training queries."""

    source: str
    target: str
    train_events: list[InteractionEvent]
    train_examples: list[Example]  # causal examples of train_events, chronological
    refit_examples: list[Example]  # causal examples of the refit events, chronological
    validation: list[Query]
    test: list[Query]
    train_probe: list[Query]  # the last training target event of a fixed sample of users
    catalogue: list[str]  # target item ids, first-appearance order: the score columns
    source_items: list[str]
    known_validation: np.ndarray  # (C,) bool: target items of the training events
    known_test: np.ndarray  # (C,) bool: target items of the training and refit events
    n_users: int
    stats: dict[str, int] = field(default_factory=dict)
    _negatives: dict[tuple[str, int, bool], np.ndarray] = field(default_factory=dict, repr=False)

    def known(self, phase: str, refit: bool = True) -> np.ndarray:
        """``(C,)`` known-item mask for ranking ``phase`` ("validation" or "test")."""
        if phase not in ("validation", "test"):
            raise ValueError(f"phase must be 'validation' or 'test', got {phase!r}")
        return self.known_test if phase == "test" and refit else self.known_validation

    def test_negatives(self, protocol: str, seed: int, refit: bool) -> np.ndarray:
        """The test queries' negatives of ``protocol`` ("sampled" or "c2dsr") for ``seed``, drawn once."""
        key = (protocol, seed, refit)
        if key not in self._negatives:
            n, replace = {"sampled": (N_SAMPLED_NEGATIVES, False), "c2dsr": (N_C2DSR_NEGATIVES, True)}[protocol]
            self._negatives[key] = sample_negatives(
                self.test, self.catalogue, self.known("test", refit), n, seed=[seed, n], replace=replace
            )
        return self._negatives[key]


def chronological_split(
    events: Sequence[InteractionEvent],
    source: str,
    target: str,
    max_len: int = 50,
    probe_users: int = DEFAULT_PROBE_USERS,
) -> Split:
    """Split chronological ``events`` as the module docstring describes.

    ``probe_users`` users with a query (a seeded sample, seed 0) give a training query each: their last
    training target event with the history before it (memorisation diagnostics).
    """
    if probe_users < 0:
        raise ValueError(f"probe_users must be >= 0, got {probe_users}")
    by_user: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        by_user.setdefault(e.user_id, []).append(i)
    held_out: dict[int, str] = {}  # event index -> "validation" | "test"
    cut: dict[str, tuple[int, int]] = {}  # user -> (validation index, test index)
    probe_at: dict[int, str] = {}  # event index -> user, the user's last training target event
    for user_id, indices in by_user.items():
        target_indices = [i for i in indices if events[i].domain == target]
        if len(target_indices) >= 3:
            held_out[target_indices[-2]] = "validation"
            held_out[target_indices[-1]] = "test"
            cut[user_id] = (target_indices[-2], target_indices[-1])
            probe_at[target_indices[-3]] = user_id
    probed = set(random.Random(0).sample(sorted(cut), min(probe_users, len(cut))))

    train_events: list[InteractionEvent] = []
    train_examples: list[Example] = []
    refit_examples: list[Example] = []
    queries: dict[str, list[Query]] = {"validation": [], "test": [], "probe": []}
    consumed: dict[str, set[str]] = {}
    store = UserStateStore((source, target), max_len=max_len, max_users=max(1, len(by_user)))
    catalogue: dict[str, None] = {}
    source_items: dict[str, None] = {}
    no_cut = (len(events), len(events))
    for i, e in enumerate(events):
        (catalogue if e.domain == target else source_items)[e.item_id] = None
        example = store.observe(e)
        kind = held_out.get(i) or ("probe" if probe_at.get(i) in probed else None)
        if kind is not None:
            queries[kind].append(
                Query(e.user_id, e.item_id, example.history, frozenset(consumed.get(e.user_id, ())) - {e.item_id})
            )
        validation_at, test_at = cut.get(e.user_id, no_cut)
        if i < validation_at:
            train_events.append(e)
            train_examples.append(example)
        elif i < test_at:
            refit_examples.append(example)
        if e.domain == target:
            consumed.setdefault(e.user_id, set()).add(e.item_id)
    columns = list(catalogue)
    index = {item_id: j for j, item_id in enumerate(columns)}
    known_validation = np.zeros(len(columns), dtype=bool)
    known_validation[[index[ex.item_id] for ex in train_examples if ex.domain == target]] = True
    known_test = known_validation.copy()
    known_test[[index[ex.item_id] for ex in refit_examples if ex.domain == target]] = True
    split = Split(
        source, target, train_events, train_examples, refit_examples, queries["validation"], queries["test"],
        queries["probe"], columns, list(source_items), known_validation, known_test, len(by_user),
    )
    split.stats = {
        "events": len(events),
        "train_events": len(train_events),
        "refit_events": len(refit_examples),
        "users": len(by_user),
        "eval_users": len(cut),
        "catalogue_items": len(columns),
        "source_items": len(source_items),
        "known_items_validation": int(known_validation.sum()),
        "known_items_test": int(known_test.sum()),
    }
    update_query_stats(split)
    log.info("split %s", " ".join(f"{k}={v}" for k, v in split.stats.items()))
    return split


def update_query_stats(split: Split, refit: bool = True) -> None:
    """Query counts and rankable counts (held-out item known) of ``split.stats``; without ``refit`` a
    test item must be known from the training events alone."""
    index = {item_id: j for j, item_id in enumerate(split.catalogue)}
    for name, queries, known in (("val", split.validation, split.known_validation),
                                 ("test", split.test, split.known("test", refit)),
                                 ("probe", split.train_probe, split.known_validation)):
        split.stats[f"{name}_queries"] = len(queries)
        split.stats[f"{name}_rankable"] = int(sum(bool(known[index[q.item_id]]) for q in queries))


def subsample_queries(split: Split, val_users: int, test_users: int) -> Split:
    """Keep a fixed subset (seed 0, the same for every row and seed) of the validation/test queries
    (0 = keep all)."""
    rng = random.Random(0)
    if 0 < val_users < len(split.validation):
        split.validation = sorted(rng.sample(split.validation, val_users), key=split.validation.index)
    if 0 < test_users < len(split.test):
        split.test = sorted(rng.sample(split.test, test_users), key=split.test.index)
    split._negatives.clear()
    update_query_stats(split)
    return split


def cold_start_history(history: History, target: str) -> History:
    """The history with the target domain emptied.

    >>> cold_start_history({"movie": (("m1",), (1,)), "book": (("b1",), (2,))}, "book")
    {'movie': (('m1',), (1,)), 'book': ((), ())}
    """
    return {d: (((), ()) if d == target else seq) for d, seq in history.items()}


def query_inputs(
    queries: Sequence[Query], view: str, source: str, target: str
) -> tuple[list[str | None], list[History]]:
    """User ids and histories a model sees for ``queries`` in ``view``.

    >>> q = Query("u", "b2", {"movie": (("m1",), (1,)), "book": (("b1",), (2,))}, frozenset({"b1"}))
    >>> query_inputs([q], "no_source", "movie", "book")
    (['u'], [{'movie': ((), ()), 'book': (('b1',), (2,))}])
    >>> query_inputs([q], "cold_start", "movie", "book")
    ([None], [{'movie': (('m1',), (1,)), 'book': ((), ())}])
    """
    if view == "overlap":
        return [q.user_id for q in queries], [q.history for q in queries]
    if view == "cold_start":
        return [None] * len(queries), [cold_start_history(q.history, target) for q in queries]
    if view == "no_source":
        return [q.user_id for q in queries], [cold_start_history(q.history, source) for q in queries]
    raise ValueError(f"view must be 'overlap', 'cold_start' or 'no_source', got {view!r}")


def sample_negatives(
    queries: Sequence[Query],
    catalogue: Sequence[str],
    known: np.ndarray,
    n_negatives: int,
    seed: int | list[int],
    *,
    replace: bool = False,
) -> np.ndarray:
    """``(N, n_negatives)`` catalogue columns per query, drawn uniformly from the candidates: known
    items minus the held-out item minus the user's consumed items. ``replace=False``: distinct
    negatives (our sampled protocol); ``replace=True``: independent draws (C2DSR's rule).

    >>> q = Query("u", "b1", {}, frozenset({"b2"}))
    >>> known = np.array([True, True, True, True, False])
    >>> sorted(sample_negatives([q], ["b1", "b2", "b3", "b4", "b5"], known, 2, seed=0)[0].tolist())
    [2, 3]
    >>> sorted(set(sample_negatives([q], ["b1", "b2", "b3", "b4", "b5"], known, 9, 0, replace=True)[0].tolist()))
    [2, 3]
    """
    index = {item_id: i for i, item_id in enumerate(catalogue)}
    pool = np.flatnonzero(known)  # (K,) the known columns
    position = np.full(len(catalogue), -1, dtype=np.int64)
    position[pool] = np.arange(len(pool))
    rng = np.random.default_rng(seed)
    out = np.empty((len(queries), n_negatives), dtype=np.int64)
    for n, q in enumerate(queries):
        banned_cols = {index[q.item_id], *(index[c] for c in q.consumed if c in index)}
        banned = np.array(sorted(position[c] for c in banned_cols if position[c] >= 0), dtype=np.int64)
        allowed = len(pool) - len(banned)
        if allowed < (1 if replace else n_negatives):
            raise ValueError(
                f"{len(pool)} known items, {len(banned)} of them banned for user {q.user_id!r}: "
                f"cannot draw {n_negatives} negatives {'with' if replace else 'without'} replacement"
            )
        if replace:
            draws = rng.integers(0, len(pool), size=n_negatives)
            bad = np.isin(draws, banned)
            while bad.any():  # rejection sampling, as C2DSR's loader does per draw
                draws[bad] = rng.integers(0, len(pool), size=int(bad.sum()))
                bad = np.isin(draws, banned)
        else:  # the first n_negatives non-banned items of a random permutation prefix: uniform
            prefix = rng.choice(len(pool), size=min(len(pool), n_negatives + len(banned)), replace=False)
            draws = prefix[~np.isin(prefix, banned)][:n_negatives]
        out[n] = pool[draws]
    return out
