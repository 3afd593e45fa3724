"""Ray shell around the online trainer: takes example batches from the consumers' bounded queue, trains,
publishes to the serving actor through its handle, checkpoints, then commits offsets.

The loop (``run``), once per delivered batch: ``trainer.process(batch)`` (prequential rank, then
``learn_many`` on every example), and when a checkpoint is due: write it, *then* send each consumer the
positions it made durable (``ConsumerWorker.commit``). See ``learner.trainer`` for why this order loses
nothing. ``finish()`` ends the loop after the batch in hand with a last checkpoint, commit and full publish.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

from learner.checkpoint_store import CheckpointStore
from learner.config import SITNConfig
from learner.learner import SITNLearner
from learner.publisher import CallableTransport, FanoutTransport, KafkaTransport, Transport
from learner.trainer import OnlineTrainer
from sitn.telemetry import TelemetrySettings, start_exporter
from stream.events import EmbeddingBatch
from stream.settings import StreamSettings

log = logging.getLogger(__name__)


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
        **trainer_options: Any,
    ) -> None:
        """``kafka_updates``: also publish every version to that settings' compacted updates topic.
        ``metrics``/``targets_dir``: expose this process's metrics and register them (``sitn.telemetry``)."""
        torch.set_num_threads(torch_threads)
        self.exporter = start_exporter(metrics, "learner", targets_dir)
        self._serving = serving
        self._in_flight: Any = None
        transports: list[Transport] = [CallableTransport(self._send)]
        if kafka_updates is not None and kafka_updates.uses_kafka:
            from stream.producer import make_kafka_producer

            transports.append(KafkaTransport(make_kafka_producer(kafka_updates), kafka_updates.topic_embedding_updates))
        self.trainer = OnlineTrainer(
            SITNLearner(config, source, target),
            FanoutTransport(transports),
            CheckpointStore(Path(checkpoint_dir), keep=checkpoint_keep),
            **trainer_options,
        )
        self.restored = self.trainer.restore()
        if self.restored:
            self.trainer.publish(force_full=True)  # serving gets exactly the restored state
        self._finish = threading.Event()
        self._stopped = threading.Event()
        self.batches_processed = 0
        self.commit_rounds = 0

    def _send(self, batch: EmbeddingBatch) -> None:
        """Hand a version to serving without waiting for it to be applied.

        At most one version is in flight: before sending the next, wait for the previous apply. That
        keeps versions in order (the serving actor is threaded) and bounds memory, while training goes
        on during an apply (e.g. an index rebuild).
        """
        if self._serving is None:
            return
        if self._in_flight is not None:
            ray.get(self._in_flight)
        self._in_flight = self._serving.apply_batch.remote(batch)

    def resume_info(self) -> dict[str, Any]:
        return self.trainer.resume_info()

    def run(self, queue: Any, consumers: dict[str, Any], poll_timeout_s: float = 0.5) -> dict[str, float]:
        """Train until ``finish()``; returns the final summary."""
        from ray.util.queue import Empty

        poll_timeout_s = min(poll_timeout_s, self.trainer.publisher.every_s)

        try:
            while not self._finish.is_set():
                try:
                    batch = queue.get(timeout=poll_timeout_s)
                except Empty:
                    self.trainer.publish_if_due()  # an idle stream still publishes its last steps
                    continue
                self.trainer.process(batch, received_wall_s=time.time())
                self.batches_processed += 1
                if self.trainer.checkpoint_due():
                    self._checkpoint_and_commit(consumers)
            self.trainer.publish(force_full=True)
            self._checkpoint_and_commit(consumers)
            return self.trainer.summary()
        finally:
            self._stopped.set()

    def _checkpoint_and_commit(self, consumers: dict[str, Any]) -> None:
        self.trainer.checkpoint()  # 1. the checkpoint holds the batches' effect ...
        commits = self.trainer.take_commits()  # 2. ... only then are their offsets committed
        refs = [consumers[cid].commit.remote(positions) for cid, positions in commits.items() if cid in consumers]
        ray.get(refs)
        self.commit_rounds += 1

    def finish(self) -> None:
        self._finish.set()

    def stats(self) -> dict[str, float]:
        out = self.trainer.summary()
        out["batches_processed"] = float(self.batches_processed)
        out["commit_rounds"] = float(self.commit_rounds)
        return out

    def recommend(self, user_id: str, k: int = 10) -> list[tuple[str, float]]:
        return list(self.trainer.learner.recommend(user_id, k))


_ray_remote: Any = ray.remote
# One CPU: the training loop. max_concurrency: run() holds one thread; stats/finish use the others.
LearnerActor = _ray_remote(num_cpus=1, max_concurrency=4)(LearnerWorker)
