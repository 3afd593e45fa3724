"""Ray shell around the consumer core: one actor per fixed partition set, batches out through a bounded queue.

``ConsumerFleet`` starts ``n`` :class:`ConsumerActor` s and a ``ray.util.queue.Queue(maxsize)``. Partition
``p`` is read by actor ``p % n`` (a static assignment, on Kafka as on the embedded log: no consumer group,
no rebalance), from the start offsets the fleet is given: the learner's checkpointed positions. Each actor
loops ``poll -> put`` in a thread of its own; the learner ``get``s :class:`~stream.consumer.EventBatch` es.
Consumers commit nothing and keep no state, so a dead one is replaced alone (``replace``), at the positions
the learner has trained for its partitions; the learner drops what the replacement reads twice.

Backpressure: when the queue is full, ``put`` waits ``put_wait_s`` and tries again (updating the lag
gauge meanwhile) until the batch fits or the actor is stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray.util.queue import Empty, Full, Queue

from stream import telemetry
from stream.consumer import ConsumerStats, EventBatch, StreamConsumer
from stream.dead_letter import open_dead_letters
from stream.exporter import Exporter, TelemetrySettings, start_exporter
from stream.settings import StreamSettings
from stream.source_factory import open_source

log = logging.getLogger(__name__)


class ConsumerWorker:
    """The actor's body, plain Python: a poll loop that delivers batches to ``out`` (anything with ``put``)."""

    def __init__(
        self,
        settings: StreamSettings,
        consumer_id: str,
        out: Any,
        partitions: frozenset[int] | None = None,
        start_offsets: Mapping[int, int] | None = None,
        put_wait_s: float = 1.0,
        metrics: TelemetrySettings | None = None,
        targets_dir: Path | None = None,
        lag_every_s: float = 1.0,
    ) -> None:
        """``partitions``: what it reads (default all); ``start_offsets``: next offset to read per partition
        (a partition without one from its beginning).
        ``metrics``/``targets_dir``: expose this process's metrics and register them (``stream.exporter``)."""
        self.settings = settings
        self.consumer_id = consumer_id
        self.out = out
        self.partitions = partitions
        self.start_offsets = dict(start_offsets or {})
        self.put_wait_s = put_wait_s
        self._stop = threading.Event()
        self._consumer: StreamConsumer | None = None
        self.batches_delivered = 0
        self.waits_on_full_queue = 0
        self.lag_every_s = lag_every_s
        self.exporter: Exporter | None = start_exporter(metrics, "consumer", targets_dir)

    def run(self) -> ConsumerStats:
        """Poll and deliver until ``stop()``; then close the consumer. Returns the stats."""
        consumer = StreamConsumer(
            open_source(self.settings, partitions=self.partitions, start_offsets=self.start_offsets),
            open_dead_letters(self.settings),
            domains=self.settings.domains,
            consumer_id=self.consumer_id,
        )
        self._consumer = consumer
        try:
            lag_due_s = 0.0
            while not self._stop.is_set():
                batch = consumer.poll(self.settings.poll_timeout_s)
                if batch.read:
                    self._deliver(consumer, batch)
                if time.monotonic() >= lag_due_s:
                    consumer.export_lag()
                    lag_due_s = time.monotonic() + self.lag_every_s
        except Exception:
            log.exception("consumer loop failed consumer=%s", self.consumer_id)
            raise
        finally:
            consumer.close()
            if self.exporter is not None:
                self.exporter.unregister()
            log.info("consumer stopped consumer=%s stats=%s", self.consumer_id, consumer.stats)
        return consumer.stats

    def _deliver(self, consumer: StreamConsumer, batch: EventBatch) -> None:
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

    def assignment(self) -> frozenset[int]:
        """The partitions it reads (static: known before the loop starts)."""
        return self.partitions if self.partitions is not None else frozenset(range(self.settings.partitions))

    def stats(self) -> ConsumerStats:
        return self._consumer.stats if self._consumer is not None else ConsumerStats()

    def delivery(self) -> dict[str, int]:
        """Batches put on the queue, and how often the queue was full for ``put_wait_s`` (backpressure)."""
        return {"batches_delivered": self.batches_delivered, "waits_on_full_queue": self.waits_on_full_queue}

    def stop(self) -> None:
        self._stop.set()


# max_concurrency: `run` occupies one thread for the actor's life; stop/stats use the others.
_ray_remote: Any = ray.remote  # its type stubs lack the actor options
ConsumerActor = _ray_remote(max_concurrency=4, num_cpus=0)(ConsumerWorker)


def partition_sets(partitions: int, consumers: int) -> list[frozenset[int]]:
    """The static split of a topic's partitions over ``consumers`` actors: ``p`` goes to actor ``p % n``.

    >>> partition_sets(5, 2)
    [frozenset({0, 2, 4}), frozenset({1, 3})]
    """
    if not 1 <= consumers <= partitions:
        raise ValueError(f"consumers must be in [1, partitions={partitions}], got {consumers}")
    return [frozenset(range(i, partitions, consumers)) for i in range(consumers)]


