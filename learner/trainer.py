"""The online trainer: example batches in, prequential ranking, mini-batch steps, publishing and
checkpoints. Plain Python around a SITNLearner; the Ray actor in ``learner.actor`` is a thin shell.

Commit order (see also ``stream.consumer``):

1. ``process(batch)`` trains on *every* example of the delivered batch (in chunks of ``batch_size``)
   before it returns, so between calls nothing is half-applied. It also replays the batch's events into
   a per-partition mirror of the consumers' user state, and notes the batch's positions.
2. ``checkpoint()`` writes model, optimizer, prototypes, id maps, the mirrored user state, publisher
   state and the positions (next offset to read per partition) atomically, in one file.
3. Only then does the caller commit the positions returned by ``take_commits()`` to the stream.

A crash before 2 loses nothing: the stream re-delivers from the last committed offsets, which are the
previous checkpoint's. A crash between 2 and 3 is repaired at restart: the supervisor moves the
group's committed offsets to the checkpoint's positions (``resume_info``) before the consumers start,
and seeds their user state from the checkpoint, so nothing is applied twice.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from learner.checkpoint_store import CheckpointStore
from learner.prequential import PrequentialEvaluator
from learner.publisher import Publisher, Transport
from stream.consumer import ExampleBatch, PendingCommits, Positions
from stream.events import EmbeddingBatch, InteractionEvent
from stream.user_state import UserStateStore

log = logging.getLogger(__name__)


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
        full_publish_every: int = 50,
        prequential_k: int = 10,
        prequential_window: int = 2000,
        max_users: int = 1_000_000,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be >= 1, got {checkpoint_every_steps}")
        self.learner = learner
        self.source, self.target = learner.source, learner.target
        self.batch_size = batch_size
        self.checkpoints = checkpoints
        self.checkpoint_every_steps = checkpoint_every_steps
        self.max_users = max_users
        self.publisher = Publisher(learner, transport, publish_every_steps, publish_every_s, full_publish_every)
        self.prequential = PrequentialEvaluator(prequential_k, prequential_window)
        self.positions: dict[int, int] = {}  # partition -> next offset to read, everything trained
        self.mirror: dict[int, UserStateStore] = {}  # partition -> the consumers' user state, as trained
        self.pending = PendingCommits()
        self.events_applied = 0
        self._last_checkpoint_step = int(learner.step)
        self.last_stats: dict[str, float] = {}

    # -- the batch path ------------------------------------------------------------------------------
    def process(self, batch: ExampleBatch, received_wall_s: float | None = None) -> list[dict[str, float]]:
        """Train on every example of ``batch``; returns the statistics of each learner step."""
        received_wall_s = time.time() if received_wall_s is None else received_wall_s
        domains = (self.source, self.target)
        for partition, (start, end) in batch.spans.items():
            store = self.mirror.get(partition)
            if store is None:
                store = self.mirror[partition] = UserStateStore(domains, self.learner.config.max_len, self.max_users)
            for ex in batch.examples[start:end]:
                store.observe(InteractionEvent(ex.event_id, ex.user_id, ex.item_id, ex.domain, ex.timestamp))
        stats = [
            self._step(batch.examples[i : i + self.batch_size], received_wall_s)
            for i in range(0, len(batch.examples), self.batch_size)
        ]
        for partition, position in batch.positions.items():
            self.positions[partition] = position.offset
        self.pending.add(batch)
        self.events_applied += len(batch.examples)
        return stats

    def _step(self, examples: list[Any], received_wall_s: float) -> dict[str, float]:
        consumed = [(ex.user_id, ex.item_id) for ex in examples if ex.domain == self.target]
        self.prequential.rank_many(consumed)  # test with what is served ...
        stats = dict(self.learner.learn_many(examples))  # ... then train
        self.publisher.touch((ex.user_id for ex in examples), consumed, received_wall_s)
        stats.update(self.prequential.stats())
        self.last_stats = stats
        self.publish_if_due()
        return stats

    def publish_if_due(self, now_s: float | None = None) -> EmbeddingBatch | None:
        """Publish when steps or time say so. Call it while the stream is idle too: the last steps before
        a pause must still reach serving once ``publish_every_s`` has passed, not wait for the next event."""
        if self.publisher.due(int(self.learner.step), now_s):
            return self.publish()
        return None

    def publish(self, force_full: bool = False) -> EmbeddingBatch:
        batch = self.publisher.publish(int(self.learner.step), force_full=force_full)
        if batch.full:
            self.prequential.set_served(
                batch.version, batch.item_ids, batch.item_vectors, batch.user_ids, batch.user_vectors,
                batch.popularity,
            )
        else:
            self.prequential.set_served_delta(batch)
        return batch

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_due(self) -> bool:
        return int(self.learner.step) - self._last_checkpoint_step >= self.checkpoint_every_steps

    def checkpoint(self) -> None:
        """Write a checkpoint holding everything trained so far (call between ``process`` calls)."""
        if self.checkpoints is None:
            return
        extra = {
            "positions": dict(self.positions),
            "user_state": {p: s.state_dict() for p, s in self.mirror.items()},
            "publisher": self.publisher.state_dict(),
            "events_applied": self.events_applied,
        }
        self.checkpoints.save(self.learner, int(self.learner.step), extra)
        self._last_checkpoint_step = int(self.learner.step)

    def take_commits(self) -> dict[str, Positions]:
        """Positions, per consumer, made durable by the last checkpoint: commit them now."""
        return self.pending.take()

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
        self.mirror = {int(p): UserStateStore.from_state_dict(s) for p, s in extra["user_state"].items()}
        self.events_applied = int(extra["events_applied"])
        self._last_checkpoint_step = int(learner.step)
        log.info("restored step=%d events_applied=%d partitions=%d", learner.step, self.events_applied,
                 len(self.positions))
        return True

    def resume_info(self) -> dict[str, Any]:
        """What the consumers must resume from: the positions and per-partition user state trained so far."""
        return {
            "positions": dict(self.positions),
            "user_state": {p: s.state_dict() for p, s in self.mirror.items()},
        }

    def summary(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.last_stats.items() if isinstance(v, int | float) and not math.isnan(v)}
        out["events_applied"] = float(self.events_applied)
        out["step"] = float(self.learner.step)
        out["published_version"] = float(self.publisher.version)
        return out
