"""The fused ranker z(model) + w * z(cooc): a hand-computed rank, serving's top-k against the learner's ranks
on the same vectors and counts, the weight and ``served_by`` travelling with the published batches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.online.shadow import FusedShadow
from serving.actor import ServingCore
from serving.fused import CoocAlignment, fused_scores, standardise
from serving.service import RecommendationService
from serving.settings import ServingSettings
from stream.cooccurrence import ItemCooccurrence
from stream.events import EmbeddingBatch, EmbeddingUpdate
from stream.user_state import Example


def test_standardise_and_fuse_by_hand() -> None:
    # model [0, 1, 2, 5]: mean 2, std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    z = standardise(np.array([0.0, 1.0, 2.0, 5.0]))
    assert z.tolist() == pytest.approx([-2 / math.sqrt(3.5), -1 / math.sqrt(3.5), 0.0, 3 / math.sqrt(3.5)], abs=1e-12)
    assert standardise(np.array([3.0, 3.0])).tolist() == [0.0, 0.0]
    # cooc [1, 0, 0, 1]: mean 0.5, std 0.5 -> [1, -1, -1, 1]
    fused = fused_scores(np.array([0.0, 1.0, 2.0, 5.0]), np.array([1.0, 0.0, 0.0, 1.0]), 2.0)
    assert fused.tolist() == pytest.approx([-2 / math.sqrt(3.5) + 2, -1 / math.sqrt(3.5) - 2, -2.0,
                                            3 / math.sqrt(3.5) + 2], abs=1e-12)
    with pytest.raises(ValueError, match=r"weight must be a finite number >= 0, got -1.0"):
        fused_scores(None, np.zeros(2), -1.0)
    with pytest.raises(ValueError, match=r"model and cooc scores must align, got shapes \(3,\) and \(2,\)"):
        fused_scores(np.zeros(3), np.zeros(2), 1.0)


def _cooc(events: list[tuple[tuple[str, ...], str]]) -> ItemCooccurrence:
    co = ItemCooccurrence("movie", "book")
    for before, item_id in events:
        co.learn({"book": before}, "book", item_id)
    return co


def test_fused_rank_by_hand_ties_against_and_exclusions() -> None:
    """Served items (p, q, r, s); the user read p before and now reads q."""
    # co-occurrence: p-q once (user x), r read twice alone, s once; counts p 1, q 1, r 2, s 1
    co = _cooc([((), "p"), (("p",), "q"), ((), "r"), ((), "r"), ((), "s")])
    served = ("p", "q", "r", "s")
    ex = Example("e", "u", "book", "q", 0, {"book": (("p",), ())})
    fused = FusedShadow(weights=(0.5, 4.0), k=2, window=10)
    # model scores: s 2, r 1, q 1 (ties with r), p 0. z(model) over the four items: mean 1, std sqrt(0.5):
    #   p -1.414, q 0, r 0, s 1.414. co-occurrence with p: q 1 (+ popularity tie-breaks ~1e-9 for the others),
    #   z(cooc) ~ p -0.577, q 1.732, r -0.577, s -0.577.
    # w = 0.5: q 0.866, r -0.289, s 1.126 -> s beats q: rank 2 (p excluded); w = 4: q 6.93 first: rank 1.
    assert fused.weight == 4.0  # the middle of a two-weight grid: index 1
    rank = fused.rank(ex, served, np.array([0.0, 1.0, 1.0, 2.0], np.float32), 1, [0], co, None, True)
    assert rank == 1
    assert {w: t.figures("stream")["stream"]["hr"] for w, t in fused.tallies.items()} == {0.5: 1.0, 4.0: 1.0}
    ndcg = {w: t.figures("stream")["stream"]["ndcg"] for w, t in fused.tallies.items()}
    assert ndcg == pytest.approx({0.5: 1 / math.log2(3), 4.0: 1.0}, abs=1e-12)
    # Ties count against the item: a user without vectors and without history gets the popularity
    # tie-break order: r (read twice) first, q tied with p and s (read once): rank 4; p excluded: 3.
    alone = Example("e", "v", "book", "q", 0, {"book": ((), ())})
    assert fused.rank(alone, served, None, 1, [], co, None, True) == 4
    assert fused.rank(alone, served, None, 1, [0], co, None, True) == 3
    # Not served: a miss for every weight (and the rankable flag is tallied as given).
    assert fused.rank(ex, served, None, None, [], co, None, False) is None
    # u had read p; v had read nothing (cold): tallied apart, over 0 and the grid
    assert [t.events for t in fused.tallies.values()] == [2, 2]
    assert [t.events for t in fused.tallies_cold.values()] == [2, 2, 2]
    assert fused.tallies[0.5].figures("stream")["stream"]["rankable"] == 1
    # choose(): the best windowed NDCG@k, 4.0 (0.5 ranked the first event second, 4.0 first; the others
    # are misses at k = 2 for both).
    assert fused.choose() == 4.0
    with pytest.raises(ValueError, match=r"weights must be distinct finite numbers > 0, got \[1.0, 1.0\]"):
        FusedShadow(weights=(1.0, 1.0))


def test_users_without_target_history_get_their_own_weight_chosen_on_their_events() -> None:
    """Cold users (no book read): co-occurrence holds only its popularity tie-break; when the model ranks their
    books better alone, their weight goes to 0 while the others' stays; serving applies each to its users."""
    co = _cooc([((), "p"), (("p",), "q"), ((), "r"), ((), "r"), ((), "s")])  # r the most read
    served = ("p", "q", "r", "s")
    fused = FusedShadow(weights=(0.5, 4.0), k=1, window=10)
    model = np.array([0.0, 0.0, 0.0, 3.0], np.float32)  # the model puts s first
    cold = Example("e", "v", "book", "s", 0, {"book": ((), ())})
    for _ in range(3):  # cold users read s: w = 0 ranks it first, w = 4 puts r (popularity) above it
        fused.rank(cold, served, model, 3, [], co, None, True)
    warm = Example("e", "u", "book", "q", 0, {"book": (("p",), ())})  # u read p, now q: co-occurrence ranks q first
    for _ in range(3):
        fused.rank(warm, served, model, 1, [0], co, None, True)
    assert fused.choose() == 4.0 and fused.weight_cold == 0.0
    assert fused.ndcg(0.0, cold=True) == 1.0 and fused.ndcg(4.0, cold=True) == 0.0
    assert fused.stats()["fused_weight_cold"] == 0.0 and fused.stats()["fused_cold_w0_ndcg_at_1_window"] == 1.0
    restored = FusedShadow(weights=(0.5, 4.0), k=1, window=10)
    restored.load_state_dict(fused.state_dict())
    assert restored.stats() == fused.stats()
    old = fused.state_dict()
    del old["weight_cold"], old["tallies_cold"]  # a checkpoint from before the cold slot: it follows the other
    before = FusedShadow(weights=(0.5, 4.0), k=1, window=10)
    before.load_state_dict(old)
    assert (before.weight, before.weight_cold) == (4.0, 4.0)
    # serving: the cold weight for a user who consumed nothing, the other for everyone else
    core = ServingCore(ServingSettings(dim=2, index_factory="Flat", index_search_params={}, popularity_refresh_s=0.0),
                       start_http=False)
    batch = EmbeddingBatch(version=1, full=True, item_ids=["a", "b", "c"],
                           item_vectors=np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32),
                           user_ids=["u", "w"], user_vectors=np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32),
                           popularity=[], created_at_s=0.0, consumed=[("v", "a"), ("v", "c"), ("x", "c"), ("u", "a")],
                           served_by="fused", fused_weight=3.0, fused_weight_cold=0.0)
    core.apply_batch(batch)
    service = core.service
    assert (service.fused_weight, service.fused_weight_cold, service.health()["fused_weight_cold"]) == (3.0, 0.0, 0.0)
    snap = service.index.snapshot
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([0.5, 0.5])}
    for user_id, history, weight in (("w", (), 0.0), ("u", ("a",), 3.0)):  # w consumed nothing: the model alone
        scores, live_rows = service.fused_scores(snap, service.users.get(user_id), history)
        ids = tuple(snap.base_item_ids[r] for r in live_rows.tolist()) + snap.delta_item_ids
        cooc = service.cooccurrence.aligned_scores(history, [CoocAlignment(ids)])[0]
        user = service.users.get(user_id)[0]
        model = np.array([float(vectors[i] @ user) for i in ids])
        assert scores.tolist() == pytest.approx(fused_scores(model, cooc, weight).tolist(), abs=1e-12), user_id
    assert [i for i, _ in core.recommend("w", k=3)["items"]] == ["b", "c", "a"]  # c, the most read, not first
    # without vectors there is no model score: co-occurrence's popularity order, not a tie of every item
    stranger = core.recommend("stranger", k=3)
    assert stranger["served_by"] == "fused" and {i for i, _ in stranger["items"][:2]} == {"a", "c"}
    assert stranger["items"][1][1] > stranger["items"][2][1]
    service.set_ranker("fused", 2.0)  # a weight alone: the cold users follow it
    assert (service.fused_weight, service.fused_weight_cold) == (2.0, None)
    with pytest.raises(ValueError, match=r"fused_weight_cold must be a finite number >= 0, got -1.0"):
        service.set_ranker("fused", 1.0, -1.0)


