"""Offline evaluation, paper style: per-user chronological split, full-catalogue and sampled ranking.

Protocol (the choices, written down once; ``results.md`` repeats them):

- Events come from ``stream.dataset.load_events``: chronological, same-second ties in file order. A
  user's order is the order of their events in that list.
- Split, per user, on the target domain: the user's last target event is the *test* event, the target
  event before it the *validation* event. Training events are all of the user's events (both domains)
  strictly before the validation event (SASRec's ``seq[:-2]``). Events after the validation event are
  never trained on. Users with fewer than 3 target events have no validation/test query; all their
  events train.
- A query's history is the user's last ``max_len`` events per domain strictly before the held-out
  event, built by ``stream.user_state.UserStateStore`` (the stream's causal example builder), so the
  test history contains the validation item. Training examples come from the same builder run over the
  training events only.
- Catalogue: every target-domain item id in the file, in first-appearance order.
- Candidates: the catalogue minus the target items the user consumed before the held-out event. The
  data never repeats a (user, item) pair, so the held-out item is never removed; serving excludes
  consumed items too. Cold-start queries use the same candidates as the warm ones, so that only the
  model input differs between the two rows.
- Ranks are 1-based and ties count against the held-out item (``learner.metrics``).
- Full protocol: rank among all candidates. Sampled protocol: rank among the held-out item and 99
  negatives drawn uniformly without replacement from the candidates, seeded by the run seed, the
  same for every model of a seed.
- Rows per model: *overlap* users (every user of the shipped data has both domains; the query carries
  both histories) and *cold-start* (the same test users, the target history emptied in the query, the
  user id withheld so no per-user parameter can leak it).
- Model selection on validation only: after each training epoch the full-protocol NDCG@10 on the
  validation queries is measured; training stops after ``patience`` epochs without improvement or at
  ``max_epochs``, the best epoch's state is restored, and the test queries are ranked once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from learner.baselines import History, Ranker
from learner.metrics import ranks_full, ranks_sampled, summarize
from stream.events import InteractionEvent
from stream.user_state import UserStateStore

if TYPE_CHECKING:
    from learner.config import SITNConfig

log = logging.getLogger(__name__)

N_SAMPLED_NEGATIVES = 99
SELECTION_METRIC = "ndcg@10"
SETTINGS = ("full/overlap", "full/cold_start", "sampled/overlap", "sampled/cold_start")


@dataclass(frozen=True, slots=True)
class Query:
    """One held-out target event and what a model may see of the user before it."""

    user_id: str
    item_id: str  # the held-out target item
    history: History  # per domain, the last max_len (item_ids, timestamps) before the held-out event
    consumed: frozenset[str]  # every target item of the user before the held-out event (not truncated)


@dataclass
class Split:
    """Training events and the validation/test queries of one data set."""

    source: str
    target: str
    train_events: list[InteractionEvent]
    validation: list[Query]
    test: list[Query]
    catalogue: list[str]  # target item ids
    source_items: list[str]
    n_users: int
    stats: dict[str, int] = field(default_factory=dict)


def chronological_split(
    events: Sequence[InteractionEvent], source: str, target: str, max_len: int = 50
) -> Split:
    """Split chronological ``events`` as the module docstring describes."""
    by_user: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        by_user.setdefault(e.user_id, []).append(i)
    held_out: dict[int, str] = {}  # event index -> "validation" | "test"
    cut: dict[str, int] = {}  # user -> index of the validation event (training stops before it)
    for user_id, indices in by_user.items():
        target_indices = [i for i in indices if events[i].domain == target]
        if len(target_indices) >= 3:
            held_out[target_indices[-2]] = "validation"
            held_out[target_indices[-1]] = "test"
            cut[user_id] = target_indices[-2]

    train_events: list[InteractionEvent] = []
    queries: dict[str, list[Query]] = {"validation": [], "test": []}
    consumed: dict[str, set[str]] = {}
    store = UserStateStore((source, target), max_len=max_len, max_users=max(1, len(by_user)))
    catalogue: dict[str, None] = {}
    source_items: dict[str, None] = {}
    for i, e in enumerate(events):
        (catalogue if e.domain == target else source_items)[e.item_id] = None
        example = store.observe(e)
        kind = held_out.get(i)
        if kind is not None:
            queries[kind].append(
                Query(e.user_id, e.item_id, example.history, frozenset(consumed.get(e.user_id, ())))
            )
        if i < cut.get(e.user_id, len(events)):
            train_events.append(e)
        if e.domain == target:
            consumed.setdefault(e.user_id, set()).add(e.item_id)
    stats = {
        "events": len(events),
        "train_events": len(train_events),
        "users": len(by_user),
        "eval_users": len(cut),
        "catalogue_items": len(catalogue),
        "source_items": len(source_items),
    }
    log.info("split %s", " ".join(f"{k}={v}" for k, v in stats.items()))
    return Split(
        source, target, train_events, queries["validation"], queries["test"],
        list(catalogue), list(source_items), len(by_user), stats,
    )


def cold_start_history(history: History, target: str) -> History:
    """The history with the target domain emptied.

    >>> cold_start_history({"movie": (("m1",), (1,)), "book": (("b1",), (2,))}, "book")
    {'movie': (('m1',), (1,)), 'book': ((), ())}
    """
    return {d: (((), ()) if d == target else seq) for d, seq in history.items()}


def sample_negatives(
    queries: Sequence[Query], catalogue: Sequence[str], n_negatives: int, seed: int
) -> np.ndarray:
    """``(N, n_negatives)`` catalogue indices per query, uniform without replacement from the candidates
    (catalogue minus the positive minus the consumed items).

    >>> q = Query("u", "b1", {}, frozenset({"b2"}))
    >>> sorted(sample_negatives([q], ["b1", "b2", "b3", "b4"], 2, seed=0)[0].tolist())
    [2, 3]
    """
    index = {item_id: i for i, item_id in enumerate(catalogue)}
    rng = random.Random(seed)
    out = np.empty((len(queries), n_negatives), dtype=np.int64)
    for n, q in enumerate(queries):
        banned = {index[q.item_id], *(index[c] for c in q.consumed if c in index)}
        if len(catalogue) - len(banned) < n_negatives:
            raise ValueError(
                f"catalogue has {len(catalogue)} items, {len(banned)} banned for user {q.user_id!r}: "
                f"cannot draw {n_negatives} negatives"
            )
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < n_negatives:
            j = rng.randrange(len(catalogue))
            if j not in banned and j not in taken:
                taken.add(j)
                chosen.append(j)
        out[n] = chosen
    return out


def rank_queries(
    ranker: Ranker,
    queries: Sequence[Query],
    catalogue: Sequence[str],
    target: str,
    *,
    cold_start: bool,
    negatives: np.ndarray | None = None,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-protocol ranks ``(N,)`` and, given ``negatives``, sampled-protocol ranks ``(N,)``."""
    index = {item_id: i for i, item_id in enumerate(catalogue)}
    full: list[np.ndarray] = []
    sampled: list[np.ndarray] = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        if cold_start:
            user_ids: list[str | None] = [None] * len(batch)
            histories = [cold_start_history(q.history, target) for q in batch]
        else:
            user_ids = [q.user_id for q in batch]
            histories = [q.history for q in batch]
        scores = np.asarray(ranker.score(user_ids, histories), dtype=np.float32)  # (B, C)
        if scores.shape != (len(batch), len(catalogue)):
            raise ValueError(f"{ranker.name}.score returned {scores.shape}, expected {(len(batch), len(catalogue))}")
        positive = np.array([index[q.item_id] for q in batch])  # (B,)
        excluded = np.zeros(scores.shape, dtype=bool)  # (B, C)
        for row, q in enumerate(batch):
            excluded[row, [index[c] for c in q.consumed if c in index]] = True
        full.append(ranks_full(scores, positive, excluded))
        if negatives is not None:
            rows = np.arange(len(batch))
            neg = negatives[start:start + len(batch)]  # (B, S)
            sampled.append(ranks_sampled(scores[rows, positive], scores[rows[:, None], neg]))
    return np.concatenate(full), (np.concatenate(sampled) if negatives is not None else None)


