"""Offline evaluation, paper style: per-user chronological split, refit, full-catalogue and sampled ranking.

Protocol (the choices, written down once; ``results.md`` repeats them through ``learner.eval_report``):

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
  validation queries, the training and refit events when ranking test queries. Candidates are the known
  items minus the target items the user consumed before the held-out event. A held-out item that is not
  known is a *miss* in every protocol (rank ``MISS_RANK`` = 2**62: 0 in HR and NDCG, 2e-19 in MRR);
  the rankable-only figures (queries whose item is known) and the rankable fraction are reported too.
- Ranks are 1-based and ties count against the held-out item (``learner.metrics``).
- Full protocol: rank among all candidates. Sampled protocol: the held-out item and 99 negatives drawn
  uniformly without replacement from the candidates. C2DSR protocol: the held-out item and 999
  negatives, each drawn uniformly *with replacement* from the candidates (C2DSR's loader draws each
  negative independently from the whole target item list, rejecting only the held-out item). Negatives
  are seeded by the run seed, the same for every model of a seed.
- Views of a query: *overlap* (both histories, the user id), *cold_start* (the target history emptied,
  the user id withheld, same candidates), and for diagnostics *no_source* (the source history emptied).
- Model selection on validation only: after each epoch the full-protocol NDCG@10 over every validation
  query; training stops after ``patience`` epochs without improvement or at ``max_epochs`` and the best
  epoch's state is restored. A counting model (``iterative = False``) learns the training examples once
  and is validated once. Then every model learns the refit examples (``refit_passes`` passes for an
  iterative model, once for a counting one) and the test queries are ranked once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from learner.baselines import History, Ranker
from learner.metrics import ranks_excluding, ranks_sampled, summarize
from stream.events import InteractionEvent
from stream.user_state import Example, UserStateStore

log = logging.getLogger(__name__)

N_SAMPLED_NEGATIVES = 99
N_C2DSR_NEGATIVES = 999
SELECTION_METRIC = "ndcg@10"
VIEWS = ("overlap", "cold_start")
SETTINGS = ("full/overlap", "full/cold_start", "sampled/overlap", "sampled/cold_start",
            "c2dsr/overlap", "c2dsr/cold_start", "full/overlap/rankable", "full/cold_start/rankable")
DEFAULT_PROBE_USERS = 2000
SCORE_BATCH = 256  # queries scored at once: (256, 39k) float64 scores are 80 MB
MISS_RANK = 2**62  # rank of a held-out item no model can rank (never learnt): 0 in HR and NDCG, 2e-19 in MRR


@dataclass(frozen=True, slots=True)
class Query:
    """One held-out target event and what a model may see of the user before it."""

    user_id: str
    item_id: str  # the held-out target item
    history: History  # per domain, the last max_len (item_ids, timestamps) before the held-out event
    consumed: frozenset[str]  # every target item of the user before the held-out event (not truncated)


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
                Query(e.user_id, e.item_id, example.history, frozenset(consumed.get(e.user_id, ())))
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


@dataclass(frozen=True)
class KnownColumns:
    """The known catalogue columns of a phase: ``columns`` ``(K,)`` and each catalogue column's position
    among them (``position`` ``(C,)``, -1 for an unknown item). Ranking works on the ``(B, K)`` scores of
    the known columns only, so unknown items never need a mask."""

    columns: np.ndarray
    position: np.ndarray

    @classmethod
    def of(cls, known: np.ndarray) -> KnownColumns:
        columns = np.flatnonzero(known)
        position = np.full(len(known), -1, dtype=np.int64)
        position[columns] = np.arange(len(columns))
        return cls(columns, position)

    def locate(
        self, queries: Sequence[Query], index: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Per query: the held-out item's known position ``(B,)`` (0 where unknown), whether it is known
        ``(B,)``, and the known positions of the consumed items (the excluded candidates).

        >>> known = KnownColumns.of(np.array([True, False, True, True]))
        >>> q = Query("u", "b4", {}, frozenset({"b1", "b2"}))
        >>> known.locate([q], {"b1": 0, "b2": 1, "b3": 2, "b4": 3})
        (array([2]), array([ True]), [array([0])])
        """
        positive = self.position[[index[q.item_id] for q in queries]]  # (B,)
        consumed = []
        for q in queries:
            at = self.position[[index[c] for c in q.consumed if c in index]]
            consumed.append(at[at >= 0])
        rankable = positive >= 0
        return np.where(rankable, positive, 0), rankable, consumed


