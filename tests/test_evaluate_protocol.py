"""The evaluation protocol on hand-made data: refit, unknown items as misses, ties against the held-out
item, one pass for counting models, and the fused weight chosen on validation only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from learner.offline.baselines import History, ItemKNN, Popularity
from learner.offline.eval_split import Split, chronological_split
from learner.offline.evaluate import (
    MISS_RANK,
    rank_queries,
    select_epoch,
    train_and_test,
    tune_transfer_scale,
)
from learner.offline.fusion import FusedRanker, train_and_test_with_fusion
from stream.dataset import load_events
from stream.user_state import Example

# u1 reads b1, b2, then b3 (validation) and b4 (test). u2 and u4 have b4 as their *validation* item,
# so b4 is known at test only after the refit. b7 and b8 (test items of u2, u4) are never learnt.
# 120 filler users read one book each, so that the sampled protocol can draw 99 distinct negatives.
N_FILLERS = 120
REFIT_ROWS = "timestamp,user_id,item_id,domain\n" + "".join(f"1,f{i},x{i},book\n" for i in range(N_FILLERS)) + """\
10,u2,b5,book
20,u2,b6,book
30,u4,b9,book
40,u4,b10,book
100,u1,b1,book
200,u1,b2,book
300,u1,b3,book
350,u2,b4,book
360,u4,b4,book
400,u1,b4,book
500,u2,b7,book
600,u4,b8,book
"""


def _split(tmp_path: Path, rows: str) -> Split:
    path = tmp_path / "events.csv"
    path.write_text(rows)
    return chronological_split(load_events(path, "movie", "book").events, "movie", "book")


def test_refit_makes_the_validation_events_count_before_test(tmp_path: Path) -> None:
    split = _split(tmp_path, REFIT_ROWS)
    assert [(ex.user_id, ex.item_id) for ex in split.refit_examples] == [("u1", "b3"), ("u2", "b4"), ("u4", "b4")]
    refitted = train_and_test(Popularity("book", split.catalogue), split, max_epochs=1, patience=1, seed=0,
                              refit_passes=1)
    # u1: b4 has count 2 after the refit, every candidate (b5, b6, b9, b10, fillers) 1 -> rank 1; b7, b8: misses.
    assert refitted.test["full/overlap"]["hr@10"] == pytest.approx(1 / 3, abs=1e-12)
    assert refitted.test["full/overlap"]["ndcg@10"] == pytest.approx(1 / 3, abs=1e-12)
    assert refitted.test["full/overlap"]["mrr"] == pytest.approx(1 / 3, abs=1e-12)
    assert refitted.test["full/overlap/rankable"]["hr@10"] == 1.0  # only u1's query is rankable
    assert refitted.test["c2dsr/overlap"]["hr@10"] == pytest.approx(1 / 3, abs=1e-12)
    not_refitted = train_and_test(Popularity("book", split.catalogue), split, max_epochs=1, patience=1, seed=0,
                                  refit_passes=0)
    # Without the refit b4 was never learnt: every test query is a miss, and none is rankable.
    assert not_refitted.test["full/overlap"]["hr@10"] == 0.0
    assert not_refitted.test["full/overlap"]["mrr"] < 1e-18
    assert "full/overlap/rankable" not in not_refitted.test


class _Constant:
    """A ranker that gives every item the same score."""

    name = "constant"
    iterative = False

    def learn_many(self, examples: Sequence[Example]) -> None:
        pass

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        return np.zeros((len(user_ids), self.n_items if columns is None else len(columns)))

    def snapshot(self) -> object:
        return None

    def restore(self, state: object) -> None:
        pass

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items


def test_ties_count_against_and_unknown_items_are_misses(tmp_path: Path) -> None:
    split = _split(tmp_path, REFIT_ROWS)
    ranks = rank_queries(_Constant(len(split.catalogue)), split.test, split, split.known("test"))
    # u1: candidates b5, b6, b9, b10 and the fillers (known, not consumed) all tie with b4; b7, b8 unknown.
    assert ranks.full.tolist() == [1 + 4 + N_FILLERS, MISS_RANK, MISS_RANK]
    assert ranks.rankable.tolist() == [True, False, False]



def test_a_repeated_held_out_item_stays_rankable(tmp_path: Path) -> None:
    """A user who reads an item again (real logs repeat): the held-out item is not among the excluded consumed
    items (as in the stream's prequential), the user's other earlier items are."""
    rows = "timestamp,user_id,item_id,domain\n" + "".join(f"1,f{i},x{i},book\n" for i in range(N_FILLERS)) + (
        "10,u1,b1,book\n20,u1,b2,book\n30,u1,b3,book\n40,u1,b1,book\n")
    split = _split(tmp_path, rows)
    [test] = split.test
    assert (test.item_id, test.consumed) == ("b1", frozenset({"b2", "b3"}))
    ranks = rank_queries(_Constant(len(split.catalogue)), split.test, split, split.known("test"))
    # every known item but the consumed b2, b3 ties with b1 and counts against it: the fillers
    assert ranks.full.tolist() == [1 + N_FILLERS]
    assert ranks.rankable.tolist() == [True]

def test_counting_rankers_learn_the_training_examples_once(tmp_path: Path) -> None:
    split = _split(tmp_path, REFIT_ROWS)
    pop = Popularity("book", split.catalogue)
    selection = select_epoch(pop, split, max_epochs=5, patience=3)
    assert selection.epoch == 1 and len(selection.epochs) == 1
    assert pop.counts.sum() == 6.0 + N_FILLERS  # the training book events, counted once
    assert set(selection.epochs[0]) == {"epoch", "train_s", "val_s", "val_hr@10", "val_ndcg@10"}


class _Recorder(_Constant):
    """An iterative ranker that records what it learns; its state is the list of ``learn_many`` calls."""

    name = "recorder"
    iterative = True

    def __init__(self, n_items: int) -> None:
        super().__init__(n_items)
        self.calls: list[list[str]] = []

    def learn_many(self, examples: Sequence[Example]) -> None:
        self.calls.append([ex.event_id for ex in examples])

    def snapshot(self, tag: str = "best") -> object:
        return list(self.calls)

    def restore(self, state: object) -> None:
        assert isinstance(state, list)
        self.calls = list(state)


def test_refit_retrains_from_the_initial_state_for_the_selected_epochs(tmp_path: Path) -> None:
    split = _split(tmp_path, REFIT_ROWS)
    train_ids = [ex.event_id for ex in split.train_examples]
    refit_ids = [ex.event_id for ex in split.refit_examples]
    retrained = _Recorder(len(split.catalogue))
    run = train_and_test(retrained, split, max_epochs=5, patience=2, seed=0, refit_passes=1, refit_mode="retrain")
    # A constant ranker never improves after epoch 1, so selection keeps epoch 1 and stops at epoch 3.
    assert run.epoch == 1 and len(run.val_curve) == 3
    # The refit went back to the untrained state and trained one epoch over training + refit examples.
    assert retrained.calls == [train_ids + refit_ids]
    continued = _Recorder(len(split.catalogue))
    train_and_test(continued, split, max_epochs=5, patience=2, seed=0, refit_passes=2, refit_mode="continue")
    assert continued.calls == [train_ids, refit_ids, refit_ids]  # the selected epoch, then 2 passes
    with pytest.raises(ValueError, match="refit mode"):
        train_and_test(_Recorder(len(split.catalogue)), split, max_epochs=1, patience=1, seed=0, refit_mode="twice")


# u1 reads a, then fav (validation) and p (test); h1 and h2 read a then p; h3 reads fav, h4 reads q.
FUSION_ROWS = "timestamp,user_id,item_id,domain\n" + "".join(f"1,f{i},x{i},book\n" for i in range(N_FILLERS)) + """\
1,u1,a,book
2,h1,a,book
2,h2,a,book
2,h3,fav,book
2,h4,q,book
3,h1,p,book
3,h2,p,book
5,u1,fav,book
6,u1,p,book
"""


class _Favourite(_Constant):
    """Scores one item 1, every other 0, whatever the history."""

    name = "favourite"

    def __init__(self, catalogue: list[str], favourite: str) -> None:
        super().__init__(len(catalogue))
        self.column = catalogue.index(favourite)

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        out = np.zeros((len(user_ids), self.n_items))
        out[:, self.column] = 1.0
        return out if columns is None else out[:, columns]


def test_fused_weight_is_chosen_on_validation_only(tmp_path: Path) -> None:
    split = _split(tmp_path, FUSION_ROWS)
    assert [(q.user_id, q.item_id) for q in split.validation] == [("u1", "fav")]
    assert [(q.user_id, q.item_id) for q in split.test] == [("u1", "p")]
    model = _Favourite(split.catalogue, "fav")
    knn = ItemKNN("knn", "target", "movie", "book", split.catalogue)
    model_run, fused_run = train_and_test_with_fusion(model, knn, split, max_epochs=1, patience=1, seed=0,
                                                      weights=(0.0, 0.01, 3.0))
    # Validation: the model alone ranks fav first; co-occurrence with a pushes p above it at w = 3.
    grid = fused_run.extra["val_grid"]
    assert grid["target@0"] == 1.0 and grid["target@0.01"] == 1.0
    assert grid["target@3"] == pytest.approx(1 / math.log2(3), abs=1e-12)
    assert (fused_run.extra["mode"], fused_run.extra["weight"]) == ("target", 0.0)  # first of the best
    # Test: fav is consumed, so the model ties p with q and the fillers -> a miss at the chosen w = 0 ...
    tied = [1 + 1 + N_FILLERS]
    assert rank_queries(FusedRanker(model, knn, "target", 0.0), split.test, split, split.known("test")).full.tolist() == tied
    assert fused_run.test["full/overlap"]["hr@10"] == 0.0 and model_run.test["full/overlap"]["hr@10"] == 0.0
    # ... although w = 3 would have ranked p first on test: the test queries did not choose w.
    heavy = FusedRanker(model, knn, "target", 3.0)
    assert rank_queries(heavy, split.test, split, split.known("test")).full.tolist() == [1]


def test_fusion_rejects_a_knn_that_learnt_other_items(tmp_path: Path) -> None:
    split = _split(tmp_path, FUSION_ROWS)
    knn = ItemKNN("knn", "target", "movie", "book", split.catalogue)
    knn.learn_many(split.train_examples + split.refit_examples)
    fused = FusedRanker(_Favourite(split.catalogue, "fav"), knn)
    known = split.known("validation").copy()
    known[split.catalogue.index("q")] = False
    with pytest.raises(ValueError, match="must have learnt exactly the known items"):
        fused.tune(split.validation, split, known)


class _Scaled(_Constant):
    """Ranks ``favourite`` first only at one warm scale (a query with book history) or one cold scale (none)."""

    name = "scaled"

    def __init__(self, catalogue: list[str], favourite: str, warm: float, cold: float) -> None:
        super().__init__(len(catalogue))
        self.column = catalogue.index(favourite)
        self.best = (warm, cold)
        self.transfer_scale = (1.0, 1.0)

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        out = np.zeros((len(user_ids), self.n_items))
        for row, history in enumerate(histories):
            slot = 0 if history.get("book", ((), ()))[0] else 1
            if self.transfer_scale[slot] == self.best[slot]:
                out[row, self.column] = 1.0
        return out if columns is None else out[:, columns]


def test_transfer_scale_is_chosen_on_validation_per_view_and_kept_after_the_refit(tmp_path: Path) -> None:
    split = _split(tmp_path, FUSION_ROWS)
    assert [(q.user_id, q.item_id) for q in split.validation] == [("u1", "fav")]  # u1 read a before
    ranker = _Scaled(split.catalogue, "fav", warm=0.25, cold=0.0)
    found = tune_transfer_scale(ranker, split)
    assert found["transfer_scale"] == [0.25, 0.0] and ranker.transfer_scale == (0.25, 0.0)
    by_scale = found["val_overlap_by_scale"]
    assert by_scale["0.25"] == 1.0  # fav first
    assert by_scale["1"] == by_scale["0.5"] == by_scale["0"] == 0.0  # fav ties with every candidate: past 10
    assert found["val_cold_start_by_scale"] == {"1": 0.0, "0.5": 0.0, "0.25": 0.0, "0": 1.0}
    # a tie keeps the scale training used (1, the grid's first)
    flat = _Scaled(split.catalogue, "fav", warm=7.0, cold=7.0)  # no grid value helps
    assert tune_transfer_scale(flat, split)["transfer_scale"] == [1.0, 1.0]
    # through train_and_test: chosen on validation, reported, and on the ranker when test is ranked
    run = train_and_test(_Scaled(split.catalogue, "fav", warm=0.5, cold=0.25), split, max_epochs=1, patience=1,
                         seed=0, refit_passes=1)
    assert run.extra["transfer_scale"] == [0.5, 0.25] and run.val["ndcg@10"] == 1.0
    # a ranker without a transfer path is left alone
    assert tune_transfer_scale(_Constant(len(split.catalogue)), split) == {}