@dataclass
class RunResult:
    """One model, one seed: the chosen epoch, its validation metrics and the test metrics per setting."""

    epoch: int
    train_s: float
    val_curve: list[float]  # validation SELECTION_METRIC after each epoch
    val: dict[str, float]
    test: dict[str, dict[str, float]]  # setting -> metric -> value


def train_and_test(
    ranker: Ranker,
    split: Split,
    *,
    max_epochs: int,
    patience: int,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train epoch by epoch, select the epoch on validation, then rank the test queries once."""
    if max_epochs < 1 or patience < 1:
        raise ValueError(f"max_epochs and patience must be >= 1, got {max_epochs} and {patience}")
    best_value, best_epoch, best_val = -1.0, 0, {}
    best_state: object = None
    curve: list[float] = []
    train_s = 0.0
    for epoch in range(1, max_epochs + 1):
        t0 = time.perf_counter()
        ranker.partial_fit(split.train_events)
        train_s += time.perf_counter() - t0
        val_ranks, _ = rank_queries(ranker, split.validation, split.catalogue, split.target, cold_start=False)
        val = summarize(val_ranks)
        curve.append(val[SELECTION_METRIC])
        log.info("epoch model=%s seed=%d epoch=%d val_%s=%.5f", ranker.name, seed, epoch, SELECTION_METRIC,
                 val[SELECTION_METRIC])
        if on_epoch is not None:
            on_epoch(epoch, val[SELECTION_METRIC])
        if val[SELECTION_METRIC] > best_value:
            best_value, best_epoch, best_val = val[SELECTION_METRIC], epoch, val
            best_state = ranker.snapshot() if epoch < max_epochs else None
        elif epoch - best_epoch >= patience:
            break
    if best_epoch != epoch:
        ranker.restore(best_state)
    negatives = sample_negatives(split.test, split.catalogue, N_SAMPLED_NEGATIVES, seed)
    test: dict[str, dict[str, float]] = {}
    for cold, name in ((False, "overlap"), (True, "cold_start")):
        full, sampled = rank_queries(
            ranker, split.test, split.catalogue, split.target, cold_start=cold, negatives=negatives
        )
        assert sampled is not None
        test[f"full/{name}"] = summarize(full)
        test[f"sampled/{name}"] = summarize(sampled)
    return RunResult(best_epoch, train_s, curve, best_val, test)


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


class SITNRanker:
    """The SITN learner behind the ranker interface.

    ``partial_fit`` rebuilds the causal training examples with ``UserStateStore`` over the training
    events, shuffles them (seeded, a fresh order per epoch) and takes one ``learn_many`` step per
    mini-batch. A single-domain config (``use_source=False``) trains on target-domain examples only.
    Scores come from ``embed_histories`` on the query history (the learner's own per-user state is
    never used), so cold-start queries see exactly the history they are given.
    """

    def __init__(
        self,
        name: str,
        config: SITNConfig,
        split: Split,
        batch_size: int,
        workdir: str | Path,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        from learner.learner import SITNLearner  # torch is imported only when SITN rows run

        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        self._learner_cls = SITNLearner
        self.name = name
        self.config = config
        self.source, self.target = split.source, split.target
        self.catalogue = list(split.catalogue)
        self.batch_size = batch_size
        self.workdir = Path(workdir)
        self.on_step = on_step
        self.learner = SITNLearner(config, split.source, split.target)
        self.learner.register_items(split.target, split.catalogue)
        if config.use_source:
            self.learner.register_items(split.source, split.source_items)
        self._rng = random.Random(config.seed)
        self._items: np.ndarray | None = None
        self.last_stats: dict[str, float] = {}

    def partial_fit(self, events: Sequence[InteractionEvent]) -> None:
        store = UserStateStore((self.source, self.target), self.config.max_len, max_users=10**9)
        examples = store.observe_many(events)
        if not self.config.use_source:
            examples = [ex for ex in examples if ex.domain == self.target]
        self._rng.shuffle(examples)
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start:start + self.batch_size]
            if len(batch) < 2:
                continue
            self.last_stats = self.learner.learn_many(batch)
            if self.on_step is not None:
                self.on_step(self.last_stats)
        self._items = None

    def _catalogue_items(self) -> np.ndarray:
        """``(C, D)`` target item vectors in catalogue order (cached until the weights change)."""
        if self._items is None:
            item_ids, vectors = self.learner.embed_items(self.target)
            position = {item_id: j for j, item_id in enumerate(item_ids)}
            self._items = np.ascontiguousarray(vectors[[position[i] for i in self.catalogue]])
        return self._items

    def score(self, user_ids: Sequence[str | None], histories: Sequence[History]) -> np.ndarray:
        """Max over views of <q_v, e_i>, the learner's ``score_items`` rule, as one BLAS matmul."""
        queries = self.learner.embed_histories(list(histories), self.target)  # (N, V, D)
        n, v, d = queries.shape
        items = self._catalogue_items()  # (C, D)
        scores = queries.reshape(n * v, d) @ items.T  # (N * V, C)
        return scores.reshape(n, v, -1).max(axis=1)  # (N, C)

    def snapshot(self) -> object:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.name}-best.pt"
        self.learner.save(path)
        return path

    def restore(self, state: object) -> None:
        assert isinstance(state, Path)
        self.learner = self._learner_cls.load(state)
        self._items = None


