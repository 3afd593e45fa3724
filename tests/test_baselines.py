"""Popularity, item-kNN and river's online MF behind the evaluation's ranker interface."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.offline.baselines import History, ItemKNN, OnlineMF, Popularity
from stream.events import InteractionEvent
from stream.user_state import Example, UserStateStore


def _examples(rows: list[tuple[str, str, str]]) -> list[Example]:
    """Causal examples of ``rows`` (user, item, domain) in order, as the evaluation builds them."""
    store = UserStateStore(("movie", "book"), max_len=50)
    return [store.observe(InteractionEvent(f"e{i}", u, item, d, 1_000 + i)) for i, (u, item, d) in enumerate(rows)]


def _events() -> list[Example]:
    return _examples([("u1", "b1", "book"), ("u2", "b1", "book"), ("u1", "m1", "movie"), ("u3", "b2", "book"),
                      ("u3", "b1", "book"), ("u2", "m1", "movie")])


def test_popularity_counts_training_target_events() -> None:
    pop = Popularity("book", ["b1", "b2", "b3"])
    pop.learn_many(_events())
    scores = pop.score(["u1", None], [{}, {}])
    assert scores.tolist() == [[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]]
    state = pop.snapshot()
    pop.learn_many(_events())
    assert pop.counts.tolist() == [6.0, 2.0, 0.0]
    pop.restore(state)
    assert pop.counts.tolist() == [3.0, 1.0, 0.0]


def test_online_mf_learns_a_separable_pattern() -> None:
    # Two groups of users: group A reads a0..a4, group B reads b0..b4. After training, each group's
    # held-out users must rank their own group's items above the other group's.
    catalogue = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    rows = []
    for epoch_user in range(40):
        group = "a" if epoch_user % 2 == 0 else "b"
        rows += [(f"u{epoch_user}", f"{group}{i}", "book") for i in range(5)]
    events = _examples(rows)
    mf = OnlineMF("book", catalogue, n_factors=4, learning_rate=0.05, negatives_per_positive=2, seed=1)
    for _ in range(30):
        mf.learn_many(events)
    scores = mf.score(["u0", "u1"], [{}, {}])
    assert scores.shape == (2, 10) and scores.dtype == np.float32
    assert scores[0, :5].min() > scores[0, 5:].max()
    assert scores[1, 5:].min() > scores[1, :5].max()
    # Cold start: fold-in from a history of group-B items ranks group B first.
    cold = mf.score([None], [{"book": (("b0", "b1"), (1, 2))}])
    assert cold[0, 5:].min() > cold[0, :5].max()


def test_online_mf_untrained_items_score_zero_and_snapshot_restores() -> None:
    mf = OnlineMF("book", ["b1", "never"], n_factors=3, seed=0)
    mf.learn_many(_events())
    scores = mf.score([None], [{}])  # no history -> user vector 0 -> item bias only
    assert scores[0, 1] == 0.0
    state = mf.snapshot()
    before = mf.score(["u1"], [{}])
    mf.learn_many(_events())
    assert not np.allclose(mf.score(["u1"], [{}]), before)
    mf.restore(state)
    np.testing.assert_allclose(mf.score(["u1"], [{}]), before, rtol=0, atol=1e-7)


def test_online_mf_rejects_negative_negatives() -> None:
    with pytest.raises(ValueError, match="negatives_per_positive must be >= 0, got -1"):
        OnlineMF("book", ["b1"], negatives_per_positive=-1)


def test_counting_rankers_are_not_iterative() -> None:
    assert Popularity.iterative is False and ItemKNN.iterative is False and OnlineMF.iterative is True


# u1 reads b1 then b2; u2 reads b1 then b3; u3 watches m1 then reads b2. Counts: b1 2, b2 2, b3 1, m1 1.
KNN_ROWS = [("u1", "b1", "book"), ("u1", "b2", "book"), ("u2", "b1", "book"), ("u2", "b3", "book"),
            ("u3", "m1", "movie"), ("u3", "b2", "book")]


def test_itemknn_scores_a_hand_made_history_exactly() -> None:
    catalogue = ["b1", "b2", "b3", "b4"]  # b4 never occurs: it scores 0
    knn = {mode: ItemKNN(f"knn_{mode}", mode, "movie", "book", catalogue) for mode in ("target", "source", "target+source")}
    for model in knn.values():
        model.learn_many(_examples(KNN_ROWS))
    history: History = {"book": (("b1",), (1,)), "movie": (("m1",), (1,))}
    tie = 1e-9  # the popularity tie-break: 1e-9 * n_j / max n
    # target: C(b1, b2) = 1, C(b1, b3) = 1; cosine = C / sqrt(n_b1 * n_j).
    expected_target = [tie * 2 / 2, 1 / math.sqrt(2 * 2) + tie * 2 / 2, 1 / math.sqrt(2 * 1) + tie * 1 / 2, 0.0]
    # source: C(m1, b2) = 1 (u3), n_m1 = 1.
    expected_source = [tie, 1 / math.sqrt(1 * 2) + tie, tie / 2, 0.0]
    scores = {mode: model.score([None], [history])[0] for mode, model in knn.items()}
    np.testing.assert_allclose(scores["target"], expected_target, rtol=0, atol=1e-15)
    np.testing.assert_allclose(scores["source"], expected_source, rtol=0, atol=1e-15)
    both = [expected_target[0], 1 / 2 + 1 / math.sqrt(2) + tie, 1 / math.sqrt(2) + tie / 2, 0.0]
    np.testing.assert_allclose(scores["target+source"], both, rtol=0, atol=1e-15)
    assert scores["target"].dtype == np.float64  # float32 would erase the tie-break next to 0.5
    # Scoring a subset of columns gives those columns of the full scores, in the order asked for.
    columns = np.array([3, 1, 0])
    for mode, model in knn.items():
        np.testing.assert_array_equal(model.score([None], [history], columns), scores[mode][None, columns])
    pop = Popularity("book", catalogue)
    pop.learn_many(_examples(KNN_ROWS))
    assert pop.score([None], [history], columns).tolist() == [[0.0, 2.0, 2.0]]


def test_itemknn_learns_each_example_once_and_snapshot_restores() -> None:
    knn = ItemKNN("itemknn_target", "target", "movie", "book", ["b1", "b2", "b3"])
    knn.learn_many(_examples(KNN_ROWS))
    state = knn.snapshot()
    before = knn.score([None], [{"book": (("b1",), (1,))}])
    assert knn.model.counts.tolist() == [2.0, 2.0, 1.0]
    knn.learn_many(_examples(KNN_ROWS))
    assert knn.model.counts.tolist() == [4.0, 4.0, 2.0]
    knn.restore(state)
    assert knn.model.counts.tolist() == [2.0, 2.0, 1.0]
    np.testing.assert_array_equal(knn.score([None], [{"book": (("b1",), (1,))}]), before)


def test_itemknn_rejects_unknown_mode_and_items_outside_the_catalogue() -> None:
    with pytest.raises(ValueError, match="mode must be one of \\('target', 'target\\+source', 'source'\\), got 'books'"):
        ItemKNN("x", "books", "movie", "book", ["b1"])
    knn = ItemKNN("x", "target", "movie", "book", ["b1"])
    knn.learn_many(_examples([("u1", "b1", "book"), ("u1", "b7", "book")]))
    with pytest.raises(ValueError, match="items \\['b7'\\] were learnt but are not in the catalogue"):
        knn.score([None], [{}])