def test_serving_fused_top_k_equals_the_learners_fused_ranks() -> None:
    """Same item and user vectors, same consumed pairs: serving's fused order is the learner's rank order."""
    rng = np.random.default_rng(7)
    n_items, dim = 40, 4
    items = [f"i{j:02d}" for j in range(n_items)]
    vectors = rng.normal(size=(n_items, dim)).astype(np.float32)
    user_views = rng.normal(size=(2, dim)).astype(np.float32)  # (V, D)
    service = RecommendationService(dim=dim, merge_threshold_rows=32, popularity_refresh_s=0.0)
    service.apply_updates([EmbeddingUpdate("item", i, 1, 1, tuple(v.tolist())) for i, v in zip(items, vectors,
                                                                                               strict=True)])
    # Re-publish three items (their base rows go stale, the delta holds them) and add two new ones.
    vectors[[3, 5, 7]] = rng.normal(size=(3, dim))
    extra = [f"n{j}" for j in range(2)]
    extra_vectors = rng.normal(size=(2, dim)).astype(np.float32)
    service.apply_updates([EmbeddingUpdate("item", items[j], 2, 1, tuple(vectors[j].tolist())) for j in (3, 5, 7)]
                          + [EmbeddingUpdate("item", i, 2, 1, tuple(v.tolist()))
                             for i, v in zip(extra, extra_vectors, strict=True)])
    snap = service.index.snapshot
    assert (snap.n_stale, len(snap.delta_item_ids), snap.size) == (3, 5, n_items + 2)
    service.apply_updates([EmbeddingUpdate("user", "u", 2, 2, tuple(user_views.ravel().tolist()))])
    # Consumed histories (serving learns co-occurrence from them in order); u read three items.
    histories = {"a": ["i01", "i02", "i03", "n0"], "b": ["i02", "i09", "i03"], "c": ["i01", "i09", "n0", "i20"],
                 "u": ["i01", "i02", "i30"]}
    learner_cooc = ItemCooccurrence("movie", "book")
    for user_id, read in histories.items():
        service.record_consumed(user_id, read)
        for j, item_id in enumerate(read):
            learner_cooc.learn({"book": tuple(read[:j])}, "book", item_id)
    service.set_ranker("fused", fused_weight=1.5)
    fused_u, live_rows = service.fused_scores(snap, service.users.get("u"), tuple(histories["u"]))
    model_u = np.concatenate([(snap.base_vectors @ user_views.T).max(axis=1)[live_rows],
                              (snap.delta_vectors @ user_views.T).max(axis=1)])  # (N,): each item's best view
    cooc_u = service.cooccurrence.aligned_scores(tuple(histories["u"]), [
        CoocAlignment(tuple(snap.base_item_ids[r] for r in live_rows.tolist()) + snap.delta_item_ids)])[0]
    assert fused_u.tolist() == fused_scores(model_u, cooc_u, 1.5).tolist()  # exact: the same arithmetic
    top = [s.item_id for s in service.recommend("u", k=100).items]
    served_ids = (*items, *extra)  # the learner's served order: another order than the index's
    all_vectors = np.concatenate([vectors, extra_vectors])
    model = (user_views @ all_vectors.T).max(axis=0)  # (N,)
    consumed = histories["u"]
    excluded = [served_ids.index(i) for i in consumed]
    fused = FusedShadow(weights=(1.5,), k=10)
    ranks = {}
    for j, item_id in enumerate(served_ids):
        if item_id in consumed:
            continue
        ex = Example("e", "u", "book", item_id, 0, {"book": (tuple(consumed), ())})
        ranks[item_id] = fused.rank(ex, served_ids, model, j, excluded, learner_cooc, None, True)
    assert sorted(ranks.values()) == list(range(1, n_items + 2 - len(consumed) + 1))  # no ties
    assert top == sorted(ranks, key=ranks.__getitem__)
    assert len(top) == n_items + 2 - len(consumed)
    # A user without vectors nor history: z(model) = 0 and co-occurrence's popularity tie-break alone:
    # i01 and i02 read three times, then i03, i09, n0 twice (ties in index order: i09 in the base, i03 and
    # n0 in the delta).
    rec = service.recommend("stranger", k=5)
    assert (rec.served_by, [s.item_id for s in rec.items]) == ("fused", ["i01", "i02", "i09", "i03", "n0"])


