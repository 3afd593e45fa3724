"""Honest prequential measurement: ties against the item, consumed items excluded, unseen items as misses,
all-events and rankable figures, whole-stream and windowed; the shadow baselines against a slow loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.online.prequential import PrequentialEvaluator, RankTally, StreamQuality
from learner.online.shadow import BASELINES, ShadowBaselines
from stream.cooccurrence import ItemCooccurrence
from stream.synthetic import SyntheticConfig, SyntheticStream
from stream.user_state import Example, UserStateStore


def served(user_vectors: dict[str, list[float]], popularity: list[str]) -> PrequentialEvaluator:
    """Items a..d as the unit vectors of 4 dimensions; one view per user."""
    ev = PrequentialEvaluator()
    users = list(user_vectors)
    ev.set_served(1, ["a", "b", "c", "d"], np.eye(4, dtype=np.float32), users,
                  np.array([[user_vectors[u]] for u in users], dtype=np.float32).reshape(len(users), 1, 4),
                  popularity)
    return ev


def test_an_all_zero_query_ranks_the_item_last_not_first() -> None:
    """Ties count against the item: a query that scores every item alike finds nothing."""
    ev = served({"zero": [0.0, 0.0, 0.0, 0.0]}, popularity=["a"])
    assert ev.rank_many([("zero", "a"), ("zero", "d")]) == [4, 4]
    assert ev.rank_many([("zero", "a")], consumed=[("b", "c")]) == [2]  # 2 candidates left, tied


def test_consumed_items_are_excluded_and_the_item_itself_stays_a_candidate() -> None:
    ev = served({"u": [0.9, 0.8, 0.7, 0.1]}, popularity=["a", "b"])
    assert ev.rank_many([("u", "c")] * 4, consumed=[(), ("a",), ("a", "b", "zzz"), ("c", "a")]) == [3, 2, 1, 2]
    # a repeat: the user consumed c before; c is still ranked (and a excluded)


def test_unserved_items_are_misses_and_strangers_get_the_popularity_order() -> None:
    ev = served({"u": [1.0, 0.0, 0.0, 0.0]}, popularity=["c", "a"])
    ranks = ev.rank_many([("u", "new"), ("x", "a"), ("x", "a"), ("x", "d"), ("x", "d")],
                         consumed=[(), (), ("c",), (), ("c", "b")])
    # x: popularity c, a, then b and d tie (unlisted): d ranks after every other candidate
    assert ranks == [None, 2, 1, 4, 2]
    assert (ev.ranked_total, ev.unrankable_total) == (4, 1)
    with pytest.raises(ValueError, match=r"one entry per pair \(1\), got 2"):
        ev.rank_many([("u", "a")], consumed=[(), ()])


def test_rank_tally_exact_figures_and_window() -> None:
    tally = RankTally(k=10, window=3)
    events = [(1, True), (3, True), (None, False), (11, True), (None, True), (10, True)]
    gains = [tally.record(r, rankable) for r, rankable in events]
    assert gains == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0, 1 / math.log2(11)], abs=1e-12)
    f = tally.figures()
    assert f["stream"] == pytest.approx({
        "events": 6, "rankable": 5, "rankable_ratio": 5 / 6,
        "hr": 3 / 6, "ndcg": (1.5 + 1 / math.log2(11)) / 6,
        "hr_rankable": 3 / 5, "ndcg_rankable": (1.5 + 1 / math.log2(11)) / 5,
    }, abs=1e-12)
    assert f["window"] == pytest.approx({  # the last three events: 11, None (rankable), 10
        "events": 3, "rankable": 3, "rankable_ratio": 1.0, "hr": 1 / 3, "ndcg": 1 / math.log2(11) / 3,
        "hr_rankable": 1 / 3, "ndcg_rankable": 1 / math.log2(11) / 3,
    }, abs=1e-12)
    restored = RankTally.from_state_dict(tally.state_dict())
    assert restored.figures() == f
    narrower = RankTally.from_state_dict(tally.state_dict(), window=1)
    assert narrower.figures("window")["window"]["events"] == 1
    assert math.isnan(RankTally().figures("stream")["stream"]["hr"])
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        RankTally(window=0)


def test_stream_quality_lift_and_best_baseline() -> None:
    q = StreamQuality(("model", "popularity", "cooc_target"), k=10, window=10)
    q.record([True, True, False], {"model": [2, 50, None], "popularity": [1, 40, None], "cooc_target": [7, 1, None]})
    ndcg = {name: q.tallies[name].figures("stream")["stream"]["ndcg"] for name in q.rankers}
    assert ndcg == pytest.approx({"model": (1 / math.log2(3)) / 3, "popularity": 1 / 3,
                                  "cooc_target": (1 / math.log2(8) + 1) / 3}, abs=1e-12)
    assert q.best_baseline() == "cooc_target"
    assert q.lift() == pytest.approx(ndcg["model"] / ndcg["cooc_target"], abs=1e-12)
    stats = q.stats()
    assert stats["prequential_ndcg_at_10"] == pytest.approx(ndcg["model"], abs=1e-12)  # window holds all three
    assert stats["prequential_rankable_ratio"] == pytest.approx(2 / 3, abs=1e-12)
    assert stats["cooc_target_ndcg_at_10_stream_rankable"] == pytest.approx(ndcg["cooc_target"] * 3 / 2, abs=1e-12)
    with pytest.raises(ValueError, match=r"ranks must be given for every ranker"):
        q.record([True], {"model": [1]})


def test_shadow_baselines_match_a_slow_test_then_train_loop() -> None:
    """Every baseline rank equals a plain loop: popularity by counting, co-occurrence by ItemCooccurrence.rank
    with the user's earlier target items excluded, each event ranked, then learnt."""
    stream = SyntheticStream(SyntheticConfig(events=3000, n_users=120, n_source_items=80, n_target_items=60,
                                             target_share=0.5, seed=5))
    store = UserStateStore(("movie", "book"), max_len=10)
    examples = [store.observe(e) for e in stream.events()]
    shadow = ShadowBaselines("movie", "book", max_history=10)
    reference = ItemCooccurrence("movie", "book", max_history=10)
    counts: dict[str, int] = {}
    got: dict[str, list[int | None]] = {name: [] for name in BASELINES}
    want: dict[str, list[int | None]] = {name: [] for name in BASELINES}
    for start in range(0, len(examples), 64):  # steps of 64, as the trainer calls it
        step = examples[start : start + 64]
        _, ranks = shadow.observe(step)
        for name in BASELINES:
            got[name] += ranks[name]
        for ex in step:  # the slow loop: one event at a time, ranked, then learnt
            if ex.domain == "book":
                before = set(ex.history["book"][0]) - {ex.item_id}
                want["popularity"].append(None if ex.item_id not in counts else 1 + sum(
                    1 for item, n in counts.items()
                    if item != ex.item_id and item not in before and n >= counts[ex.item_id]))
                for name, mode in (("cooc_target", "target"), ("cooc_target_source", "target+source")):
                    want[name].append(reference.rank(ex.history, ex.item_id, mode, consumed=before))
                counts[ex.item_id] = counts.get(ex.item_id, 0) + 1
            reference.learn_example(ex)
    assert got == want
    assert sum(r is not None and r <= 10 for r in got["cooc_target"]) > 100  # the stream has structure to find
    restored = ShadowBaselines("movie", "book", max_history=10)
    restored.load_state_dict(shadow.state_dict())
    seen_book = next(ex.item_id for ex in examples if ex.domain == "book")
    probe = [Example("p", "someone", "book", seen_book, 0, ex.history) for ex in examples[-50:]]
    assert restored.rank(probe) == shadow.rank(probe)
    with pytest.raises(ValueError, match="only 'book' events are ranked, got an event of 'movie'"):
        shadow.rank([Example("e", "u", "movie", "m", 0, {})])
