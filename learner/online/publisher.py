"""Publishing fresh embeddings to serving as versioned updates.

Every ``every_steps`` learner steps or ``every_s`` seconds (whichever comes first) the publisher reads
the target-domain item vectors and the query vectors of the users touched since the last publish, and
hands a :class:`EmbeddingBatch` to a transport. Items are sent as a delta (rows that moved by more than
``tolerance`` since they were last published). Users not touched still drift as the shared encoder
learns: each publish also re-encodes the next ``refresh_users`` of them in turn, so every known user's
served vectors are renewed about every ``known users / refresh_users`` publishes at a bounded cost per
publish. A full snapshot of all items and all known users goes out when forced (the first publish, a new
serving replica, the end of a run) and, if ``full_every`` > 0, every ``full_every`` publishes: a full
publish of a large population costs seconds on both ends (measured: 0.85-1.1 s to build and 1.5-2.8 s to
apply on the shipped data), which is why the rolling refresh replaced it on schedule. A replica on the
updates topic does not need it either: compaction keeps every key's newest record.

The publisher counts consumed target items for the popularity order it publishes (serving's fallback, as
the prequential evaluator mirrors it). Counts are cumulative, like serving's own, and bounded by a cap
rather than decayed: decay would make the published order differ from the cumulative counts serving
ranks by. The catalogue bounds the items in practice; ``max_counted_items`` only guards against an
unbounded id space, and what it prunes (the least counted) never reaches the published top
``popularity_size`` while the cap is well above it.

The publisher also keeps the consumed sets serving holds (``stream.consumed.ConsumedItems`` with serving's
bounds, ``max_consumed_per_user`` items per user and ``max_users`` users, fed the same pairs in the same order),
and the counts: a full version carries both, as of the version before it (``EmbeddingBatch.base``), so a replica
that starts mid-run (a replacement, or the one serving actor after a crash) builds the exclusions, popularity
and co-occurrence that a replica fed every version holds; the checkpoint holds them, and the pairs not yet
published, so a restarted learner hands a replica the same. Memory: one entry per remembered pair, as in
serving (the shipped data: about 70k pairs).

Two transports: a Ray actor handle (everything in one cluster) and the compacted Kafka updates topic for
replicas deployed on their own, which carries the same batch (:func:`stream.events.encode_batch`: one record
per item and per user vector, then a version record with the consumed pairs, the ranker and the fused
weight). Both ends apply it with ``serving.service.RecommendationService.apply``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from stream.consumed import ConsumedItems, group_by_user
from stream.events import EmbeddingBatch, ServingBase, encode_batch

log = logging.getLogger(__name__)


class Transport(Protocol):
    def send(self, batch: EmbeddingBatch) -> None: ...


class CallableTransport:
    """Hands the batch to a callable (a Ray actor method's ``.remote``, or a plain function in tests)."""

    def __init__(self, fn: Callable[[EmbeddingBatch], Any]) -> None:
        self._fn = fn

    def send(self, batch: EmbeddingBatch) -> None:
        self._fn(batch)


class KafkaTransport:
    """Sends each batch's records to the (compacted, one-partition) updates topic, in order, and waits for
    them; ``producer`` is a kafka-python KafkaProducer."""

    def __init__(self, producer: Any, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    def send(self, batch: EmbeddingBatch) -> None:
        for key, value in encode_batch(batch):
            self._producer.send(self._topic, key=key, value=value)
        self._producer.flush()


class FanoutTransport:
    """Sends each batch to every transport in order (e.g. the serving actor, then the Kafka topic)."""

    def __init__(self, transports: list[Transport]) -> None:
        self.transports = transports

    def send(self, batch: EmbeddingBatch) -> None:
        for transport in self.transports:
            transport.send(batch)


class Publisher:
    """Decides when to publish and what; ``learner`` follows the SITNLearner contract."""

    def __init__(
        self,
        learner: Any,
        transport: Transport,
        every_steps: int = 20,
        every_s: float = 1.0,
        full_every: int = 0,
        tolerance: float = 1e-4,
        refresh_users: int = 0,
        popularity_size: int = 1000,
        max_counted_items: int = 1_000_000,
        max_consumed_per_user: int = 500,
        max_users: int = 1_000_000,
        max_share: float = 1.0,
    ) -> None:
        """``full_every``: every Nth publish is full (0: only forced ones). ``refresh_users``: users not
        touched re-published per publish, in turn (0: none). ``max_counted_items``: after each publish, only
        the most counted items keep their counts (ties: the first seen); the others are forgotten and count
        from zero if they come back. ``max_consumed_per_user``, ``max_users``: serving's bounds on its consumed
        sets (``ServingSettings``), which the publisher's copy keeps too. ``max_share``: while the learner is
        ``behind`` (more events wait for it), the most of its time publishing may take: after a publish that
        took c seconds the next one waits at least c * (1 / max_share - 1) seconds, whatever ``every_steps``
        and ``every_s`` say (1: no wait). A learner that keeps up publishes on ``every_steps``/``every_s``
        alone; one behind a backlog trains instead of re-embedding the same users (and making serving
        re-index them) every step, and catches up sooner."""
        if not 0.0 < max_share <= 1.0:
            raise ValueError(f"max_share must be in (0, 1], got {max_share}")
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if every_s <= 0:
            raise ValueError(f"every_s must be > 0, got {every_s}")
        if full_every < 0:
            raise ValueError(f"full_every must be >= 0, got {full_every}")
        if refresh_users < 0:
            raise ValueError(f"refresh_users must be >= 0, got {refresh_users}")
        if max_counted_items < popularity_size:
            raise ValueError(
                f"max_counted_items must be >= popularity_size ({popularity_size}), got {max_counted_items}"
            )
        self.learner = learner
        self.transport = transport
        self.every_steps = every_steps
        self.every_s = every_s
        self.full_every = full_every
        self.tolerance = tolerance
        self.refresh_users = refresh_users
        self._refresh_cursor = 0  # where the next publish's refresh starts in known_users()
        self.popularity_size = popularity_size
        self.max_counted_items = max_counted_items
        self.items_pruned = 0
        self.version = 0
        self._touched: dict[str, None] = {}  # users touched since the last publish, in order
        self._arrivals: list[float] = []  # per event touched since the last publish: when it arrived
        self._consumed: list[tuple[str, str]] = []  # since the last publish, in order
        self._item_counts: dict[str, int] = {}  # of the pairs published, first seen first
        self.served_consumed = ConsumedItems(max_consumed_per_user, max_users)  # serving's sets, as published
        self._published_ids: list[str] = []  # embed_items order at the last publish
        self._published_vectors = np.zeros((0, 0), dtype=np.float32)  # (N, D): what serving holds per row
        self._last_step = 0
        self._last_s = time.monotonic()
        self.max_share = max_share
        self.wait_s = 0.0  # after the last publish, from its cost and max_share
        self.behind = False  # set by the trainer: more events were waiting when the current ones arrived

    def touch(self, user_ids: Iterable[str], consumed: Iterable[tuple[str, str]], ingest_wall_s: float) -> None:
        """Note users whose vectors changed, and (user, target item) pairs consumed since the last publish.

        ``user_ids`` has one entry per event, which all arrived at ``ingest_wall_s``: the next version carries
        each event's arrival (``EmbeddingBatch.event_ingest_wall_s``), so freshness is measured per event.
        """
        for user_id in user_ids:
            self._touched[user_id] = None
            self._arrivals.append(ingest_wall_s)
        self._consumed.extend(consumed)

    def due(self, step: int, now_s: float | None = None) -> bool:
        """``every_steps`` steps since the last publish, or ``every_s`` seconds with something new: a step,
        or users and consumed items recorded without one (a warm start's burn-in changes histories with no
        step, and those users must reach serving on time as well)."""
        now_s = time.monotonic() if now_s is None else now_s
        if self.behind and now_s - self._last_s < self.wait_s:
            return False
        pending = step > self._last_step or bool(self._touched or self._consumed)
        return step - self._last_step >= self.every_steps or (pending and now_s - self._last_s >= self.every_s)

    def hold(self, step: int) -> None:
        """A publish was due but held back (publish gate): keep what is pending, ask again after the interval."""
        self._last_step = step
        self._last_s = time.monotonic()

    def publish(self, step: int, force_full: bool = False) -> EmbeddingBatch:
        """Build the next version and send it."""
        start_s = time.monotonic()
        self.version += 1
        full = force_full or self.version == 1 or (self.full_every > 0 and self.version % self.full_every == 0)
        item_ids, item_vectors = self.learner.embed_items()
        item_ids = list(item_ids)
        item_vectors = np.asarray(item_vectors, dtype=np.float32)
        n_old = len(self._published_ids)
        if full or n_old == 0 or item_ids[:n_old] != self._published_ids:  # id maps only append; else all
            changed = np.arange(len(item_ids))
        else:
            moved = np.abs(item_vectors[:n_old] - self._published_vectors).max(axis=1) > self.tolerance  # (n_old,)
            changed = np.concatenate([np.flatnonzero(moved), np.arange(n_old, len(item_ids))])
        user_ids = list(self.learner.known_users()) if full else list(self._touched) + self._refresh_turn()
        if len(changed) == len(item_ids):
            self._published_vectors = item_vectors.copy()
        else:
            self._published_vectors = np.concatenate([self._published_vectors, item_vectors[n_old:]])
            self._published_vectors[changed] = item_vectors[changed]
        self._published_ids = list(item_ids)
        user_vectors = (
            np.asarray(self.learner.embed_users(user_ids), dtype=np.float32)
            if user_ids
            else np.zeros((0, self.learner.config.n_views, self.learner.config.dim), dtype=np.float32)
        )
        # The consumed state serving holds at the previous version: a full version hands it to a replica that
        # missed versions (serving.service.RecommendationService.apply); then this version's pairs, as serving
        # applies them.
        base = ServingBase(self.served_consumed.export(), list(self._item_counts.items())) if full else None
        for user_id, consumed_items in group_by_user(self._consumed):
            self.served_consumed.add(user_id, consumed_items)
            for item_id in consumed_items:
                self._item_counts[item_id] = self._item_counts.get(item_id, 0) + 1
        ranked = sorted(self._item_counts, key=lambda i: -self._item_counts[i])  # stable: ties by first seen
        popularity = ranked[: self.popularity_size]
        self._prune_counts(ranked)
        batch = EmbeddingBatch(
            version=self.version,
            full=full,
            item_ids=[item_ids[r] for r in changed.tolist()],
            item_vectors=item_vectors[changed],
            user_ids=user_ids,
            user_vectors=user_vectors,
            popularity=popularity,
            created_at_s=time.time(),
            event_ingest_wall_s=self._arrivals,
            consumed=self._consumed,
            base=base,
        )
        self.transport.send(batch)
        log.info(
            "published version=%d full=%s items=%d users=%d step=%d",
            self.version, full, len(changed), len(user_ids), step,
        )
        self._touched = {}
        self._arrivals = []
        self._consumed = []
        self._last_step = step
        self._last_s = time.monotonic()
        self.wait_s = (self._last_s - start_s) * (1.0 / self.max_share - 1.0)
        return batch

    def _refresh_turn(self) -> list[str]:
        """The next ``refresh_users`` known users not touched since the last publish, from a cursor that walks
        ``known_users()`` and wraps. That list is in least-recently-learned order and changes as users learn;
        a user who moves was just touched (and published), so the walk still reaches every user in turn."""
        if not self.refresh_users:
            return []
        known = self.learner.known_users()
        if not known:
            return []
        start = self._refresh_cursor % len(known)
        turn = known[start : start + self.refresh_users]
        if start + self.refresh_users > len(known):
            turn += known[: min(start, start + self.refresh_users - len(known))]
        self._refresh_cursor = (start + self.refresh_users) % len(known)
        return [user_id for user_id in turn if user_id not in self._touched]

    def _prune_counts(self, ranked: list[str]) -> None:
        """Keep the counts of the ``max_counted_items`` first of ``ranked`` (the dict keeps first-seen order)."""
        for item_id in ranked[self.max_counted_items :]:
            del self._item_counts[item_id]
        self.items_pruned += max(0, len(ranked) - self.max_counted_items)

    def state_dict(self) -> dict[str, Any]:
        """The version, counts and consumed sets as published, and the pairs not published yet (their events
        are trained, so below the checkpoint's positions: nothing re-delivers them)."""
        return {"version": self.version, "item_counts": dict(self._item_counts),
                "served_consumed": self.served_consumed.export(), "pending_consumed": list(self._consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints written before the publisher kept consumed sets restore empty ones (a replica started
        from such a restart excludes only what it is sent from then on)."""
        self.version = int(state["version"])
        self._item_counts = dict(state["item_counts"])
        self.served_consumed.replace_all(state.get("served_consumed", ()))
        self._consumed = list(state.get("pending_consumed", ()))
