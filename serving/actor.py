"""Ray shell around the serving core: the RecommendationService plus its HTTP server in one actor.

The learner actor hands it :class:`~stream.events.EmbeddingBatch` es through its handle (the in-cluster
transport), and it applies each with :meth:`serving.service.RecommendationService.apply`, the same validated
write path a standalone replica (``sitn serve``) uses for the batches it reads from the updates topic: item
rows into the FAISS index as one upsert, user query vectors into the user store, consumed (user, item) pairs
into the exclusion sets, popularity and co-occurrence counts; ``served_by`` says which ranker ``/recommend``
answers with from then on (``fused_weight``: the fused ranker's weight). Freshness, the
time from an event's arrival at the learner to its effect being visible here, is recorded per user.
The HTTP server runs in a thread of this actor, so ``/recommend`` reads the same in-memory state
without a hop.

Several replicas may listen on one port (``reuse_port``, see :func:`serving.api.serve_in_thread`), each
fed every version by the learner. A replica that replaces a dead one beside live ones is started with
``listen_after_full``: it joins the port only once it has applied its first full version, so the kernel
never hands it a connection while it would answer from an empty index. A scrape of the shared port
would reach any one replica, so a replica on a shared port registers a metrics endpoint of its own
(``stream.exporter.start_exporter``, on a port of its own) instead of the API's ``/metrics``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from prometheus_client import Histogram

from serving.api import ServerHandle, create_app, serve_in_thread
from serving.service import RecommendationService
from serving.settings import ServingSettings
from stream.events import EmbeddingBatch

if TYPE_CHECKING:
    from stream.exporter import Exporter, TelemetrySettings

log = logging.getLogger(__name__)

FRESHNESS_SECONDS = Histogram(
    "sitn_serving_freshness_seconds",
    "Seconds from an event's arrival at the learner to its user's vectors being served.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)
FRESHNESS_WINDOW_S = 30.0  # stats(): freshness quantiles of the events served this recently, too


class ServingCore:
    """Plain-Python body of the serving actor (testable without Ray)."""

    def __init__(
        self,
        settings: ServingSettings,
        start_http: bool = True,
        targets_dir: Path | None = None,
        reuse_port: bool = False,
        listen_after_full: bool = False,
        metrics: TelemetrySettings | None = None,
    ) -> None:
        """``targets_dir``: register the API's ``/metrics`` there for Prometheus (file_sd, see ``stream.exporter``).
        ``reuse_port``: share ``settings.port`` with other replicas (``SO_REUSEPORT``); with ``targets_dir``,
        this process's metrics are then served and registered by an exporter of its own (``metrics``' settings).
        ``listen_after_full``: start HTTP only after the first full version is applied (see the module docstring)."""
        self.settings = settings
        self.service = RecommendationService.from_settings(settings)
        self.http: ServerHandle | None = None
        self._target_file: Path | None = None
        self._targets_dir = targets_dir
        self._reuse_port = reuse_port
        self._metrics = metrics
        self._exporter: Exporter | None = None
        self._http_wanted = start_http
        self.http_error: str | None = None  # a deferred start that failed: check_health says so
        self.batches_applied = 0
        self.version = 0
        self._freshness_s: deque[float] = deque(maxlen=100_000)
        self._freshness_at_s: deque[float] = deque(maxlen=100_000)  # when each of _freshness_s was observed
        self._applied_at: dict[int, float] = {}
        if start_http and not listen_after_full:
            self._start_http()

    def _start_http(self) -> None:
        self.http = serve_in_thread(create_app(self.service, self.settings), self.settings.host, self.settings.port,
                                    reuse_port=self._reuse_port)
        if self._targets_dir is None:
            return
        if self._reuse_port and self._metrics is not None:  # the API's port is shared: a scrape reaches any replica
            from stream.exporter import start_exporter

            self._exporter = start_exporter(self._metrics, "serving", self._targets_dir)
        else:
            from stream.exporter import write_target

            self._target_file = write_target(self._targets_dir, "serving", self._advertised_address())

    def _advertised_address(self) -> str:
        """host:port others can scrape: the bound address, or this node's IP when bound to all interfaces."""
        assert self.http is not None
        host, _, port = self.http.url.removeprefix("http://").rpartition(":")
        if host in ("0.0.0.0", "[::]", "::", ""):
            import ray

            host = str(ray.util.get_node_ip_address())
        return f"{host}:{port}"

    def url(self) -> str | None:
        """The URL this replica listens on; None while it waits for its first full version."""
        return self.http.url if self.http is not None else None

    def pid(self) -> int:
        return os.getpid()

    def apply_batch(self, batch: EmbeddingBatch) -> dict[str, int]:
        """Apply one published version through the service's one write path (validated there, as on a
        standalone replica); returns counts applied. A batch that fails validation raises: the learner built
        it, so it is a bug, not data."""
        stats = self.service.apply(batch)
        now_s = time.time()
        for ingest_s in batch.event_ingest_wall_s:  # per event this version is the first to reflect
            self._freshness_s.append(now_s - ingest_s)
            self._freshness_at_s.append(now_s)
            FRESHNESS_SECONDS.observe(now_s - ingest_s)
        self.batches_applied += 1
        self.version = max(self.version, batch.version)
        self._applied_at[batch.version] = now_s
        if batch.full and self._http_wanted and self.http is None and self.http_error is None:
            try:
                self._start_http()  # deferred (listen_after_full): the replica holds the whole state now
            except (OSError, RuntimeError, TimeoutError) as exc:  # the port is taken: the supervisor replaces us
                self.http_error = f"{type(exc).__name__}: {exc}"
                log.error("deferred http start failed port=%s error=%s", self.settings.port, self.http_error)
        return {"items": stats.items_applied, "users": stats.users_applied, "consumed": stats.consumed_applied}

    def recommend(self, user_id: str, k: int = 10) -> dict[str, Any]:
        rec = self.service.recommend(user_id, k)
        return {
            "user_id": rec.user_id,
            "served_by": rec.served_by,
            "items": [(s.item_id, s.score) for s in rec.items],
            "index_version": rec.index_version,
        }

    def stats(self) -> dict[str, Any]:
        self.service.refresh_gauges()  # the index age, for an exporter of its own (the API's /metrics refreshes)
        fresh = np.array(self._freshness_s)
        recent = fresh[np.array(self._freshness_at_s) >= time.time() - FRESHNESS_WINDOW_S]
        health = self.service.health()
        return {
            "pid": os.getpid(),
            "listening": self.http is not None,
            "served_by": self.service.ranker,
            "fused_weight": self.service.fused_weight,
            "ranker_switches": float(self.service.ranker_switches),
            "served_version": float(self.version),
            "batches_applied": float(self.batches_applied),
            "index_items": float(health["index_items"]),
            "users": float(health["users"]),
            "consumed_counted": float(health["consumed_counted"]),
            "freshness_p50_s": float(np.percentile(fresh, 50)) if fresh.size else float("nan"),
            "freshness_p99_s": float(np.percentile(fresh, 99)) if fresh.size else float("nan"),
            # the same over the events served in the last FRESHNESS_WINDOW_S (the dashboard's figure)
            "freshness_window_s": FRESHNESS_WINDOW_S,
            "freshness_window_p50_s": float(np.percentile(recent, 50)) if recent.size else float("nan"),
            "freshness_window_p99_s": float(np.percentile(recent, 99)) if recent.size else float("nan"),
        }

    def check_health(self) -> bool:
        """False once the HTTP server stopped or a deferred start failed; true while a deferred start waits."""
        if self.http_error is not None:
            return False
        return self.http is None or self.http.thread.is_alive()

    def stop(self) -> None:
        if self._target_file is not None:
            self._target_file.unlink(missing_ok=True)
        if self._exporter is not None:
            self._exporter.unregister()  # the process's one exporter (stream.exporter) stays for a later actor
        if self.http is not None:
            self.http.stop()
            self.http = None


_ray_remote: Any = ray.remote
# max_concurrency: apply_batch from the learner and stats/health from the driver must not queue behind
# each other; the HTTP server has its own thread.
ServingActor = _ray_remote(num_cpus=0, max_concurrency=4)(ServingCore)