def full_ranks(
    known_scores: np.ndarray, positive: np.ndarray, rankable: np.ndarray, consumed: Sequence[np.ndarray]
) -> np.ndarray:
    """Ranks ``(B,)`` among the candidates: the known columns of ``known_scores`` ``(B, K)`` minus each
    row's ``consumed`` columns; an unrankable row is a miss (``MISS_RANK``), whatever its score.

    >>> s = np.array([[0.9, 0.1, 0.5], [0.2, 0.9, 0.0]])
    >>> ranks = full_ranks(s, np.array([1, 0]), np.array([True, False]), [np.array([2]), np.array([1])])
    >>> ranks.tolist() == [2, MISS_RANK]
    True
    """
    consumed = [c if ok else c[:0] for c, ok in zip(consumed, rankable, strict=True)]
    return np.where(rankable, ranks_excluding(known_scores, positive, consumed), MISS_RANK)


@dataclass
class Ranks:
    """Ranks of one set of queries: full protocol, rankable flags, and per sampled protocol."""

    full: np.ndarray  # (N,)
    rankable: np.ndarray  # (N,) bool
    sampled: dict[str, np.ndarray] = field(default_factory=dict)  # protocol -> (N,)


def rank_queries(
    ranker: Ranker,
    queries: Sequence[Query],
    split: Split,
    known: np.ndarray,
    *,
    view: str = "overlap",
    negatives: dict[str, np.ndarray] | None = None,
    batch_size: int = SCORE_BATCH,
) -> Ranks:
    """Score ``queries`` in batches and rank them under the full protocol and each sampled protocol of
    ``negatives`` (protocol name -> ``(N, S)`` catalogue columns)."""
    index = {item_id: i for i, item_id in enumerate(split.catalogue)}
    columns = KnownColumns.of(known)
    negatives = negatives or {}
    full: list[np.ndarray] = []
    rankable: list[np.ndarray] = []
    sampled: dict[str, list[np.ndarray]] = {name: [] for name in negatives}
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        user_ids, histories = query_inputs(batch, view, split.source, split.target)
        scores = np.asarray(ranker.score(user_ids, histories, columns.columns))  # (B, K) known columns only
        if scores.shape != (len(batch), len(columns.columns)):
            raise ValueError(f"{ranker.name}.score returned {scores.shape}, expected {(len(batch), len(columns.columns))}")
        at, ok, consumed = columns.locate(batch, index)
        full.append(full_ranks(scores, at, ok, consumed))
        rankable.append(ok)
        rows = np.arange(len(batch))
        for name, neg in negatives.items():
            cols = columns.position[neg[start:start + len(batch)]]  # (B, S) negatives are known items
            assert (cols >= 0).all(), "a negative outside the known items"
            ranks = ranks_sampled(scores[rows, at], scores[rows[:, None], cols])
            sampled[name].append(np.where(ok, ranks, MISS_RANK))
    return Ranks(np.concatenate(full), np.concatenate(rankable),
                 {name: np.concatenate(parts) for name, parts in sampled.items()})


@dataclass
class RunResult:
    """One model, one seed: the chosen epoch, validation and test metrics, per-epoch diagnostics."""

    epoch: int
    train_s: float
    val_curve: list[float]  # validation SELECTION_METRIC after each epoch
    val: dict[str, float]
    test: dict[str, dict[str, float]]  # setting -> metric -> value
    epochs: list[dict[str, float]] = field(default_factory=list)  # per-epoch log (see select_epoch)
    refit_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """What model selection on validation found; the ranker is left at the chosen epoch."""

    epoch: int
    val: dict[str, float]
    curve: list[float]
    epochs: list[dict[str, float]]
    train_s: float


