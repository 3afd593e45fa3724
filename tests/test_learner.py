"""SITNLearner on a few hundred real events: learning, checkpoints, determinism, edge cases, ablations."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from learner import SITNConfig, SITNLearner
from stream.dataset import load_events
from stream.errors import CheckpointError
from stream.user_state import Example, UserStateStore

torch.set_num_threads(1)

SMALL = SITNConfig(
    dim=16, max_len=20, n_views=2, view_hidden=16, proj_dim=16, cluster_counts=(4, 8), reservoir_size=128,
    recluster_every_steps=4, i2c_warmup_steps=4, n_item_clusters=4, n_sampled_negatives=32,
    initial_item_capacity=64, lr=1e-2,
)
BATCH = 64


@pytest.fixture(scope="module")
def examples(events_csv: Path) -> list[Example]:
    log = load_events(events_csv, "movie", "book", limit=4000)
    store = UserStateStore(("movie", "book"), max_len=20)
    out = store.observe_many(log.events)
    # the first rows of the file are mostly users' first events; keep examples with some history
    with_history = [ex for ex in out if any(items for items, _ in ex.history.values())]
    return with_history[:384]


def batches(examples: list[Example]) -> list[list[Example]]:
    return [examples[i : i + BATCH] for i in range(0, len(examples), BATCH)]


def train(learner: SITNLearner, examples: list[Example], epochs: int = 1) -> list[dict[str, float]]:
    return [learner.learn_many(b) for _ in range(epochs) for b in batches(examples)]


def test_losses_finite_and_falling(examples: list[Example]) -> None:
    # without the regularisers (dropout, source-history dropout) the training loss must fall fast
    learner = SITNLearner(SMALL.replace(dropout=0.0, source_dropout=0.0), "movie", "book")
    stats = train(learner, examples, epochs=4)
    keys = {"loss", "loss_main", "loss_i2i", "loss_i2c", "examples_per_s", "step", "batch_size", "i2i_pairs",
            "proto_agreement", "proto_entropy"}
    assert keys <= set(stats[0])
    for s in stats:
        for k in ("loss", "loss_main", "loss_i2i", "loss_i2c", "examples_per_s"):
            assert math.isfinite(s[k]), (k, s)
    assert [s["step"] for s in stats] == list(range(1, len(stats) + 1))
    assert stats[0]["batch_size"] == BATCH and stats[0]["i2i_pairs"] > 1
    assert math.isnan(stats[0]["proto_agreement"])  # no prototypes before the first re-clustering
    assert stats[-1]["loss_i2c"] > 0 and 0 <= stats[-1]["proto_agreement"] <= 1
    per_epoch = len(stats) // 4
    first = np.mean([s["loss_main"] for s in stats[:per_epoch]])
    last = np.mean([s["loss_main"] for s in stats[-per_epoch:]])
    assert last < first - 0.2, (first, last)
    proto = learner.prototype_stats()
    assert proto["n_reclusters"] == len(stats) // SMALL.recluster_every_steps
    assert learner.prototypes is not None
    assert sum(proto["source_k4_sizes"]) == len(learner.prototypes.reservoir("source"))  # type: ignore[arg-type]
    assert sum(proto["item_clusters_target_sizes"]) > 0  # type: ignore[arg-type]


def test_checkpoint_round_trip_gives_identical_scores_and_continuation(examples: list[Example],
                                                                      tmp_path: Path) -> None:
    learner = SITNLearner(SMALL, "movie", "book")
    train(learner, examples[:256])
    path = tmp_path / "ckpt.sitn"
    learner.save(path, extra={"offsets": {"events": 256}})
    restored = SITNLearner.load(path)
    assert restored.step == learner.step and restored.extra == {"offsets": {"events": 256}}
    assert restored.config == learner.config and restored.known_users() == learner.known_users()
    users = learner.known_users()[:20]
    np.testing.assert_array_equal(restored.embed_users(users), learner.embed_users(users))
    ids_a, vec_a = learner.embed_items()
    ids_b, vec_b = restored.embed_items()
    assert ids_a == ids_b and np.array_equal(vec_a, vec_b)
    assert restored.recommend(users[0], k=5) == learner.recommend(users[0], k=5)
    assert restored.prototype_stats() == learner.prototype_stats()
    # same RNG stream, optimizer state and prototypes: the next step is identical too
    s1, s2 = learner.learn_many(examples[256:320]), restored.learn_many(examples[256:320])
    for k in ("loss", "loss_main", "loss_i2i", "loss_i2c"):
        assert s1[k] == s2[k]
    np.testing.assert_array_equal(restored.embed_users(users), learner.embed_users(users))


def test_corrupt_checkpoint_is_refused(examples: list[Example], tmp_path: Path) -> None:
    learner = SITNLearner(SMALL, "movie", "book")
    learner.learn_many(examples[:32])
    path = tmp_path / "ckpt.sitn"
    learner.save(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        SITNLearner.load(path)
    with pytest.raises(CheckpointError, match="not found"):
        SITNLearner.load(tmp_path / "missing")


def test_same_seed_same_embeddings_even_interleaved(examples: list[Example]) -> None:
    a, b = SITNLearner(SMALL, "movie", "book"), SITNLearner(SMALL, "movie", "book")
    for batch in batches(examples[:192]):
        a.learn_many(batch)
        b.learn_many(batch)
    users = a.known_users()[:10]
    np.testing.assert_array_equal(a.embed_users(users), b.embed_users(users))
    other = SITNLearner(SMALL.replace(seed=1), "movie", "book")
    train(other, examples[:192])
    assert not np.array_equal(other.embed_users(users), a.embed_users(users))


def test_unknown_user_unseen_item_and_cold_start(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL, "movie", "book")
    train(learner, examples[:256])
    q = learner.embed_users(["nobody", "nobody-else"])
    assert q.shape == (2, SMALL.n_views, SMALL.dim) and q.dtype == np.float32
    np.testing.assert_array_equal(q[0], q[1])  # unknown users: the same (empty-history) query
    np.testing.assert_allclose(q[0], learner.embed_histories([{}])[0], atol=1e-6)
    assert len(learner.recommend("nobody", k=3)) == 3
    # an item never learned is dropped from a query history
    known = next(ex for ex in examples if ex.history["book"][0])
    items, times = known.history["book"]
    with_unknown = {"movie": known.history["movie"], "book": (("never-seen", *items), (times[0], *times))}
    np.testing.assert_allclose(
        learner.embed_histories([with_unknown])[0], learner.embed_histories([known.history])[0], atol=1e-6
    )
    # cold start: no target history, target vectors come from the source side alone
    movie_only = next(ex for ex in examples if len(ex.history["movie"][0]) >= 2)
    cold = learner.embed_histories([{"movie": movie_only.history["movie"], "book": ((), ())}])[0]
    empty = learner.embed_histories([{}])[0]
    assert np.abs(cold).sum() > 0 and not np.allclose(cold, empty)
    # a registered but never trained item gets a defined, initialised row
    n_before = len(learner.embed_items()[0])
    learner.register_items("book", ["brand-new-book"])
    ids, vectors = learner.embed_items("book")
    assert len(ids) == n_before + 1 and ids[-1] == "brand-new-book" and np.abs(vectors[-1]).sum() > 0
    scores = learner.score_items(learner.embed_users(["nobody"]))
    assert scores.shape == (1, n_before + 1)


def test_recommend_excludes_consumed_and_scores_are_max_over_views(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL, "movie", "book")
    train(learner, examples[:256])
    user = next(u for u in learner.known_users() if learner.consumed(u, "book"))
    consumed = learner.consumed(user, "book")
    recs = learner.recommend(user, k=10)
    assert len(recs) == 10 and not consumed & {i for i, _ in recs}
    assert [s for _, s in recs] == sorted((s for _, s in recs), reverse=True)
    q = learner.embed_users([user])
    ids, vectors = learner.embed_items()
    expected = max(float(q[0, v] @ vectors[ids.index(recs[0][0])]) for v in range(SMALL.n_views))
    assert recs[0][1] == pytest.approx(expected, rel=1e-5)
    with_consumed = {i for i, _ in learner.recommend(user, k=len(ids), exclude_consumed=False)}
    assert consumed <= with_consumed


def test_tables_grow_past_initial_capacity(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL.replace(initial_item_capacity=8), "movie", "book")
    stats = train(learner, examples[:192])
    assert all(math.isfinite(s["loss"]) for s in stats)
    assert len(learner.embed_items()[0]) > 8


@pytest.mark.parametrize(
    "changes",
    [
        {"n_views": 1},
        {"cluster_counts": (4,)},
        {"use_i2i": False},
        {"use_i2c": False},
        {"use_coarse_level": False, "use_time_gap": False, "use_transfer_gate": False},
        {"n_layers": 2, "causal": True, "dropout": 0.1},
    ],
)
def test_ablation_configs_run(examples: list[Example], changes: dict) -> None:
    config = SMALL.replace(**changes)
    learner = SITNLearner(config, "movie", "book")
    stats = train(learner, examples)  # 6 steps: prototypes exist from step 4, I2C runs from step 5
    assert all(math.isfinite(s["loss"]) for s in stats)
    if not config.use_i2i:
        assert all(s["loss_i2i"] == 0.0 and s["i2i_pairs"] == 0 for s in stats)
    if not config.use_i2c:
        assert all(s["loss_i2c"] == 0.0 for s in stats)
    else:
        assert stats[-1]["loss_i2c"] > 0
    q = learner.embed_users(learner.known_users()[:3])
    assert q.shape == (3, config.n_views, config.dim) and np.isfinite(q).all()


def test_single_domain_model_trains_on_target_events_only(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL.replace(use_source=False), "movie", "book")
    stats = train(learner, examples[:256])
    n_target = sum(ex.domain == "book" for ex in examples[:256])
    assert sum(s["trained_examples"] for s in stats) == n_target
    assert all(s["loss_i2i"] == 0.0 and math.isnan(s["proto_agreement"]) for s in stats)
    assert learner.embed_users(learner.known_users()[:2]).shape == (2, SMALL.n_views, SMALL.dim)
    with pytest.raises(ValueError, match=r"domain 'movie' is not served by this learner; allowed: \['book'\]"):
        learner.embed_items("movie")


def test_bad_input_is_refused(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL, "movie", "book")
    with pytest.raises(ValueError, match="empty batch"):
        learner.learn_many([])
    bad = Example("e", "u", "music", "i", 1, {})
    with pytest.raises(ValueError, match=r"domain 'music'; allowed: \['movie', 'book'\]"):
        learner.learn_many([bad])
    with pytest.raises(ValueError, match="source and target domains must differ"):
        SITNLearner(SMALL, "book", "book")
    with pytest.raises(ValueError, match=r"queries must have shape \(N, V, 16\), got \(2, 16\)"):
        learner.score_items(np.zeros((2, 16)))
    with pytest.raises(ValueError, match="n_heads must be a divisor of dim=16, got 3"):
        SMALL.replace(n_heads=3)


def test_replay_buffer_trains_earlier_examples_again_and_survives_a_checkpoint(
    examples: list[Example], tmp_path: Path
) -> None:
    config = SMALL.replace(replay_buffer_size=100, replay_ratio=0.5)
    learner = SITNLearner(config, "movie", "book")
    stats = train(learner, examples[:192])  # 3 batches of 64
    assert [s["replayed_examples"] for s in stats] == [0.0, 32.0, 32.0]
    assert [s["trained_examples"] for s in stats] == [64.0, 64.0, 64.0]
    # label counts behind the logQ correction count each fresh example once, never a replay
    assert int(learner.model.encoder("target").item_count.sum()) == sum(ex.domain == "book" for ex in examples[:192])
    path = tmp_path / "ckpt.sitn"
    learner.save(path)
    restored = SITNLearner.load(path)
    assert len(restored._replay) == 100 and list(restored._replay) == list(learner._replay)
    s1, s2 = learner.learn_many(examples[192:256]), restored.learn_many(examples[192:256])
    assert s1["loss"] == s2["loss"] and s1["replayed_examples"] == 32.0


def _histories_before_and_after_dropout(
    learner: SITNLearner, examples: list[Example]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Which of 256 examples have each domain's history before and after the learner's history dropout
    (seeded), and which are target events."""
    from learner.core.batch import build_training_batch

    tb = build_training_batch(examples[:256], learner.domains, learner.idmaps, SMALL.max_len, SMALL.n_time_gap_buckets)
    had = {role: tb.sequences[role].valid.any(dim=1).clone() for role in ("source", "target")}
    torch.manual_seed(0)
    learner._drop_other_history(tb)
    has = {role: tb.sequences[role].valid.any(dim=1) for role in ("source", "target")}
    return had, has, tb.event_role == 1


