"""The composition root of the live system: replay -> log -> consumer actors -> learner actor -> serving.

``Pipeline`` wires the pieces for one deployment and supervises them:

- the **serving actor** (FAISS index + HTTP API) starts first and keeps answering through every restart
  below it;
- the **learner actor** restores the newest good checkpoint (if the run directory has one); it owns the
  stream's positions and every user's history;
- the **consumer actors**, stateless decoders with a static partition assignment, start at the learner's
  positions, so the stream resumes exactly after what the model holds;
- a **replay thread** produces the data set into the log (embedded or Kafka) at a chosen rate.

If a consumer actor dies, ``supervise()`` replaces it alone, at the learner's current positions for its
partitions; the learner goes on and drops by offset what the replacement reads twice. If the learner
dies, ``supervise()`` stops the consumers, starts a new learner from the last checkpoint and new
consumers at its positions: what was trained after that checkpoint is trained again (at most one
checkpoint interval plus the batches in flight), nothing is lost and nothing is applied twice. A restart
that fails (the broker is down) is retried by the next ``supervise()`` call.

If the serving actor dies, ``supervise()`` starts a new one, on the same port when it can (so the URL
stays), and hands it to the learner, whose loop sends it a full version first. Only that restart
interrupts answers.

With ``serving_replicas`` > 1, that many serving actors listen on one host:port (``SO_REUSEPORT``: the
kernel spreads connections over them) and the learner sends every version to each. A dead replica is
replaced alone, on that port, and joins it only once its first full version is applied
(``listen_after_full``): the others answer meanwhile, and no connection reaches a replica with an empty
index. ``status()`` has each replica's served version and whether it is alive (``serving_replicas``).

``write_summary`` puts the run's figures in one JSON file (``sitn run`` writes ``<run dir>/summary.json``
when it ends): what was replayed, trained and dead-lettered (by reason, with the first record of each), the
verdict (``ok``, ``problems``: trained nothing, or dead-lettered more than ``dead_letter_max_ratio``; see
``sitn.dead_letter_watch``), restarts, wall time and throughput, freshness, and the prequential HR@10/NDCG@10 of the served model and of every shadow baseline on the same events.

The replay producer is idempotent (acks=all, retries until its delivery timeout), and each tick waits
for every record of the tick to be acknowledged: a broker that is killed and restarted within the
delivery timeout loses nothing and duplicates nothing; one that stays away longer fails the replay loudly
(``ReplayProgress.error``), with ``sent`` the count acknowledged.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from learner.core.config import SITNConfig
from learner.online.actor import LearnerActor
from learner.online.drift import DriftMonitor, DriftSettings
from learner.online.gate import PublishGate, RankerFallback
from serving.actor import ServingActor
from serving.settings import ServingSettings
from sitn.dead_letter_watch import judge_run
from sitn.resources import PeakMemory
from sitn.settings import RunSettings
from stream.actors import ConsumerFleet
from stream.dataset import EventFile, EventLog, open_events
from stream.events import InteractionEvent
from stream.exporter import TelemetrySettings
from stream.group_offsets import GroupLag
from stream.producer import (
    KafkaRecordProducer,
    LagThrottle,
    RecordProducer,
    make_kafka_producer,
    open_producer,
    paced_send,
)
from stream.settings import StreamSettings

log = logging.getLogger(__name__)

FLAT_OUT_CHUNK_EVENTS = 65_536  # events per flush when replaying flat out (bounds the replay's memory)
REPLAY_DELIVERY_TIMEOUT_S = 300.0  # how long the replay producer retries a record while the broker is away
SERVING_HEALTH_TIMEOUT_S = 10.0  # a serving actor that does not answer within this is busy, not dead


@dataclass
class ReplayProgress:
    total: int = 0
    sent: int = 0  # events of the file in the log, those of an earlier run of this run directory included
    resumed_from: int = 0  # events already in the log when this run's replay started (stream.replay_journal)
    done: bool = False
    started_s: float = field(default_factory=time.monotonic)
    finished_s: float | None = None
    error: str | None = None

    @property
    def rate_events_per_s(self) -> float:
        """Events sent per second over the replay (up to now while it runs)."""
        elapsed = (self.finished_s or time.monotonic()) - self.started_s
        return (self.sent - self.resumed_from) / elapsed if elapsed > 0 else 0.0


def paced_replay(
    events: Iterable[InteractionEvent],
    producer: Any,
    rate_events_per_s: float | None,
    progress: ReplayProgress,
    stop: threading.Event,
    tick_s: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    throttle: LagThrottle | None = None,
    offset: int = 0,
    on_sent: Callable[[int], None] | None = None,
) -> None:
    """Send ``events`` in order at ``rate_events_per_s`` (None: flat out), flushing every tick.

    ``progress.sent`` counts the events acknowledged (a flush returned), plus ``offset`` (events sent before,
    by an earlier run); ``on_sent`` is called with that count after each acknowledged chunk. A flush that fails raises, naming
    the first event that may not be stored: the replay stops there, loudly, and sends nothing after it.
    ``throttle``: wait before each chunk while the consumer group's lag is above its bound (backpressure).
    """
    paced_send(events, producer, rate_events_per_s, throttle=throttle, stop=stop, tick_s=tick_s,
               max_chunk_events=FLAT_OUT_CHUNK_EVENTS if rate_events_per_s is None and throttle is None else 4096,
               on_sent=lambda n: _acknowledged(progress, offset + n, on_sent), clock=clock)


def _acknowledged(progress: ReplayProgress, sent: int, on_sent: Callable[[int], None] | None) -> None:
    progress.sent = sent
    if on_sent is not None:
        on_sent(sent)


def open_replay_producer(settings: StreamSettings) -> RecordProducer:
    """The replay's producer. On Kafka it rides out a broker restart: the idempotent producer retries each
    record for up to ``REPLAY_DELIVERY_TIMEOUT_S`` (no loss, no duplicates), and a flush waits that long."""
    if not settings.uses_kafka:
        return open_producer(settings)
    timeout_ms = int(REPLAY_DELIVERY_TIMEOUT_S * 1000)
    producer = make_kafka_producer(settings, delivery_timeout_ms=timeout_ms, max_block_ms=timeout_ms)
    return KafkaRecordProducer(producer, settings.topic_interactions, flush_timeout_s=REPLAY_DELIVERY_TIMEOUT_S + 30)


class Pipeline:
    """One deployment of the live system. Call ``start()``, then ``supervise()`` periodically, then ``stop()``."""

    def __init__(
        self,
        run: RunSettings,
        stream: StreamSettings,
        serving: ServingSettings,
        config: SITNConfig,
        run_dir: Path,
        metrics: TelemetrySettings | None = None,
        audit_log: Path | None = None,
        drift: DriftSettings | None = None,
    ) -> None:
        """``metrics``: every actor exposes Prometheus metrics, registered under ``targets_dir`` (file_sd).
        ``audit_log``: every learner incarnation appends what it trained there (``learner.online.actor``).
        ``drift``: drift detector settings (built here, in the driver, so ``SITN_DRIFT_*`` of the process
        that runs ``sitn run`` apply, not the Ray workers' environment); alarms go to ``drift_log``."""
        self.run_settings = run
        self.stream = stream
        self.serving_settings = serving
        self.config = config
        self.run_dir = run_dir
        self.servings: list[Any] = []  # serving actors by replica index; None while one is being replaced
        self.learner: Any = None
        self.fleet: ConsumerFleet | None = None
        self._learner_run: Any = None
        self.restarts = 0  # of the learner (with the consumers)
        self.memory = PeakMemory()  # resident MiB per component, sampled with every status()
        self.consumer_restarts = 0  # of one consumer alone
        self.serving_restarts = 0
        self.recovering: str | None = None  # the failure whose restart has not succeeded yet
        self.audit_log = audit_log
        self.replay_progress = ReplayProgress()
        self._replay_stop = threading.Event()
        self._replay_thread: threading.Thread | None = None
        self.serving_url: str | None = None
        self.metrics = metrics
        self.targets_dir: Path | None = None
        if metrics is not None and metrics.enabled:
            self.targets_dir = metrics.targets_dir or run_dir / "metrics" / "targets"
        self.drift_settings = drift if drift is not None else DriftSettings()
        self.drift_log = self.drift_settings.log_path or run_dir / "metrics" / "drift.jsonl"
        self._throttle: LagThrottle | None = None
        self.caught_up_s: float | None = None  # monotonic time every replayed event was first seen trained

    # -- start-up ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.stream.uses_kafka:
            from stream.topics import ensure_topics

            ensure_topics(self.stream)
        replicas = self.run_settings.serving_replicas
        first, self.serving_url = self._start_serving(self.serving_settings, reuse_port=replicas > 1)
        self.servings = [first]
        # The others on the port the first one got (it may have been 0: any free one).
        shared = self.serving_settings.model_copy(update={"port": _port_of(self.serving_url)})
        for _ in range(1, replicas):
            self.servings.append(self._start_serving(shared, reuse_port=True)[0])
        log.info("serving url=%s replicas=%d", self.serving_url, replicas)
        self._start_training()

    @property
    def serving(self) -> Any:
        """A live serving actor (the lowest replica index), or None."""
        return next((actor for actor in self.servings if actor is not None), None)

    def _start_serving(self, settings: ServingSettings, reuse_port: bool = False,
                       listen_after_full: bool = False) -> tuple[Any, str]:
        """A serving actor listening on ``settings``' port (sharing it when ``reuse_port``), and its URL; with
        ``listen_after_full`` it listens only after its first full version, and the URL is the one it will have."""
        actor = ServingActor.options(**_placement(self.run_settings.learner_resource)).remote(
            settings, targets_dir=self.targets_dir, reuse_port=reuse_port, listen_after_full=listen_after_full,
            metrics=self.metrics)
        try:
            url: str | None = ray.get(actor.url.remote(), timeout=60)
        except Exception:
            ray.kill(actor, no_restart=True)
            raise
        return actor, url or f"http://{settings.host}:{settings.port}"

    def _start_training(self) -> None:
        """A learner restored from the newest checkpoint (kept from a failed attempt if there is one), the
        consumers started at its positions, then its loop."""
        if self.learner is None:
            self.learner = self._new_learner()
        positions = ray.get(self.learner.positions.remote())
        r = self.run_settings
        self.fleet = ConsumerFleet(
            self.stream, consumers=r.consumers, queue_maxsize=r.queue_maxsize, start_offsets=positions,
            metrics=self.metrics, targets_dir=self.targets_dir, actor_options=_placement(r.consumer_resource),
        )
        self._learner_run = self.learner.run.remote(self.fleet.queue)

    def _new_learner(self) -> Any:
        r = self.run_settings
        return LearnerActor.options(**_placement(r.learner_resource)).remote(
            self.config,
            r.source,
            r.target,
            self.run_dir / "checkpoints",
            list(self.servings),  # a replica being replaced (None) is handed over when it is up
            torch_threads=r.torch_threads,
            batch_size=r.batch_size,
            checkpoint_every_steps=r.checkpoint_every_steps,
            publish_every_steps=r.publish_every_steps,
            publish_every_s=r.publish_every_s,
            publish_max_share=r.publish_max_share,
            full_publish_every=r.full_publish_every,
            refresh_users_per_publish=r.refresh_users_per_publish,
            cooc_max_neighbours=r.cooc_max_neighbours or None,
            kafka_updates=self.stream if self.stream.uses_kafka else None,
            group_offsets=self.stream,
            metrics=self.metrics,
            targets_dir=self.targets_dir,
            gate=self._gate(),
            gate_sample_per_step=r.gate_sample_per_step,
            drift=DriftMonitor(self.drift_settings, self.drift_log),
            fallback=self._fallback(),
            fused_weights=tuple(r.fused_weights),
            fused_window=r.fused_window,
            transfer_scale_window=r.transfer_scale_window, prior_window=r.prior_window,
            prequential_sample=r.prequential_sample,
            served_max_users=self.serving_settings.max_users,
            served_max_consumed_per_user=self.serving_settings.max_consumed_per_user,
            audit_log=self.audit_log,
            warm_start=r.warm_start,
        )

    def _gate(self) -> PublishGate | None:
        r = self.run_settings
        if not r.gate_enabled:
            return None
        return PublishGate(r.gate_max_drop, r.gate_window, r.gate_min_events, log_path=self.drift_log,
                           z_critical=r.gate_z_critical)

    def _fallback(self) -> RankerFallback | None:
        r = self.run_settings
        if not r.fallback_enabled:
            return None
        return RankerFallback(("popularity", "cooccurrence"), r.fallback_window, r.fallback_min_events,
                              r.fallback_z_critical, r.fallback_recover_z, log_path=self.drift_log,
                              learnt=("fused",) if r.fused_weights else ())

    def start_replay(self, events: EventFile | EventLog | Sequence[InteractionEvent], skip: int = 0,
                     on_sent: Callable[[int], None] | None = None) -> None:
        """Replay ``events`` (iterated once, lazily: an :class:`EventFile` streams from disk) in a thread.

        ``skip``: the first events are already in the log (a resumed replay, ``stream.replay_journal``): they
        count as sent and are not sent again. ``on_sent(n)``: called with the events of ``events`` in the log
        (``skip`` included) after every acknowledged chunk."""
        self.replay_progress = ReplayProgress(total=len(events), sent=skip, resumed_from=skip)
        self.caught_up_s = None
        if skip >= len(events):
            self.replay_progress.finished_s = time.monotonic()
            self.replay_progress.done = True
            return
        producer = open_replay_producer(self.stream)
        self.caught_up_s = None
        r = self.run_settings
        throttle = None
        if r.max_lag_events is not None:
            throttle = LagThrottle(GroupLag(self.stream), r.max_lag_events)
            throttle.check_headroom(r.checkpoint_every_steps * r.batch_size, r.queue_maxsize * self.stream.batch_size)
        self._throttle = throttle
        todo: Iterable[InteractionEvent] = itertools.islice(events, skip, None) if skip else events

        def body() -> None:
            try:
                paced_replay(todo, producer, self.run_settings.rate_events_per_s, self.replay_progress,
                             self._replay_stop, throttle=throttle, offset=skip, on_sent=on_sent)
            except Exception as exc:  # reported on the status line and re-raised in the thread's log
                self.replay_progress.error = f"{type(exc).__name__}: {exc}"
                log.exception("replay failed")
                raise
            finally:
                producer.close()
                if throttle is not None:
                    close = getattr(throttle.lag_events, "close", None)
                    if close is not None:
                        close()
                self.replay_progress.finished_s = time.monotonic()
                self.replay_progress.done = True

        self._replay_thread = threading.Thread(target=body, name="sitn-replay", daemon=True)
        self._replay_thread.start()

    def note_replayed(self, n: int) -> None:
        """The log already holds ``n`` replayed events (an earlier run's replay, ``stream.replay_journal``) and
        nothing is replayed now: ``caught_up`` waits for those ``n`` to be trained."""
        self.replay_progress = ReplayProgress(total=n, sent=n, resumed_from=n, done=True, finished_s=time.monotonic())
        self.caught_up_s = None

    # -- supervision -----------------------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart what died: serving on its own; a consumer on its own, at the learner's positions; the
        learner together with the consumers, from the last checkpoint.

        Call it periodically. A restart that fails is logged and retried by the next call.
        """
        self._supervise_serving()
        if self.recovering is None:
            self.recovering = self._learner_failure()
            if self.recovering is None:
                self._supervise_consumers()
                return
            log.error("recovering from failure=%s", self.recovering.splitlines()[0])
            self.restarts += 1
            self._stop_training(graceful=False)
        try:
            self._start_training()
        except Exception as exc:
            log.warning("restart failed, retried at the next supervise() failure=%s error=%s: %s",
                        self.recovering.splitlines()[0], type(exc).__name__, (str(exc) or "-").splitlines()[0])
            self._stop_fleet()
            if isinstance(exc, ray.exceptions.RayActorError) and self.learner is not None:
                ray.kill(self.learner, no_restart=True)  # the new learner itself died: start another
                self.learner = None
            return
        log.info("recovered from failure=%s", self.recovering.splitlines()[0])
        self.recovering = None

    def _learner_failure(self) -> str | None:
        """Why the learner is down, or None."""
        done, _ = ray.wait([self._learner_run], timeout=0)
        if not done:
            return None
        try:
            ray.get(done[0])
            return "learner loop returned"
        except Exception as exc:
            return f"learner: {type(exc).__name__}: {exc}"

    def _supervise_consumers(self) -> None:
        """Replace each consumer whose loop ended, alone, at the learner's positions for its partitions.

        The learner's positions may trail what it trains by the time the new consumer reads: the learner
        drops what is read twice (``learner.online.trainer``). A replacement that fails is retried next call."""
        assert self.fleet is not None
        for consumer_id, why in self.fleet.failed().items():
            log.error("consumer failed consumer=%s failure=%s", consumer_id, why.splitlines()[0])
            try:
                positions = ray.get(self.learner.positions.remote(), timeout=30)
                self.fleet.replace(consumer_id, positions)
            except Exception as exc:
                log.warning("consumer restart failed, retried at the next supervise() consumer=%s error=%s: %s",
                            consumer_id, type(exc).__name__, (str(exc) or "-").splitlines()[0])
                continue
            self.consumer_restarts += 1
            log.info("consumer replaced consumer=%s", consumer_id)

    def _supervise_serving(self) -> None:
        """Start a new serving actor for each replica that died (or whose HTTP server stopped), and hand it to
        the learner. Replicas are checked together and replaced one by one; the others go on answering."""
        checks = {i: actor.check_health.remote() for i, actor in enumerate(self.servings) if actor is not None}
        for index in range(len(self.servings)):
            if index in checks:
                try:
                    if ray.get(checks[index], timeout=SERVING_HEALTH_TIMEOUT_S):
                        continue
                except ray.exceptions.GetTimeoutError:
                    log.warning("serving did not answer its health check within timeout_s=%s replica=%d",
                                SERVING_HEALTH_TIMEOUT_S, index)
                    continue
                except ray.exceptions.RayActorError as exc:
                    log.error("serving actor died replica=%d error=%s", index, str(exc).splitlines()[0])
                ray.kill(self.servings[index], no_restart=True)
                self.servings[index] = None
            self._replace_serving(index)

    def _replace_serving(self, index: int) -> None:
        """A new serving actor for replica ``index`` on the port serving had (so the URL stays), handed to the
        learner. One replica alone may fall back to the configured port; a replica among several only shares
        the port, joining it once it holds a full version."""
        assert self.serving_url is not None
        last_port = _port_of(self.serving_url)
        shared = len(self.servings) > 1
        candidates = [self.serving_settings.model_copy(update={"port": last_port})]
        if last_port != self.serving_settings.port and not shared:
            candidates.append(self.serving_settings)
        for settings in candidates:
            try:
                actor, url = self._start_serving(settings, reuse_port=shared, listen_after_full=shared)
                break
            except Exception as exc:
                log.warning("serving did not start replica=%d port=%s error=%s", index, settings.port,
                            type(exc).__name__)
        else:
            if shared:  # the others still answer: retried at the next supervise()
                return
            raise RuntimeError(f"serving could not be restarted on port {last_port} nor {self.serving_settings.port}")
        self.servings[index] = actor
        if not shared:
            self.serving_url = url
        self.serving_restarts += 1
        log.info("serving restarted replica=%d url=%s", index, url)
        if self.learner is not None:
            try:
                ray.get(self.learner.set_serving.remote(actor, index), timeout=30)
            except Exception as exc:  # a learner that died meanwhile gets the new replica when it is restarted
                log.warning("new serving replica not handed to the learner replica=%d error=%s", index,
                            type(exc).__name__)

    def learner_replicas(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """What the learner knows of each serving replica (``LearnerWorker.replicas``)."""
        replicas: list[dict[str, Any]] = ray.get(self.learner.replicas.remote(), timeout=timeout_s)
        return replicas

    def recommend(self, user_id: str, k: int = 10, timeout_s: float = 10.0) -> dict[str, Any]:
        """``/recommend``'s answer through Ray, from the first serving replica that answers."""
        error: Exception | None = None
        for actor in self.servings:
            if actor is None:
                continue
            try:
                answer: dict[str, Any] = ray.get(actor.recommend.remote(user_id, k), timeout=timeout_s)
                return answer
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                error = exc
        raise RuntimeError(f"no serving replica answered (of {len(self.servings)}): {error!r}")

    def _stop_fleet(self) -> None:
        if self.fleet is not None:
            try:
                self.fleet.stop(timeout_s=30)
            except Exception:  # a consumer that died raises its error here; the others are stopped anyway
                log.exception("stopping consumers")
            self.fleet = None

    def _stop_training(self, graceful: bool) -> None:
        self._stop_fleet()
        if self.learner is not None:
            if not graceful:
                ray.kill(self.learner, no_restart=True)
            self.learner = None

    # -- status ------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "replay_sent": self.replay_progress.sent,
            "replay_total": self.replay_progress.total,
            "replay_rate": self.replay_progress.rate_events_per_s,
            "restarts": self.restarts,
            "consumer_restarts": self.consumer_restarts,
        }
        rss = self.memory.sample()
        out["rss_mb"] = rss
        out["rss_total_mb"] = sum(rss.values())
        if self._throttle is not None:
            out["replay_throttled_s"] = self._throttle.throttled_s
            out["lag_events"] = self._throttle.last_lag_events
        try:
            learner = ray.get(self.learner.stats.remote(), timeout=10)
            out.update(learner)
            # The records the learner's positions have passed: trained events and dead letters. Its tally, not
            # the consumers': a replaced consumer (or all of them, after a learner restart) counts from zero.
            out["dead_letters"] = int(learner["dead_letters"])
            out["records_in"] = int(learner["events_applied"]) + out["dead_letters"]
        except Exception as exc:  # a dead learner shows as such until supervise() replaces it
            out["learner_error"] = type(exc).__name__
        out.update(self._serving_status())
        if self.fleet is not None:
            try:
                stats = self.fleet.stats(timeout_s=10)
                out["records_read"] = sum(s.records_in for s in stats.values())  # by the consumers alive now
                out["events_decoded"] = sum(s.events_out for s in stats.values())  # by the consumers alive now
                out["consumer_lag_records"] = sum(s.lag_records for s in stats.values())
            except Exception as exc:
                out["consumer_error"] = type(exc).__name__
        return out

    def _serving_status(self) -> dict[str, Any]:
        """The first live replica's figures (served version, ranker, freshness ...), and ``serving_replicas``:
        per replica its index, whether it is alive, its pid, whether it listens yet and its served version."""
        refs = {i: actor.stats.remote() for i, actor in enumerate(self.servings) if actor is not None}
        out: dict[str, Any] = {}
        replicas: list[dict[str, Any]] = []
        for index in range(len(self.servings)):
            row: dict[str, Any] = {"replica": index, "alive": False, "pid": None, "listening": False,
                                   "served_version": None}
            try:
                if index not in refs:
                    raise RuntimeError("being replaced")
                stats = dict(ray.get(refs[index], timeout=10))
            except Exception as exc:
                out.setdefault("serving_error", type(exc).__name__)
            else:
                row.update(alive=True, pid=stats.pop("pid"), listening=stats.pop("listening"),
                           served_version=stats["served_version"])
                if "served_version" not in out:
                    out.update(stats)
            replicas.append(row)
        if "served_version" in out:
            out.pop("serving_error", None)  # one replica answered; the rows say which did not
        out["serving_replicas"] = replicas
        return out

    def placement(self, timeout_s: float = 30.0) -> dict[str, str]:
        """The Ray node id each live actor runs on: ``serving`` (``serving-<replica>`` with several replicas),
        ``learner`` and each consumer's id."""
        actors: dict[str, Any] = {"learner": self.learner}
        if len(self.servings) == 1:
            actors["serving"] = self.servings[0]
        else:
            actors.update({f"serving-{i}": actor for i, actor in enumerate(self.servings)})
        if self.fleet is not None:
            actors.update(self.fleet.actors)
        refs = {name: a.__ray_call__.remote(_node_id) for name, a in actors.items() if a is not None}
        out: dict[str, str] = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=timeout_s)
            except Exception as exc:  # a dead actor has no node
                log.warning("no node for actor=%s error=%s", name, type(exc).__name__)
        return out

    def caught_up(self, status: dict[str, Any] | None = None) -> bool:
        """Every replayed event has been trained on (or dead-lettered); ``status``: a fresh ``status()``."""
        if not self.replay_progress.done:
            return False
        status = self.status() if status is None else status
        done = status.get("events_applied", 0) + status.get("dead_letters", 0) >= self.replay_progress.total
        if done and self.caught_up_s is None:
            self.caught_up_s = time.monotonic()
        return bool(done)

    # -- the run's summary -----------------------------------------------------------------------------------
    def summary(self, wall_time_s: float) -> dict[str, Any]:
        """The run's figures (see ``write_summary``); ``wall_time_s``: seconds since the run started."""
        status = self.status()
        quality: dict[str, Any] = {}
        if self.learner is not None:
            try:
                quality = ray.get(self.learner.quality.remote(), timeout=30)
            except Exception as exc:  # a dead learner: the summary says so instead of its figures
                log.warning("no prequential figures for the summary error=%s", type(exc).__name__)
        progress = self.replay_progress
        end_s = self.caught_up_s if self.caught_up_s is not None else time.monotonic()
        replay_to_trained_s = end_s - progress.started_s if progress.total else math.nan
        trained = int(status.get("events_applied", 0))
        by_reason = {r: int(n) for r, n in (status.get("dead_letters_by_reason") or {}).items()}
        verdict = judge_run(int(status.get("records_in", 0)), trained, int(progress.total), by_reason,
                            self.run_settings.dead_letter_max_ratio)
        out: dict[str, Any] = {
            "ok": verdict.ok,  # trained something and dead-lettered at most dead_letter_max_ratio (sitn run's exit status)
            "problems": verdict.problems,
            "events_replayed": int(progress.sent),
            "events_to_replay": int(progress.total),
            "events_trained": trained,
            "dead_letters": int(status.get("dead_letters", 0)),
            "records_consumed": verdict.records_in,
            "dead_letter_ratio": verdict.ratio,  # per record consumed, whole run
            "dead_letter_max_ratio": self.run_settings.dead_letter_max_ratio,
            "dead_letters_by_reason": by_reason,
            "dead_letter_examples": status.get("dead_letter_examples") or {},  # the first letter of each reason
            # a warm-started run (sitn run --warm-start): the model file, and the events it had been trained on,
            # burnt in without a step or a rank; every prequential figure below counts only the events after them
            "warm_start": str(self.run_settings.warm_start) if self.run_settings.warm_start is not None else None,
            "burn_in_events": int(status.get("burn_in_events", 0)),
            "restarts": int(self.restarts),  # of the learner, with the consumers
            "consumer_restarts": int(self.consumer_restarts),  # of a consumer alone
            "serving_restarts": int(self.serving_restarts),  # of any replica
            # per serving replica at the end: index, alive, pid, listening, served version
            "serving_replicas": status.get("serving_replicas", []),
            "caught_up": self.caught_up_s is not None,
            "wall_time_s": wall_time_s,
            # resident MiB per component (driver, serving, learner, consumers, queue, Ray's own processes,
            # a broker below the driver), the largest of the status samples taken once per status tick
            "rss_peak_mb": {c: round(mb, 1) for c, mb in self.memory.peak_mb.items()},
            "rss_peak_total_mb": round(self.memory.peak_total_mb, 1),
            "replay_to_trained_s": replay_to_trained_s,
            # end to end: from the first event produced to the last one trained (or to now, if not caught up)
            "events_per_s": trained / replay_to_trained_s if replay_to_trained_s > 0 else math.nan,
            "freshness_p50_s": status.get("freshness_p50_s", math.nan),
            "freshness_p99_s": status.get("freshness_p99_s", math.nan),
            "served_by": status.get("served_by"),  # what serving answers with at the end
            "serving_ranker_switches": int(status.get("ranker_switches", 0)),
            "learner_served_by": quality.get("served_by"),  # what the learner last told serving
            "prequential": _prequential_summary(quality) if quality else None,
            "ray_nodes": self.placement(),  # actor -> id of the Ray node it ran on at the end (serving, learner, consumers)
        }
        return out

    def write_summary(self, path: Path, wall_time_s: float) -> dict[str, Any]:
        """Write ``summary(wall_time_s)`` to ``path`` as JSON (nan as null), atomically; returns it."""
        summary = _json_ready(self.summary(wall_time_s))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        log.info("summary written path=%s", path)
        return dict(summary)

    # -- shutdown ------------------------------------------------------------------------------------------
    def finish_training(self, timeout_s: float = 120) -> dict[str, float]:
        """Final checkpoint, commit and full publish; returns the learner's summary."""
        assert self.learner is not None
        self.learner.finish.remote()
        summary: dict[str, float] = ray.get(self._learner_run, timeout=timeout_s)
        return summary

    def stop(self) -> None:
        self._replay_stop.set()
        if self._replay_thread is not None:
            self._replay_thread.join(timeout=30)
        if self.learner is not None:
            try:
                self.finish_training()
            except Exception:
                log.exception("finishing the learner")
        self._stop_training(graceful=True)
        stops = [actor.stop.remote() for actor in self.servings if actor is not None]
        for ref in stops:
            try:
                ray.get(ref, timeout=30)
            except Exception:
                log.exception("stopping serving")
        self.servings = []


