"""Ray shell around the consumer core: one actor per partition set, batches out through a bounded queue.

``ConsumerFleet`` starts ``n`` :class:`ConsumerActor` s in one consumer group and a
``ray.util.queue.Queue(maxsize)``. Each actor loops ``poll -> put`` in a thread of its own; the learner
``get``s :class:`~stream.consumer.ExampleBatch` es, trains, checkpoints, then hands the batches' positions
back with ``commit`` (see the commit order in ``stream.consumer``).

Backpressure: when the queue is full, ``put`` waits ``put_wait_s``; if there is still no room the actor
pauses its source and keeps polling (returns nothing, keeps the Kafka group membership and serves commit
requests) until the batch fits. Partitions revoked meanwhile are cut out of the waiting batch. Kafka
assigns partitions through the group; the embedded log gets a static split (partition ``p`` goes to actor
``p % n``).

Only the loop thread touches the consumer (a KafkaConsumer is not thread-safe): ``commit`` calls from the
driver are queued to it and answered through a future.
"""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from ray.util.queue import Empty, Full, Queue

from sitn.telemetry import Exporter, TelemetrySettings, start_exporter
from stream import telemetry
from stream.consumer import ConsumerStats, ExampleBatch, Position, Positions, StreamConsumer
from stream.dead_letter import open_dead_letters
from stream.settings import StreamSettings
from stream.source import open_source

log = logging.getLogger(__name__)


class ConsumerWorker:
    """The actor's body, plain Python: a poll loop that delivers batches to ``out`` (anything with ``put``)."""

    def __init__(
        self,
        settings: StreamSettings,
        consumer_id: str,
        out: Any,
        partitions: frozenset[int] | None = None,
        put_wait_s: float = 1.0,
        initial_user_state: Mapping[int, dict[str, Any]] | None = None,
        metrics: TelemetrySettings | None = None,
        targets_dir: Path | None = None,
        lag_every_s: float = 1.0,
    ) -> None:
        """``metrics``/``targets_dir``: expose this process's metrics and register them (``sitn.telemetry``)."""
        self.settings = settings
        self.initial_user_state = dict(initial_user_state or {})
        self.consumer_id = consumer_id
        self.out = out
        self.partitions = partitions
        self.put_wait_s = put_wait_s
        self._stop = threading.Event()
        self._started = threading.Event()
        self._commits: stdlib_queue.Queue[tuple[Positions, Future[dict[int, int]]]] = stdlib_queue.Queue()
        self._consumer: StreamConsumer | None = None
        self.batches_delivered = 0
        self.waits_on_full_queue = 0
        self.lag_every_s = lag_every_s
        self.exporter: Exporter | None = start_exporter(metrics, "consumer", targets_dir)

    def run(self) -> ConsumerStats:
        """Poll and deliver until ``stop()``; then close the consumer (leaving the group). Returns the stats."""
        consumer = StreamConsumer(
            open_source(self.settings, partitions=self.partitions),
            open_dead_letters(self.settings),
            domains=self.settings.domains,
            max_history=self.settings.max_history,
            max_users=self.settings.max_users,
            consumer_id=self.consumer_id,
            initial_user_state=self.initial_user_state,
        )
        self._consumer = consumer
        self._started.set()
        try:
            lag_due_s = 0.0
            while not self._stop.is_set():
                self._serve_commits(consumer)
                batch = consumer.poll(self.settings.poll_timeout_s)
                if batch.positions:
                    self._deliver(consumer, batch)
                if time.monotonic() >= lag_due_s:
                    consumer.export_lag()
                    lag_due_s = time.monotonic() + self.lag_every_s
            self._serve_commits(consumer)
        except Exception:
            log.exception("consumer loop failed consumer=%s", self.consumer_id)
            raise
        finally:
            self._fail_pending_commits()
            consumer.close()
            if self.exporter is not None:
                self.exporter.unregister()
            log.info("consumer stopped consumer=%s stats=%s", self.consumer_id, consumer.stats)
        return consumer.stats

    def _deliver(self, consumer: StreamConsumer, batch: ExampleBatch) -> None:
        paused = False
        try:
            while not self._stop.is_set():
                try:
                    self.out.put(batch, timeout=self.put_wait_s)
                    self.batches_delivered += 1
                    telemetry.BATCHES_DELIVERED.inc()
                    return
                except Full:
                    self.waits_on_full_queue += 1
                    telemetry.QUEUE_FULL_WAITS.inc()
                    consumer.export_lag()  # lag grows while we wait: keep the gauge honest
                if not paused:
                    consumer.source.pause()
                    paused = True
                self._serve_commits(consumer)
                idle = consumer.poll(self.settings.poll_timeout_s)  # keeps the group membership alive
                assert not idle.positions, "a paused source returned records"
                stale = consumer.stale_partitions(batch.positions)
                if stale:
                    batch = batch.without_partitions(stale)
                    if not batch.positions:
                        return
        finally:
            if paused:
                consumer.source.resume()

    def _serve_commits(self, consumer: StreamConsumer) -> None:
        while True:
            try:
                positions, future = self._commits.get_nowait()
            except stdlib_queue.Empty:
                return
            try:
                future.set_result(consumer.commit(positions))
            except Exception as exc:
                future.set_exception(exc)
                raise

    def _fail_pending_commits(self) -> None:
        while True:
            try:
                _positions, future = self._commits.get_nowait()
            except stdlib_queue.Empty:
                return
            future.set_result({})  # stopped before committing: the records will be read again

    def commit(self, positions: Mapping[int, Position], timeout_s: float = 60.0) -> dict[int, int]:
        """Commit from another thread: runs on the loop thread; returns the offsets committed."""
        if self._stop.is_set():
            return {}
        future: Future[dict[int, int]] = Future()
        self._commits.put((dict(positions), future))
        return future.result(timeout=timeout_s)

    def assignment(self) -> frozenset[int]:
        return self._consumer.assignment() if self._consumer is not None else frozenset()

    def stats(self) -> ConsumerStats:
        return self._consumer.stats if self._consumer is not None else ConsumerStats()

    def delivery(self) -> dict[str, int]:
        """Batches put on the queue, and how often the queue was full for ``put_wait_s`` (backpressure)."""
        return {"batches_delivered": self.batches_delivered, "waits_on_full_queue": self.waits_on_full_queue}

    def stop(self) -> None:
        self._stop.set()