def test_source_dropout_blanks_the_other_domains_history_of_a_share_of_examples(examples: list[Example]) -> None:
    had, has, target_events = _histories_before_and_after_dropout(
        SITNLearner(SMALL.replace(source_dropout=0.5), "movie", "book"), examples)
    # only the *other* domain's history is ever blanked: a target event keeps its target history
    assert torch.equal(has["target"][target_events], had["target"][target_events])
    assert torch.equal(has["source"][~target_events], had["source"][~target_events])
    dropped = (had["source"] & ~has["source"])[target_events].float().mean().item()
    assert 0.35 < dropped / had["source"][target_events].float().mean().item() < 0.65


def test_own_history_dropout_blanks_a_disjoint_share_of_the_events_own_domain(examples: list[Example]) -> None:
    had, has, target_events = _histories_before_and_after_dropout(
        SITNLearner(SMALL.replace(source_dropout=0.3, own_history_dropout=0.3), "movie", "book"), examples)
    lost_own = (had["target"] & ~has["target"])[target_events]
    lost_other = (had["source"] & ~has["source"])[target_events]
    assert not (lost_own & lost_other).any()  # the two shares are disjoint: never both histories gone
    assert 0.15 < lost_own.float().mean().item() / had["target"][target_events].float().mean().item() < 0.45
    assert 0.15 < lost_other.float().mean().item() / had["source"][target_events].float().mean().item() < 0.45
    with pytest.raises(ValueError, match="own_history_dropout must be in"):
        SMALL.replace(source_dropout=0.6, own_history_dropout=0.5)