def _port_of(url: str) -> int:
    """The port of ``http://host:port``."""
    return int(url.rsplit(":", 1)[1])


def _placement(resource: str | None) -> dict[str, Any]:
    """Ray actor options that place an actor on the nodes offering custom ``resource`` (none: anywhere).
    A hundredth of a unit each, so one unit on a node holds up to a hundred such actors."""
    return {"resources": {resource: 0.01}} if resource else {}


def _node_id(_actor: object) -> str:
    """Run inside an actor (``__ray_call__``): the id of the Ray node it lives on."""
    return str(ray.get_runtime_context().get_node_id())


def _prequential_summary(quality: dict[str, Any]) -> dict[str, Any]:
    """The summary's ``prequential`` part from ``OnlineTrainer.quality_report()``: per ranker and span
    (``stream``: the whole stream; ``window``: the last window of target events) HR@k/NDCG@k over all
    target events and over the rankable ones, the rankable fraction, the best baseline and the lift."""
    rankers = quality["rankers"]
    model = rankers["model"]
    return {
        "k": quality["k"],
        "target_events": model["stream"]["events"],  # tested: with a sample below 1, that share of them
        "prequential_sample": quality.get("prequential_sample", 1.0),
        "window_events": model["window"]["events"],
        "rankable_events": model["stream"]["rankable"],
        "rankable_ratio": {span: model[span]["rankable_ratio"] for span in ("stream", "window")},
        "rankers": {
            name: {span: {key: figures[span][key] for key in ("hr", "ndcg", "hr_rankable", "ndcg_rankable")}
                   for span in ("stream", "window")}
            for name, figures in rankers.items()
        },
        "best_baseline": quality["best_baseline"],
        "lift": quality["lift"],
        "lift_window": quality["lift_window"],
        "lifts": quality.get("lifts"),  # per learnt ranker (model, fused) and span
        "fused": quality.get("fused"),  # the weight served at the end, the grid and each weight's windowed NDCG
        "fallback": quality.get("fallback"),
        # the query-time transfer scales in force at the end (warm / cold users) and each one's windowed NDCG@10
        "transfer_scale": quality.get("transfer_scale"),
        # the half-life of the counts the popularity prior reads at the end (0: all-time) and each option's
        # windowed NDCG@10
        "popularity_half_life": quality.get("popularity_half_life"),
    }


def _json_ready(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no nan)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def load_replay_log(run: RunSettings) -> EventFile | EventLog | None:
    """The events file of the run, its timestamps read in ``run.time_unit``, streamed from disk when it is
    chronological (``stream.dataset.open_events``); None when there is none."""
    if run.events is None:
        return None
    return open_events(run.events, run.source, run.target, limit=run.limit, time_unit=run.time_unit)