def test_published_batches_carry_the_fused_ranker_and_its_weight() -> None:
    core = ServingCore(ServingSettings(dim=2, index_factory="Flat", index_search_params={}, popularity_refresh_s=0.0),
                       start_http=False)
    batch = EmbeddingBatch(version=1, full=True, item_ids=["a", "b", "c"],
                           item_vectors=np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32),
                           user_ids=["u"], user_vectors=np.array([[[1.0, 0.0]]], np.float32), popularity=[],
                           created_at_s=0.0, consumed=[("v", "a"), ("v", "b"), ("u", "a")], served_by="fused",
                           fused_weight=3.0)
    core.apply_batch(batch)
    assert (core.service.ranker, core.service.fused_weight, core.stats()["fused_weight"]) == ("fused", 3.0, 3.0)
    rec = core.recommend("u", k=2)
    # model (u = [1, 0]): a 1, b 0, c 0.5 -> z [1.22, -1.22, 0]; co-occurrence with a: b 0.5, a and c ~0
    # -> z ~ [-0.71, 1.41, -0.71]; w = 3: b 3.02, c -2.12 (a consumed)
    assert rec["served_by"] == "fused" and [i for i, _ in rec["items"]] == ["b", "c"]
    assert rec["items"][0][1] == pytest.approx(-math.sqrt(1.5) + 3 * math.sqrt(2), abs=1e-6)
    with pytest.raises(ValueError, match=r"fused_weight must be a finite number >= 0, got -1.0"):
        core.service.set_ranker("fused", -1.0)