def select_epoch(
    ranker: Ranker,
    split: Split,
    *,
    max_epochs: int,
    patience: int,
    diagnostics: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Selection:
    """Train epoch by epoch on the training examples, pick the epoch on validation, restore it.

    Each epoch's log holds ``train_s``, ``val_s`` (one pass over the validation queries) and the
    validation HR@10/NDCG@10; with ``diagnostics`` also ``val_no_source_ndcg@10`` (the source history
    blanked at query time) and ``probe_hr@10``/``probe_ndcg@10`` (training queries: memorisation).
    A counting ranker (``iterative`` False) learns once and is validated once.
    """
    if max_epochs < 1 or patience < 1:
        raise ValueError(f"max_epochs and patience must be >= 1, got {max_epochs} and {patience}")
    if not ranker.iterative:
        max_epochs = 1
    known = split.known("validation")
    best_value, best_epoch, best_val = -1.0, 0, {}
    best_state: object = None
    curve: list[float] = []
    epochs: list[dict[str, float]] = []
    train_s = 0.0
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        ranker.learn_many(split.train_examples)
        t1 = time.perf_counter()
        ranks = rank_queries(ranker, split.validation, split, known)
        val_s = time.perf_counter() - t1
        train_s += t1 - t0
        val = summarize(ranks.full)
        entry = {"epoch": float(epoch), "train_s": round(t1 - t0, 2), "val_s": round(val_s, 2),
                 "val_hr@10": val["hr@10"], "val_ndcg@10": val["ndcg@10"]}
        if diagnostics:
            no_source = summarize(rank_queries(ranker, split.validation, split, known, view="no_source").full)
            entry["val_no_source_ndcg@10"] = no_source["ndcg@10"]
            if split.train_probe:
                probe = summarize(rank_queries(ranker, split.train_probe, split, known).full)
                entry["probe_hr@10"], entry["probe_ndcg@10"] = probe["hr@10"], probe["ndcg@10"]
        epochs.append(entry)
        curve.append(val[SELECTION_METRIC])
        log.info("epoch model=%s %s", ranker.name, " ".join(f"{k}={v:.5g}" for k, v in entry.items()))
        if on_epoch is not None:
            on_epoch(epoch, val[SELECTION_METRIC])
        if val[SELECTION_METRIC] > best_value:
            best_value, best_epoch, best_val = val[SELECTION_METRIC], epoch, val
            best_state = ranker.snapshot() if ranker.iterative and epoch < max_epochs else None
        elif epoch - best_epoch >= patience:
            break
    if best_epoch != epoch:
        ranker.restore(best_state)
    return Selection(best_epoch, best_val, curve, epochs, train_s)


def refit(ranker: Ranker, split: Split, passes: int) -> float:
    """Learn the refit examples (``passes`` times for an iterative ranker, once for a counting one);
    returns the seconds spent. ``passes = 0`` skips refitting."""
    if passes < 0:
        raise ValueError(f"refit passes must be >= 0, got {passes}")
    t0 = time.perf_counter()
    for _ in range(min(passes, 1) if not ranker.iterative else passes):
        ranker.learn_many(split.refit_examples)
    return time.perf_counter() - t0


def rank_test_queries(ranker: Ranker, split: Split, seed: int, refit_passes: int) -> dict[str, dict[str, float]]:
    """Every setting of ``SETTINGS`` on the test queries."""
    refitted = refit_passes > 0
    negatives = {p: split.test_negatives(p, seed, refitted) for p in ("sampled", "c2dsr")}
    out: dict[str, dict[str, float]] = {}
    for view in VIEWS:
        ranks = rank_queries(ranker, split.test, split, split.known("test", refitted), view=view, negatives=negatives)
        out[f"full/{view}"] = summarize(ranks.full)
        for protocol, values in ranks.sampled.items():
            out[f"{protocol}/{view}"] = summarize(values)
        if ranks.rankable.any():
            out[f"full/{view}/rankable"] = summarize(ranks.full[ranks.rankable])
    return {s: out[s] for s in SETTINGS if s in out}


def train_and_test(
    ranker: Ranker,
    split: Split,
    *,
    max_epochs: int,
    patience: int,
    seed: int,
    refit_passes: int = 1,
    diagnostics: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Select the epoch on validation, refit on the refit examples, then rank the test queries once."""
    selection = select_epoch(ranker, split, max_epochs=max_epochs, patience=patience, diagnostics=diagnostics,
                             on_epoch=on_epoch)
    refit_s = refit(ranker, split, refit_passes)
    test = rank_test_queries(ranker, split, seed, refit_passes)
    return RunResult(selection.epoch, selection.train_s, selection.curve, selection.val, test, selection.epochs,
                     refit_s)


def aggregate(runs: Sequence[RunResult]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Mean and sample standard deviation (ddof=1; None for a single run) per setting and metric.

    >>> r = [RunResult(1, 0.0, [], {}, {"full/overlap": {"mrr": v}}) for v in (0.2, 0.4)]
    >>> out = aggregate(r)["full/overlap"]["mrr"]
    >>> round(out["mean"], 6), round(out["std"], 6)
    (0.3, 0.141421)
    """
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for setting in runs[0].test:
        out[setting] = {}
        for metric in runs[0].test[setting]:
            values = np.array([r.test[setting][metric] for r in runs])
            std = float(values.std(ddof=1)) if len(values) > 1 else None
            out[setting][metric] = {"mean": float(values.mean()), "std": std}
    return out