def test_new_item_rows_start_at_the_mean_of_their_history_items(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL.replace(source_dropout=0.0), "movie", "book")
    train(learner, examples[:128])
    enc = learner.model.encoder("target")
    user_history = next(ex.history for ex in examples[128:] if len(ex.history["book"][0]) >= 2)
    items = user_history["book"][0]
    rows = learner.idmaps["target"].rows(items)
    assert (rows > 0).all()
    expected = enc.item_weight[torch.from_numpy(rows)].detach().mean(dim=0)
    new = Example("x1", "someone", "book", "a-brand-new-book", 10**9, user_history)
    from learner.core.batch import build_training_batch

    known = {role: len(m) for role, m in learner.idmaps.items()}
    tb = build_training_batch([new], learner.domains, learner.idmaps, SMALL.max_len, SMALL.n_time_gap_buckets)
    learner._ensure_capacity()
    learner._init_new_rows(tb, known)
    row = int(learner.idmaps["target"].rows(["a-brand-new-book"])[0])
    torch.testing.assert_close(enc.item_weight[row].detach(), expected)


def test_init_history_items_starts_a_row_first_seen_in_a_history_at_that_history_s_mean(
    examples: list[Example],
) -> None:
    from learner.core.batch import build_training_batch

    for init_history_items in (True, False):
        learner = SITNLearner(SMALL.replace(source_dropout=0.0, init_history_items=init_history_items), "movie", "book")
        train(learner, examples[:128])
        enc = learner.model.encoder("target")
        user_history = next(ex.history for ex in examples[128:] if len(ex.history["book"][0]) >= 2)
        items, times = user_history["book"]
        old_rows = torch.from_numpy(learner.idmaps["target"].rows(items))
        assert (old_rows > 0).all()
        expected = enc.item_weight[old_rows].detach().mean(dim=0)
        # a movie event whose book history holds a book never seen before (and the history's older books)
        history = {"movie": user_history["movie"], "book": ((*items, "first-met-in-a-history"), (*times, times[-1]))}
        movie = next(ex.item_id for ex in examples[:128] if ex.domain == "movie")
        new = Example("x1", "someone", "movie", movie, 10**9, history)
        known = {role: len(m) for role, m in learner.idmaps.items()}
        tb = build_training_batch([new], learner.domains, learner.idmaps, SMALL.max_len, SMALL.n_time_gap_buckets)
        learner._ensure_capacity()
        learner._init_new_rows(tb, known)
        row = int(learner.idmaps["target"].rows(["first-met-in-a-history"])[0])
        assert row > known["target"]
        if init_history_items:
            torch.testing.assert_close(enc.item_weight[row].detach(), expected)
        else:  # the row keeps its random start
            assert not torch.allclose(enc.item_weight[row].detach(), expected)


