"""The online trainer: test-then-train, publishing, checkpoints, exact resume, and positions it owns:
re-read events dropped by offset, a skip refused, each user's history built once, in the learner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from learner.core.config import SITNConfig
from learner.core.learner import SITNLearner
from learner.online.checkpoint_store import CheckpointStore
from learner.online.prequential import ranks_event
from learner.online.publisher import CallableTransport
from learner.online.shadow import consumed_items
from learner.online.trainer import OnlineTrainer, StreamGapError
from stream.consumer import EventBatch, LetterMark
from stream.dataset import load_events
from stream.events import EmbeddingBatch, InteractionEvent
from stream.user_state import Example, UserStateStore

DOMAINS = ("movie", "book")



def same_state(a: Any, b: Any) -> bool:
    """``a == b`` for nested state dicts whose leaves may be numpy arrays (compared by shape and values)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)

def small_config() -> SITNConfig:
    return SITNConfig(dim=16, max_len=10, n_views=2, cluster_counts=(4,), n_item_clusters=4, n_sampled_negatives=16,
                      i2c_warmup_steps=2, recluster_every_steps=3, reservoir_size=256, initial_item_capacity=64)


def batches_from(events: list[InteractionEvent], per_batch: int, partitions: int = 2) -> list[EventBatch]:
    """What consumer actors deliver: events with their offsets, positions = next offset per partition."""
    next_offset = dict.fromkeys(range(partitions), 0)
    out = []
    for i in range(0, len(events), per_batch):
        by_partition: dict[int, list[InteractionEvent]] = {}
        for e in events[i : i + per_batch]:
            by_partition.setdefault(partition_of(e.user_id, partitions), []).append(e)
        batch_events: list[InteractionEvent] = []
        offsets: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        read: dict[int, tuple[int, int]] = {}
        for p, es in sorted(by_partition.items()):
            spans[p] = (len(batch_events), len(batch_events) + len(es))
            batch_events.extend(es)
            offsets.extend(range(next_offset[p], next_offset[p] + len(es)))
            read[p] = (next_offset[p], next_offset[p] + len(es))
            next_offset[p] += len(es)
        out.append(EventBatch(batch_events, offsets, spans, read, (), "c0"))
    return out


def partition_of(user_id: str, partitions: int) -> int:
    return sum(user_id.encode()) % partitions  # stable across processes, unlike hash()


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
        ("model", "model_live", "popularity", "cooc_target", "cooc_target_source", "fused", "fused_live"),
        len(books))
    # The fused ranker, at replay time and at data time: every weight of the grid ranked every target event;
    # each batch carries the weight chosen at its publish (on the data-time tallies), the one both rank with
    # from then on.
    assert trainer.fused is not None and trainer.fused_live is not None
    # (users with no book history before the event in their own slot, over 0 and the grid)
    cold = sum(1 for ex in UserStateStore(("movie", "book"), max_len=10).observe_many(events[:600])
               if ex.domain == "book" and not consumed_items(ex, "book"))
    assert 0 < cold < len(books)
    for fused in (trainer.fused, trainer.fused_live):
        assert {w: t.events for w, t in fused.tallies.items()} == dict.fromkeys((0.25, 0.5, 1.0, 2.0, 4.0),
                                                                                len(books) - cold)
        assert {w: t.events for w, t in fused.tallies_cold.items()} == dict.fromkeys((0, 0.25, 0.5, 1.0, 2.0, 4.0),
                                                                                     cold)
    assert sent[-1].fused_weight == trainer.fused.weight == trainer.fused_live.weight in trainer.fused.weights
    assert sent[-1].fused_weight_cold == trainer.fused.weight_cold == trainer.fused_live.weight_cold \
        in trainer.fused.weights_cold
    # At data time every rankable event is ranked (the live model knows every item seen in the stream).
    live = trainer.quality.tallies["fused_live"].figures()["stream"]
    assert live["rankable"] == len(books) - len(set(books))
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
    # The status snapshot's publish lag: p99 over the events published in the last 30 s, all of them here.
    lags = [b.created_at_s - t for b in sent for t in b.event_ingest_wall_s]
    assert trainer.summary()["publish_lag_window_p99_s"] == pytest.approx(np.percentile(lags, 99), abs=1e-9)


