"""Offline evaluation, paper style: ranking, model selection, refit and test over a ``learner.offline.eval_split``.

Protocol (the choices, written down once; ``results.md`` repeats them through ``learner.offline.eval_report``;
the split, examples, known items, negatives and query views are in ``learner.offline.eval_split``):

- Known items: the target items of the events a model has learnt: the training events when ranking
  validation queries, the training and refit events when ranking test queries. Candidates are the known
  items minus the target items the user consumed before the held-out event, other than the held-out item
  itself (a repeated item stays rankable, as in the stream's prequential). A held-out item that is not
  known is a *miss* in every protocol (rank ``MISS_RANK`` = 2**62: 0 in HR and NDCG, 2e-19 in MRR);
  the rankable-only figures (queries whose item is known) and the rankable fraction are reported too.
- Ranks are 1-based and ties count against the held-out item (``learner.offline.metrics``).
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
  and is validated once. Then every model learns the refit examples and the test queries are ranked
  once. A counting model counts them once. An iterative model either *retrains* (``refit_mode
  "retrain"``, the default: back to its untrained initial state, then as many epochs as selection chose
  over the training and refit examples together, so an item first seen in the refit period gets as many
  passes as a training item) or *continues* (``"continue"``: ``refit_passes`` more passes over the refit
  examples from the selected epoch's state). ``refit_passes = 0`` refits nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from learner.core.config import TRANSFER_SCALES
from learner.offline.baselines import Ranker
from learner.offline.eval_split import Query, Split, query_inputs
from learner.offline.metrics import ranks_excluding, ranks_sampled, summarize

log = logging.getLogger(__name__)

SELECTION_METRIC = "ndcg@10"
VIEWS = ("overlap", "cold_start")
SETTINGS = ("full/overlap", "full/cold_start", "sampled/overlap", "sampled/cold_start",
            "c2dsr/overlap", "c2dsr/cold_start", "full/overlap/rankable", "full/cold_start/rankable")
SCORE_BATCH = 256  # queries scored at once: (256, 39k) float64 scores are 80 MB
REFIT_MODES = ("retrain", "continue")
MISS_RANK = 2**62  # rank of a held-out item no model can rank (never learnt): 0 in HR and NDCG, 2e-19 in MRR


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
    # full-protocol rank of every test query per view ("full/overlap", "full/cold_start"), in split.test's
    # order: what a paired comparison of two rows on the same queries needs (learner.offline.significance)
    test_ranks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)




def tune_transfer_scale(ranker: Ranker, split: Split, known: np.ndarray | None = None,
                        grid: Sequence[float] = TRANSFER_SCALES) -> dict[str, Any]:
    """Choose a SITN ranker's query-time transfer scale (warm, cold) on the validation queries.

    ``warm`` (users with target history) maximises the full-protocol NDCG@10 of the overlap view, ``cold``
    that of the cold-start view (target history hidden); the grid starts at 1, the scale training used, and
    a later value must be strictly better to be chosen. The ranker is left at the chosen scales. Returns the
    choice and every value tried (empty for a ranker without a transfer path).
    """
    if getattr(ranker, "transfer_scale", None) is None:
        return {}
    known = split.known("validation") if known is None else known
    found: dict[str, Any] = {}
    chosen = [1.0, 1.0]
    for slot, view in ((0, "overlap"), (1, "cold_start")):
        values: dict[float, float] = {}
        for scale in grid:
            trial = list(chosen)
            trial[slot] = scale
            ranker.transfer_scale = (trial[0], trial[1])  # type: ignore[attr-defined]
            values[scale] = summarize(rank_queries(ranker, split.validation, split, known, view=view).full)[
                SELECTION_METRIC]
        chosen[slot] = max(values, key=lambda k: (values[k], -list(grid).index(k)))
        found[f"val_{view}_by_scale"] = {f"{k:g}": v for k, v in values.items()}
    ranker.transfer_scale = (chosen[0], chosen[1])  # type: ignore[attr-defined]
    found["transfer_scale"] = chosen
    log.info("transfer scale tuned model=%s warm=%g cold=%g grid=%s", getattr(ranker, "name", "?"), chosen[0],
             chosen[1], {k: v for k, v in found.items() if k.endswith("_by_scale")})
    return found


@dataclass
class Selection:
    """What model selection on validation found; the ranker is left at the chosen epoch."""

    epoch: int
    val: dict[str, float]
    curve: list[float]
    epochs: list[dict[str, float]]
    train_s: float
    initial: object = None  # the ranker's state before the first epoch (kept for a retraining refit)
    transfer: dict[str, Any] = field(default_factory=dict)  # tune_transfer_scale's choice (SITN rows)

    def apply(self, ranker: Ranker) -> None:
        """Put the choices made on validation (beyond the epoch) back on ``ranker``, e.g. after a refit."""
        if self.transfer:
            ranker.transfer_scale = tuple(self.transfer["transfer_scale"])  # type: ignore[attr-defined]


def select_epoch(
    ranker: Ranker,
    split: Split,
    *,
    max_epochs: int,
    patience: int,
    diagnostics: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
    keep_initial: bool = False,
    tune_transfer: bool = True,
) -> Selection:
    """Train epoch by epoch on the training examples, pick the epoch on validation, restore it.

    Each epoch's log holds ``train_s``, ``val_s`` (one pass over the validation queries) and the
    validation HR@10/NDCG@10; with ``diagnostics`` also ``val_no_source_ndcg@10`` (the source history
    blanked at query time), ``val_cold_ndcg@10`` (the target history blanked, user id withheld: the
    cold-start view) and ``probe_hr@10``/``probe_ndcg@10`` (training queries: memorisation).
    A counting ranker (``iterative`` False) learns once and is validated once. With ``keep_initial``
    an iterative ranker's untrained state is kept in ``Selection.initial`` (for :func:`refit`). With
    ``tune_transfer`` a SITN ranker's query-time transfer scale is then chosen on validation
    (:func:`tune_transfer_scale`, in ``Selection.transfer``; ``Selection.val`` is the overlap figure at it).
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
    initial = ranker.snapshot("initial") if keep_initial and ranker.iterative else None
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
            cold = summarize(rank_queries(ranker, split.validation, split, known, view="cold_start").full)
            entry["val_cold_ndcg@10"] = cold["ndcg@10"]
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
            best_state = ranker.snapshot("best") if ranker.iterative and epoch < max_epochs else None
        elif epoch - best_epoch >= patience:
            break
    if best_epoch != epoch:
        ranker.restore(best_state)
    transfer = tune_transfer_scale(ranker, split, known) if tune_transfer else {}
    if transfer:
        chosen = tuple(transfer["transfer_scale"])
        best_val = dict(best_val, **{SELECTION_METRIC: transfer["val_overlap_by_scale"][f"{chosen[0]:g}"]})
    return Selection(best_epoch, best_val, curve, epochs, train_s, initial, transfer)