def test_transfer_gate_starts_closed() -> None:
    learner = SITNLearner(SMALL.replace(gate_init_bias=-4.0), "movie", "book")
    gate = learner.model.transfer["target"].gate
    assert gate is not None and torch.all(gate.bias == -4.0)


def test_registered_but_untrained_items_are_dropped_from_query_histories(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL, "movie", "book")
    train(learner, examples[:256])
    learner.register_items("book", ["registered-only"])  # a row exists, still at its random initialisation
    known = next(ex for ex in examples if ex.history["book"][0])
    items, times = known.history["book"]
    with_untrained = {"movie": known.history["movie"], "book": ((*items, "registered-only"), (*times, times[-1]))}
    np.testing.assert_allclose(
        learner.embed_histories([with_untrained])[0], learner.embed_histories([known.history])[0], atol=1e-6
    )


def test_item_bias_is_the_last_coordinate_and_serves_popularity_to_a_user_without_history(
    examples: list[Example],
) -> None:
    learner = SITNLearner(SMALL, "movie", "book")  # item_bias is on by default
    train(learner, examples, epochs=3)
    queries = learner.embed_histories([{}, examples[0].history])  # (2, V, D): no history at all, and some
    assert (queries[..., -1] == 1.0).all()
    item_ids, vectors = learner.embed_items()
    scores = learner.score_items(queries[:1])[0]
    expected = (queries[0, :, :-1] @ vectors[:, :-1].T).max(axis=0) + vectors[:, -1]  # <q', e'> + b_i
    assert np.allclose(scores, expected, atol=1e-5)
    # The bias learns what the softmax favours: the most frequent book labels rank above the rare ones.
    counts = {item_id: 0 for item_id in item_ids}
    for ex in examples:
        if ex.domain == "book":
            counts[ex.item_id] += 1
    frequent = [i for i, item_id in enumerate(item_ids) if counts[item_id] >= 3]
    once = [i for i, item_id in enumerate(item_ids) if counts[item_id] == 1]
    assert frequent and once
    assert scores[frequent].mean() > scores[once].mean()


