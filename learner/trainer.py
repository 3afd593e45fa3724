"""The online trainer: stream records in, causal examples, prequential ranking, mini-batch steps,
publishing and checkpoints. Plain Python around a SITNLearner; the Ray actor is a thin shell over it.

Exactly-once effect on the model. Records arrive as ``(partition, offset, event)``. The trainer keeps,
per partition, the next offset it has not yet applied (``applied_offsets``); a record below it is a
redelivery and is skipped. The order at a checkpoint is:

1. apply the records (user state -> examples -> prequential rank -> ``learn_many``),
2. write the checkpoint atomically: model, optimizer, prototypes, id maps, user state, publisher
   state and ``applied_offsets`` together,
3. only then return the offsets to the caller, which commits them to the stream.

A crash between 2 and 3 re-delivers records the checkpoint already holds; step 1's skip drops them.
A crash before 2 loses nothing: the stream re-delivers from the last committed offsets, which are at
or before the checkpoint's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learner.checkpoint_store import CheckpointStore
from learner.prequential import PrequentialEvaluator
from learner.publisher import EmbeddingBatch, Publisher, Transport
from stream.events import InteractionEvent
from stream.user_state import Example, UserStateStore

log = logging.getLogger(__name__)

Record = tuple[str, int, InteractionEvent]  # (partition, offset, event)


class OnlineTrainer:
    """Consumes records, trains, publishes and checkpoints. ``learner`` follows the SITNLearner contract."""

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
        self.learner = learner
        self.source, self.target = learner.source, learner.target
        self.batch_size = batch_size
        self.checkpoints = checkpoints
        self.checkpoint_every_steps = checkpoint_every_steps
        self.user_state = UserStateStore((self.source, self.target), learner.config.max_len, max_users)
        self.publisher = Publisher(learner, transport, publish_every_steps, publish_every_s, full_publish_every)
        self.prequential = PrequentialEvaluator(prequential_k, prequential_window)
        self.applied_offsets: dict[str, int] = {}
        self.events_applied = 0
        self.events_skipped_redelivered = 0
        self._pending: list[Example] = []
        self._pending_ingest_s = 0.0
        self._last_checkpoint_step = learner.step
        self.last_stats: dict[str, float] = {}

    # -- the record path ---------------------------------------------------------------------------
    def process(self, records: Sequence[Record], ingest_wall_s: float | None = None) -> list[dict[str, float]]:
        """Apply records in order; returns the statistics of each learner step that ran."""
        ingest_wall_s = time.time() if ingest_wall_s is None else ingest_wall_s
        step_stats: list[dict[str, float]] = []
        for partition, offset, event in records:
            if offset < self.applied_offsets.get(partition, 0):
                self.events_skipped_redelivered += 1
                continue
            self._pending.append(self.user_state.observe(event))
            self.applied_offsets[partition] = offset + 1
            self.events_applied += 1
            self._pending_ingest_s = ingest_wall_s
            if len(self._pending) >= self.batch_size:
                step_stats.append(self._step())
        return step_stats

    def flush(self) -> dict[str, float] | None:
        """Train on a partial batch (end of stream)."""
        return self._step() if self._pending else None

    def _step(self) -> dict[str, float]:
        batch, self._pending = self._pending, []
        target_pairs = [(ex.user_id, ex.item_id) for ex in batch if ex.domain == self.target]
        self.prequential.rank_many(target_pairs)  # test ...
        stats = dict(self.learner.learn_many(batch))  # ... then train
        self.publisher.touch(
            (ex.user_id for ex in batch), (item for _, item in target_pairs), self._pending_ingest_s
        )
        stats.update(self.prequential.stats())
        stats["events_applied"] = float(self.events_applied)
        self.last_stats = stats
        step = int(self.learner.step)
        if self.publisher.due(step):
            self.publish()
        if self.checkpoints is not None and step - self._last_checkpoint_step >= self.checkpoint_every_steps:
            self.checkpoint()
        return stats

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
    def checkpoint(self) -> dict[str, int]:
        """Write a checkpoint holding everything applied so far; return the offsets safe to commit."""
        if self.checkpoints is None:
            return dict(self.applied_offsets)
        extra = {
            "applied_offsets": dict(self.applied_offsets),
            "user_state": self.user_state.state_dict(),
            "publisher": self.publisher.state_dict(),
            "events_applied": self.events_applied,
        }
        path = self.checkpoints.save(self.learner, int(self.learner.step), extra)
        self._last_checkpoint_step = int(self.learner.step)
        log.info("checkpoint step=%d path=%s partitions=%d", self.learner.step, path, len(self.applied_offsets))
        return dict(self.applied_offsets)

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
        self.user_state = UserStateStore.from_state_dict(extra["user_state"])
        self.publisher.load_state_dict(extra["publisher"])
        self.applied_offsets = {str(k): int(v) for k, v in extra["applied_offsets"].items()}
        self.events_applied = int(extra["events_applied"])
        self._last_checkpoint_step = int(learner.step)
        return True

    def summary(self) -> dict[str, float]:
        out = {k: v for k, v in self.last_stats.items() if isinstance(v, int | float) and not math.isnan(v)}
        out["events_applied"] = float(self.events_applied)
        out["events_skipped_redelivered"] = float(self.events_skipped_redelivered)
        out["step"] = float(self.learner.step)
        return out

    @staticmethod
    def default_checkpoint_dir(run_dir: Path) -> Path:
        return run_dir / "checkpoints"
