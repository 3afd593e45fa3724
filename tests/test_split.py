"""The exact per-user chronological split on a tiny hand-made events.csv."""

from __future__ import annotations

from pathlib import Path

from learner.evaluate import chronological_split, cold_start_history, sample_negatives
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
    assert split.stats == {"events": 10, "train_events": 7, "users": 2, "eval_users": 1,
                           "catalogue_items": 6, "source_items": 4}


def test_history_is_truncated_to_max_len(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(ROWS)
    split = chronological_split(load_events(path, "movie", "book").events, "movie", "book", max_len=2)
    assert split.test[0].history["book"] == (("b2", "b3"), (300, 400))
    assert split.test[0].consumed == frozenset({"b1", "b2", "b3"})  # exclusion is never truncated


def test_cold_start_history_hides_only_the_target() -> None:
    hist = {"movie": (("m1",), (1,)), "book": (("b1", "b2"), (2, 3))}
    assert cold_start_history(hist, "book") == {"movie": (("m1",), (1,)), "book": ((), ())}


def test_negatives_avoid_positive_and_consumed_and_are_seeded(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(ROWS)
    split = chronological_split(load_events(path, "movie", "book").events, "movie", "book")
    neg = sample_negatives(split.test, split.catalogue, 2, seed=3)
    assert neg.shape == (1, 2)
    assert sorted(split.catalogue[j] for j in neg[0]) == ["b8", "b9"]  # the only 2 candidates left
    assert (sample_negatives(split.test, split.catalogue, 2, seed=3) == neg).all()