def test_checkpoint_restore_resumes_exactly(tmp_path: Path, events: list[InteractionEvent]) -> None:
    sent: list[EmbeddingBatch] = []
    trainer = make_trainer(tmp_path, sent)
    batches = batches_from(events, per_batch=200)
    for b in batches[:3]:
        trainer.process(b)
    trainer.checkpoint()
    expected = {p: pos for b in batches[:3] for p, pos in b.positions.items()}  # the newest per partition
    assert trainer.resume_positions() == expected
    assert sum(expected.values()) == 600
    # A new trainer (a restarted actor) restores the same model, positions and histories.
    fresh = make_trainer(tmp_path, [])
    assert fresh.restore()
    assert fresh.learner.step == trainer.learner.step
    assert fresh.resume_positions() == expected
    users = [e.user_id for e in events[:50]]
    np.testing.assert_allclose(fresh.learner.embed_users(users), trainer.learner.embed_users(users), atol=1e-6)
    assert fresh.learner.histories.state_dict() == trainer.learner.histories.state_dict()
    # So do the prequential tallies and the shadow baselines (the same figures, the same counts).
    assert same_state(fresh.quality.state_dict(), trainer.quality.state_dict())
    assert same_state(fresh.shadow.state_dict(), trainer.shadow.state_dict())
    assert fresh.fused is not None and trainer.fused is not None
    assert same_state(fresh.fused.state_dict(), trainer.fused.state_dict())
    # Both go on alike: the same histories, built in the learner, for the next batch's examples.
    for t in (trainer, fresh):
        t.process(batches[3])
    assert fresh.learner.histories.state_dict() == trainer.learner.histories.state_dict()


def test_checkpoint_holds_only_trained_batches(tmp_path: Path, events: list[InteractionEvent]) -> None:
    trainer = make_trainer(tmp_path, [])
    batches = batches_from(events[:400], per_batch=200)
    trainer.process(batches[0])
    trainer.checkpoint()
    first = trainer.resume_positions()
    trainer.process(batches[1])  # trained, not checkpointed: a crash now must re-deliver it
    fresh = make_trainer(tmp_path, [])
    fresh.restore()
    assert fresh.resume_positions() == first
    assert fresh.events_applied == 200


def test_background_checkpoint_holds_the_state_at_the_call_and_reports_when_durable(
    tmp_path: Path, events: list[InteractionEvent]
) -> None:
    """``checkpoint(background=True)`` reads the state out at the call; training on while the writer thread
    writes it changes nothing in the file, and ``collect_checkpoint`` returns its mark once it is durable."""
    trainer = make_trainer(tmp_path, [])
    batches = batches_from(events[:600], per_batch=200)
    trainer.process(batches[0])
    users = [e.user_id for e in events[:50]]
    at_call = trainer.learner.embed_users(users)
    step, positions = trainer.learner.step, trainer.resume_positions()
    assert trainer.checkpoint(background=True) is None
    trainer.process(batches[1])  # trains while (or after) the file is written
    mark = trainer.collect_checkpoint(wait=True)
    assert mark is not None and (mark.step, mark.events_applied, mark.positions) == (step, 200, positions)
    assert trainer.collect_checkpoint(wait=True) is None  # handed back once
    fresh = make_trainer(tmp_path, [])
    assert fresh.restore()
    assert (fresh.learner.step, fresh.events_applied, fresh.resume_positions()) == (step, 200, positions)
    np.testing.assert_allclose(fresh.learner.embed_users(users), at_call, atol=1e-6)
    # A checkpoint due while one is in flight waits for it; the newest durable mark is the one returned.
    assert trainer.checkpoint(background=True) is None
    trainer.process(batches[2])
    assert trainer.checkpoint(background=True) is None
    mark = trainer.collect_checkpoint(wait=True)
    assert mark is not None and mark.events_applied == 600
    assert [m.name for m in trainer.checkpoints.manifests()] == [  # type: ignore[union-attr]
        f"ckpt-{s:012d}.json" for s in (trainer.learner.step, 8, step)
    ]


