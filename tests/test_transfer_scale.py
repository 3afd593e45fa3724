"""The query-time transfer scale chosen online (``learner.online.transfer_scale``): by hand on score vectors, and inside
the online trainer on real events (ranked at every scale before training, the choice used and checkpointed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from learner.core.learner import SITNLearner
from learner.online.checkpoint_store import CheckpointStore
from learner.online.publisher import CallableTransport
from learner.online.shadow import consumed_items
from learner.online.trainer import OnlineTrainer
from learner.online.transfer_scale import TransferScaleTuner
from stream.dataset import load_events
from stream.events import EmbeddingBatch
from stream.user_state import UserStateStore
from tests.test_trainer import batches_from, same_state, small_config

# Two items: the own interests alone rank item 1 first, the whole transfer item 0.
S0 = np.array([[0.0, 1.0]])
S1 = np.array([[2.0, 1.0]])


def test_each_slot_keeps_its_scale_until_its_window_has_min_events_then_takes_the_best() -> None:
    tuner = TransferScaleTuner(grid=(1.0, 0.5, 0.0), window=10, min_events=3, initial=(1.0, 0.25))
    for _ in range(2):
        tuner.observe(S0, S1, [1], [[]], [True])  # warm users read item 1: scale 0 ranks it first
    assert tuner.choose() == (1.0, 0.25)  # 2 < min_events, and the cold slot has no events
    tuner.observe(S0, S1, [1], [[]], [True])
    # at 0.5 the scores tie (1, 1): ties count against the item, rank 2, as at 1
    assert tuner.choose() == (0.0, 0.25) and tuner.switches == 1
    for _ in range(3):
        tuner.observe(S0, S1, [0], [[]], [False])  # cold users read item 0: the transfer ranks it first
    assert tuner.choose() == (0.0, 1.0) and tuner.switches == 2
    stats = tuner.stats()
    assert stats["transfer_scale_warm_0_ndcg_window"] == 1.0 and stats["transfer_scale_warm_1_ndcg_window"] < 1.0
    # the window slides: warm users turn to item 0, and after a window of them scale 1 wins back
    for _ in range(10):
        tuner.observe(S0, S1, [0], [[]], [True])
    assert tuner.choose() == (1.0, 1.0)


def test_misses_exclusions_ties_and_a_checkpoint_round_trip() -> None:
    tuner = TransferScaleTuner(grid=(1.0, 0.0), window=4, min_events=2)
    tuner.observe(np.vstack([S0, S0]), np.vstack([S1, S1]), [None, 1], [[], [0]], [True, True])
    # a miss counts at every scale; with item 0 consumed, item 1 is first at both: a tie keeps the current
    assert tuner.choose() == (1.0, 1.0)
    assert tuner.stats()["transfer_scale_warm_1_ndcg_window"] == tuner.stats()["transfer_scale_warm_0_ndcg_window"] == 0.5
    restored = TransferScaleTuner(grid=(1.0, 0.0), window=4, min_events=2)
    restored.load_state_dict(tuner.state_dict())
    assert restored.stats() == tuner.stats()
    with pytest.raises(ValueError, match="min_events must be in"):
        TransferScaleTuner(window=4, min_events=5)
    with pytest.raises(ValueError, match="grid must be distinct finite scales"):
        TransferScaleTuner(grid=(1.0, 1.0))


def test_the_trainer_ranks_at_every_scale_uses_the_choice_and_checkpoints_it(events_csv: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    events = load_events(events_csv, "movie", "book", limit=1200).events
    sent: list[EmbeddingBatch] = []

    def trainer() -> OnlineTrainer:
        return OnlineTrainer(
            SITNLearner(small_config(), "movie", "book"), CallableTransport(sent.append),
            CheckpointStore(tmp_path / "ckpt"), batch_size=64, checkpoint_every_steps=1000, publish_every_steps=3,
            publish_every_s=3600.0, transfer_scale_window=50,
        )

    first = trainer()
    assert first.transfer_scale is not None
    for batch in batches_from(events, 100):
        stats = first.process(batch)
    tuner = first.transfer_scale
    ranked = {slot: tuner.tallies[slot][1.0].events for slot in ("warm", "cold")}
    assert ranked["warm"] > 0 and ranked["cold"] > 0  # both kinds of target events occur in the stream
    assert all(t.events == ranked[slot] for slot in ranked for t in tuner.tallies[slot].values())
    assert first.learner.model.transfer_scale == (tuner.scale["warm"], tuner.scale["cold"])
    assert stats[-1]["transfer_scale_warm"] == tuner.scale["warm"]
    # the live ranks use the scale in force: their scores are a plain embedding at it
    store = UserStateStore(("movie", "book"), max_len=10)
    targets = [ex for ex in store.observe_many(events) if ex.domain == "book"][-16:]
    first.learner.model.transfer_scale = (0.25, 0.5)
    live = first._live_ranks(targets, [consumed_items(ex, "book") for ex in targets])
    learner = first.learner
    learner.model.transfer_scale = (0.25, 0.5)  # _live_ranks applied the tuner's choice afterwards
    expected = learner.score_items(learner.embed_histories([ex.history for ex in targets]))
    np.testing.assert_allclose(live.scores, expected, rtol=1e-4, atol=1e-4)
    learner.model.transfer_scale = (tuner.scale["warm"], tuner.scale["cold"])
    first.checkpoint()
    second = trainer()
    assert second.restore()
    assert second.transfer_scale is not None and same_state(second.transfer_scale.state_dict(), tuner.state_dict())
    assert second.learner.model.transfer_scale == first.learner.model.transfer_scale
    # without a source path there is nothing to scale
    single = OnlineTrainer(SITNLearner(small_config().replace(use_source=False), "movie", "book"),
                           CallableTransport(sent.append), None, batch_size=64)
    assert single.transfer_scale is None


def test_a_warm_start_keeps_the_scales_chosen_offline_until_the_stream_says_otherwise(tmp_path: Path) -> None:
    trainer = OnlineTrainer(SITNLearner(small_config(), "movie", "book"), CallableTransport(lambda b: None), None,
                            batch_size=64, transfer_scale_window=50)
    warm = SITNLearner(small_config(), "movie", "book")
    warm.model.transfer_scale = (0.25, 0.5)  # what sitn train chose on its validation split
    trainer.warm_start(warm, trained_until=0.0)
    assert trainer.transfer_scale is not None and trainer.transfer_scale.choose() == (0.25, 0.5)


def test_a_scale_takes_over_only_beyond_min_gain() -> None:
    # 40 warm events, 21 reading item 1 (rank 1 at scale 0, rank 2 at scale 1) and 19 item 0 (the reverse):
    # NDCG 0 = (21 + 19 g) / 40 and NDCG 1 = (19 + 21 g) / 40 with g = 1 / log2(3): scale 0 better by 2.3 %,
    # above a 1 % margin, below a 5 % one.
    for min_gain, expected in ((0.01, 0.0), (0.05, 1.0)):
        tuner = TransferScaleTuner(grid=(1.0, 0.0), window=40, min_events=40, min_gain=min_gain)
        for positive in [1] * 21 + [0] * 19:
            tuner.observe(S0, S1, [positive], [[]], [True])
        assert tuner.choose()[0] == expected, min_gain
    with pytest.raises(ValueError, match="min_gain must be >= 0"):
        TransferScaleTuner(min_gain=-0.1)