# max_concurrency: `run` occupies one thread for the actor's life; commit/stop/stats use the others.
_ray_remote: Any = ray.remote  # its type stubs lack the actor options
ConsumerActor = _ray_remote(max_concurrency=4, num_cpus=0)(ConsumerWorker)


def embedded_partition_sets(partitions: int, consumers: int) -> list[frozenset[int]]:
    """Static split of the embedded log's partitions over ``consumers`` actors.

    >>> embedded_partition_sets(5, 2)
    [frozenset({0, 2, 4}), frozenset({1, 3})]
    """
    if not 1 <= consumers <= partitions:
        raise ValueError(f"consumers must be in [1, partitions={partitions}], got {consumers}")
    return [frozenset(range(i, partitions, consumers)) for i in range(consumers)]


class ConsumerFleet:
    """``n`` consumer actors of one group feeding one bounded queue. Use as a context manager."""

    def __init__(
        self,
        settings: StreamSettings,
        consumers: int = 2,
        queue_maxsize: int = 8,
        put_wait_s: float = 1.0,
        initial_user_state: Mapping[int, dict[str, Any]] | None = None,
        metrics: TelemetrySettings | None = None,
        targets_dir: Path | None = None,
    ) -> None:
        """``initial_user_state``: per-partition user state from the checkpoint the group resumes from.
        ``metrics``/``targets_dir``: each actor exposes its metrics (``sitn.telemetry``)."""
        if queue_maxsize < 1:
            raise ValueError(f"queue_maxsize must be >= 1 (bounded), got {queue_maxsize}")
        self.queue = Queue(maxsize=queue_maxsize, actor_options={"num_cpus": 0})
        sets: list[frozenset[int] | None] = (
            [None] * consumers if settings.uses_kafka else list(embedded_partition_sets(settings.partitions, consumers))
        )
        self.actors: dict[str, Any] = {}
        self._runs: dict[str, Any] = {}
        for i, partitions in enumerate(sets):
            consumer_id = f"consumer-{i}"
            actor = ConsumerActor.remote(
                settings, consumer_id, self.queue, partitions, put_wait_s, initial_user_state or {}, metrics,
                targets_dir,
            )
            self.actors[consumer_id] = actor
            self._runs[consumer_id] = actor.run.remote()

    def __enter__(self) -> ConsumerFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, timeout_s: float) -> ExampleBatch | None:
        """The next batch, or None after ``timeout_s`` without one."""
        try:
            batch: ExampleBatch = self.queue.get(timeout=timeout_s)
        except Empty:
            return None
        return batch

    def commit(self, positions_by_consumer: Mapping[str, Positions], timeout_s: float = 60.0) -> dict[str, dict[int, int]]:
        """Commit each consumer's positions (``PendingCommits.take()``); returns what each committed."""
        refs = {cid: self.actors[cid].commit.remote(pos, timeout_s) for cid, pos in positions_by_consumer.items()}
        return {cid: ray.get(ref, timeout=timeout_s) for cid, ref in refs.items()}

    def assignments(self, timeout_s: float = 30.0) -> dict[str, frozenset[int]]:
        refs = {cid: a.assignment.remote() for cid, a in self.actors.items()}
        return {cid: ray.get(ref, timeout=timeout_s) for cid, ref in refs.items()}

    def stats(self, timeout_s: float = 30.0) -> dict[str, ConsumerStats]:
        refs = {cid: a.stats.remote() for cid, a in self.actors.items()}
        return {cid: ray.get(ref, timeout=timeout_s) for cid, ref in refs.items()}

    def delivery(self, timeout_s: float = 30.0) -> dict[str, dict[str, int]]:
        refs = {cid: a.delivery.remote() for cid, a in self.actors.items()}
        return {cid: ray.get(ref, timeout=timeout_s) for cid, ref in refs.items()}

    def check_health(self) -> None:
        """Raise the error of an actor whose loop died (ray.get of its finished run)."""
        done, _ = ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=0)
        for ref in done:
            ray.get(ref)

    def stop(self, timeout_s: float = 60.0) -> dict[str, ConsumerStats]:
        """Stop every loop (each leaves the group), wait for them, then release the actors and the queue."""
        for actor in self.actors.values():
            actor.stop.remote()
        try:
            results = {cid: ray.get(ref, timeout=timeout_s) for cid, ref in self._runs.items()}
        finally:
            for actor in self.actors.values():
                ray.kill(actor)
            self.queue.shutdown()
            self.actors, self._runs = {}, {}
        return results
