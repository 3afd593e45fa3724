"""The online trainer: example batches in, prequential ranking, mini-batch steps, publishing and
checkpoints. Plain Python around a SITNLearner; the Ray actor in ``learner.online.actor`` is a thin shell.

Quality, test-then-train: each step's target events are ranked by the served model (``learner.online.prequential``)
before the model trains on them, and by the shadow baselines (``learner.online.shadow``) before each learns them;
``quality`` (a :class:`learner.online.prequential.StreamQuality`) tallies every ranker on those same events.
With a ``fallback`` (``learner.online.gate.RankerFallback``), each publish also tells serving which ranker to
use (``EmbeddingBatch.served_by``): the model, or the best servable baseline while the model ranks
significantly worse than it. The fused ranker (``learner.online.shadow.FusedShadow``: the served model's scores
combined with the baselines' target-history co-occurrence, ``serving.fused``) is ranked on the same events
for a grid of weights; each publish carries the weight it serves with (``EmbeddingBatch.fused_weight``), and
the ``fused`` tally is its rank at that weight, so the fallback can choose it as serving would answer.
Tallies, baselines, the fused weights' tallies and the fallback's window are checkpointed with the model.

Replay time and data time. A replay sends days of activity in minutes: a user's next event often arrives
milliseconds after the previous one (on the shipped data 81% of the later book events directly follow the
same user's previous event in the file), long before any publish can serve it, while the shadow baselines
rank every event from its own history. So each learnt ranker is tallied twice: ``model`` and ``fused`` as
serving held them at that moment of the replay (*replay time*), and ``model_live`` and ``fused_live`` from
the event's own history with the weights being trained (*data time*: what serving answers once a user's
vectors are published before the user's next request, as at live traffic rates, where freshness is about a
second and a publish follows every step). Data time is the comparison with the baselines on equal terms,
so the fallback and the fused weight are decided on it; the replay-time figures stay beside it.

The learner owns the stream's positions and each user's history (``stream.consumer`` hands it decoded events
with their offsets, nothing more). Per partition it keeps the position, the next offset to read, of
everything trained. The one history store is the model's own (``SITNLearner.histories``, which
``embed_users`` and ``recommend`` read): each event's causal example is built from it, the user's last
``max_len`` items per domain before the event, and ``learn_many`` records the event there. Exactly once,
in this order:

1. ``process(batch)`` drops every event at an offset below its partition's position (trained already: a
   consumer replaced alone re-reads from the position it was given, while the batches its predecessor
   delivered are still queued), builds the examples of the others chunk by chunk (``batch_size``) from
   the history store, trains on each chunk before building the next, and advances the positions once
   all are trained. Between calls nothing is half-applied. A batch that starts *above* a position would
   skip records: an error. The batch's dead letters (``EventBatch.letters``) at or above the positions are
   counted, by reason, as the positions pass them: the run's dead-letter tally lives here, beside the
   positions, because a consumer's own count starts again when it is replaced.
2. ``checkpoint()`` writes model (with the history store), optimizer, prototypes, id maps, publisher
   state, the dead-letter tally and the positions atomically, in one file. It reads them out (encodes
   them) at once; the write may then run on a writer thread (``background=True``), and the positions
   count as durable only when ``collect_checkpoint`` returns its mark.
3. Only then (the write done) does the caller mirror the positions into the consumer group
   (``stream.group_offsets``), for lag tools; nothing reads them back.

A crash before 2 is durable loses nothing: the new learner restores the previous checkpoint and the
consumers are started at its positions (``positions()``), so what was trained after it is trained again (at
most one checkpoint interval plus the batches in flight) and nothing is applied twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import time
from typing import Any, NamedTuple

import numpy as np

from learner.core.history import EMPTY, History
from learner.online import telemetry
from learner.online.checkpoint_store import CheckpointStore, StagedCheckpoint
from learner.online.drift import DriftMonitor
from learner.online.gate import PublishGate, RankerFallback, ndcg_gain
from learner.online.prequential import PrequentialEvaluator, StreamQuality, ranks_event
from learner.online.prior_tuner import PriorTuner
from learner.online.publisher import Publisher, Transport
from learner.online.shadow import BASELINES, FusedShadow, ShadowBaselines, consumed_items
from learner.online.transfer_scale import TransferScaleTuner
from serving.fused import FUSED_WEIGHTS
from stream.consumer import EventBatch, LetterMark
from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS, rank_with_ties_against
from stream.errors import SitnError
from stream.events import EmbeddingBatch, InteractionEvent
from stream.user_state import Example

PUBLISH_LAG_WINDOW_S = 30.0  # summary()'s publish_lag_window_p99_s: the events published this recently

log = logging.getLogger(__name__)


class CheckpointMark(NamedTuple):
    """What a checkpoint holds: the learner step, the events applied and the positions (partition -> next
    offset) of everything trained before it."""

    step: int
    events_applied: int
    positions: dict[int, int]

MODEL = "model"
MODEL_LIVE = "model_live"  # the live model, queried with the event's own history, as the shadow baselines are
FUSED = "fused"
FUSED_LIVE = "fused_live"  # the fused ranker over the live model's scores: FUSED at data time
# What serving answers with each learnt ranker once the event's user is served fresh (data time, see the
# module docstring), as the shadow baselines are measured: the figures the fallback and the fused weight go by.
DATA_TIME = {MODEL: MODEL_LIVE, FUSED: FUSED_LIVE}
RANKERS = (MODEL, *BASELINES)  # the rankers every target event is scored with (and FUSED when it is on)
# The baselines serving can compute itself, by the name ``served_by`` gives them, and their shadow ranker.
SERVABLE = {"popularity": "popularity", "cooccurrence": "cooc_target"}


class StreamGapError(SitnError):
    """A batch starts above the learner's position in a partition: records would be skipped. A bug in
    whoever started the consumer there; the learner stops and is restarted from its checkpoint."""


class _LiveRanking(NamedTuple):
    """The live model on a step's target events (``OnlineTrainer._live_ranks``), one entry per event."""

    ranks: list[int | None]  # 1-based, ties against the item; None: an item the learner never saw (a miss)
    scores: np.ndarray  # (B, N) over the learner's target items, in ``embed_items`` order
    positives: list[int | None]  # the item's column in ``scores``; None: never seen
    excluded: list[list[int]]  # the columns of the user's earlier target items