class ConsumerFleet:
    """``n`` consumer actors with fixed partitions feeding one bounded queue. Use as a context manager."""

    def __init__(
        self,
        settings: StreamSettings,
        consumers: int = 2,
        queue_maxsize: int = 8,
        put_wait_s: float = 1.0,
        start_offsets: Mapping[int, int] | None = None,
        metrics: TelemetrySettings | None = None,
        targets_dir: Path | None = None,
        actor_options: Mapping[str, Any] | None = None,
    ) -> None:
        """``start_offsets``: next offset to read per partition (the learner's checkpointed positions;
        a partition without one is read from its beginning).
        ``metrics``/``targets_dir``: each actor exposes its metrics (``stream.exporter``).
        ``actor_options``: Ray options of every consumer actor (e.g. ``resources``, which places them)."""
        if queue_maxsize < 1:
            raise ValueError(f"queue_maxsize must be >= 1 (bounded), got {queue_maxsize}")
        self.settings = settings
        self.put_wait_s = put_wait_s
        self.metrics = metrics
        self.targets_dir = targets_dir
        self.actor_options = dict(actor_options or {})
        self.partitions = {f"consumer-{i}": ps for i, ps in enumerate(partition_sets(settings.partitions, consumers))}
        self.queue = Queue(maxsize=queue_maxsize, actor_options={"num_cpus": 0})
        self.actors: dict[str, Any] = {}
        self._runs: dict[str, Any] = {}
        for consumer_id in self.partitions:
            self._start(consumer_id, start_offsets or {})

    def _start(self, consumer_id: str, start_offsets: Mapping[int, int]) -> None:
        partitions = self.partitions[consumer_id]
        mine = {int(p): int(o) for p, o in start_offsets.items() if int(p) in partitions}
        actor = ConsumerActor.options(**self.actor_options).remote(self.settings, consumer_id, self.queue, partitions, mine, self.put_wait_s,
                                     self.metrics, self.targets_dir)
        self.actors[consumer_id] = actor
        self._runs[consumer_id] = actor.run.remote()
        log.info("consumer started consumer=%s partitions=%s start_offsets=%s", consumer_id, sorted(partitions), mine)

    def __enter__(self) -> ConsumerFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, timeout_s: float) -> EventBatch | None:
        """The next batch, or None after ``timeout_s`` without one."""
        try:
            batch: EventBatch = self.queue.get(timeout=timeout_s)
        except Empty:
            return None
        return batch

    def assignments(self, timeout_s: float = 30.0) -> dict[str, frozenset[int]]:
        refs = {cid: a.assignment.remote() for cid, a in self.actors.items()}
        return {cid: ray.get(ref, timeout=timeout_s) for cid, ref in refs.items()}

    def stats(self, timeout_s: float = 30.0) -> dict[str, ConsumerStats]:
        refs = {cid: a.stats.remote() for cid, a in self.actors.items()}
        return {cid: ray.get(ref, timeout=timeout_s) for cid, ref in refs.items()}

    def delivery(self, timeout_s: float = 30.0) -> dict[str, dict[str, int]]:
        refs = {cid: a.delivery.remote() for cid, a in self.actors.items()}
        return {cid: ray.get(ref, timeout=timeout_s) for cid, ref in refs.items()}

    def failed(self) -> dict[str, str]:
        """Consumers whose loop ended (died or raised): consumer id -> why."""
        out: dict[str, str] = {}
        done, _ = ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=0)
        by_ref = {ref: cid for cid, ref in self._runs.items()}
        for ref in done:
            try:
                ray.get(ref)
                out[by_ref[ref]] = "consumer loop returned"
            except Exception as exc:
                out[by_ref[ref]] = f"{type(exc).__name__}: {exc}"
        return out

    def check_health(self) -> None:
        """Raise the error of an actor whose loop died (ray.get of its finished run)."""
        done, _ = ray.wait(list(self._runs.values()), num_returns=len(self._runs), timeout=0)
        for ref in done:
            ray.get(ref)

    def replace(self, consumer_id: str, start_offsets: Mapping[int, int]) -> None:
        """Start a new actor for ``consumer_id``'s partitions at ``start_offsets`` (the learner's positions),
        in place of the one there (killed first). The others and the queue are untouched."""
        old = self.actors.pop(consumer_id)
        self._runs.pop(consumer_id)
        ray.kill(old, no_restart=True)
        self._start(consumer_id, start_offsets)

    def stop(self, timeout_s: float = 60.0) -> dict[str, ConsumerStats]:
        """Stop every loop, wait for them, then release the actors and the queue."""
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