def test_popularity_prior_adds_beta_log_counts_to_every_inference_score_and_nothing_to_training(
    examples: list[Example],
) -> None:
    plain = SITNLearner(dataclasses.replace(SMALL, popularity_prior=0.0), "movie", "book")
    prior = SITNLearner(dataclasses.replace(SMALL, popularity_prior=2.0), "movie", "book")
    train(plain, examples, epochs=2)
    train(prior, examples, epochs=2)
    target = "target"
    assert torch.equal(plain.model.encoder(target).item_weight, prior.model.encoder(target).item_weight)  # same steps
    item_ids, vectors = prior.embed_items()
    plain_ids, plain_vectors = plain.embed_items()
    counts = prior.model.encoder(target).item_count[1 : len(item_ids) + 1].numpy()
    assert item_ids == plain_ids and counts.max() >= 2
    np.testing.assert_allclose(vectors[:, -1] - plain_vectors[:, -1], 2.0 * np.log1p(counts), rtol=1e-5)
    np.testing.assert_array_equal(vectors[:, :-1], plain_vectors[:, :-1])
    queries = prior.embed_histories([{}, examples[0].history, examples[5].history])  # (3, V, D)
    scores = prior.score_items(queries)
    np.testing.assert_allclose(scores, (queries @ vectors.T).max(axis=1), rtol=1e-5, atol=1e-5)  # = serving's
    np.testing.assert_allclose(scores - plain.score_items(queries), np.tile(2.0 * np.log1p(counts), (3, 1)),
                               rtol=1e-5, atol=1e-5)
    # Without the bias coordinate no inner product can carry a prior: none is added.
    unbiased = [SITNLearner(dataclasses.replace(SMALL, item_bias=False, popularity_prior=p), "movie", "book")
                for p in (0.0, 1.0)]
    for learner in unbiased:
        train(learner, examples, epochs=1)
    np.testing.assert_array_equal(unbiased[0].embed_items()[1], unbiased[1].embed_items()[1])
    with pytest.raises(ValueError, match="popularity_prior"):
        dataclasses.replace(SMALL, popularity_prior=-1.0)
    values = SMALL.to_dict()
    del values["popularity_prior"]
    assert SITNConfig.from_dict(values).popularity_prior == 0.0  # checkpoints from before ranked without it


