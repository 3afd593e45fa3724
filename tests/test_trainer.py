"""The online trainer: test-then-train, publishing, checkpoint-then-commit and exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from learner.checkpoint_store import CheckpointStore
from learner.config import SITNConfig
from learner.learner import SITNLearner
from learner.publisher import CallableTransport
from learner.trainer import OnlineTrainer
from stream.consumer import ExampleBatch, Position
from stream.dataset import load_events
from stream.events import EmbeddingBatch, InteractionEvent
from stream.user_state import UserStateStore

DOMAINS = ("movie", "book")


def small_config() -> SITNConfig:
    return SITNConfig(dim=16, max_len=10, n_views=2, cluster_counts=(4,), n_item_clusters=4, n_sampled_negatives=16,
                      i2c_warmup_steps=2, recluster_every_steps=3, reservoir_size=256, initial_item_capacity=64)


def batches_from(events: list[InteractionEvent], per_batch: int, partitions: int = 2) -> list[ExampleBatch]:
    """What consumer actors deliver: per-partition user state, positions = next offset per partition."""
    stores = {p: UserStateStore(DOMAINS, 10) for p in range(partitions)}
    next_offset = dict.fromkeys(range(partitions), 0)
    out = []
    for i in range(0, len(events), per_batch):
        by_partition: dict[int, list] = {}
        for e in events[i : i + per_batch]:
            p = hash(e.user_id) % partitions
            by_partition.setdefault(p, []).append(stores[p].observe(e))
        examples, spans, positions = [], {}, {}
        for p, exs in sorted(by_partition.items()):
            spans[p] = (len(examples), len(examples) + len(exs))
            examples.extend(exs)
            next_offset[p] += len(exs)
            positions[p] = Position(1, next_offset[p])
        out.append(ExampleBatch(examples, positions, spans, 0, "c0"))
    return out


@pytest.fixture(scope="module")
def events(events_csv: Path) -> list[InteractionEvent]:
    return load_events(events_csv, "movie", "book", limit=1200).events


def make_trainer(tmp_path: Path, sent: list[EmbeddingBatch]) -> OnlineTrainer:
    torch.set_num_threads(1)
    return OnlineTrainer(
        SITNLearner(small_config(), "movie", "book"), CallableTransport(sent.append),
        CheckpointStore(tmp_path / "ckpt"), batch_size=64, checkpoint_every_steps=4, publish_every_steps=3,
        publish_every_s=3600.0, full_publish_every=4,
    )


def test_trains_every_example_publishes_and_ranks(tmp_path: Path, events: list[InteractionEvent]) -> None:
    sent: list[EmbeddingBatch] = []
    trainer = make_trainer(tmp_path, sent)
    batches = batches_from(events[:600], per_batch=200)
    step_stats = [s for b in batches for s in trainer.process(b)]
    assert trainer.events_applied == 600
    assert len(step_stats) == trainer.learner.step  # 200 = 64+64+64+8: four steps per batch
    assert trainer.learner.step == 12
    assert [b.version for b in sent] == [1, 2, 3, 4]  # every 3 steps
    assert [b.full for b in sent] == [True, False, False, True]
    assert sent[0].item_vectors.shape[1] == 16 and sent[0].user_vectors.shape[1:] == (2, 16)
    # The last publish came after the last step, so every target event reached serving as consumed.
    consumed = [pair for b in sent for pair in b.consumed]
    assert sorted(consumed) == sorted((e.user_id, e.item_id) for e in events[:600] if e.domain == "book")
    # Prequential: every target event was ranked by the model and by every baseline, before training.
    books = [e.item_id for e in events[:600] if e.domain == "book"]
    assert {name: t.events for name, t in trainer.quality.tallies.items()} == dict.fromkeys(
        ("model", "popularity", "cooc_target", "cooc_target_source", "fused"), len(books))
    # The fused ranker: every weight of the grid ranked every target event; each batch carries the weight
    # chosen at its publish, the one the learner ranks with from then on.
    assert trainer.fused is not None
    assert {w: t.events for w, t in trainer.fused.tallies.items()} == dict.fromkeys(
        (0.25, 0.5, 1.0, 2.0, 4.0), len(books))
    assert sent[-1].fused_weight == trainer.fused.weight in trainer.fused.weights
    # An item's first occurrence is the only unrankable one, in whatever order the partitions interleave.
    figures = trainer.quality.figures()["rankers"]
    assert {f["stream"]["rankable"] for f in figures.values()} == {len(books) - len(set(books))}
    # The model ranks against what serving holds: before the first publish nothing is served (all misses).
    assert trainer.prequential.ranked_total + trainer.prequential.unrankable_total == len(books)
    assert 0 < trainer.prequential.ranked_total < len(books)
    for f in figures.values():
        s = f["stream"]
        assert s["ndcg"] == pytest.approx(s["rankable_ratio"] * s["ndcg_rankable"], abs=1e-12)
    assert all(b.served_by == "model" for b in sent)  # no fallback configured


def test_checkpoint_restore_resumes_exactly(tmp_path: Path, events: list[InteractionEvent]) -> None:
    sent: list[EmbeddingBatch] = []
    trainer = make_trainer(tmp_path, sent)
    batches = batches_from(events, per_batch=200)
    for b in batches[:3]:
        trainer.process(b)
    trainer.checkpoint()
    commits = trainer.take_commits()
    expected = {p: pos for b in batches[:3] for p, pos in b.positions.items()}  # the newest per partition
    assert commits == {"c0": expected}
    assert trainer.take_commits() == {}  # taken once
    positions = {p: pos.offset for p, pos in commits["c0"].items()}
    assert positions == trainer.resume_info()["positions"]
    # A new trainer (a restarted actor) restores the same model, positions and user state.
    fresh = make_trainer(tmp_path, [])
    assert fresh.restore()
    assert fresh.learner.step == trainer.learner.step
    assert fresh.resume_info() == trainer.resume_info()
    users = [e.user_id for e in events[:50]]
    np.testing.assert_allclose(fresh.learner.embed_users(users), trainer.learner.embed_users(users), atol=1e-6)
    # The restored mirror continues the consumers' user state exactly.
    for p, store in trainer.mirror.items():
        assert fresh.mirror[p].state_dict() == store.state_dict()
    # So do the prequential tallies and the shadow baselines (the same figures, the same counts).
    assert fresh.quality.state_dict() == trainer.quality.state_dict()
    assert fresh.shadow.state_dict() == trainer.shadow.state_dict()
    assert fresh.fused is not None and trainer.fused is not None
    assert fresh.fused.state_dict() == trainer.fused.state_dict()


def test_checkpoint_holds_only_trained_batches(tmp_path: Path, events: list[InteractionEvent]) -> None:
    trainer = make_trainer(tmp_path, [])
    batches = batches_from(events[:400], per_batch=200)
    trainer.process(batches[0])
    trainer.checkpoint()
    first = trainer.resume_info()["positions"]
    trainer.process(batches[1])  # trained, not checkpointed: a crash now must re-deliver it
    fresh = make_trainer(tmp_path, [])
    fresh.restore()
    assert fresh.resume_info()["positions"] == first
    assert fresh.events_applied == 200


def test_steps_before_an_idle_pause_are_published_once_the_interval_passes(
    tmp_path: Path, events: list[InteractionEvent]
) -> None:
    """A step right after a publish is not due yet; with no further events it must still go out on time."""
    sent: list[EmbeddingBatch] = []
    trainer = OnlineTrainer(
        SITNLearner(small_config(), "movie", "book"), CallableTransport(sent.append), None, batch_size=64,
        publish_every_steps=100, publish_every_s=5.0,
    )
    first, second = batches_from(events[:128], per_batch=64)
    trainer.process(first)
    trainer.publish()  # serving is current
    trainer.process(second)  # one step, neither 100 steps nor 5 s since the publish
    assert [b.version for b in sent] == [1]
    now = trainer.publisher._last_s
    assert trainer.publish_if_due(now + 1.0) is None  # too early
    late = trainer.publish_if_due(now + 5.0)
    assert late is not None and late.version == 2
    assert {u for u, _ in late.consumed} == {e.user_id for e in events[64:128] if e.domain == "book"}
    assert trainer.publish_if_due(now + 60.0) is None  # nothing trained since: nothing to publish


def test_drift_monitor_sees_the_stream_and_survives_a_checkpoint(tmp_path: Path) -> None:
    from learner.drift import DriftMonitor, DriftSettings
    from stream.synthetic import SyntheticConfig, SyntheticStream

    stream = SyntheticStream(SyntheticConfig(events=10_000, n_users=500, n_source_items=300, n_target_items=300,
                                             target_share=0.3, drift="domain_mix", drift_at_event=6_000, seed=1))
    events = list(stream.events())
    settings = DriftSettings(reference_window_events=3000, current_window_events=1000)

    def make(path: Path) -> OnlineTrainer:
        torch.manual_seed(0)
        return OnlineTrainer(SITNLearner(small_config(), "movie", "book"), CallableTransport(lambda b: None),
                             CheckpointStore(path), batch_size=250, publish_every_steps=4, publish_every_s=3600.0,
                             drift=DriftMonitor(settings, tmp_path / "drift.jsonl"))

    trainer = make(tmp_path / "ckpt")
    all_batches = batches_from(events, per_batch=500)
    for b in all_batches[:10]:  # 5,000 stationary events: reference plus two quiet windows
        trainer.process(b)
    assert trainer.drift is not None and trainer.drift.state()["signals"]["input_domain_mix"]["alarms"] == 0
    trainer.checkpoint()
    restored = make(tmp_path / "ckpt")
    assert restored.restore() and restored.drift is not None
    assert restored.drift.events_seen == trainer.drift.events_seen == 5000
    for b in all_batches[10:]:  # the target share jumps from 0.3 to 0.7 at event 6,000
        restored.process(b)
    mix = restored.drift.state()["signals"]["input_domain_mix"]
    assert 6_000 < mix["last_alarm_event"] <= 6_000 + 2 * 1000  # within two current windows of the shift
    logged = [orjson.loads(line) for line in (tmp_path / "drift.jsonl").read_text().splitlines()]
    mix_alarms = [a for a in logged if a["signal"] == "input_domain_mix"]
    # One shift, one check that alarms (PSI and JS both fire there), then a new reference: no repeat.
    assert mix["alarms"] == len(mix_alarms) == 2
    assert {a["detector"] for a in mix_alarms} == {"psi", "js"}
    assert {a["index"] for a in mix_alarms} == {mix["last_alarm_event"]}
