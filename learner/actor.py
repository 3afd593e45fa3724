"""Ray shell around the online trainer: takes example batches from the consumers' bounded queue, trains,
publishes to the serving actor through its handle, checkpoints, then commits offsets.

The loop (``run``), once per delivered batch: ``trainer.process(batch)`` (prequential rank of the model
and the shadow baselines, then ``learn_many`` on every example), and when a checkpoint is due: write it, *then* send each consumer the
positions it made durable (``ConsumerWorker.commit``). See ``learner.trainer`` for why this order loses
nothing. A commit that fails (the broker is down, the consumer died) is logged and its positions go back
to the pending set, so the next round commits them (a newer position covers an older one); nothing is
lost, because the checkpoint, not the commit, is what a restart resumes from. ``finish()`` ends the loop
after the batch in hand with a last checkpoint, commit and full publish.

A consumer-group rebalance can hand a partition to another consumer, which re-reads it from the last
commit: records the learner has already trained (e.g. a consumer that joined the group alone at start
and polled every partition before the others joined). The loop cuts them out of the batch
before training (``RedeliveryFilter``), so a rebalance never applies an event twice.

Serving may die on its own: ``_send`` then drops the version (it never crashes the learner), and when the
supervisor hands over a new replica (``set_serving``) the loop, and only the loop (it owns the trainer),
sends it a full version before any delta.

``audit_log``: a JSON-lines record of what each incarnation of the learner trained: one ``start`` line
(pid, the restored checkpoint's ``events_applied``, positions, id-map and user-state sizes), then one
``batch`` line per trained batch with its event ids, written after the batch is trained and before any
checkpoint that holds it. From it the fault tests rebuild exactly which events the model reflects and how
many were trained twice across a restart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from learner.checkpoint_store import CheckpointStore, same_config
from learner.config import SITNConfig
from learner.learner import SITNLearner
from learner.publisher import CallableTransport, FanoutTransport, KafkaTransport, Transport
from learner.trainer import OnlineTrainer
from sitn.errors import SitnError
from sitn.telemetry import TelemetrySettings, start_exporter
from stream.consumer import ExampleBatch, Position
from stream.events import EmbeddingBatch
from stream.settings import StreamSettings

log = logging.getLogger(__name__)


class RedeliveryError(SitnError):
    """A re-delivered batch whose overlap with what was trained cannot be told exactly (it holds dead
    letters), or a batch that skips records. The learner stops; the supervisor restarts it from the
    checkpoint."""


class RedeliveryFilter:
    """Cuts records the learner has trained already out of a batch that re-delivers them.

    Each partition's batches come from one consumer per assignment epoch, in offset order. A batch from
    the same (consumer, epoch) as the last one trained for its partition continues it. One from another
    owner follows a rebalance and starts at the last commit, at or below what was trained: a span of ``n``
    examples ending at next offset ``e`` covers offsets ``e - n .. e - 1`` when the batch has no dead
    letters (with ``d`` dead letters it starts somewhere in ``e - n - d .. e - n``).

    >>> from stream.user_state import Example
    >>> ex = [Example(f"e{i}", "u", "movie", f"m{i}", i, {}) for i in range(5)]
    >>> f = RedeliveryFilter()
    >>> first = ExampleBatch(ex[:2], {0: Position(1, 12), 1: Position(1, 9)}, {0: (0, 1), 1: (1, 2)}, consumer_id="c0")
    >>> f.filter(first, {0: 11, 1: 8})[0] is first  # the first batch after a restore continues the checkpoint
    True
    >>> again = ExampleBatch(ex, {0: Position(2, 13), 1: Position(2, 7)}, {0: (0, 3), 1: (3, 5)}, consumer_id="c1")
    >>> kept, cut = f.filter(again, {0: 12, 1: 9})  # 0: offsets 10..12, 12 is new; 1: nothing new
    >>> [e.event_id for e in kept.examples], kept.positions, kept.spans, cut
    (['e2'], {0: Position(epoch=2, offset=13)}, {0: (0, 1)}, 4)
    """

    def __init__(self) -> None:
        self.owners: dict[int, tuple[str, int]] = {}  # partition -> (consumer, epoch) of its last trained batch

    def filter(self, batch: ExampleBatch, trained: dict[int, int]) -> tuple[ExampleBatch, int]:
        """``batch`` without what ``trained`` (partition -> next offset trained) covers; and the examples cut."""
        examples: list[Any] = []
        spans: dict[int, tuple[int, int]] = {}
        positions: dict[int, Position] = {}
        cut = 0
        d = batch.dead_letters
        for p, pos in batch.positions.items():
            start, end = batch.spans.get(p, (0, 0))
            n = end - start
            owner = self.owners.get(p)
            done = trained.get(p)
            keep = n
            if owner is not None and owner != (batch.consumer_id, pos.epoch) and done is not None:
                first = pos.offset - n  # the first offset, unless some of the records were dead letters
                if first - d > done:
                    raise RedeliveryError(f"partition {p}: a batch from offset {first - d} on, but the learner "
                                          f"trained up to {done}: records were skipped")
                if pos.offset <= done:
                    keep = 0
                elif d == 0 or first - d == done:
                    keep = min(n, pos.offset - done)
                else:
                    raise RedeliveryError(
                        f"partition {p}: a re-delivered batch with {d} dead letter(s) ends at offset {pos.offset}, "
                        f"the learner trained up to {done}: the overlap is not exact"
                    )
            cut += n - keep
            if keep or (n == 0 and (done is None or pos.offset > done)):
                positions[p] = pos
                self.owners[p] = (batch.consumer_id, pos.epoch)
            if keep:
                spans[p] = (len(examples), len(examples) + keep)
                examples.extend(batch.examples[end - keep : end])
        if cut == 0:
            for p, pos in batch.positions.items():
                self.owners[p] = (batch.consumer_id, pos.epoch)
            return batch, 0
        return ExampleBatch(examples, positions, spans, d, batch.consumer_id), cut


class LearnerWorker:
    """The actor's body, plain Python. ``serving`` is a handle with ``apply_batch.remote`` (or None)."""

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
        metrics: TelemetrySettings | None = None,
        targets_dir: Path | None = None,
        audit_log: Path | None = None,
        **trainer_options: Any,
    ) -> None:
        """``kafka_updates``: also publish every version to that settings' compacted updates topic.
        ``metrics``/``targets_dir``: expose this process's metrics and register them (``sitn.telemetry``).
        ``audit_log``: append what this incarnation trains there (see the module docstring)."""
        torch.set_num_threads(torch_threads)
        self.exporter = start_exporter(metrics, "learner", targets_dir)
        self._serving = serving
        self._in_flight: Any = None
        self._serving_lock = threading.Lock()
        self._new_serving: list[Any] = []  # a replica handed over by set_serving, adopted by the run loop
        self._awaiting_full = False  # a new replica must get a full version before any delta
        self.versions_dropped = 0
        self.commit_failures = 0
        self.redelivered_dropped = 0
        self._redelivery = RedeliveryFilter()
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
        self._audit = audit_log.open("a", encoding="utf-8") if audit_log is not None else None
        if self._audit is not None:
            self._audit_write({
                "kind": "start",
                "pid": os.getpid(),
                "restored_events_applied": self.trainer.events_applied,
                "positions": {str(p): o for p, o in self.trainer.positions.items()},
                "idmap_sizes": {role: len(m) for role, m in self.trainer.learner.idmaps.items()},
                "mirror_users": {str(p): len(s) for p, s in self.trainer.mirror.items()},
            })
        if self.restored:
            self.trainer.publish(force_full=True)  # serving gets exactly the restored state
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
        """Hand a version to serving without waiting for it to be applied.

        At most one version is in flight: before sending the next, wait for the previous apply. That
        keeps versions in order (the serving actor is threaded) and bounds memory, while training goes
        on during an apply (e.g. an index rebuild). A dead serving actor drops the version (logged): the
        supervisor starts a new replica, and ``set_serving`` makes the loop send it a full version.
        """
        if self._serving is None:
            self.versions_dropped += 1
            return
        if self._awaiting_full and not batch.full:
            self.versions_dropped += 1  # a delta means nothing to a replica without the base
            return
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            try:
                ray.get(in_flight)
            except ray.exceptions.ActorDiedError as exc:
                log.error("serving actor died; versions are dropped until a new replica is handed over "
                          "error=%s", str(exc).splitlines()[0])
                self._serving = None
                self.versions_dropped += 1
                return
            except ray.exceptions.RayActorError as exc:  # unavailable for now (e.g. its node is restarting)
                log.warning("serving did not apply version error=%s", str(exc).splitlines()[0])
        self._in_flight = self._serving.apply_batch.remote(batch)
        if batch.full:
            self._awaiting_full = False

    def set_serving(self, serving: Any) -> None:
        """Hand over a new serving replica (from any thread); the run loop adopts it and sends a full version."""
        with self._serving_lock:
            self._new_serving.append(serving)

    def _adopt_serving(self) -> None:
        """In the run loop: switch to a replica handed over by ``set_serving`` and send it the full state."""
        with self._serving_lock:
            handed_over, self._new_serving = self._new_serving, []
        if handed_over:
            self._serving = handed_over[-1]
            self._in_flight = None  # its apply belonged to the replica that died
            self._awaiting_full = True
            log.info("serving replica handed over; sending a full version")
        if self._awaiting_full and self._serving is not None:
            self.trainer.publish(force_full=True)  # None while the publish gate holds: retried next iteration

    def resume_info(self) -> dict[str, Any]:
        return self.trainer.resume_info()

    def run(self, queue: Any, consumers: dict[str, Any], poll_timeout_s: float = 0.5) -> dict[str, float]:
        """Train until ``finish()``; returns the final summary."""
        from ray.util.queue import Empty

        poll_timeout_s = min(poll_timeout_s, self.trainer.publisher.every_s)

        try:
            while not self._finish.is_set():
                self._adopt_serving()
                try:
                    batch = queue.get(timeout=poll_timeout_s)
                except Empty:
                    self.trainer.publish_if_due()  # an idle stream still publishes its last steps
                    continue
                batch, cut = self._redelivery.filter(batch, self.trainer.positions)
                if cut:
                    self.redelivered_dropped += cut
                    log.warning("dropped re-delivered examples already trained consumer=%s examples=%d",
                                batch.consumer_id, cut)
                self.trainer.process(batch, received_wall_s=time.time())
                self.batches_processed += 1
                self.examples_processed += len(batch.examples)
                if self._audit is not None:  # after training, before any checkpoint that holds it
                    self._audit_write({"kind": "batch", "event_ids": [ex.event_id for ex in batch.examples]})
                if self.trainer.checkpoint_due():
                    self._checkpoint_and_commit(consumers)
            self._adopt_serving()
            self.trainer.publish(force_full=True)
            self._checkpoint_and_commit(consumers)
            return self.trainer.summary()
        finally:
            self._stopped.set()

    def _checkpoint_and_commit(self, consumers: dict[str, Any]) -> None:
        self.trainer.checkpoint()  # 1. the checkpoint holds the batches' effect ...
        self.events_checkpointed = self.trainer.events_applied
        commits = self.trainer.take_commits()  # 2. ... only then are their offsets committed
        refs = {cid: consumers[cid].commit.remote(positions) for cid, positions in commits.items() if cid in consumers}
        for cid, ref in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                # 3. A failed commit is retried by the next round: put the positions back (a newer position
                # covers an older one). A restart in between resumes from the checkpoint, so nothing is lost.
                self.commit_failures += 1
                self.trainer.pending.add(ExampleBatch([], commits[cid], consumer_id=cid))
                log.warning("commit failed; retried with the next checkpoint consumer=%s error=%s", cid,
                            str(exc).splitlines()[0])
        self.commit_rounds += 1

    def finish(self) -> None:
        self._finish.set()

    def stats(self) -> dict[str, float]:
        out = self.trainer.summary()
        out["batches_processed"] = float(self.batches_processed)
        out["examples_processed"] = float(self.examples_processed)
        out["commit_rounds"] = float(self.commit_rounds)
        out["events_checkpointed"] = float(self.events_checkpointed)
        out["commit_failures"] = float(self.commit_failures)
        out["versions_dropped"] = float(self.versions_dropped)
        out["redelivered_dropped"] = float(self.redelivered_dropped)
        return out

    def quality(self) -> dict[str, Any]:
        """Prequential figures of the model and every baseline, and the ranker serving was told to use."""
        return self.trainer.quality_report()

    def recommend(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        return list(self.trainer.learner.recommend(user_id, k))


_ray_remote: Any = ray.remote
# One CPU: the training loop. max_concurrency: run() holds one thread; stats/finish use the others.
LearnerActor = _ray_remote(num_cpus=1, max_concurrency=4)(LearnerWorker)