# -- the results table -------------------------------------------------------------------------------

METRICS_ORDER = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr")


def _cell(stat: dict[str, float | None]) -> str:
    mean, std = stat["mean"], stat["std"]
    assert mean is not None
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per setting; ``rows`` are the ``rows`` entries of results.json.

    >>> row = {"name": "pop", "summary": {"full/overlap": {m: {"mean": 0.5, "std": None} for m in METRICS_ORDER}},
    ...        "per_seed": [{"epoch": 1}]}
    >>> print(markdown_tables([row]))
    ### full/overlap
    <BLANKLINE>
    | model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | MRR | epochs |
    | --- | --- | --- | --- | --- | --- | --- |
    | pop | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 | 1 |
    """
    parts: list[str] = []
    settings = [s for s in SETTINGS if s in rows[0]["summary"]]
    for setting in settings:
        parts.append(f"### {setting}\n")
        parts.append("| model | HR@10 | HR@20 | NDCG@10 | NDCG@20 | MRR | epochs |")
        parts.append("| --- | --- | --- | --- | --- | --- | --- |")
        for row in rows:
            cells = [_cell(row["summary"][setting][m]) for m in METRICS_ORDER]
            epochs = ",".join(str(r["epoch"]) for r in row["per_seed"])
            parts.append(f"| {row['name']} | {' | '.join(cells)} | {epochs} |")
        parts.append("")
    return "\n".join(parts).rstrip("\n")
