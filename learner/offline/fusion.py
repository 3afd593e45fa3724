"""A fused ranker: a model's scores combined with item co-occurrence, the weight tuned on validation.

Per query both score vectors are standardised over the items the co-occurrence model has seen (the
known items: both models learnt the same examples), then ``s = z_model + weight * z_cooc``. The
co-occurrence ``mode`` and ``weight`` are chosen on the validation queries only, from a small grid that
includes ``weight = 0`` (the model alone); the model's epoch is chosen first, on its own validation
NDCG@10. Both parts then learn the refit examples and the test queries are ranked once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from learner.offline.baselines import History, ItemKNN, Ranker
from learner.offline.eval_split import Query, Split, query_inputs
from learner.offline.evaluate import (
    SCORE_BATCH,
    SELECTION_METRIC,
    KnownColumns,
    RunResult,
    full_ranks,
    rank_test_queries,
    refit,
    select_epoch,
)
from learner.offline.metrics import summarize
from stream.cooccurrence import MODES
from stream.user_state import Example

log = logging.getLogger(__name__)

FUSION_WEIGHTS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
UNKNOWN_SCORE = -1e30  # fused score of items outside the known set (never candidates)


def standardise(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, ``(s - mean) / std`` over the columns of ``mask``; a constant row gives 0; other
    columns are 0.

    >>> standardise(np.array([[1.0, 3.0, 9.0], [2.0, 2.0, 5.0]]), np.array([True, True, False])).tolist()
    [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    kept = scores[:, mask].astype(np.float64)  # (B, K)
    mean = kept.mean(axis=1, keepdims=True)
    std = kept.std(axis=1, keepdims=True)
    out = np.zeros(scores.shape, dtype=np.float64)
    out[:, mask] = (kept - mean) / np.where(std > 0, std, 1.0)
    return out


def fuse(z_model: np.ndarray, z_cooc: np.ndarray, mask: np.ndarray, weight: float) -> np.ndarray:
    """``z_model + weight * z_cooc`` on the ``mask`` columns, ``UNKNOWN_SCORE`` elsewhere.

    >>> fuse(np.array([[1.0, -1.0, 0.0]]), np.array([[-1.0, 1.0, 0.0]]), np.array([True, True, False]), 3.0).tolist()
    [[-2.0, 2.0, -1e+30]]
    """
    out = z_model + weight * z_cooc
    out[:, ~mask] = UNKNOWN_SCORE
    return out


class FusedRanker:
    """``model`` fused with the co-occurrence scores of ``knn`` (module docstring)."""

    iterative = False

    def __init__(self, model: Ranker, knn: ItemKNN, mode: str = "target", weight: float = 0.0,
                 name: str = "fused") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.name = name
        self.model, self.knn = model, knn
        self.mode, self.weight = mode, weight

    def known_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.knn.catalogue), dtype=bool)
        mask[self.knn.columns()] = True
        return mask

    def learn_many(self, examples: Sequence[Example]) -> None:
        """Both parts learn ``examples`` (the refit: one pass of the model, one count of the kNN)."""
        self.model.learn_many(examples)
        self.knn.learn_many(examples)

    def parts(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None,
        modes: Sequence[str],
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Standardised model scores, standardised co-occurrence scores per mode, and the known mask, on
        ``columns`` (all catalogue columns when None)."""
        mask = self.known_mask() if columns is None else self.known_mask()[columns]
        z_model = standardise(np.asarray(self.model.score(user_ids, histories, columns)), mask)
        z_cooc = {m: standardise(self.knn.score_mode(histories, m, columns), mask) for m in modes}
        return z_model, z_cooc, mask

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        z_model, z_cooc, mask = self.parts(user_ids, histories, columns, (self.mode,))
        return fuse(z_model, z_cooc[self.mode], mask, self.weight)

    def snapshot(self, tag: str = "best") -> object:
        raise NotImplementedError("a fused ranker is not trained in epochs; snapshot its model")

    def restore(self, state: object) -> None:
        raise NotImplementedError("a fused ranker is not trained in epochs; restore its model")

    def tune(
        self, queries: Sequence[Query], split: Split, known: np.ndarray,
        weights: Sequence[float] = FUSION_WEIGHTS, modes: Sequence[str] = MODES,
    ) -> dict[str, float]:
        """Choose ``mode`` and ``weight`` by full-protocol NDCG@10 on ``queries`` (the validation
        queries), set them, and return NDCG@10 per grid point (keys ``"<mode>@<weight>"``). Ties keep
        the earlier grid point (a smaller weight)."""
        if not queries:
            raise ValueError("tune needs at least one validation query")
        index = {item_id: i for i, item_id in enumerate(split.catalogue)}
        mask = self.known_mask()
        if not (mask == known).all():
            raise ValueError("the co-occurrence model must have learnt exactly the known items of the queries")
        grid = [(m, w) for m in modes for w in weights]
        columns = KnownColumns.of(known)
        ranks: dict[tuple[str, float], list[np.ndarray]] = {g: [] for g in grid}
        for start in range(0, len(queries), SCORE_BATCH):
            batch = queries[start:start + SCORE_BATCH]
            user_ids, histories = query_inputs(batch, "overlap", split.source, split.target)
            at, rankable, consumed = columns.locate(batch, index)
            z_model, z_cooc, _ = self.parts(user_ids, histories, columns.columns, modes)  # (B, K) each
            for mode in modes:
                for weight in weights:  # fuse() without the unknown columns: there are none here
                    ranks[(mode, weight)].append(full_ranks(z_model + weight * z_cooc[mode], at, rankable, consumed))
        values = {g: summarize(np.concatenate(r))[SELECTION_METRIC] for g, r in ranks.items()}
        self.mode, self.weight = max(grid, key=lambda g: values[g])  # max keeps the first of equals
        log.info("fusion tuned mode=%s weight=%g val_%s=%.5f", self.mode, self.weight, SELECTION_METRIC,
                 values[(self.mode, self.weight)])
        return {f"{m}@{w:g}": v for (m, w), v in values.items()}


