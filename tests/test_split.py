"""The exact per-user chronological split on a tiny hand-made events.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from learner.offline.eval_split import (
    chronological_split,
    cold_start_history,
    sample_negatives,
    update_query_stats,
)
from stream.dataset import load_events

ROWS = """timestamp,user_id,item_id,domain
100,u1,m1,movie
100,u1,b1,book
200,u2,b9,book
300,u1,b2,book
300,u1,m2,movie
400,u1,b3,book
400,u2,m9,movie
500,u1,m3,movie
600,u1,b4,book
700,u2,b8,book
"""


def test_split_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(ROWS)
    log = load_events(path, "movie", "book")
    split = chronological_split(log.events, "movie", "book", max_len=50)

    # u1's book events in order: b1, b2, b3, b4 -> validation b3, test b4; training stops before b3.
    # u2 has only 2 book events: no query, all of u2's events train.
    train = [(e.user_id, e.item_id) for e in split.train_events]
    assert train == [("u1", "m1"), ("u1", "b1"), ("u2", "b9"), ("u1", "b2"), ("u1", "m2"),
                     ("u2", "m9"), ("u2", "b8")]
    assert [(q.user_id, q.item_id) for q in split.validation] == [("u1", "b3")]
    assert [(q.user_id, q.item_id) for q in split.test] == [("u1", "b4")]

    val, test = split.validation[0], split.test[0]
    assert val.history == {"movie": (("m1", "m2"), (100, 300)), "book": (("b1", "b2"), (100, 300))}
    assert val.consumed == frozenset({"b1", "b2"})
    # The test history includes the validation item and the movie event between the two held-out ones.
    assert test.history == {"movie": (("m1", "m2", "m3"), (100, 300, 500)),
                            "book": (("b1", "b2", "b3"), (100, 300, 400))}
    assert test.consumed == frozenset({"b1", "b2", "b3"})

    assert split.catalogue == ["b1", "b9", "b2", "b3", "b4", "b8"]
    assert split.source_items == ["m1", "m2", "m9", "m3"]
    # Refit: u1's events from the validation event up to the test event: b3 and m3, with causal histories.
    assert [(ex.user_id, ex.item_id) for ex in split.refit_examples] == [("u1", "b3"), ("u1", "m3")]
    assert split.refit_examples[1].history == {"movie": (("m1", "m2"), (100, 300)),
                                               "book": (("b1", "b2", "b3"), (100, 300, 400))}
    assert [(ex.user_id, ex.item_id) for ex in split.train_examples] == train
    # Known items: training targets at validation; plus the refit targets at test. b4 is never known.
    assert split.known_validation.tolist() == [True, True, True, False, False, True]
    assert split.known_test.tolist() == [True, True, True, True, False, True]
    assert split.known("test", refit=False) is split.known_validation
    # The probe: u1's last training target event (b2) with the history before it.
    [probe] = split.train_probe
    assert (probe.user_id, probe.item_id, probe.consumed) == ("u1", "b2", frozenset({"b1"}))
    assert probe.history == {"movie": (("m1",), (100,)), "book": (("b1",), (100,))}
    assert split.stats == {"events": 10, "train_events": 7, "refit_events": 2, "users": 2, "eval_users": 1,
                           "catalogue_items": 6, "source_items": 4, "known_items_validation": 4,
                           "known_items_test": 5, "val_queries": 1, "val_rankable": 0, "test_queries": 1,
                           "test_rankable": 0, "probe_queries": 1, "probe_rankable": 1}


def test_rankable_counts_follow_the_refit(tmp_path: Path) -> None:
    # u2's validation item b4 is u1's test item: known at test only through the refit.
    path = tmp_path / "events.csv"
    path.write_text("timestamp,user_id,item_id,domain\n100,u1,b1,book\n110,u2,b5,book\n200,u1,b2,book\n"
                    "210,u2,b6,book\n300,u1,b3,book\n400,u2,b4,book\n600,u1,b4,book\n700,u2,b7,book\n")
    split = chronological_split(load_events(path, "movie", "book").events, "movie", "book")
    assert [q.item_id for q in split.test] == ["b4", "b7"]
    assert (split.stats["val_rankable"], split.stats["test_rankable"]) == (0, 1)
    update_query_stats(split, refit=False)
    assert (split.stats["val_rankable"], split.stats["test_rankable"]) == (0, 0)


def test_probe_users_zero_gives_no_probe(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(ROWS)
    split = chronological_split(load_events(path, "movie", "book").events, "movie", "book", probe_users=0)
    assert split.train_probe == [] and split.stats["probe_queries"] == 0


def test_history_is_truncated_to_max_len(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(ROWS)
    split = chronological_split(load_events(path, "movie", "book").events, "movie", "book", max_len=2)
    assert split.test[0].history["book"] == (("b2", "b3"), (300, 400))
    assert split.test[0].consumed == frozenset({"b1", "b2", "b3"})  # exclusion is never truncated


def test_cold_start_history_hides_only_the_target() -> None:
    hist = {"movie": (("m1",), (1,)), "book": (("b1", "b2"), (2, 3))}
    assert cold_start_history(hist, "book") == {"movie": (("m1",), (1,)), "book": ((), ())}


def test_negatives_avoid_positive_consumed_and_unknown_and_are_seeded(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(ROWS)
    split = chronological_split(load_events(path, "movie", "book").events, "movie", "book")
    # u1's test item b4; consumed b1, b2, b3; known at test: b1, b9, b2, b3, b8 -> candidates b9, b8.
    neg = sample_negatives(split.test, split.catalogue, split.known_test, 2, seed=3)
    assert neg.shape == (1, 2)
    assert sorted(split.catalogue[j] for j in neg[0]) == ["b8", "b9"]
    assert (sample_negatives(split.test, split.catalogue, split.known_test, 2, seed=3) == neg).all()
    with pytest.raises(ValueError, match="5 known items, 3 of them banned for user 'u1': cannot draw 3 "
                                         "negatives without replacement"):
        sample_negatives(split.test, split.catalogue, split.known_test, 3, seed=3)


def test_c2dsr_negatives_are_independent_uniform_draws(tmp_path: Path) -> None:
    """C2DSR's rule: 999 independent uniform draws (with replacement), only forbidden items redrawn."""
    path = tmp_path / "events.csv"
    path.write_text(ROWS)
    split = chronological_split(load_events(path, "movie", "book").events, "movie", "book")
    neg = sample_negatives(split.test, split.catalogue, split.known_test, 999, seed=[0, 999], replace=True)
    assert neg.shape == (1, 999)
    assert set(neg[0].tolist()) == {split.catalogue.index("b9"), split.catalogue.index("b8")}
    share = float(np.mean(neg[0] == split.catalogue.index("b8")))
    assert abs(share - 0.5) < 4 * (0.25 / 999) ** 0.5  # uniform over the two candidates, 4 sigma
    assert (split.test_negatives("c2dsr", 0, refit=True) == neg).all()  # the split draws the same
    with pytest.raises(ValueError, match="cannot draw 99 negatives without replacement"):
        split.test_negatives("sampled", 0, refit=True)  # our sampled protocol needs 99 distinct candidates