def test_checkpoints_without_item_bias_keep_it_off() -> None:
    values = SMALL.to_dict()
    del values["item_bias"]
    assert SITNConfig.from_dict(values).item_bias is False
    assert SITNConfig.from_dict(SMALL.to_dict()).item_bias is True


def test_checkpoints_without_init_history_items_keep_it_off() -> None:
    assert SITNConfig().init_history_items is True  # the default since it closed most of the long-tail gap
    values = SMALL.to_dict()
    del values["init_history_items"]
    assert SITNConfig.from_dict(values).init_history_items is False
    assert SITNConfig.from_dict(SMALL.replace(init_history_items=True).to_dict()).init_history_items is True


def test_transfer_map_without_bias_maps_an_empty_history_to_nothing(examples: list[Example]) -> None:
    # transfer_map_bias=False: the target query of a user with no history at all is 0 (bar the item-bias
    # coordinate), so items rank by their bias alone; with the bias the query carries the gated offset.
    queries = {}
    for map_bias in (False, True):
        learner = SITNLearner(SMALL.replace(transfer_map_bias=map_bias), "movie", "book")
        assert (learner.model.transfer["target"].map.bias is not None) is map_bias
        train(learner, examples, epochs=1)
        queries[map_bias] = learner.embed_histories([{}])[0]  # (V, D)
    assert (queries[False][..., :-1] == 0.0).all() and (queries[False][..., -1] == 1.0).all()
    assert np.abs(queries[True][..., :-1]).max() > 1e-3


def test_checkpoints_without_transfer_map_bias_keep_the_bias() -> None:
    values = SMALL.to_dict()
    del values["transfer_map_bias"]
    assert SITNConfig.from_dict(values).transfer_map_bias is True