def test_background_checkpoint_failure_is_raised_on_the_training_thread(
    tmp_path: Path, events: list[InteractionEvent], monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_trainer(tmp_path, [])
    trainer.process(batches_from(events[:200], per_batch=200)[0])
    assert trainer.checkpoints is not None

    def disk_full(staged: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.checkpoints, "commit", disk_full)
    trainer.checkpoint(background=True)
    with pytest.raises(OSError, match="No space left"):
        trainer.collect_checkpoint(wait=True)
    assert trainer.checkpoints.manifests() == []  # nothing claims to be durable


def test_histories_are_built_once_in_the_learner_from_the_events_in_order(
    tmp_path: Path, events: list[InteractionEvent]
) -> None:
    """Each example's history is the user's events before it (bounded by max_len), whatever the batching."""
    trainer = make_trainer(tmp_path, [])
    seen: list[Example] = []
    learn_many = trainer.learner.learn_many

    def recording(examples: list[Example]) -> dict[str, float]:
        seen.extend(examples)
        return learn_many(examples)

    trainer.learner.learn_many = recording
    for b in batches_from(events[:600], per_batch=150):
        trainer.process(b)
    reference = UserStateStore(DOMAINS, trainer.learner.config.max_len)
    by_id = {ex.event_id: ex for ex in seen}
    assert len(by_id) == 600
    for e in events[:600]:
        assert by_id[e.event_id] == reference.observe(e)
    # The learner's one store holds each user's history after their last event (what embed_users reads).
    assert sorted(trainer.learner.histories.user_ids()) == sorted(reference.user_ids())
    assert all(trainer.learner.histories.get(u) == reference.history(u) for u in reference.user_ids())
    # Several events of one user within one step: each example sees the earlier ones of the same step.
    u = "u-new"
    mine = [InteractionEvent(f"x{i}", u, f"m{i}", "movie" if i % 2 else "book", 1_500_000_000 + i) for i in range(3)]
    seen.clear()
    trainer.process(EventBatch.of(mine, partition=7))
    assert [ex.history for ex in seen] == [
        {"movie": ((), ()), "book": ((), ())},
        {"movie": ((), ()), "book": (("m0",), (1_500_000_000,))},
        {"movie": (("m1",), (1_500_000_001,)), "book": (("m0",), (1_500_000_000,))},
    ]
    assert trainer.learner.histories.get(u) == {"movie": (("m1",), (1_500_000_001,)),
                                                "book": (("m0", "m2"), (1_500_000_000, 1_500_000_002))}


def test_events_below_the_position_are_dropped_and_a_skip_is_refused(
    tmp_path: Path, events: list[InteractionEvent]
) -> None:
    """A consumer replaced alone re-reads from the learner's position while its predecessor's batches are
    still queued: the learner trains each event once. A batch that would skip records is an error."""
    trainer = make_trainer(tmp_path, [])
    batches = batches_from(events[:600], per_batch=200, partitions=1)  # offsets 0..199, 200..399, 400..599
    trainer.process(batches[0])
    trainer.process(batches[1])
    # The replacement started at 100 (the position it was handed) and reads 100..399 in one batch.
    reread = EventBatch(events[100:400], list(range(100, 400)), {0: (0, 300)}, {0: (100, 400)}, (), "c0")
    assert trainer.process(reread) == []  # nothing new: no step
    assert trainer.redelivered_dropped == 300 and trainer.last_trained_event_ids == []
    overlapping = EventBatch(events[350:500], list(range(350, 500)), {0: (0, 150)}, {0: (350, 500)}, (), "c0")
    trainer.process(overlapping)
    assert trainer.redelivered_dropped == 350
    assert trainer.last_trained_event_ids == [e.event_id for e in events[400:500]]
    assert trainer.events_applied == 500 and trainer.resume_positions() == {0: 500}
    with pytest.raises(StreamGapError, match=r"partition 0: a batch from offset 501 on, but the learner trained "
                                             r"up to 500: records 500\.\.500 would be skipped"):
        trainer.process(EventBatch(events[501:502], [501], {0: (0, 1)}, {0: (501, 502)}, (), "c0"))
    assert trainer.events_applied == 500


def with_letters(events: list[InteractionEvent], first: int, bad: dict[int, str]) -> EventBatch:
    """Records ``first..first + len(events) + len(bad) - 1`` of partition 0, where the offsets in ``bad`` went to
    the dead-letter topic (with that reason) and ``events`` fill the others, in order."""
    end = first + len(events) + len(bad)
    good = [o for o in range(first, end) if o not in bad]
    letters = tuple(LetterMark(0, o, reason) for o, reason in sorted(bad.items()))
    examples = {m.reason: f"partition 0 offset {m.offset}" for m in reversed(letters)}
    return EventBatch(events, good, {0: (0, len(events))} if events else {}, {0: (first, end)}, letters, "c0", examples)


def test_dead_letters_are_counted_once_as_the_positions_pass_them_and_survive_a_restore(
    tmp_path: Path, events: list[InteractionEvent]
) -> None:
    """The run's dead-letter tally is the learner's: a letter counts when the position passes it, a re-read one
    (a replaced consumer re-sends what lies after the position it was handed) does not count again, and a
    restored learner goes on from its checkpoint's tally, the one matching its positions."""
    trainer = make_trainer(tmp_path, [])
    trainer.process(with_letters(events[:100], 0, {10: "bad_json", 50: "bad_timestamp"}))  # offsets 0..101
    trainer.process(with_letters([], 102, {102: "bad_timestamp"}))  # a poll of letters only: 102
    assert trainer.resume_positions() == {0: 103}
    assert trainer.dead_letters_by_reason == {"bad_json": 1, "bad_timestamp": 2}
    assert trainer.dead_letter_examples == {"bad_json": "partition 0 offset 10", "bad_timestamp": "partition 0 offset 50"}
    # A replacement handed position 50 re-reads 50..102 and goes on to 103..130 (one more letter at 120).
    reread = with_letters(events[49:100] + events[100:127], 50, {50: "bad_timestamp", 102: "bad_timestamp",
                                                                   120: "unknown_domain"})
    trainer.process(reread)
    assert trainer.resume_positions() == {0: 131}
    assert trainer.events_applied == 127
    assert trainer.dead_letters_by_reason == {"bad_json": 1, "bad_timestamp": 2, "unknown_domain": 1}
    assert trainer.summary()["dead_letters"] == 4
    trainer.checkpoint()
    trainer.process(with_letters(events[127:150], 131, {140: "bad_json"}))  # after the checkpoint: lost by the crash
    assert sum(trainer.dead_letters_by_reason.values()) == 5
    restored = make_trainer(tmp_path, [])
    assert restored.restore()
    assert restored.resume_positions() == {0: 131}
    assert restored.dead_letters_by_reason == {"bad_json": 1, "bad_timestamp": 2, "unknown_domain": 1}
    assert restored.dead_letter_examples["unknown_domain"] == "partition 0 offset 120"
    # The consumers restart at 131: the letter at 140 is read, and counted, again, once.
    restored.process(with_letters(events[127:150], 131, {140: "bad_json"}))
    assert restored.dead_letters_by_reason == {"bad_json": 2, "bad_timestamp": 2, "unknown_domain": 1}


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
    from learner.online.drift import DriftMonitor, DriftSettings
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


def test_a_warm_start_burns_in_its_training_events_and_ranks_only_the_later_ones(
    tmp_path: Path, events: list[InteractionEvent]
) -> None:
    from learner.core.warm_checkpoint import load_warm_start, save_warm_start, warm_start_config
    from learner.offline.warm_start import train_warm_start

    torch.set_num_threads(1)
    cut = events[599].timestamp
    warm = train_warm_start(events, "movie", "book", small_config(), cut, batch_size=64, max_epochs=2, patience=1,
                            workdir=tmp_path)
    early = [e for e in events if e.timestamp <= cut]
    assert warm.events == len(early) >= 600 and 1 <= warm.epochs <= 2 and warm.trained_until == cut
    assert len(warm.learner.histories) == 0  # rebuilt by the run, in event order
    save_warm_start(warm, tmp_path / "warm.pt")
    loaded = load_warm_start(tmp_path / "warm.pt")
    assert (loaded.trained_until, loaded.events, loaded.epochs) == (warm.trained_until, warm.events, warm.epochs)
    config, info = warm_start_config(tmp_path / "warm.pt")  # what sitn run's driver reads
    assert config == loaded.learner.config == small_config() and (info["trained_until"], info["events"]) == (
        cut, warm.events)
    step0 = loaded.learner.step
    assert step0 > 0
    sent: list[EmbeddingBatch] = []
    trainer = make_trainer(tmp_path, sent)
    trainer.warm_start(loaded.learner, loaded.trained_until)
    for b in batches_from(events, per_batch=200):
        trainer.process(b)
    later = [e for e in events if e.timestamp > cut]
    assert trainer.events_applied == len(events) and trainer.burn_in_events == len(early)
    # No step on a burnt-in event; every later event trained once (64 per step, chunked per batch of 200).
    assert step0 < trainer.learner.step <= step0 + len(later) // 64 + 6
    # Only the later book events are ranked, by the model and by each baseline alike ...
    later_books = [e for e in later if e.domain == "book"]
    assert {t.events for t in trainer.quality.tallies.values()} == {len(later_books)}
    # ... while the baselines learnt every event and the histories hold every user's events in order.
    assert trainer.shadow.state_dict() != make_trainer(tmp_path / "other", []).shadow.state_dict()
    reference = UserStateStore(DOMAINS, max_len=10, max_users=10_000)
    for e in events:
        reference.observe(e)
    assert sorted(trainer.learner.histories.user_ids()) == sorted(reference.user_ids())
    assert all(trainer.learner.histories.get(u) == reference.history(u) for u in reference.user_ids())
    # Serving got the warm model's vectors for burnt-in users and their items as consumed.
    consumed = {pair for b in sent for pair in b.consumed}
    assert {(e.user_id, e.item_id) for e in early if e.domain == "book"} <= consumed
    # Burnt-in users reach serving on time, with no step: a publish interval of 0 s publishes each chunk.
    timely = make_trainer(tmp_path / "timely", [])
    timely.publisher.every_s = 0.0
    timely.warm_start(load_warm_start(tmp_path / "warm.pt").learner, cut)
    early_batches = batches_from(early, per_batch=200)
    for b in early_batches:
        timely.process(b)
    assert timely.learner.step == step0 and timely.publisher.version >= len(early_batches)
    # A restart goes on with the same cut-off.
    trainer.checkpoint()
    fresh = make_trainer(tmp_path, [])
    assert fresh.restore()
    assert (fresh.burn_in_until, fresh.burn_in_events) == (cut, len(early))


def test_a_model_that_sitn_train_did_not_write_is_refused(tmp_path: Path) -> None:
    from learner.core.warm_checkpoint import load_warm_start, warm_start_config

    SITNLearner(small_config(), "movie", "book").save(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a `sitn train` model"):
        load_warm_start(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a `sitn train` model"):
        warm_start_config(tmp_path / "plain.pt")


def test_the_live_model_ranks_each_event_from_its_own_history_among_the_known_items(
    tmp_path: Path, events: list[InteractionEvent]
) -> None:
    trainer = make_trainer(tmp_path, [])
    for b in batches_from(events[:400], per_batch=200):
        trainer.process(b)
    store = UserStateStore(DOMAINS, max_len=10)
    examples = [store.observe(e) for e in events[:600]][400:]
    targets = [ex for ex in examples if ex.domain == "book"][:40]
    before = [tuple(ex.history["book"][0]) for ex in targets]
    live = trainer._live_ranks(targets, before)
    ranks, live_scores = live.ranks, live.scores
    learner = trainer.learner
    item_ids, _ = learner.embed_items("book")
    column = {item_id: j for j, item_id in enumerate(item_ids)}
    scores = learner.score_items(learner.embed_histories([ex.history for ex in targets]))
    np.testing.assert_allclose(live_scores, scores, rtol=1e-5, atol=1e-6)  # what fused_live fuses
    assert any(r is None for r in ranks) and any(r is not None for r in ranks)
    for j, (ex, rank) in enumerate(zip(targets, ranks, strict=True)):
        assert live.positives[j] == column.get(ex.item_id)  # the columns fused_live ranks with
        assert live.excluded[j] == [column[i] for i in before[j] if i in column]
        if ex.item_id not in column:
            assert rank is None  # an item the learner never saw is a miss
            continue
        mine = scores[j, column[ex.item_id]]
        others = [c for i, c in column.items() if i != ex.item_id and i not in before[j]]
        assert rank == 1 + int((scores[j, others] >= mine).sum())  # ties against, earlier books excluded


def test_a_prequential_sample_tests_the_same_hashed_events_for_every_ranker_and_trains_all(
        tmp_path: Path, events: list[InteractionEvent]) -> None:
    sent: list[EmbeddingBatch] = []
    trainer = OnlineTrainer(
        SITNLearner(small_config(), "movie", "book"), CallableTransport(sent.append), None, batch_size=64,
        publish_every_steps=3, publish_every_s=3600.0, prequential_sample=0.3,
    )
    for b in batches_from(events[:600], per_batch=200):
        trainer.process(b)
    trainer.publish()
    assert trainer.events_applied == 600 and trainer.learner.step == 12  # every event trained, as with 1.0
    books = [e for e in events[:600] if e.domain == "book"]
    tested = [e for e in books if ranks_event(e.event_id, 0.3)]
    assert 0.15 * len(books) < len(tested) < 0.45 * len(books)
    assert {name: t.events for name, t in trainer.quality.tallies.items()} == dict.fromkeys(
        ("model", "model_live", "popularity", "cooc_target", "cooc_target_source", "fused", "fused_live"),
        len(tested))
    # the fused weights judged on the tested events only (each in its slot); serving still gets every consumed book
    assert trainer.fused_live is not None
    cold = sum(1 for ex in UserStateStore(("movie", "book"), max_len=10).observe_many(events[:600])
               if ex.domain == "book" and ranks_event(ex.event_id, 0.3) and not consumed_items(ex, "book"))
    assert 0 < cold < len(tested)
    assert {t.events for t in trainer.fused_live.tallies.values()} == {len(tested) - cold}
    assert {t.events for t in trainer.fused_live.tallies_cold.values()} == {cold}
    assert sorted(pair for b in sent for pair in b.consumed) == sorted((e.user_id, e.item_id) for e in books)
    assert trainer.quality_report()["prequential_sample"] == 0.3 == trainer.summary()["prequential_sample"]
    with pytest.raises(ValueError, match=r"prequential_sample must be in \(0, 1\], got 0"):
        OnlineTrainer(SITNLearner(small_config(), "movie", "book"), CallableTransport(sent.append), None,
                      prequential_sample=0)
