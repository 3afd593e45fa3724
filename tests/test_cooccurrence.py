"""ItemCooccurrence: the incremental counts and scores against a dense, obviously-correct rebuild."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS, ItemCooccurrence, rank_with_ties_against
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


# -- the neighbour cap (max_neighbours): exact below it, bounded above it, the strongest neighbours kept --


def test_a_cap_no_row_reaches_changes_nothing() -> None:
    store = UserStateStore(("movie", "book"), max_len=50)
    examples = store.observe_many(_random_events(3))
    uncapped, capped = ItemCooccurrence("movie", "book", max_neighbours=None), ItemCooccurrence("movie", "book")
    uncapped.learn_many(examples)
    capped.learn_many(examples)
    assert capped.pruned_rows == 0 and capped.n_pairs() == uncapped.n_pairs()
    # 15 items per domain: a row holds at most 15 neighbours; a cap of 8 (rows pruned past 16) never prunes
    at_the_edge = ItemCooccurrence("movie", "book", max_neighbours=8)
    at_the_edge.learn_many(examples)
    assert at_the_edge.pruned_rows == 0
    for user in ("u2", "u11"):
        for mode in ("target", "target+source", "source"):
            expected = uncapped.scores(store.history(user), mode)
            np.testing.assert_array_equal(capped.scores(store.history(user), mode), expected)
            np.testing.assert_array_equal(at_the_edge.scores(store.history(user), mode), expected)


def test_rows_stay_bounded_and_keep_their_largest_counts() -> None:
    co = ItemCooccurrence("movie", "book", max_neighbours=2)  # a row is pruned back to 2 when it passes 4
    for _ in range(5):
        co.learn({"book": ("b1",)}, "book", "b0")
    for _ in range(3):
        co.learn({"book": ("b2",)}, "book", "b0")
    for n in range(20):  # singletons, each pair seen once: b0 gains one neighbour per event
        co.learn({"book": (f"s{n}",), "movie": ("m1",)}, "book", "b0")
    b0, b1, b2 = (co._target.index[b] for b in ("b0", "b1", "b2"))
    row = co._target.neighbours[b0]
    assert len(row) <= 4 and co.pruned_rows > 0
    assert row[b1] == 5 and row[b2] == 3  # the two largest counts survive every pruning, exact
    assert co.counts[b0] == 28  # event counts (popularity) are never pruned
    # m1's C_st row: one count per b0 event, one neighbour only: exact
    assert co._source.neighbours[co._source.index["m1"]] == {b0: 20}
    # every row of a longer random stream stays within 2 x the cap
    store = UserStateStore(("movie", "book"), max_len=50)
    small = ItemCooccurrence("movie", "book", max_neighbours=3)
    small.learn_many(store.observe_many(_random_events(4, n=2000)))
    assert small.pruned_rows > 0
    assert max(map(len, small._target.neighbours + small._source.neighbours)) <= 6
    assert sum(small.n_pairs().values()) <= 6 * (len(small) + len(small._source.ids))


def test_prune_keeps_the_top_counts_ties_to_the_first_seen() -> None:
    co = ItemCooccurrence("movie", "book", max_neighbours=2)
    rows = co._target
    row = {9: 2, 4: 1, 3: 7, 6: 2, 1: 1}
    rows.prune(row)
    assert row == {3: 7, 6: 2}  # 7, then the tie of 2s goes to the lower (earlier seen) row 6


def test_capped_state_round_trips_and_a_cap_applies_to_a_loaded_uncapped_state() -> None:
    store = UserStateStore(("movie", "book"), max_len=50)
    examples = store.observe_many(_random_events(5, n=1000))
    capped = ItemCooccurrence("movie", "book", max_neighbours=3)
    capped.learn_many(examples)
    again = ItemCooccurrence.from_state_dict(capped.state_dict())
    assert again.max_neighbours == 3 and again.n_pairs() == capped.n_pairs()
    np.testing.assert_array_equal(again.scores(store.history("u4"), "target+source"),
                                  capped.scores(store.history("u4"), "target+source"))
    uncapped = ItemCooccurrence("movie", "book", max_neighbours=None)
    uncapped.learn_many(examples)
    state = uncapped.state_dict()
    state["max_neighbours"] = 3
    loaded = ItemCooccurrence.from_state_dict(state)
    assert max(map(len, loaded._target.neighbours + loaded._source.neighbours)) <= 6
    del state["max_neighbours"]  # a state saved before the cap existed: loaded with the default
    assert ItemCooccurrence.from_state_dict(state).max_neighbours == DEFAULT_MAX_NEIGHBOURS


def test_bad_max_neighbours_is_named() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_neighbours must be None"):
            ItemCooccurrence("movie", "book", max_neighbours=bad)  # type: ignore[arg-type]


def test_serving_ranker_passes_the_cap_through() -> None:
    from serving.cooccurrence import CooccurrenceRanker

    ranker = CooccurrenceRanker(max_neighbours=1)  # rows pruned back to 1 when they pass 2
    ranker.learn([(("a",), "x")] * 3 + [((f"s{n}",), "x") for n in range(10)])
    assert max(map(len, ranker._cooc._target.neighbours)) <= 2
    assert ranker.top(("x",), k=1)[0][0] == "a"  # x's strongest neighbour survives


def test_target_and_both_scores_in_one_pass_equal_the_two_modes() -> None:
    """The shadow baselines score both modes per event with the target part summed once: bit for bit the
    values ``scores`` gives each mode."""
    rng = np.random.default_rng(5)
    co = ItemCooccurrence("movie", "book", max_neighbours=4)  # small cap: pruned rows too
    books, movies = [f"b{n}" for n in range(30)], [f"m{n}" for n in range(20)]
    history: dict[str, tuple[str, ...]] = {"book": (), "movie": ()}
    for _ in range(400):
        domain = "book" if rng.random() < 0.6 else "movie"
        item_id = str(rng.choice(books if domain == "book" else movies))
        co.learn(history, domain, item_id)
        history = {**history, domain: (*history[domain], item_id)[-6:]}
        if rng.random() < 0.1:
            history = {"book": (), "movie": ()}  # another user
        target, both = co.scores_target_and_both(history)
        assert np.array_equal(target, co.scores(history, "target"))
        assert np.array_equal(both, co.scores(history, "target+source"))


def test_a_state_saved_as_pairs_per_row_loads_as_the_flat_arrays_do() -> None:
    """Checkpoints written before the neighbours became flat arrays held a list of (col, count) pairs per
    row; both load to the same counts, in the same insertion order (pruning ties depend on it)."""
    store = UserStateStore(("movie", "book"), max_len=50)
    co = ItemCooccurrence("movie", "book", max_neighbours=4)
    co.learn_many(store.observe_many(_random_events(3)))
    state = co.state_dict()
    old = dict(state)
    for side in ("target_rows", "source_rows"):
        flat = state[side]
        ptr, cols, counts = flat["neighbour_ptr"], flat["neighbour_cols"], flat["neighbour_counts"]
        pairs = [list(zip(cols[a:b].tolist(), counts[a:b].tolist(), strict=True)) for a, b in pairwise(ptr.tolist())]
        old[side] = {k: v for k, v in flat.items() if not k.startswith("neighbour_")} | {"neighbours": pairs}
    assert sum(map(len, pairs)) > 0
    for loaded in (ItemCooccurrence.from_state_dict(state), ItemCooccurrence.from_state_dict(old)):
        for side in ("_target", "_source"):
            assert [list(n.items()) for n in getattr(loaded, side).neighbours] == \
                [list(n.items()) for n in getattr(co, side).neighbours]