def refit(ranker: Ranker, split: Split, passes: int, mode: str = "continue", selection: Selection | None = None) -> float:
    """Learn the refit examples before test; returns the seconds spent. ``passes = 0`` skips refitting.

    A counting ranker learns them once. An iterative ranker with ``mode="retrain"`` goes back to
    ``selection.initial`` and trains ``selection.epoch`` epochs over the training and refit examples
    together (each epoch one shuffled ``learn_many``); with ``mode="continue"`` it takes ``passes`` more
    passes over the refit examples from its current (selected) state.
    """
    if passes < 0:
        raise ValueError(f"refit passes must be >= 0, got {passes}")
    if mode not in REFIT_MODES:
        raise ValueError(f"refit mode must be one of {REFIT_MODES}, got {mode!r}")
    t0 = time.perf_counter()
    if passes == 0:
        return 0.0
    if not ranker.iterative:
        ranker.learn_many(split.refit_examples)
    elif mode == "retrain":
        if selection is None or selection.initial is None:
            raise ValueError("a retraining refit needs the selection's initial state (select_epoch(keep_initial=True))")
        ranker.restore(selection.initial)
        examples = [*split.train_examples, *split.refit_examples]
        for _ in range(selection.epoch):
            ranker.learn_many(examples)
    else:
        for _ in range(passes):
            ranker.learn_many(split.refit_examples)
    return time.perf_counter() - t0


def rank_test_queries(ranker: Ranker, split: Split, seed: int, refit_passes: int,
                      ranks_out: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Every setting of ``SETTINGS`` on the test queries; ``ranks_out`` receives each view's full-protocol
    ranks (``"full/<view>"`` -> ``(N,)``)."""
    refitted = refit_passes > 0
    negatives = {p: split.test_negatives(p, seed, refitted) for p in ("sampled", "c2dsr")}
    out: dict[str, dict[str, float]] = {}
    for view in VIEWS:
        ranks = rank_queries(ranker, split.test, split, split.known("test", refitted), view=view, negatives=negatives)
        out[f"full/{view}"] = summarize(ranks.full)
        if ranks_out is not None:
            ranks_out[f"full/{view}"] = ranks.full
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
    refit_mode: str = "continue",
    diagnostics: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Select the epoch on validation, refit on the refit examples, then rank the test queries once."""
    selection = select_epoch(ranker, split, max_epochs=max_epochs, patience=patience, diagnostics=diagnostics,
                             on_epoch=on_epoch, keep_initial=refit_mode == "retrain" and refit_passes > 0)
    refit_s = refit(ranker, split, refit_passes, refit_mode, selection)
    selection.apply(ranker)  # a retraining refit starts from the initial state, scales included
    ranks: dict[str, np.ndarray] = {}
    test = rank_test_queries(ranker, split, seed, refit_passes, ranks)
    return RunResult(selection.epoch, selection.train_s, selection.curve, selection.val, test, selection.epochs,
                     refit_s, extra=dict(selection.transfer), test_ranks=ranks)


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