def test_query_time_transfer_scale_turns_the_source_part_down_and_survives_a_checkpoint(
    examples: list[Example], tmp_path: Path
) -> None:
    learner = SITNLearner(SMALL.replace(gate_init_bias=2.0), "movie", "book")  # an open gate: transfer shows
    train(learner, examples, epochs=2)
    both = next(ex for ex in examples if ex.history["book"][0] and len(ex.history["movie"][0]) >= 2)
    warm = both.history
    no_source = {"movie": ((), ()), "book": warm["book"]}
    cold = {"movie": warm["movie"], "book": ((), ())}
    q = {h: learner.embed_histories([x])[0] for h, x in (("warm", warm), ("no_source", no_source), ("cold", cold))}
    assert not np.allclose(q["warm"], q["no_source"])  # the source part moves a warm query at scale 1
    learner.model.transfer_scale = (0.0, 0.5)
    # warm users: scale 0 leaves the own interests alone; cold users: half the transferred part
    np.testing.assert_allclose(learner.embed_histories([warm])[0], q["no_source"], atol=1e-6)
    half = learner.embed_histories([cold])[0]
    np.testing.assert_allclose(half[..., :-1], 0.5 * q["cold"][..., :-1], atol=1e-6)  # own part 0 when cold
    assert (half[..., -1] == 1.0).all()  # the item-bias coordinate is not scaled
    # training ignores the scale (it is a query-time choice): the same step from the same state either way
    path = tmp_path / "scaled.pt"
    learner.save(path)
    restored = SITNLearner.load(path)
    assert restored.model.transfer_scale == (0.0, 0.5)
    np.testing.assert_array_equal(restored.embed_histories([cold]), learner.embed_histories([cold]))
    unscaled = SITNLearner.load(path)
    unscaled.model.transfer_scale = (1.0, 1.0)
    assert restored.learn_many(examples[:BATCH])["loss"] == unscaled.learn_many(examples[:BATCH])["loss"]
    # a checkpoint written before the scale existed transfers as trained
    state = learner.state_dict()
    del state["transfer_scale"]
    assert SITNLearner.from_state_dict(state).model.transfer_scale == (1.0, 1.0)


def test_low_rank_transfer_map_and_detached_other_domain(examples: list[Example]) -> None:
    learner = SITNLearner(SMALL.replace(transfer_rank=3), "movie", "book")
    weights = [p.shape for p in learner.model.transfer["target"].map.parameters()]
    assert weights == [torch.Size([3, SMALL.dim]), torch.Size([SMALL.dim, 3])]
    assert all(math.isfinite(s["loss"]) for s in train(learner, examples))
    with pytest.raises(ValueError, match="transfer_rank must be an int >= 0"):
        SMALL.replace(transfer_rank=-1)
    # detached: the loss of a batch of target events reaches no source-encoder parameter; attached, it does
    book_events = [ex for ex in examples if ex.domain == "book" and ex.history["movie"][0]][:BATCH]
    assert len(book_events) >= 8
    reached = {}
    for detach in (False, True):
        model = SITNLearner(SMALL.replace(transfer_detach_other=detach, source_dropout=0.0, use_i2i=False,
                                          use_i2c=False, gate_init_bias=0.0), "movie", "book")
        model.learn_many(book_events)
        reached[detach] = sum(float(p.grad.abs().sum()) for p in model.model.encoder("source").parameters()
                              if p.grad is not None)
    assert reached[False] > 0.0 and reached[True] == 0.0
    # transfer_detach_target: a batch of source events reaches no target-encoder parameter, while a batch of
    # target events still reaches the source encoder
    movie_events = [ex for ex in examples if ex.domain == "movie" and ex.history["book"][0]][:BATCH]
    assert len(movie_events) >= 8
    for detach in (False, True):
        config = SMALL.replace(transfer_detach_target=detach, source_dropout=0.0, use_i2i=False, use_i2c=False,
                               gate_init_bias=0.0)
        model = SITNLearner(config, "movie", "book")
        model.learn_many(movie_events)
        into_target = sum(float(p.grad.abs().sum()) for p in model.model.encoder("target").parameters()
                          if p.grad is not None)
        assert (into_target == 0.0) is detach
        model = SITNLearner(config, "movie", "book")
        model.learn_many(book_events)
        assert sum(float(p.grad.abs().sum()) for p in model.model.encoder("source").parameters()
                   if p.grad is not None) > 0.0