def test_alignment_follows_a_growing_cooccurrence_as_a_fresh_lookup_would() -> None:
    """Caught up from new rows only, the alignment must equal looking every id up again, at every step, with
    ids that arrive late, never, twice in the sequence, and for another co-occurrence object."""
    rng = np.random.default_rng(7)
    universe = [f"i{n}" for n in range(60)]
    item_ids = tuple(rng.choice(universe, size=40, replace=True).tolist())  # repeats on purpose
    cooc = ItemCooccurrence("s", "t")
    align = CoocAlignment(item_ids)

    def fresh(co: ItemCooccurrence) -> list[int]:
        return [-1 if (row := co.row(i)) is None else row for i in align.item_ids]

    for _ in range(80):
        for item_id in rng.choice(universe, size=int(rng.integers(0, 3))).tolist():
            cooc.learn({"t": ()}, "t", item_id)
        assert align.rows(cooc).tolist() == fresh(cooc)
        if rng.random() < 0.2:  # served items grow: the alignment is extended, not rebuilt
            item_ids = item_ids + tuple(rng.choice(universe, size=3).tolist())
            align = align.extended(item_ids)
            for item_id in rng.choice(universe, size=int(rng.integers(0, 3))).tolist():  # grown since
                cooc.learn({"t": ()}, "t", item_id)
            assert align.rows(cooc).tolist() == fresh(cooc)
    assert align.extended(item_ids[1:]).rows(cooc).tolist() == fresh(cooc)[1:]  # not an extension: afresh
    other = ItemCooccurrence("s", "t")
    for item_id in reversed(universe[:30]):
        other.learn({"t": ()}, "t", item_id)
    assert align.rows(other).tolist() == fresh(other)


def test_all_weights_ranked_at_once_equal_one_weight_at_a_time() -> None:
    """FusedShadow ranks its whole grid in one (W, N) pass; each rank must be the one ``combine`` and
    ``rank_with_ties_against`` give for that weight alone, ties and exclusions included."""
    from serving.fused import combine
    from stream.cooccurrence import rank_with_ties_against, ranks_with_ties_against

    rng = np.random.default_rng(11)
    weights = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0])  # 0: the cold users' model-alone weight
    for _ in range(200):
        n = int(rng.integers(2, 40))
        z_model = None if rng.random() < 0.3 else standardise(rng.integers(0, 4, n).astype(float))  # ties
        z_cooc = standardise(rng.integers(0, 3, n).astype(float))
        positive = int(rng.integers(0, n))
        excluded = rng.integers(0, n, size=int(rng.integers(0, 5))).tolist()
        stacked = np.broadcast_to(z_cooc, (len(weights), n)) if z_model is None else \
            z_model[None, :] + weights[:, None] * z_cooc[None, :]
        expected = [rank_with_ties_against(combine(z_model, z_cooc, float(w)), positive, excluded) for w in weights]
        assert ranks_with_ties_against(stacked, positive, excluded).tolist() == expected