class _StampServedBy:
    """Hands each published batch on with the ranker serving must use (``EmbeddingBatch.served_by``) and
    the fused ranker's weights (``EmbeddingBatch.fused_weight``, ``fused_weight_cold``)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.served_by = MODEL
        self.fused_weight = 1.0
        self.fused_weight_cold: float | None = None

    def stamp(self, batch: EmbeddingBatch) -> EmbeddingBatch:
        return dataclasses.replace(batch, served_by=self.served_by, fused_weight=self.fused_weight,
                                   fused_weight_cold=self.fused_weight_cold)

    def send(self, batch: EmbeddingBatch) -> None:
        self.transport.send(self.stamp(batch))


class OnlineTrainer:
    """Trains on delivered example batches. ``learner`` follows the SITNLearner contract."""

    def __init__(
        self,
        learner: Any,
        transport: Transport,
        checkpoints: CheckpointStore | None,
        batch_size: int = 256,
        checkpoint_every_steps: int = 200,
        publish_every_steps: int = 20,
        publish_every_s: float = 1.0,
        full_publish_every: int = 0,
        refresh_users_per_publish: int = 256,
        prequential_k: int = 10,
        prequential_window: int = 2000,
        served_max_users: int = 1_000_000,
        served_max_consumed_per_user: int = 500,
        gate: PublishGate | None = None,
        gate_sample_per_step: int = 64,
        drift: DriftMonitor | None = None,
        fallback: RankerFallback | None = None,
        fused_weights: tuple[float, ...] = FUSED_WEIGHTS,
        fused_window: int = 10_000,
        cooc_max_neighbours: int | None = DEFAULT_MAX_NEIGHBOURS,
        transfer_scale_window: int = 5000,
        prior_window: int = 5000,
        prequential_sample: float = 1.0,
        publish_max_share: float = 1.0,
    ) -> None:
        """``gate``: hold versions back whose shadow NDCG dropped (``learner.online.gate``); it ranks up to
        ``gate_sample_per_step`` target events of each step with the live model as well.
        ``full_publish_every``/``refresh_users_per_publish``: ``learner.online.publisher.Publisher``'s ``full_every``
        and ``refresh_users``.
        ``served_max_users``, ``served_max_consumed_per_user``: serving's bounds (``ServingSettings.max_users``,
        ``max_consumed_per_user``), kept by the mirror of its users' vectors and the publisher's of its consumed sets.
        ``drift``: watches each step's losses and prequential metrics, the input events and, after each
        publish, the prototype assignments (``learner.online.drift``); its detectors are checkpointed.
        ``fallback``: decides at each publish whether serving uses the model or a baseline; its baselines
        must be named as in ``SERVABLE``, its learnt rankers among ``model`` and ``fused``. Without it serving
        always uses the model.
        ``fused_weights``: the fused ranker's weight grid (``learner.online.shadow.FusedShadow``, whose weights are
        tallied over the last ``fused_window`` target events); empty: no fused ranker.
        ``cooc_max_neighbours``: the shadow co-occurrence's neighbours per item (``stream.cooccurrence``; None:
        every pair), as serving's ``ServingSettings.cooc_max_neighbours``; a checkpoint restores its own.
        ``transfer_scale_window``: target events per slot over which the query-time transfer scale is chosen
        online (``learner.online.transfer_scale``; it starts from the learner's, e.g. a warm start's offline choice);
        0, or a learner without a source path: the scale stays as it is.
        ``prior_window``: target events over which the popularity prior's half-life is chosen online among
        all-time counts and the learner's ``SITNConfig.popularity_half_lives`` (``learner.online.prior_tuner``);
        0, or a learner without decayed counts or without a prior: it stays as it is.
        ``publish_max_share``: the most of the learner's time publishing may take while it is behind
        (``Publisher``'s ``max_share``; ``process(behind=...)``).
        ``prequential_sample``: the share of target events tested before training (``ranks_event``: the same
        events for every ranker, baseline, tuner and the gate, and on every run); 1 = all. Every event trains."""
        if not 0.0 < prequential_sample <= 1.0:
            raise ValueError(f"prequential_sample must be in (0, 1], got {prequential_sample}")
        self.prequential_sample = prequential_sample
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be >= 1, got {checkpoint_every_steps}")
        self.learner = learner
        self.source, self.target = learner.source, learner.target
        self.batch_size = batch_size
        self.checkpoints = checkpoints
        self.checkpoint_every_steps = checkpoint_every_steps
        if fallback is not None and not set(fallback.baselines) <= set(SERVABLE):
            raise ValueError(f"fallback baselines must be among {sorted(SERVABLE)}, got {list(fallback.baselines)}")
        self.fused = FusedShadow(fused_weights, prequential_k, fused_window) if fused_weights else None
        transfers = getattr(getattr(learner, "config", None), "use_source", False) and hasattr(learner, "model")
        self.transfer_scale = (
            TransferScaleTuner(window=transfer_scale_window, min_events=max(1, transfer_scale_window // 5),
                               k=prequential_k, initial=learner.model.transfer_scale)
            if transfers and transfer_scale_window > 0 else None
        )
        half_lives: tuple[int, ...] = getattr(getattr(learner, "config", None), "popularity_half_lives", ())
        tunes_prior = (prior_window > 0 and bool(half_lives) and learner.config.popularity_prior > 0
                       and learner.config.item_bias)
        self.prior_tuner = (
            PriorTuner(half_lives, window=prior_window, min_events=max(1, prior_window // 5),
                       k=prequential_k, initial=learner.popularity_half_life)
            if tunes_prior else None
        )
        self.fused_live = (FusedShadow(fused_weights, prequential_k, fused_window, name=FUSED_LIVE)
                           if fused_weights else None)
        learnt = (MODEL, MODEL_LIVE, FUSED, FUSED_LIVE) if self.fused is not None else (MODEL, MODEL_LIVE)
        if fallback is not None and not set(fallback.learnt) <= set(learnt) - {MODEL_LIVE, FUSED_LIVE}:
            raise ValueError(f"fallback learnt rankers must be among {list(learnt)}, got {list(fallback.learnt)}")
        self._stamp = _StampServedBy(transport)
        self.publisher = Publisher(learner, self._stamp, publish_every_steps, publish_every_s, full_publish_every,
                                   refresh_users=refresh_users_per_publish,
                                   max_consumed_per_user=served_max_consumed_per_user, max_users=served_max_users,
                                   max_share=publish_max_share)
        self.prequential = PrequentialEvaluator(max_users=served_max_users)
        self.shadow = ShadowBaselines(self.source, self.target, max_history=learner.config.max_len,
                                      max_neighbours=cooc_max_neighbours)
        self.quality = StreamQuality((*RANKERS, *learnt[1:]), prequential_k, prequential_window, model=MODEL,
                                     learnt=learnt[1:])
        if self.fused_live is not None:
            self._stamp.fused_weight = self.fused_live.weight
            self._stamp.fused_weight_cold = self.fused_live.weight_cold
        self.fallback = fallback
        self.positions: dict[int, int] = {}  # partition -> next offset to read, everything trained
        self.events_applied = 0
        self.redelivered_dropped = 0  # events of delivered batches below the position: trained already
        # The records below the positions that went to the dead-letter topic, by reason, counted once each as
        # the positions pass them (so, like the positions, exact across consumer and learner restarts), and
        # the first letter of each reason (DeadLetter.example)
        self.dead_letters_by_reason: collections.Counter[str] = collections.Counter()
        self.dead_letter_examples: dict[str, str] = {}
        self.last_trained_event_ids: list[str] = []  # of the last process() call, in training order
        self._last_checkpoint_step = int(learner.step)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None  # background checkpoint writes
        self._writing: tuple[concurrent.futures.Future[None], CheckpointMark] | None = None  # in flight
        self._durable: CheckpointMark | None = None  # written, not yet collected
        # Seconds of the newest checkpoints: the training loop's stall (reading the state out) and the write.
        self.checkpoint_stall_s: collections.deque[float] = collections.deque(maxlen=64)
        self.checkpoint_write_s: collections.deque[float] = collections.deque(maxlen=64)
        self.last_stats: dict[str, float] = {}
        # (published at, seconds from arrival) of each event published in the last PUBLISH_LAG_WINDOW_S: the
        # status snapshot's publish-lag p99 (the dashboard's figure without Prometheus)
        self._publish_lags: collections.deque[tuple[float, float]] = collections.deque()
        self.publish_lag_window_p99_s = math.nan
        self.gate = gate
        self.gate_sample_per_step = gate_sample_per_step
        self.drift = drift
        self._gate_rng = np.random.default_rng(0)
        self.burn_in_until: float | None = None  # see warm_start()
        self.burn_in_events = 0

    def warm_start(self, learner: Any, trained_until: float) -> None:
        """Start from ``learner``, trained offline (``sitn train``) on the events up to ``trained_until``.

        Those events still arrive (the replay sends the whole file): each one is *burnt in*, not trained
        and not ranked: its user's history and the shadow baselines learn it, its user is published with
        the warm model's vectors and its item is excluded from that user's recommendations. So the
        baselines know exactly what the model knows, and the prequential figures count only the events
        after ``trained_until``, which neither has seen. Checkpoints carry both, so a restart goes on alike.
        """
        if learner.source != self.source or learner.target != self.target:
            raise ValueError(f"warm-start model is {learner.source}->{learner.target}, the run {self.source}->{self.target}")
        self.learner = learner
        self.publisher.learner = learner
        self._last_checkpoint_step = int(learner.step)
        self.burn_in_until = float(trained_until)
        if self.transfer_scale is not None:  # start from the scales the offline training chose on validation
            warm, cold = learner.model.transfer_scale
            self.transfer_scale.scale = {"warm": float(warm), "cold": float(cold)}
        if self.prior_tuner is not None:  # a warm model without the same decayed counts keeps its prior as trained
            if self.prior_tuner.options[1:] != getattr(learner.config, "popularity_half_lives", ()):
                self.prior_tuner = None
            else:
                self.prior_tuner.half_life = learner.popularity_half_life

    # -- the batch path ------------------------------------------------------------------------------
    def process(self, batch: EventBatch, received_wall_s: float | None = None,
                behind: bool = False) -> list[dict[str, float]]:
        """Train on every event of ``batch`` not trained yet; returns the statistics of each learner step.
        ``behind``: more events were waiting when this batch was taken (the publisher's budget then applies)."""
        received_wall_s = time.time() if received_wall_s is None else received_wall_s
        self.publisher.behind = behind
        events, positions, letters = self._new_events(batch)
        self.last_trained_event_ids = [e.event_id for e in events]
        stats = []
        for i in range(0, len(events), self.batch_size):
            chunk = events[i : i + self.batch_size]
            if self.burn_in_until is not None:  # a user's early events all come before their later ones
                early = [e for e in chunk if e.timestamp <= self.burn_in_until]
                if early:
                    self._burn_in(self._examples(early), received_wall_s)
                    chunk = [e for e in chunk if e.timestamp > self.burn_in_until]
            if chunk:
                stats.append(self._step(self._examples(chunk), received_wall_s))
        self.positions.update(positions)
        self.events_applied += len(events)
        for mark in letters:
            self.dead_letters_by_reason[mark.reason] += 1
            if mark.reason not in self.dead_letter_examples and mark.reason in batch.letter_examples:
                self.dead_letter_examples[mark.reason] = batch.letter_examples[mark.reason]
        telemetry.EVENTS_APPLIED.set(self.events_applied)
        return stats

    def _new_events(self, batch: EventBatch) -> tuple[list[InteractionEvent], dict[int, int], list[LetterMark]]:
        """The batch's events at or above their partition's position, in batch order, the positions after
        the batch, and its dead letters at or above the positions. Events below a position were trained
        already: dropped and counted; dead letters below it were counted already."""
        events: list[InteractionEvent] = []
        positions: dict[int, int] = {}
        floors: dict[int, int] = {}
        for partition, (first, end) in batch.read.items():
            trained = self.positions.get(partition)
            if trained is not None and first > trained:
                raise StreamGapError(f"partition {partition}: a batch from offset {first} on, but the learner "
                                     f"trained up to {trained}: records {trained}..{first - 1} would be skipped")
            floor = floors[partition] = trained or 0
            start, stop = batch.spans.get(partition, (0, 0))
            kept = [e for e, o in zip(batch.events[start:stop], batch.offsets[start:stop], strict=True) if o >= floor]
            self.redelivered_dropped += (stop - start) - len(kept)
            events.extend(kept)
            positions[partition] = max(end, floor)
        letters = [m for m in batch.letters if m.offset >= floors[m.partition]]
        return events, positions, letters

    def _examples(self, events: list[InteractionEvent]) -> list[Example]:
        """Each event's causal example: the user's last ``max_len`` items per domain before it, from the
        learner's history store and, for a user with several events here, the earlier ones among them
        (the store records them only when ``learn_many`` learns them)."""
        histories = self.learner.histories
        max_len = self.learner.config.max_len
        pending: dict[str, dict[str, History]] = {}  # user -> history after their events so far in this chunk
        out: list[Example] = []
        for e in events:
            before = pending.get(e.user_id)
            if before is None:
                before = histories.get(e.user_id)
            out.append(Example(e.event_id, e.user_id, e.domain, e.item_id, e.timestamp, before))
            items, stamps = before.get(e.domain, EMPTY)
            after = dict(before)
            after[e.domain] = ((*items, e.item_id)[-max_len:], (*stamps, e.timestamp)[-max_len:])
            pending[e.user_id] = after
        return out

    def _burn_in(self, examples: list[Example], received_wall_s: float) -> None:
        """Events the warm-start model was trained on (``warm_start``): record, let the baselines learn,
        publish; no step, no ranking."""
        self.shadow.learn(examples)
        for ex in examples:
            self.learner.histories.record(ex.user_id, ex.domain, ex.item_id, ex.timestamp, ex.history)
        consumed = [(ex.user_id, ex.item_id) for ex in examples if ex.domain == self.target]
        self.publisher.touch((ex.user_id for ex in examples), consumed, received_wall_s)
        self.burn_in_events += len(examples)
        self.publish_if_due()

    def _step(self, examples: list[Any], received_wall_s: float) -> dict[str, float]:
        start_s = time.perf_counter()
        is_target = [ex.domain == self.target for ex in examples]
        # Every ranker (served, live, fused, baselines, tuners, gate) tests the same sampled target events.
        ranked = [t and ranks_event(ex.event_id, self.prequential_sample) for ex, t in zip(examples, is_target,
                                                                                             strict=True)]
        targets = [ex for ex, r in zip(examples, ranked, strict=True) if r]
        consumed = [(ex.user_id, ex.item_id) for ex in targets]
        before = [consumed_items(ex, self.target) for ex in targets]  # excluded from the candidates
        model_scores: dict[int, np.ndarray] = {}  # target position -> served model scores (N,)
        served_ranks = self.prequential.rank_many(consumed, before, model_scores)  # test with what is served ...
        live = self._live_ranks(targets, before)  # the live model, from each event's own history
        live_ranks = live.ranks
        ranks: dict[str, list[int | None]] = {MODEL: served_ranks, MODEL_LIVE: live_ranks}
        hook = None
        if self.fused is not None:
            fused_ranks: list[int | None] = []
            fused_live_ranks: list[int | None] = []
            ranks[FUSED], ranks[FUSED_LIVE] = fused_ranks, fused_live_ranks
            hook = self._fused_ranker(model_scores, fused_ranks, live, fused_live_ranks)
        # ... the baselines and the fused ranker, each event then learnt ...
        rankable, baseline_ranks = self.shadow.observe(examples, hook, ranked)
        gains = self.quality.record(rankable, {**ranks, **baseline_ranks})
        if self.fallback is not None:  # judged at data time, as the baselines are
            others = {name: gains[DATA_TIME.get(name, name)] for name in self.fallback.learnt[1:]}
            others.update({name: gains[SERVABLE[name]] for name in self.fallback.baselines})
            self.fallback.record(gains[DATA_TIME[MODEL]], others)
        telemetry.PREQUENTIAL_RANKED.inc(len(targets))
        if self.gate is not None and consumed:
            self._shadow_rank(consumed, served_ranks, live_ranks)  # ... served vs what would be published ...
        stats = dict(self.learner.learn_many(examples))  # ... then train
        self.publisher.touch((ex.user_id for ex in examples),  # every consumed book reaches serving, tested or not
                             [(ex.user_id, ex.item_id) for ex, t in zip(examples, is_target, strict=True) if t],
                             received_wall_s)
        stats.update(self.prequential.stats())
        stats.update(self.quality.stats())
        if self.transfer_scale is not None:
            stats.update(self.transfer_scale.stats())
        if self.prior_tuner is not None:
            stats.update(self.prior_tuner.stats())
        if self.fused is not None and self.fused_live is not None:
            stats.update(self.fused.stats())
            stats.update(self.fused_live.stats())
        telemetry.record_quality(self.quality)
        if self.gate is not None:
            stats.update(self.gate.state())
        if self.fallback is not None:
            stats.update(self.fallback.state())
        if self.drift is not None:
            self.drift.observe_events([ex.domain for ex in examples], [ex.item_id for ex in examples])
            self.drift.observe_step(stats, int(self.learner.step))
            stats["drift_alarms_total"] = float(self.drift.alarms_total)
            stats["drift_alarms_active"] = float(self.drift.alarms_active())
        self.last_stats = stats
        n_target = sum(is_target)
        telemetry.record_step(stats, time.perf_counter() - start_s,
                              {self.source: len(examples) - n_target, self.target: n_target})
        self.publish_if_due()
        return stats

    def _live_ranks(self, targets: list[Example], before: list[tuple[str, ...]]) -> _LiveRanking:
        """Each target event ranked by the live model (before it trains on the step) from the event's own
        causal history, among the target items the learner knows: the information the shadow baselines
        rank with (the scores, columns and exclusions are kept for ``fused_live``). ``model`` ranks with what
        serving held at that moment of the replay, so the gap between the two is what serving a user's
        vectors after the user's next event costs (module docstring: data time)."""
        if not targets:
            return _LiveRanking([], np.zeros((0, 0), dtype=np.float32), [], [])
        idmap = self.learner.idmaps["target"]
        rows = idmap.rows(ex.item_id for ex in targets) - 1  # embed_items order; -1: never seen, a miss
        histories = [ex.history for ex in targets]
        tuner = self.transfer_scale
        if tuner is None:
            scores = self.learner.score_items(self.learner.embed_histories(histories))  # (B, N)
        else:  # own interests alone and with the whole transfer; the current scale lies between (linear)
            current = self.learner.model.transfer_scale
            q0, q1 = self.learner.embed_histories_at(histories, [(0.0, 0.0), (1.0, 1.0)])  # one encoder pass
            s0, s1 = self.learner.score_items(q0), self.learner.score_items(q1)  # (B, N) each
            warm = [bool(h.get(self.target, EMPTY)[0]) for h in histories]
            scale = np.where(warm, current[0], current[1]).astype(np.float32)[:, None]  # (B, 1)
            scores = s0 + scale * (s1 - s0)
        out: list[int | None] = []
        positives: list[int | None] = []
        excluded: list[list[int]] = []
        for j, r in enumerate(rows.tolist()):
            excluded.append([e for e in (idmap.rows(before[j]) - 1).tolist() if e >= 0])
            positives.append(r if r >= 0 else None)
            out.append(None if r < 0 else rank_with_ties_against(scores[j], int(r), excluded[j]))
        if tuner is not None:  # tallied before the model trains on them; the choice applies from the next step
            tuner.observe(s0, s1, positives, excluded, warm)
            self.learner.model.transfer_scale = tuner.choose()
        if self.prior_tuner is not None:  # likewise, with the prior of each half-life in place of the active one
            beta, n = self.learner.config.popularity_prior, scores.shape[1]
            priors = np.stack([beta * np.log1p(self.learner.prior_counts("target", h, n))
                               for h in self.prior_tuner.options]).astype(np.float32)  # (options, N)
            self.prior_tuner.observe(scores, priors, positives, excluded)
            self.learner.popularity_half_life = self.prior_tuner.choose()
        return _LiveRanking(out, scores, positives, excluded)

    def _fused_ranker(self, model_scores: dict[int, np.ndarray], out: list[int | None], live: _LiveRanking,
                      out_live: list[int | None]) -> Any:
        """The shadow hook ranking each target event with the fused ranker into ``out`` (served vectors) and
        ``out_live`` (the live model's scores of ``live``), each with the baselines' co-occurrence before
        the event."""
        assert self.fused is not None and self.fused_live is not None
        fused, fused_live, prequential, cooc = self.fused, self.fused_live, self.prequential, self.shadow.cooc
        served_ids = prequential.served_item_ids()
        live_ids = self.learner.idmaps["target"].ids()  # the columns of live.scores (embed_items order)

        def rank(position: int, ex: Any, rankable: bool, cooc_scores: np.ndarray | None) -> None:
            positive = prequential.item_row(ex.item_id)
            excluded: list[int] = []
            if positive is not None:
                excluded = [r for r in map(prequential.item_row, consumed_items(ex, self.target)) if r is not None]
            out.append(fused.rank(ex, served_ids, model_scores.get(position), positive, excluded, cooc,
                                  cooc_scores, rankable))
            out_live.append(fused_live.rank(ex, live_ids, live.scores[position], live.positives[position],
                                            live.excluded[position], cooc, cooc_scores, rankable))

        return rank

    def _shadow_rank(self, consumed: list[tuple[str, str]], served_ranks: list[int | None],
                     live_ranks: list[int | None]) -> None:
        """Feed the gate a sample of the step's target events, each with its served rank and its rank by
        the live model (``_live_ranks``, before it trains on them; ties against the item, the user's earlier
        target items excluded)."""
        assert self.gate is not None
        # Compare version with version: only events whose user the served version ranks with its model
        # vectors (not the popularity fallback) and whose item it holds.
        candidates = [i for i, (user, _) in enumerate(consumed)
                      if served_ranks[i] is not None and self.prequential.serves_user(user)]
        if not candidates:
            return
        picked = np.asarray(candidates)
        if len(candidates) > self.gate_sample_per_step:
            picked = np.sort(self._gate_rng.choice(picked, self.gate_sample_per_step, replace=False))
        k = self.quality.k
        self.gate.record([ndcg_gain(served_ranks[i], k) for i in picked.tolist()],
                         [ndcg_gain(live_ranks[i], k) for i in picked.tolist()])

    def publish_if_due(self, now_s: float | None = None) -> EmbeddingBatch | None:
        """Publish when steps or time say so. Call it while the stream is idle too: the last steps before
        a pause must still reach serving once ``publish_every_s`` has passed, not wait for the next event."""
        if self.publisher.due(int(self.learner.step), now_s):
            return self.publish()
        return None

    def publish(self, force_full: bool = False) -> EmbeddingBatch | None:
        """Publish the live model, unless the publish gate holds it back (then None; serving keeps its version)."""
        if self.gate is not None:
            allowed = self.gate.allows(self.publisher.version + 1)
            telemetry.PUBLISH_GATE_CLOSED.set(0.0 if allowed else 1.0)
            if not allowed:
                telemetry.PUBLISH_HELD.inc()
                self.publisher.hold(int(self.learner.step))
                return None
        if self.fallback is not None:
            previous, self._stamp.served_by = self._stamp.served_by, self.fallback.decide()
            telemetry.record_served_ranker(self._stamp.served_by, self._stamp.served_by != previous)
        if self.fused is not None and self.fused_live is not None:
            # the weight serving uses from this version on (chosen at data time), and the learner ranks with
            self._stamp.fused_weight = self.fused.weight = self.fused_live.choose()
            self._stamp.fused_weight_cold = self.fused.weight_cold = self.fused_live.weight_cold
            telemetry.FUSED_WEIGHT.set(self._stamp.fused_weight)
            telemetry.FUSED_WEIGHT_COLD.set(self._stamp.fused_weight_cold)
        start_s = time.perf_counter()
        batch = self._stamp.stamp(self.publisher.publish(int(self.learner.step), force_full=force_full))
        if self.gate is not None:
            self.gate.published()
        if batch.full:
            self.prequential.set_served(
                batch.version, batch.item_ids, batch.item_vectors, batch.user_ids, batch.user_vectors,
                batch.popularity,
            )
        else:
            self.prequential.set_served_delta(batch)
        telemetry.PUBLISH_SECONDS.observe(time.perf_counter() - start_s)
        telemetry.PUBLISHES.labels("full" if batch.full else "delta").inc()
        telemetry.PUBLISHED_VERSION.set(batch.version)
        for ingest_s in batch.event_ingest_wall_s:  # per event
            lag_s = max(0.0, batch.created_at_s - ingest_s)
            telemetry.PUBLISH_LAG_SECONDS.observe(lag_s)
            self._publish_lags.append((batch.created_at_s, lag_s))
        self._publish_lag_window(batch.created_at_s)
        telemetry.record_prototypes(self.learner)
        if self.drift is not None and getattr(self.learner, "prototypes", None) is not None:
            for (side, k), proto in self.learner.prototypes.sets.items():
                self.drift.observe_assignments(f"proto_{side}_k{k}", proto.sizes, int(self.learner.step))
        return batch

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        return int(self.learner.step) - self._last_checkpoint_step >= self.checkpoint_every_steps

    def checkpoint(self, background: bool = False) -> CheckpointMark | None:
        """Checkpoint everything trained so far (call between ``process`` calls); returns what it holds.

        The state is read out (encoded) now, on this thread; with ``background`` the write (hash, file,
        fsync, manifest) then runs on a writer thread while training goes on, this returns None and
        ``collect_checkpoint`` hands back the mark once the file is durable. At most one write is in
        flight: a checkpoint due while the previous one is still being written first waits for it."""
        if self.checkpoints is None:
            return None
        self._await_write()
        extra = {
            "positions": dict(self.positions),
            "redelivered_dropped": self.redelivered_dropped,
            "dead_letters": {"by_reason": dict(self.dead_letters_by_reason), "examples": dict(self.dead_letter_examples)},
            "publisher": self.publisher.state_dict(),
            "events_applied": self.events_applied,
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "quality": self.quality.state_dict(),
            "shadow": self.shadow.state_dict(),
            "fallback": self.fallback.state_dict() if self.fallback is not None else None,
            "fused": self.fused.state_dict() if self.fused is not None else None,
            "fused_live": self.fused_live.state_dict() if self.fused_live is not None else None,
            "transfer_scale": self.transfer_scale.state_dict() if self.transfer_scale is not None else None,
            "prior_tuner": self.prior_tuner.state_dict() if self.prior_tuner is not None else None,
            "burn_in": {"until": self.burn_in_until, "events": self.burn_in_events},
        }
        mark = CheckpointMark(int(self.learner.step), self.events_applied, dict(self.positions))
        start_s = time.perf_counter()
        staged = self.checkpoints.stage(self.learner, mark.step, extra)
        self.checkpoint_stall_s.append(time.perf_counter() - start_s)
        telemetry.CHECKPOINT_STALL_SECONDS.observe(self.checkpoint_stall_s[-1])
        self._last_checkpoint_step = mark.step
        if not background:
            self._commit(staged, start_s)
            telemetry.EVENTS_APPLIED.set(mark.events_applied)
            self._durable = None
            return mark
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._writing = (self._writer.submit(self._commit, staged, start_s), mark)
        return None

    def collect_checkpoint(self, wait: bool = False) -> CheckpointMark | None:
        """The newest checkpoint made durable in the background since the last call, or None (``wait``: wait
        for the one in flight first). A failed write raises its error here, on the training thread."""
        if self._writing is not None and (wait or self._writing[0].done()):
            self._await_write()
        mark, self._durable = self._durable, None
        return mark

    def _await_write(self) -> None:
        if self._writing is None:
            return
        future, mark = self._writing
        self._writing = None
        future.result()  # re-raises the writer's error
        telemetry.EVENTS_APPLIED.set(mark.events_applied)
        self._durable = mark

    def _commit(self, staged: StagedCheckpoint, start_s: float) -> None:
        assert self.checkpoints is not None
        commit_s = time.perf_counter()
        self.checkpoints.commit(staged)
        self.checkpoint_write_s.append(time.perf_counter() - commit_s)
        telemetry.CHECKPOINT_SECONDS.observe(time.perf_counter() - start_s)

    def restore(self) -> bool:
        """Load the newest good checkpoint, if any; True when one was loaded."""
        if self.checkpoints is None:
            return False
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            return False
        learner, extra = loaded
        self.learner = learner
        self.publisher.learner = learner
        self.publisher.load_state_dict(extra["publisher"])
        self.positions = {int(p): int(o) for p, o in extra["positions"].items()}
        self.redelivered_dropped = int(extra.get("redelivered_dropped", 0))
        letters = extra.get("dead_letters") or {}  # absent in checkpoints written before the learner counted them
        by_reason = letters.get("by_reason", {})
        self.dead_letters_by_reason = collections.Counter({str(r): int(n) for r, n in by_reason.items()})
        self.dead_letter_examples = {str(r): str(x) for r, x in letters.get("examples", {}).items()}
        self.events_applied = int(extra["events_applied"])
        if self.drift is not None and extra.get("drift") is not None:
            self.drift.load_state_dict(extra["drift"])
        if extra.get("quality") is not None:
            self.quality.load_state_dict(extra["quality"])
        if extra.get("shadow") is not None:
            self.shadow.load_state_dict(extra["shadow"])
        if self.fallback is not None and extra.get("fallback") is not None:
            self.fallback.load_state_dict(extra["fallback"])
            self._stamp.served_by = self.fallback.served
        if self.fused is not None and extra.get("fused") is not None:
            self.fused.load_state_dict(extra["fused"])
        if self.fused_live is not None and extra.get("fused_live") is not None:
            self.fused_live.load_state_dict(extra["fused_live"])
        if self.transfer_scale is not None and extra.get("transfer_scale") is not None:
            self.transfer_scale.load_state_dict(extra["transfer_scale"])
            self.learner.model.transfer_scale = (self.transfer_scale.scale["warm"], self.transfer_scale.scale["cold"])
        if self.prior_tuner is not None and extra.get("prior_tuner") is not None:
            self.prior_tuner.load_state_dict(extra["prior_tuner"])
            self.learner.popularity_half_life = self.prior_tuner.half_life
        if self.fused is not None and self.fused_live is not None:  # both or neither (__init__)
            self._stamp.fused_weight = self.fused.weight = self.fused_live.weight
            self._stamp.fused_weight_cold = self.fused.weight_cold = self.fused_live.weight_cold
        burn_in = extra.get("burn_in") or {}
        self.burn_in_until = burn_in.get("until")
        self.burn_in_events = int(burn_in.get("events", 0))
        self._last_checkpoint_step = int(learner.step)
        log.info("restored step=%d events_applied=%d partitions=%d", learner.step, self.events_applied,
                 len(self.positions))
        return True

    def resume_positions(self) -> dict[int, int]:
        """Where consumers start: per partition, the next offset after everything trained (a copy)."""
        return dict(self.positions)

    @property
    def served_by(self) -> str:
        """The ranker serving was last told to use."""
        return self._stamp.served_by

    def quality_report(self) -> dict[str, Any]:
        """The prequential figures of the model and every baseline (``StreamQuality.figures``), JSON-ready,
        with the ranker serving was last told to use."""
        out = self.quality.figures()
        out["prequential_sample"] = self.prequential_sample  # the share of target events ranked
        out["served_by"] = self.served_by
        out["fused"] = None if self.fused is None or self.fused_live is None else {
            "weight": self.fused_live.weight, "weights": list(self.fused_live.weights),
            "ndcg_window_by_weight": {f"{w:g}": self.fused_live.ndcg(w) for w in self.fused_live.weights},
            "ndcg_window_by_weight_replay": {f"{w:g}": self.fused.ndcg(w) for w in self.fused.weights},
            # users with no book history: their own weight (0: the model alone), over their events only
            "weight_cold": self.fused_live.weight_cold, "weights_cold": list(self.fused_live.weights_cold),
            "ndcg_window_by_weight_cold": {f"{w:g}": self.fused_live.ndcg(w, cold=True)
                                           for w in self.fused_live.weights_cold},
        }
        out["fallback"] = self.fallback.state() if self.fallback is not None else None
        tuner = self.transfer_scale
        out["transfer_scale"] = None if tuner is None else {
            "warm": tuner.scale["warm"], "cold": tuner.scale["cold"], "switches": tuner.switches,
            "ndcg_window_by_scale": {slot: {f"{s:g}": t.figures("window")["window"]["ndcg"] for s, t in per.items()}
                                     for slot, per in tuner.tallies.items()},
        }
        prior = self.prior_tuner
        out["popularity_half_life"] = None if prior is None else {
            "half_life": prior.half_life, "switches": prior.switches,
            "ndcg_window_by_half_life": {str(h): t.figures("window")["window"]["ndcg"] for h, t in prior.tallies.items()},
        }
        return out

    def _publish_lag_window(self, now_s: float) -> None:
        """Drop the publish lags older than ``PUBLISH_LAG_WINDOW_S`` and set the p99 of the rest (NaN: none)."""
        lags = self._publish_lags
        while lags and lags[0][0] < now_s - PUBLISH_LAG_WINDOW_S:
            lags.popleft()
        self.publish_lag_window_p99_s = float(np.percentile([lag for _, lag in lags], 99)) if lags else math.nan

    def summary(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.last_stats.items() if isinstance(v, int | float) and not math.isnan(v)}
        if not math.isnan(self.publish_lag_window_p99_s):  # of the events published in the last 30 s
            out["publish_lag_window_p99_s"] = self.publish_lag_window_p99_s
        out["events_applied"] = float(self.events_applied)
        out["redelivered_dropped"] = float(self.redelivered_dropped)
        out["dead_letters"] = float(sum(self.dead_letters_by_reason.values()))
        out["step"] = float(self.learner.step)
        out["published_version"] = float(self.publisher.version)
        out["burn_in_events"] = float(self.burn_in_events)  # warm start: events the model had been trained on
        out["prequential_sample"] = self.prequential_sample
        return out
