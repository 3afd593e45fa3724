"""The popularity prior on decayed label counts (``learner.core.popularity``) and its half-life chosen online
(``learner.online.prior_tuner``): the counts by hand, the learner's prior and checkpoint, and the tuner inside the
online trainer on real events."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.core import popularity
from learner.core.config import SITNConfig
from learner.core.learner import SITNLearner
from learner.online.checkpoint_store import CheckpointStore
from learner.online.prior_tuner import PriorTuner
from learner.online.publisher import CallableTransport
from learner.online.shadow import consumed_items
from learner.online.trainer import OnlineTrainer
from stream.dataset import load_events
from stream.events import EmbeddingBatch
from stream.user_state import UserStateStore
from tests.test_trainer import batches_from, same_state, small_config


def test_decayed_counts_halve_per_half_life_step_by_ticks_and_survive_a_rebase() -> None:
    h = 8  # a tick is a half-life: 8 labels
    recent, offset = np.zeros(3), 0.0
    offset = popularity.add_labels(recent, offset, np.array([1]), n_before=0, half_life=h)
    assert popularity.decayed_counts(recent, offset, n=7, half_life=h)[1] == 1.0  # no tick yet: undecayed
    assert popularity.decayed_counts(recent, offset, n=8, half_life=h)[1] == pytest.approx(0.5)  # one half-life
    assert popularity.decayed_counts(recent, offset, n=15, half_life=h)[1] == pytest.approx(0.5)  # same tick
    assert popularity.decayed_counts(recent, offset, n=16, half_life=h)[1] == pytest.approx(0.25)
    # an untouched item keeps its value between ticks (a publish need not send it), and a count that fell below
    # MIN_COUNT reads 0, so it stops changing (4 halvings: 1 / 16 < 0.1)
    assert popularity.decayed_counts(recent, offset, n=3 * h, half_life=h)[1] == pytest.approx(1 / 8)
    assert popularity.decayed_counts(recent, offset, n=4 * h, half_life=h)[1] == 0.0
    # a label within a tick counts 2^((n - n_tick) / h) until the tick, then halves like the others
    offset = popularity.add_labels(recent, offset, np.array([2]), n_before=4, half_life=h)
    assert popularity.decayed_counts(recent, offset, n=5, half_life=h)[2] == pytest.approx(2 ** 0.5)
    assert popularity.decayed_counts(recent, offset, n=8, half_life=h)[2] == pytest.approx(2 ** -0.5)
    # far later labels move the offset forward before the weights overflow; every count stays what it was
    h = 64
    edge = int(popularity.REBASE_EXPONENT * h)  # the weight 2^(n / h) reaches 2^512 here
    recent[:] = 0.0
    offset = popularity.add_labels(recent, 0.0, np.array([1]), n_before=edge - 8, half_life=h)
    assert offset == 0.0  # not yet
    before = popularity.decayed_counts(recent, offset, n=edge + 32, half_life=h).copy()
    assert before[1] == pytest.approx(2 ** (-8 / 64))
    moved = popularity.add_labels(recent, offset, np.array([], dtype=np.int64), n_before=edge + 32, half_life=h)
    assert moved == edge and np.isfinite(recent).all() and recent.max() < 2.0
    np.testing.assert_allclose(popularity.decayed_counts(recent, moved, n=edge + 32, half_life=h), before, rtol=1e-9)
    with pytest.raises(ValueError, match="half_life"):
        popularity.add_labels(recent, 0.0, np.array([1]), n_before=0, half_life=0)


def test_the_learner_keeps_each_half_lifes_counts_ranks_with_the_active_one_and_checkpoints_it(
    events_csv: Path, tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    config = small_config().replace(popularity_prior=1.0, popularity_half_lives=(50, 400), popularity_half_life=50)
    learner = SITNLearner(config, "movie", "book")
    events = load_events(events_csv, "movie", "book", limit=1500).events
    examples = UserStateStore(("movie", "book"), max_len=config.max_len).observe_many(events)
    for i in range(0, len(examples), 100):
        learner.learn_many(examples[i : i + 100])
    ids, vectors = learner.embed_items()
    n = len(ids)
    all_time, fast, slow = (learner.prior_counts("target", h, n) for h in (0, 50, 400))
    labels = int(all_time.sum())
    assert labels > 400
    # decayed counts weigh the recent labels: at a tick, their total is between h (the last half-life's labels
    # halved, plus the ones before) and 2h, once far more than h labels passed
    assert fast.sum() < slow.sum() < all_time.sum()
    assert 40 <= fast.sum() <= 110
    np.testing.assert_allclose(vectors[:, -1] - learner.model.encoder("target").item_weight[1 : n + 1, -1].detach().numpy(),
                               np.log1p(fast), rtol=1e-5, atol=1e-5)  # the active counts (50) are in the bias
    learner.popularity_half_life = 0
    np.testing.assert_allclose(learner.embed_items()[1][:, -1] - vectors[:, -1], np.log1p(all_time) - np.log1p(fast),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(learner.embed_items()[1][:, :-1], vectors[:, :-1])  # the prior alone moved
    learner.popularity_half_life = 400
    learner.save(tmp_path / "l.pt")
    restored = SITNLearner.load(tmp_path / "l.pt")
    assert restored.popularity_half_life == 400
    np.testing.assert_array_equal(restored.prior_counts("target", 400, n), slow)
    np.testing.assert_array_equal(restored.embed_items()[1], learner.embed_items()[1])
    with pytest.raises(ValueError, match="popularity_half_life"):
        learner.popularity_half_life = 100
    with pytest.raises(ValueError, match="popularity_half_life"):
        SITNConfig(popularity_half_lives=(50,), popularity_half_life=60)
    with pytest.raises(ValueError, match="popularity_half_lives"):
        SITNConfig(popularity_half_lives=(50, 50))
    assert SITNConfig.from_dict(config.to_dict()) == config
    values = config.to_dict()
    del values["popularity_half_lives"], values["popularity_half_life"]
    assert SITNConfig.from_dict(values).popularity_half_lives == ()  # older checkpoints: all-time counts


def test_the_tuner_takes_the_half_life_that_ranks_the_window_best_beyond_min_gain() -> None:
    # item 2 was popular long ago (all-time prior), item 1 lately (the half-life's prior)
    priors = np.array([[0.0, 1.0, 2.0], [0.0, 2.0, 0.0]], dtype=np.float32)
    tuner = PriorTuner(half_lives=(100,), window=10, min_events=4, initial=0)
    model = np.array([[0.1, 0.0, 0.0]], dtype=np.float32)  # the model's own scores, without any prior
    for _ in range(3):
        tuner.observe(model + priors[0], priors, [1], [[]])  # users read item 1
    assert tuner.choose() == 0  # 3 < min_events
    tuner.observe(model + priors[0], priors, [None], [[]])  # a miss counts for every option
    assert tuner.choose() == 100 and tuner.switches == 1
    stats = tuner.stats()
    assert stats["popularity_half_life"] == 100.0
    assert stats["popularity_half_life_100_ndcg_window"] == pytest.approx(0.75)  # three firsts, one miss
    assert stats["popularity_half_life_0_ndcg_window"] == pytest.approx(0.75 / np.log2(3))  # behind item 2
    # now the live scores carry the half-life's prior; each option's replaces it (added twice, the all-time
    # option would rank item 1 first)
    for _ in range(10):
        tuner.observe(model + priors[1], priors, [2], [[]])  # users read item 2
    assert tuner.tallies[0].figures("window")["window"]["ndcg"] == 1.0
    assert tuner.tallies[100].figures("window")["window"]["ndcg"] == pytest.approx(0.5)  # third
    assert tuner.choose() == 0 and tuner.switches == 2
    restored = PriorTuner(half_lives=(100,), window=10, min_events=4)
    restored.load_state_dict(tuner.state_dict())
    assert restored.stats() == tuner.stats()
    with pytest.raises(ValueError, match="initial"):
        PriorTuner(half_lives=(100,), initial=50)
    with pytest.raises(ValueError, match="half_lives"):
        PriorTuner(half_lives=(0,))
    with pytest.raises(ValueError, match="one row per option"):
        tuner.observe(model, priors[:1], [1], [[]])


def test_the_trainer_ranks_with_every_half_life_uses_the_choice_and_checkpoints_it(
    events_csv: Path, tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    events = load_events(events_csv, "movie", "book", limit=1200).events
    sent: list[EmbeddingBatch] = []
    config = small_config().replace(popularity_prior=1.0, popularity_half_lives=(30, 300))

    def trainer() -> OnlineTrainer:
        return OnlineTrainer(
            SITNLearner(config, "movie", "book"), CallableTransport(sent.append),
            CheckpointStore(tmp_path / "ckpt"), batch_size=64, checkpoint_every_steps=1000, publish_every_steps=3,
            publish_every_s=3600.0, prior_window=50,
        )

    first = trainer()
    assert first.prior_tuner is not None and first.prior_tuner.options == (0, 30, 300)
    for batch in batches_from(events, 100):
        stats = first.process(batch)
    tuner = first.prior_tuner
    assert tuner.tallies[0].events > 50
    assert all(t.events == tuner.tallies[0].events for t in tuner.tallies.values())
    assert first.learner.popularity_half_life == tuner.half_life == stats[-1]["popularity_half_life"]
    report = first.quality_report()["popularity_half_life"]
    assert report["half_life"] == tuner.half_life and set(report["ndcg_window_by_half_life"]) == {"0", "30", "300"}
    # the live ranks carry the active prior: a plain score_items
    store = UserStateStore(("movie", "book"), max_len=config.max_len)
    targets = [ex for ex in store.observe_many(events) if ex.domain == "book"][-16:]
    first.learner.popularity_half_life = 300
    tuner.half_life = 300
    live = first._live_ranks(targets, [consumed_items(ex, "book") for ex in targets])
    learner = first.learner
    chosen = learner.popularity_half_life
    learner.popularity_half_life = 300
    expected = learner.score_items(learner.embed_histories([ex.history for ex in targets]))
    np.testing.assert_allclose(live.scores, expected, rtol=1e-4, atol=1e-4)
    learner.popularity_half_life = tuner.half_life = chosen
    first.checkpoint()
    second = trainer()
    assert second.restore()
    assert second.prior_tuner is not None and same_state(second.prior_tuner.state_dict(), tuner.state_dict())
    assert second.learner.popularity_half_life == chosen
    # without decayed counts, or with the tuner off, the prior stays on all-time counts
    plain = OnlineTrainer(SITNLearner(small_config(), "movie", "book"), CallableTransport(sent.append), None,
                          batch_size=64)
    off = OnlineTrainer(SITNLearner(config, "movie", "book"), CallableTransport(sent.append), None, batch_size=64,
                        prior_window=0)
    assert plain.prior_tuner is None and off.prior_tuner is None
    assert dataclasses.replace(config).popularity_half_life == 0
