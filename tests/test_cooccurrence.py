"""ItemCooccurrence: the incremental counts and scores against a dense, obviously-correct rebuild."""

from __future__ import annotations

import numpy as np
import pytest

from stream.cooccurrence import ItemCooccurrence, rank_with_ties_against
from stream.events import InteractionEvent
from stream.user_state import UserStateStore


def _random_events(seed: int, n: int = 400) -> list[InteractionEvent]:
    rng = np.random.default_rng(seed)
    events = []
    for i in range(n):
        domain = "book" if rng.random() < 0.5 else "movie"
        item = f"{domain[0]}{int(rng.integers(0, 15))}"
        events.append(InteractionEvent(f"e{i}", f"u{int(rng.integers(0, 25))}", item, domain, 1_000 + i))
    return events


def test_scores_match_a_dense_rebuild() -> None:
    events = _random_events(0)
    store = UserStateStore(("movie", "book"), max_len=50)
    co = ItemCooccurrence("movie", "book", alpha=0.5, source_weight=0.7)
    examples = store.observe_many(events)
    co.learn_many(examples)
    books = co.item_ids
    movies = sorted({e.item_id for e in events if e.domain == "movie"})
    b, m = {x: i for i, x in enumerate(books)}, {x: i for i, x in enumerate(movies)}
    c_tt = np.zeros((len(books), len(books)))
    c_st = np.zeros((len(movies), len(books)))
    n_b, n_m = np.zeros(len(books)), np.zeros(len(movies))
    for ex in examples:  # the slow loop: every event against the distinct items before it
        hist_b = set(ex.history["book"][0])
        hist_m = set(ex.history["movie"][0])
        if ex.domain == "book":
            j = b[ex.item_id]
            n_b[j] += 1
            for i in hist_b - {ex.item_id}:
                c_tt[b[i], j] += 1
                c_tt[j, b[i]] += 1
            for s in hist_m:
                c_st[m[s], j] += 1
        else:
            n_m[m[ex.item_id]] += 1
            for j_id in hist_b:
                c_st[m[ex.item_id], b[j_id]] += 1
    np.testing.assert_array_equal(co.counts, n_b)
    history = store.history("u3")
    expected = np.zeros(len(books))
    for i in set(history["book"][0]):
        expected += c_tt[b[i]] / max(n_b[b[i]], 1) ** 0.5
    for s in set(history["movie"][0]):
        expected += 0.7 * c_st[m[s]] / max(n_m[m[s]], 1) ** 0.5
    expected = expected / np.maximum(n_b, 1) ** 0.5 + 1e-9 * n_b / n_b.max()
    np.testing.assert_allclose(co.scores(history, "target+source"), expected, rtol=1e-12, atol=0)


def test_state_round_trip_gives_the_same_scores() -> None:
    store = UserStateStore(("movie", "book"), max_len=50)
    co = ItemCooccurrence("movie", "book")
    co.learn_many(store.observe_many(_random_events(1)))
    again = ItemCooccurrence.from_state_dict(co.state_dict())
    history = store.history("u7")
    for mode in ("target", "target+source", "source"):
        np.testing.assert_array_equal(again.scores(history, mode), co.scores(history, mode))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        ItemCooccurrence("movie", "book").scores({}, "both")
    with pytest.raises(ValueError, match="domain must be 'movie' or 'book', got 'music'"):
        ItemCooccurrence("movie", "book").learn({}, "music", "x")
    with pytest.raises(ValueError, match="two different domain names"):
        ItemCooccurrence("book", "book")


def test_all_equal_scores_rank_the_positive_last() -> None:
    assert rank_with_ties_against(np.zeros(5), 2) == 5
    assert rank_with_ties_against(np.zeros(5), 2, excluded_rows=[0, 1]) == 3


def test_scores_between_events_match_a_model_that_never_scored() -> None:
    # scores() keeps its per-item normaliser between calls; scoring after every event must give exactly
    # what a model that learnt the same events without ever scoring gives
    store = UserStateStore(("movie", "book"), max_len=50)
    examples = store.observe_many(_random_events(2))
    scored, fresh = ItemCooccurrence("movie", "book", alpha=0.3), ItemCooccurrence("movie", "book", alpha=0.3)
    for n, example in enumerate(examples):
        scored.learn_example(example)
        if n % 7 == 0:
            scored.scores(example.history, "target+source")
    fresh.learn_many(examples)
    for user in ("u1", "u7", "u13"):
        for mode in ("target", "target+source", "source"):
            assert np.allclose(scored.scores(store.history(user), mode), fresh.scores(store.history(user), mode),
                               rtol=1e-12, atol=0.0)