def test_residual_transfer_trains_the_own_interests_alone_and_the_transfer_on_top(examples: list[Example]) -> None:
    from learner.core.batch import build_training_batch

    learner = SITNLearner(SMALL.replace(transfer_residual=True, gate_init_bias=0.0), "movie", "book")
    assert all(math.isfinite(s["loss_main"]) for s in train(learner, examples))
    tb = build_training_batch(examples[:BATCH], learner.domains, learner.idmaps, SMALL.max_len,
                              SMALL.n_time_gap_buckets)
    learner.model.train()
    learner.model.zero_grad(set_to_none=True)  # the last step's gradients are still on the parameters
    interests = learner.model(tb.sequences)
    assert interests.own_queries is not None
    # the combined target query reads the own interests detached: no gradient reaches the target encoder ...
    interests.queries["target"].sum().backward()
    target_encoder = list(learner.model.encoder("target").parameters())
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in target_encoder)
    # ... the own-alone query carries it
    learner.model.zero_grad(set_to_none=True)
    interests = learner.model(tb.sequences)
    assert interests.own_queries is not None
    interests.own_queries["target"].sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in target_encoder if p.grad is not None) > 0.0
    # at query time there is one query per domain, own + transfer, as without the option
    learner.model.eval()
    with torch.no_grad():
        assert learner.model(tb.sequences).own_queries is None


@pytest.mark.parametrize("share", [1.0, 0.5, 0.0])
def test_transfer_item_grad_leaves_the_item_table_to_the_own_interests(examples: list[Example], share: float) -> None:
    from learner.core.batch import build_training_batch

    # transfer_detach_other: the other domain's encoder (whose history tokens are item rows too) is not a path
    learner = SITNLearner(SMALL.replace(transfer_item_grad=share, transfer_detach_other=True,
                                        gate_init_bias=0.0, use_i2i=False, use_i2c=False), "movie", "book")
    train(learner, examples)
    tb = build_training_batch(examples[:BATCH], learner.domains, learner.idmaps, SMALL.max_len,
                              SMALL.n_time_gap_buckets)
    learner.model.train()
    table = learner.model.encoder("target").item_weight

    def item_gradient(combined_scale: float) -> torch.Tensor:
        """The book table's gradient of the main loss, the combined queries scaled by ``combined_scale``."""
        learner.model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout masks and sampled negatives in both calls
        interests = learner.model(tb.sequences)
        interests.queries = {role: q * combined_scale for role, q in interests.queries.items()}
        learner._main_loss(tb, interests).backward()
        assert table.grad is not None
        return table.grad.to_dense().clone()

    moved = float((item_gradient(1.0) - item_gradient(0.5)).abs().sum())
    # at 0 the combined queries' loss sends the items nothing; above, a share of its gradient
    assert (moved == 0.0) is (share == 0.0)
    with pytest.raises(ValueError, match="transfer_item_grad must be in"):
        SMALL.replace(transfer_item_grad=1.5)


def test_checkpoints_without_the_residual_switches_train_on_as_before() -> None:
    values = SMALL.to_dict()
    del values["transfer_residual"], values["contrastive_target_grad"]
    old = SITNConfig.from_dict(values)
    assert old.transfer_residual is False and old.contrastive_target_grad is True
    assert SITNConfig().transfer_residual is True and SITNConfig().contrastive_target_grad is False
