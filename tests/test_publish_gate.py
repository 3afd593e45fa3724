"""The publish gate end to end on the trainer: a deliberately bad update (a learning-rate spike) is held
back, an alarm fires, serving keeps the last good version; an honest model is never held back. The ranker
fallback end to end: while the model ranks significantly worse than a baseline, serving answers with it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import torch

from learner.core.config import SITNConfig
from learner.core.learner import SITNLearner
from learner.online.gate import PublishGate, RankerFallback
from learner.online.publisher import CallableTransport
from learner.online.trainer import OnlineTrainer
from serving.actor import ServingCore
from serving.settings import ServingSettings
from stream.consumer import EventBatch
from stream.events import EmbeddingBatch, InteractionEvent
from stream.synthetic import SyntheticConfig, SyntheticStream

pytestmark = pytest.mark.slow

DIM = 16


def synthetic_events(n: int) -> list[InteractionEvent]:
    """A stream with strong, learnable structure: few clusters, little noise, half the events in the target."""
    config = SyntheticConfig(events=n, n_users=300, new_user_share=0.0, n_source_items=200, n_target_items=200,
                             n_clusters=8, primary_share=0.95, target_share=0.5, noise=0.02, seed=3)
    return list(SyntheticStream(config).events())


def batches(events: list[InteractionEvent], per_batch: int) -> list[EventBatch]:
    return [EventBatch.of(events[i : i + per_batch], 0, i, "c0") for i in range(0, len(events), per_batch)]


def make_trainer(tmp_path: Path, deliver: Callable[[EmbeddingBatch], None], gate: PublishGate | None,
                 fallback: RankerFallback | None = None) -> OnlineTrainer:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = SITNConfig(dim=DIM, max_len=10, n_views=2, cluster_counts=(8,), n_item_clusters=8,
                        n_sampled_negatives=64, i2c_warmup_steps=5, recluster_every_steps=20, reservoir_size=512,
                        initial_item_capacity=256, lr=5e-3)
    return OnlineTrainer(SITNLearner(config, "movie", "book"), CallableTransport(deliver), None, batch_size=128,
                         publish_every_steps=5, publish_every_s=3600.0, full_publish_every=1000, gate=gate,
                         gate_sample_per_step=128, prequential_window=1000, fallback=fallback)


def model_ndcg(trainer: OnlineTrainer) -> float:
    """The served model's prequential NDCG@10 over the last window of target events."""
    return float(trainer.quality.tallies["model"].figures("window")["window"]["ndcg"])


def test_a_learning_rate_spike_is_held_back_and_serving_keeps_the_good_version(tmp_path: Path) -> None:
    events = synthetic_events(40_000)
    log_path = tmp_path / "alarms.jsonl"
    gate = PublishGate(max_drop=0.3, window=1000, min_events=100, log_path=log_path)
    serving = ServingCore(ServingSettings(dim=DIM, index_factory="Flat", index_search_params={}), start_http=False)
    sent: list[EmbeddingBatch] = []

    def deliver(batch: EmbeddingBatch) -> None:
        sent.append(batch)
        serving.apply_batch(batch)

    trainer = make_trainer(tmp_path, deliver, gate)
    all_batches = batches(events, 512)
    for b in all_batches[:50]:  # learn the structure; every publish passes the gate
        trainer.process(b)
    good_version = serving.version
    assert good_version > 1 and not gate.closed and gate.held_total == 0
    served_ndcg = model_ndcg(trainer)
    assert served_ndcg > 0.2, f"the synthetic structure should be learnt, prequential NDCG {served_ndcg:.3f}"

    for opt in (trainer.learner._dense_opt, trainer.learner._sparse_opt):  # the deliberately bad update
        for group in opt.param_groups:
            group["lr"] *= 300.0
    for b in all_batches[50:62]:
        trainer.process(b)

    assert gate.held_total >= 1, f"gate never closed: live {gate.live_ndcg:.3f} vs served {gate.served_ndcg:.3f}"
    assert gate.closed
    assert gate.live_ndcg < gate.served_ndcg * 0.7
    assert model_ndcg(trainer) > 0.8 * served_ndcg  # what serving holds still ranks as well as before
    held_at = [b.version for b in sent]
    # Serving kept the last good version: nothing was published after the gate closed.
    assert serving.version == held_at[-1] and trainer.prequential.version == serving.version
    first_alarm = orjson.loads(log_path.read_bytes().splitlines()[0])
    assert first_alarm["signal"] == "publish_gate" and first_alarm["live_ndcg"] < first_alarm["served_ndcg"]
    # Every version that was sent passed the gate: the spike's versions never reached serving.
    assert trainer.last_stats["gate_closed"] == 1.0


def test_an_honest_model_is_never_held_back(tmp_path: Path) -> None:
    events = synthetic_events(20_000)
    gate = PublishGate(max_drop=0.3, window=1000, min_events=100)
    sent: list[EmbeddingBatch] = []
    trainer = make_trainer(tmp_path, sent.append, gate)
    for b in batches(events, 512):
        trainer.process(b)
    assert gate.judged_total >= 10  # the gate had enough evidence to close, often, and never did
    assert gate.held_total == 0 and not gate.closed
    assert len(sent) == trainer.learner.step // 5


def test_serving_answers_with_the_best_baseline_while_the_model_is_significantly_worse(tmp_path: Path) -> None:
    """A model that cannot learn (learning rate 0) ranks far below item co-occurrence on a stream with
    structure: serving is told to answer with co-occurrence, and does; the publish gate is not involved."""
    serving = ServingCore(ServingSettings(dim=DIM, index_factory="Flat", index_search_params={}), start_http=False)
    sent: list[EmbeddingBatch] = []

    def deliver(batch: EmbeddingBatch) -> None:
        sent.append(batch)
        serving.apply_batch(batch)

    fallback = RankerFallback(("popularity", "cooccurrence"), window=1000, min_events=100, log_path=tmp_path / "a.jsonl")
    trainer = make_trainer(tmp_path, deliver, None, fallback)
    for opt in (trainer.learner._dense_opt, trainer.learner._sparse_opt):
        for group in opt.param_groups:
            group["lr"] = 0.0
    events = synthetic_events(8000)
    for b in batches(events, 512):
        trainer.process(b)
    figures = trainer.quality.figures()["rankers"]
    ndcg = {name: f["window"]["ndcg"] for name, f in figures.items()}
    assert ndcg["cooc_target"] > max(ndcg["popularity"], 3 * ndcg["model"]), ndcg
    assert (fallback.served, fallback.switches, trainer.served_by) == ("cooccurrence", 1, "cooccurrence"), ndcg
    switched_at = next(i for i, b in enumerate(sent) if b.served_by == "cooccurrence")
    assert all(b.served_by == "model" for b in sent[:switched_at])
    assert all(b.served_by == "cooccurrence" for b in sent[switched_at:])
    assert serving.service.ranker == "cooccurrence"
    user = next(e.user_id for e in events if e.domain == "book")
    assert serving.recommend(user, k=10)["served_by"] == "cooccurrence"
    assert trainer.last_stats["fallback_serving_baseline"] == 1.0 and trainer.last_stats["fallback_z"] < -2.33
    switch = orjson.loads((tmp_path / "a.jsonl").read_bytes().splitlines()[0])
    assert (switch["from"], switch["to"], switch["best_baseline"]) == ("model", "cooccurrence", "cooccurrence")