def train_and_test_with_fusion(
    model: Ranker,
    knn: ItemKNN,
    split: Split,
    *,
    max_epochs: int,
    patience: int,
    seed: int,
    refit_passes: int = 1,
    refit_mode: str = "continue",
    diagnostics: bool = False,
    weights: Sequence[float] = FUSION_WEIGHTS,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[RunResult, RunResult]:
    """The model's run and the fused run from one training: select the model's epoch on validation,
    tune the fusion on validation, refit both parts, rank the test queries with each."""
    selection = select_epoch(model, split, max_epochs=max_epochs, patience=patience, diagnostics=diagnostics,
                             on_epoch=on_epoch, keep_initial=refit_mode == "retrain" and refit_passes > 0)
    t0 = time.perf_counter()
    knn.learn_many(split.train_examples)
    fused = FusedRanker(model, knn)
    grid = fused.tune(split.validation, split, split.known("validation"), weights)
    tune_s = time.perf_counter() - t0
    refit_s = refit(model, split, refit_passes, refit_mode, selection)
    selection.apply(model)  # a retraining refit starts from the initial state, scales included
    if refit_passes > 0:
        knn.learn_many(split.refit_examples)
    model_ranks: dict[str, np.ndarray] = {}
    model_run = RunResult(selection.epoch, selection.train_s, selection.curve, selection.val,
                          rank_test_queries(model, split, seed, refit_passes, model_ranks), selection.epochs, refit_s,
                          extra=dict(selection.transfer), test_ranks=model_ranks)
    best = f"{fused.mode}@{fused.weight:g}"
    fused_ranks: dict[str, np.ndarray] = {}
    fused_run = RunResult(
        selection.epoch, selection.train_s, selection.curve, {SELECTION_METRIC: grid[best]},
        rank_test_queries(fused, split, seed, refit_passes, fused_ranks), selection.epochs, refit_s,
        extra={"mode": fused.mode, "weight": fused.weight, "val_grid": grid, "tune_s": round(tune_s, 1),
               **selection.transfer}, test_ranks=fused_ranks,
    )
    return model_run, fused_run
