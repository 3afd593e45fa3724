"""Ray shell around the online trainer: takes event batches from the consumers' bounded queue, trains,
publishes to the serving actor through its handle, checkpoints, then mirrors its positions into the
consumer group.

The loop (``run``), once per delivered batch: ``trainer.process(batch)`` (events already trained are
dropped by offset; prequential rank of the model and the shadow baselines, then ``learn_many`` on every
example), and when a checkpoint is due: read the state out (the training loop's only stall), write it on
the trainer's writer thread while training goes on, and once it is durable (collected on the loop after a
later batch) commit the positions it holds to the consumer group
(``stream.group_offsets.GroupCommitter``), so that lag tools see the durable progress. See
``learner.online.trainer`` for why this order loses nothing. A commit that fails (the broker is down) is logged;
the next checkpoint commits newer positions. Nothing reads the group's offsets back: a restart resumes
from the checkpoint, whose positions the supervisor hands to the consumers (``positions()``).
``finish()`` ends the loop after the batch in hand with a last checkpoint, commit and full publish.

Serving may be several replicas (``serving``: one handle per replica index), and every version goes to
every replica, each with its own state: at most one version in flight, and whether it awaits a full
version. A replica may die on its own: ``_send`` then drops that replica's versions only (it never crashes
the learner, and the others are unaffected), and when the supervisor hands over a new replica for that
index (``set_serving``) the loop, and only the loop (it owns the trainer), sends a full version, which that
replica takes before any delta.

``audit_log``: a JSON-lines record of what each incarnation of the learner trained: one ``start`` line
(pid, the restored checkpoint's ``events_applied``, positions, id-map sizes and users with a history), then
one ``batch`` line per trained batch with the event ids it trained (re-read ones dropped), written after the
batch is trained and before any checkpoint that holds it. From it the fault tests rebuild exactly which events the model reflects and how
many were trained twice across a restart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from learner.core.config import SITNConfig
from learner.core.learner import SITNLearner
from learner.core.warm_checkpoint import load_warm_start
from learner.online.allocator import trim_free_memory
from learner.online.checkpoint_store import CheckpointStore, same_config
from learner.online.publisher import CallableTransport, FanoutTransport, KafkaTransport, Transport
from learner.online.trainer import CheckpointMark, OnlineTrainer
from stream.events import EmbeddingBatch
from stream.exporter import TelemetrySettings, start_exporter
from stream.group_offsets import GroupCommitter
from stream.settings import StreamSettings

log = logging.getLogger(__name__)


@dataclass
class ServingReplica:
    """What the learner knows of one serving replica: its handle (None once dead), the apply in flight, and
    whether it must get a full version before any delta (a new replica has no base to apply a delta to)."""

    handle: Any
    in_flight: Any = None
    awaiting_full: bool = False
    versions_sent: int = 0
    versions_dropped: int = 0


class LearnerWorker:
    """The actor's body, plain Python. ``serving``: the serving replicas, handles with ``apply_batch.remote``
    (a single handle is one replica; None or an empty list: none)."""

    def __init__(
        self,
        config: SITNConfig,
        source: str,
        target: str,
        checkpoint_dir: Path,
        serving: Any,
        torch_threads: int = 1,
        checkpoint_keep: int = 3,
        kafka_updates: StreamSettings | None = None,
        group_offsets: StreamSettings | None = None,
        metrics: TelemetrySettings | None = None,
        targets_dir: Path | None = None,
        audit_log: Path | None = None,
        warm_start: Path | None = None,
        **trainer_options: Any,
    ) -> None:
        """``kafka_updates``: also publish every version to that settings' compacted updates topic.
        ``group_offsets``: after each checkpoint, commit its positions to that settings' consumer group.
        ``metrics``/``targets_dir``: expose this process's metrics and register them (``stream.exporter``).
        ``audit_log``: append what this incarnation trains there (see the module docstring).
        ``warm_start``: with no checkpoint yet, start from this offline-trained model (``sitn train``), whose
        training events are burnt in (``OnlineTrainer.warm_start``); a checkpoint, once written, wins."""
        torch.set_num_threads(torch_threads)
        self.exporter = start_exporter(metrics, "learner", targets_dir)
        handles: Sequence[Any] = [] if serving is None else serving if isinstance(serving, list | tuple) else [serving]
        self._replicas = [ServingReplica(handle) for handle in handles]
        self._serving_lock = threading.Lock()
        self._new_serving: list[tuple[int, Any]] = []  # (replica, handle) handed over by set_serving, for the loop
        self.versions_dropped_no_serving = 0
        self.commit_failures = 0
        self._group = GroupCommitter(group_offsets) if group_offsets is not None else None
        transports: list[Transport] = [CallableTransport(self._send)]
        if kafka_updates is not None and kafka_updates.uses_kafka:
            from stream.producer import make_kafka_producer

            transports.append(KafkaTransport(make_kafka_producer(kafka_updates), kafka_updates.topic_embedding_updates))
        self.trainer = OnlineTrainer(
            SITNLearner(config, source, target),
            FanoutTransport(transports),
            # A checkpoint trained with another config is refused (named in the log), not loaded silently.
            CheckpointStore(Path(checkpoint_dir), keep=checkpoint_keep, accept_fn=same_config(config.to_dict())),
            **trainer_options,
        )
        self.restored = self.trainer.restore()
        self.warm_started = False
        if not self.restored and warm_start is not None:
            warm = load_warm_start(warm_start)
            self.trainer.warm_start(warm.learner, warm.trained_until)
            self.warm_started = True
            log.info("warm start path=%s trained_until=%s events=%d epochs=%d", warm_start, warm.trained_until,
                     warm.events, warm.epochs)
        self._audit = audit_log.open("a", encoding="utf-8") if audit_log is not None else None
        if self._audit is not None:
            self._audit_write({
                "kind": "start",
                "pid": os.getpid(),
                "restored_events_applied": self.trainer.events_applied,
                "positions": {str(p): o for p, o in self.trainer.positions.items()},
                "idmap_sizes": {role: len(m) for role, m in self.trainer.learner.idmaps.items()},
                "users": len(self.trainer.learner.histories),
            })
        if self.restored or self.warm_started:
            self.trainer.publish(force_full=True)  # serving gets exactly the restored (or warm) state
        self._finish = threading.Event()
        self._stopped = threading.Event()
        self.batches_processed = 0
        self.examples_processed = 0  # by this incarnation (events_applied also counts the restored ones)
        self.commit_rounds = 0
        self.events_checkpointed = self.trainer.events_applied  # a crash now re-trains events_applied minus this

    def _audit_write(self, record: dict[str, Any]) -> None:
        assert self._audit is not None
        self._audit.write(json.dumps(record) + "\n")
        self._audit.flush()  # in the OS's hands now: survives a SIGKILL of this process

    def _send(self, batch: EmbeddingBatch) -> None:
        """Hand a version to every serving replica without waiting for it to be applied.

        Per replica, at most one version is in flight: before sending it the next, wait for its previous
        apply. That keeps versions in order (the serving actor is threaded) and bounds memory, while training
        goes on during an apply (e.g. an index rebuild). A dead replica drops its versions (logged), the
        others go on: the supervisor starts a new replica, and ``set_serving`` makes the loop send a full
        version, the first one that replica takes.
        """
        if not self._replicas:
            self.versions_dropped_no_serving += 1
            return
        for index, replica in enumerate(self._replicas):
            if replica.handle is None or (replica.awaiting_full and not batch.full):
                replica.versions_dropped += 1  # dead, or a delta that means nothing without the base
                continue
            if replica.in_flight is not None:
                in_flight, replica.in_flight = replica.in_flight, None
                try:
                    ray.get(in_flight)
                except ray.exceptions.ActorDiedError as exc:
                    log.error("serving replica died; its versions are dropped until a new one is handed over "
                              "replica=%d error=%s", index, str(exc).splitlines()[0])
                    replica.handle = None
                    replica.versions_dropped += 1
                    continue
                except ray.exceptions.RayActorError as exc:  # unavailable for now (e.g. its node is restarting)
                    log.warning("serving did not apply version replica=%d error=%s", index, str(exc).splitlines()[0])
            replica.in_flight = replica.handle.apply_batch.remote(batch)
            replica.versions_sent += 1
            if batch.full:
                replica.awaiting_full = False

    @property
    def versions_dropped(self) -> int:
        """Versions not sent, summed over the replicas (dead, or awaiting a full version), plus those published
        with no replica at all."""
        return self.versions_dropped_no_serving + sum(r.versions_dropped for r in self._replicas)

    def set_serving(self, serving: Any, replica: int = 0) -> None:
        """Hand over a new serving replica for index ``replica`` (from any thread); the run loop adopts it and
        sends a full version."""
        if not 0 <= replica < max(1, len(self._replicas)):
            raise ValueError(f"replica must be in 0..{max(1, len(self._replicas)) - 1}, got {replica}")
        with self._serving_lock:
            self._new_serving.append((replica, serving))

    def _adopt_serving(self) -> None:
        """In the run loop: switch to the replicas handed over by ``set_serving`` and publish a full version,
        until every replica awaiting one has got it."""
        with self._serving_lock:
            handed_over, self._new_serving = self._new_serving, []
        for index, handle in handed_over:
            if not self._replicas:
                self._replicas.append(ServingReplica(None))
            # Its in-flight apply, if any, belonged to the replica that died.
            self._replicas[index] = ServingReplica(handle, awaiting_full=True)
            log.info("serving replica handed over replica=%d; sending a full version", index)
        if any(r.awaiting_full and r.handle is not None for r in self._replicas):
            self.trainer.publish(force_full=True)  # None while the publish gate holds: retried next iteration

    def replicas(self) -> list[dict[str, Any]]:
        """Per serving replica: whether the learner holds a live handle, awaits a full version, and the versions
        sent and dropped."""
        return [{"replica": i, "handle": r.handle is not None, "awaiting_full": r.awaiting_full,
                 "versions_sent": r.versions_sent, "versions_dropped": r.versions_dropped}
                for i, r in enumerate(self._replicas)]

    def positions(self) -> dict[int, int]:
        """Per partition, the next offset after everything trained: where a (re)started consumer begins."""
        return self.trainer.resume_positions()

    def run(self, queue: Any, poll_timeout_s: float = 0.5) -> dict[str, float]:
        """Train until ``finish()``; returns the final summary."""
        from ray.util.queue import Empty

        poll_timeout_s = min(poll_timeout_s, self.trainer.publisher.every_s)

        try:
            while not self._finish.is_set():
                self._adopt_serving()
                try:
                    batch = queue.get(timeout=poll_timeout_s)
                except Empty:
                    self.trainer.publisher.behind = False
                    self.trainer.publish_if_due()  # an idle stream still publishes its last steps
                    self._checkpointed(self.trainer.collect_checkpoint())
                    continue
                dropped_before = self.trainer.redelivered_dropped
                applied_before = self.trainer.events_applied
                # A backlog (another batch already queued): train first, publish within the budget (if any).
                behind = self.trainer.publisher.max_share < 1.0 and queue.qsize() > 0
                self.trainer.process(batch, received_wall_s=time.time(), behind=behind)
                dropped = self.trainer.redelivered_dropped - dropped_before
                if dropped:
                    log.warning("dropped re-delivered events already trained consumer=%s events=%d",
                                batch.consumer_id, dropped)
                self.batches_processed += 1
                self.examples_processed += self.trainer.events_applied - applied_before
                if self._audit is not None:  # after training, before any checkpoint that holds it
                    trained = self.trainer.last_trained_event_ids
                    self._audit_write({"kind": "batch", "event_ids": trained})
                self._checkpointed(self.trainer.collect_checkpoint())
                if self.trainer.checkpoint_due():
                    self._checkpointed(self.trainer.checkpoint(background=True))  # None: written in the background
                trim_free_memory()  # the batch's freed buffers back to the OS (learner.online.allocator, issue 12)
            self._adopt_serving()
            self.trainer.publish(force_full=True)
            self._checkpointed(self.trainer.collect_checkpoint(wait=True))
            self._checkpointed(self.trainer.checkpoint())
            return self.trainer.summary()
        finally:
            self._stopped.set()
            if self._group is not None:
                self._group.close()

    def _checkpointed(self, mark: CheckpointMark | None) -> None:
        """A checkpoint is durable (None: none since the last call): 1. it holds the batches' effect and their
        positions ... 2. only now does the consumer group show those positions (for lag tools; a failure is
        retried next time)."""
        if mark is None:
            return
        self.events_checkpointed = mark.events_applied
        if self._group is not None and not self._group.commit(mark.positions):
            self.commit_failures += 1
        self.commit_rounds += 1

    def finish(self) -> None:
        self._finish.set()

    def stats(self) -> dict[str, Any]:
        """The trainer's figures (``OnlineTrainer.summary``), the loop's counters, and the run's dead-letter
        tally (counted once per record as the positions pass it, so exact across restarts)."""
        out: dict[str, Any] = dict(self.trainer.summary())
        out["batches_processed"] = float(self.batches_processed)
        out["examples_processed"] = float(self.examples_processed)
        out["commit_rounds"] = float(self.commit_rounds)
        out["events_checkpointed"] = float(self.events_checkpointed)
        out["commit_failures"] = float(self.commit_failures)
        out["versions_dropped"] = float(self.versions_dropped)
        out["dead_letters_by_reason"] = dict(self.trainer.dead_letters_by_reason)
        out["dead_letter_examples"] = dict(self.trainer.dead_letter_examples)
        return out

    def quality(self) -> dict[str, Any]:
        """Prequential figures of the model and every baseline, and the ranker serving was told to use."""
        return self.trainer.quality_report()

    def recommend(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        return list(self.trainer.learner.recommend(user_id, k))


_ray_remote: Any = ray.remote
# One CPU: the training loop. max_concurrency: run() holds one thread; stats/finish use the others.
LearnerActor = _ray_remote(num_cpus=1, max_concurrency=4)(LearnerWorker)
