"""The driver's ops server: a local dashboard of the live system, and the driver's own ``/metrics``.

No Grafana is needed to watch a run. ``create_dashboard_app`` serves:

- ``GET /dashboard``: one self-contained HTML page (``sitn/dashboard.html``) that polls ``/api/series``;
- ``GET /api/series``: every series as ``{"t": [unix s...], "v": [...]}``, with ``source`` saying where
  they come from;
- ``GET /api/targets``: the processes behind them and whether each is up;
- ``GET /metrics``: the driver's own registry (:data:`REGISTRY`); ``GET /healthz``.

The series come from one of two sources, and neither computes PromQL itself:

- :class:`StatusSeries`, the default (nothing installed): the status snapshot ``sitn run``'s status loop
  builds each tick (``Pipeline.status()``: the learner's, serving's and the consumers' own figures) is
  handed to :meth:`DashboardHandle.observe`, and each figure the page draws is appended to a bounded ring
  buffer. The processes compute the figures: the prequential HR@10/NDCG@10 of every ranker over the last
  window of target events, the lifts, losses and prototype agreement (the learner), freshness p50/p99 over
  the last ``freshness_window_s`` (serving), the consumers' lag. The only arithmetic here is the two rates
  (events decoded/s, examples trained/s): the difference of a total between two snapshots over their time
  apart; a total that went down (a consumer or the learner restarted) gives no point.
- :class:`PrometheusSeries`, when a Prometheus scrapes the run (``SITN_METRICS_PROMETHEUS_URL``, ``sitn
  run --prometheus-url``): each request asks Prometheus's ``query_range`` API for the last ``range_s``
  at a step of ``interval_s``, with the expressions of ``sitn.promql`` (rates and
  ``histogram_quantile`` over the last ``window_s``), the same text the Grafana dashboard runs where they
  overlap. Prometheus keeps the history; the driver keeps nothing.

In the status snapshot, ``publish_lag_p99_s`` is the learner's p99 over the events it published in the last
30 s (Prometheus: the histogram over ``window_s``) and ``drift_alarms_active`` the number of signals in alarm
at the last step; ``prototype_agreement`` is the last step's cross-domain agreement (mean over K) from the
snapshot, and per K (the reservoir's) from Prometheus.
Every series with a label has one buffer per label value; all those labels are bounded (docs:
``stream.exporter``), so the number of buffers is too.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from learner.online.telemetry import SERVED_BY
from sitn.promql import QUERIES, SeriesQuery, matrix_series
from stream.exporter import TelemetrySettings

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("dashboard.html")

# -- the driver's metrics, defined once ------------------------------------------------------------------
# A registry of its own: the driver imports the learner, stream and serving modules, so its default
# registry holds every actor metric at zero; exposing those would add a zero-valued duplicate of each series.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
REPLAY_EVENTS_SENT = Counter(
    "sitn_pipeline_replay_events_sent", "Events the replay thread has produced into the log.", registry=REGISTRY
)
RESTARTS = Counter(
    "sitn_pipeline_restarts", "Times the supervisor restarted the learner and consumers.", registry=REGISTRY
)
DEAD_LETTER_WINDOW_RATIO = Gauge(
    "sitn_pipeline_dead_letter_window_ratio",
    "Dead letters per record consumed over the live window (SITN_RUN_DEAD_LETTER_WINDOW_RECORDS); the counts by "
    "reason are the consumers' sitn_stream_dead_letters_total.", registry=REGISTRY,
)
PROMETHEUS_QUERY_FAILURES = Counter(
    "sitn_dashboard_prometheus_query_failures",
    "Dashboard requests to Prometheus (SITN_METRICS_PROMETHEUS_URL) that failed.", registry=REGISTRY,
)


class PipelineMetrics:
    """Feeds the driver's counters from ``Pipeline.status()`` dicts (the status loop calls ``observe``)."""

    def __init__(self) -> None:
        self._sent = 0
        self._restarts = 0

    def observe(self, status: Mapping[str, Any]) -> None:
        sent, restarts = int(status.get("replay_sent", 0)), int(status.get("restarts", 0))
        # A new replay starts its count at 0 again: everything it reports is new.
        REPLAY_EVENTS_SENT.inc(sent - self._sent if sent >= self._sent else sent)
        RESTARTS.inc(max(0, restarts - self._restarts))
        if "dead_letter_window_ratio" in status:
            DEAD_LETTER_WINDOW_RATIO.set(float(status["dead_letter_window_ratio"]))
        self._sent, self._restarts = sent, max(restarts, self._restarts)


# -- source 1: the pipeline's status snapshots ----------------------------------------------------------
# series <- the status keys it is read from, the first one present
STATUS_GAUGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('loss{term="total"}', ("loss",)),
    ('loss{term="main"}', ("loss_main",)),
    ('loss{term="i2i"}', ("loss_i2i",)),
    ('loss{term="i2c"}', ("loss_i2c",)),
    ("model_lift_ratio", ("model_live_lift", "prequential_lift")),  # data time, as sitn_learner_model_lift_ratio
    ("fused_lift_ratio", ("fused_live_lift",)),
    ("fused_weight", ("fused_weight",)),
    ("rankable_ratio", ("prequential_rankable_ratio",)),
    ("freshness_p50_s", ("freshness_window_p50_s",)),
    ("freshness_p99_s", ("freshness_window_p99_s",)),
    ("consumer_lag_records", ("consumer_lag_records",)),
    ("prototype_agreement", ("proto_agreement",)),
    ("drift_alarms_total", ("drift_alarms_total",)),
    ("drift_alarms_active", ("drift_alarms_active",)),
    ("publish_lag_p99_s", ("publish_lag_window_p99_s",)),
    ("publish_gate_closed", ("gate_closed",)),
)
# series <- the status total whose increase per second it is
STATUS_RATES: tuple[tuple[str, str], ...] = (
    ("events_decoded_per_s", "events_decoded"),
    ("examples_trained_per_s", "events_applied"),
)
# '<ranker>_<hr|ndcg>_at_10_window': the learner's figure of each ranker over the last window of target events
_RANKER_FIGURE = re.compile(r"(?P<ranker>[a-z_]+)_(?P<figure>hr|ndcg)_at_10_window")
_PARTS = {"learner": "learner_error", "consumers": "consumer_error"}  # part -> the key saying it did not answer


def status_points(status: Mapping[str, Any]) -> dict[str, float]:
    """The gauge points of one status snapshot (rates need two: :class:`StatusSeries`); non-finite dropped.

    >>> status_points({"loss": 2.5, "gate_closed": 0.0, "fused_ndcg_at_10_window": 0.02,
    ...                "fused_ndcg_at_10_window_rankable": 0.04, "served_by": "fused", "freshness_window_p50_s": math.nan})
    {'loss{term="total"}': 2.5, 'publish_gate_closed': 0.0, 'ndcg_at_10{ranker="fused"}': 0.02,
     'serving_ranker{served_by="model"}': 0.0, 'serving_ranker{served_by="fused"}': 1.0,
     'serving_ranker{served_by="popularity"}': 0.0, 'serving_ranker{served_by="cooccurrence"}': 0.0}
    """
    out: dict[str, float] = {}
    for series, keys in STATUS_GAUGES:
        key = next((k for k in keys if k in status), None)
        if key is not None:
            out[series] = float(status[key])
    for key, value in status.items():
        match = _RANKER_FIGURE.fullmatch(key)
        if match is not None:
            out[f'{match["figure"]}_at_10{{ranker="{match["ranker"]}"}}'] = float(value)
    if isinstance(status.get("served_by"), str):
        for name in SERVED_BY:
            out[f'serving_ranker{{served_by="{name}"}}'] = 1.0 if name == status["served_by"] else 0.0
    return {name: value for name, value in out.items() if math.isfinite(value)}


def status_targets(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The processes a snapshot heard from: the learner, the consumers (one answer for the fleet) and each
    serving replica, each ``up`` or not with the error it gave."""
    rows = [{"component": part, "address": "", "up": key not in status, "error": status.get(key), "scrape_s": None}
            for part, key in _PARTS.items()]
    for replica in status.get("serving_replicas") or []:
        pid = replica.get("pid")
        rows.append({"component": f"serving-{replica['replica']}", "address": f"pid {pid}" if pid else "",
                     "up": bool(replica.get("alive")), "error": None, "scrape_s": None})
    return rows


@dataclass
class StatusSeries:
    """Ring buffers of ``capacity`` points per series, fed with status snapshots (``observe``).

    ``interval_s``: how often the status loop observes (reported, not enforced). Thread-safe: the status
    loop observes while the HTTP server reads.
    """

    interval_s: float = 1.0
    capacity: int = 1800
    clock: Callable[[], float] = time.time
    _series: dict[str, deque[tuple[float, float]]] = field(default_factory=dict, init=False)
    _totals: dict[str, tuple[float, float]] = field(default_factory=dict, init=False)  # key -> (t, total)
    _targets: list[dict[str, Any]] = field(default_factory=list, init=False)
    _window_s: float | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    rounds: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)
    last_s: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s!r}")
        if self.capacity < 2:
            raise ValueError(f"capacity must be >= 2 points, got {self.capacity!r}")

    def observe(self, status: Mapping[str, Any], t_s: float | None = None) -> dict[str, float]:
        """Append the points of ``status`` taken at ``t_s`` (default: now); returns them."""
        t_s = self.clock() if t_s is None else t_s
        points = status_points(status)
        with self._lock:
            for series, key in STATUS_RATES:
                if key not in status:
                    continue
                total, before = float(status[key]), self._totals.get(key)
                self._totals[key] = (t_s, total)
                if before is not None and t_s > before[0] and total >= before[1]:
                    points[series] = (total - before[1]) / (t_s - before[0])
            for name, value in points.items():
                self._series.setdefault(name, deque(maxlen=self.capacity)).append((t_s, value))
            self._targets = status_targets(status)
            self._window_s = status.get("freshness_window_s", self._window_s)
            self.rounds += 1
            self.failures += any(not row["up"] for row in self._targets)
            self.last_s = t_s
        return points

    def series(self) -> dict[str, Any]:
        """Every series as parallel lists ``{"t": [...], "v": [...]}`` (JSON-ready)."""
        with self._lock:
            series = {name: {"t": [t for t, _ in buf], "v": [v for _, v in buf]}
                      for name, buf in sorted(self._series.items())}
            return {"source": "status", "now_s": self.clock(), "interval_s": self.interval_s,
                    "window_s": self._window_s, "rounds": self.rounds, "scrape_failures": self.failures,
                    "targets_up": sum(row["up"] for row in self._targets), "targets": len(self._targets),
                    "errors": [], "series": series}

    def targets(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(row) for row in self._targets]

    def health(self) -> dict[str, Any]:
        age_s = None if self.last_s is None else self.clock() - self.last_s
        return {"ok": True, "source": "status", "snapshots": self.rounds, "last_snapshot_age_s": age_s}


# -- source 2: a Prometheus server ------------------------------------------------------------------------
class PrometheusError(Exception):
    """Prometheus did not answer, or answered with an error."""


@dataclass
class PrometheusSeries:
    """The page's series from Prometheus at ``url``: per request, ``query_range`` over the last ``range_s``
    at a step of ``interval_s``, ``rate`` over ``window_s`` (``sitn.promql``).

    Requests use the standard library's ``urllib``, not httpx: httpx logs every request at INFO, which would
    put a dozen lines per page refresh into the operator's log (and through ``sitn run``'s live table).
    """

    url: str
    interval_s: float = 2.0
    range_s: float = 3600.0
    window_s: float = 30.0
    timeout_s: float = 5.0
    queries: tuple[SeriesQuery, ...] = QUERIES
    clock: Callable[[], float] = time.time
    rounds: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for name in ("interval_s", "range_s", "window_s", "timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.range_s / self.interval_s > 11_000:  # Prometheus refuses more points per series
            raise ValueError(f"range_s / interval_s must be <= 11000 points, got {self.range_s / self.interval_s:g}")
        self.url = self.url.rstrip("/")

    def _get(self, path: str, **params: Any) -> Any:
        """``data`` of a Prometheus API answer; :class:`PrometheusError` on anything else."""
        address = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(address, timeout=self.timeout_s) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 4xx/5xx carry {"status": "error", "error": ...}
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise PrometheusError(f"{path} answered {exc.code}: {detail}") from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise PrometheusError(f"{path}: {type(exc).__name__}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def _failed(self, what: str, exc: PrometheusError) -> str:
        self.failures += 1
        PROMETHEUS_QUERY_FAILURES.inc()
        log.warning("prometheus request failed url=%s what=%s error=%s", self.url, what, exc)
        return f"{what}: {exc}"

    def series(self) -> dict[str, Any]:
        """Every query's series over the last ``range_s``; a query that fails is left out and named in
        ``errors`` (an unreachable Prometheus ends the round at the first failure)."""
        end_s = round(self.clock(), 3)  # as sent: Prometheus's times are whole milliseconds
        start_s = end_s - self.range_s
        series: dict[str, dict[str, list[float]]] = {}
        errors: list[str] = []
        for query in self.queries:
            try:
                data = self._get("/api/v1/query_range", query=query.render(self.window_s), start=f"{start_s:.3f}",
                                 end=f"{end_s:.3f}", step=f"{self.interval_s:g}")
            except PrometheusError as exc:
                errors.append(self._failed(query.series, exc))
                if not isinstance(exc.__cause__, urllib.error.HTTPError):
                    break  # not answering at all: the other queries would wait for the same timeout
                continue
            series.update(matrix_series(query, data["result"]))
        targets = self.targets() if not errors else []
        self.rounds += 1
        return {"source": "prometheus", "prometheus_url": self.url, "now_s": end_s, "interval_s": self.interval_s,
                "window_s": self.window_s, "rounds": self.rounds, "scrape_failures": self.failures,
                "targets_up": sum(t["up"] for t in targets), "targets": len(targets), "errors": errors,
                "series": dict(sorted(series.items()))}

    def targets(self) -> list[dict[str, Any]]:
        """Prometheus's active targets of the run (those with a ``component`` label: ``stream.exporter``)."""
        try:
            active = self._get("/api/v1/targets", state="active")["activeTargets"]
        except PrometheusError as exc:
            self._failed("targets", exc)
            return []
        return [{"component": t["labels"]["component"], "address": t["labels"].get("instance", ""),
                 "up": t["health"] == "up", "error": t.get("lastError") or None,
                 "scrape_s": t.get("lastScrapeDuration")}
                for t in active if "component" in t["labels"]]

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=min(self.timeout_s, 1.0)) as response:
                ready = response.status == 200
        except (OSError, http.client.HTTPException):
            ready = False
        return {"ok": True, "source": "prometheus", "prometheus_url": self.url, "prometheus_ready": ready}


Source = StatusSeries | PrometheusSeries


# -- HTTP ------------------------------------------------------------------------------------------------------
def create_dashboard_app(source: Source) -> Any:
    """FastAPI app: ``/dashboard``, ``/api/series``, ``/api/targets``, ``/metrics``, ``/healthz``."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, RedirectResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="sitn-stream driver", docs_url=None, redoc_url=None)
    page = PAGE.read_text(encoding="utf-8")  # read once: a missing file fails at start-up, not per request

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/series")
    def series() -> dict[str, Any]:
        return source.series()

    @app.get("/api/targets")
    def targets() -> dict[str, Any]:
        return {"source": _source_name(source), "targets": source.targets()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return source.health()

    return app


def _source_name(source: Source) -> str:
    return "prometheus" if isinstance(source, PrometheusSeries) else "status"


@dataclass
class DashboardHandle:
    """The running ops server: ``url`` (of ``/dashboard``'s server), its ``source``; ``observe(status)`` each
    status tick; ``stop()`` ends it."""

    url: str
    source: Source
    server: Any
    target_file: Path | None
    metrics: PipelineMetrics = field(default_factory=PipelineMetrics)

    def observe(self, status: Mapping[str, Any]) -> None:
        """One status snapshot (``Pipeline.status()``): the driver's counters, and the page's series
        unless they come from Prometheus."""
        self.metrics.observe(status)
        if isinstance(self.source, StatusSeries):
            self.source.observe(status)

    def stop(self) -> None:
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)
            self.target_file = None
        self.server.stop()


def start_dashboard(settings: TelemetrySettings, targets_dir: Path, interval_s: float = 1.0,
                    capacity: int = 1800) -> DashboardHandle:
    """Serve the dashboard on ``settings.dashboard_host:dashboard_port`` (0: any free port) and register the
    driver's ``/metrics`` in ``targets_dir`` so Prometheus scrapes it too.

    ``interval_s``: the status loop's period (``RunSettings.status_every_s``), or with
    ``settings.prometheus_url`` the step of the queries; ``capacity``: points kept (or asked for) per series.
    """
    from serving.api import serve_in_thread
    from stream.errors import ConfigError
    from stream.exporter import _advertised, register_existing

    directory = Path(settings.targets_dir or targets_dir)
    source: Source
    if settings.prometheus_url is not None:
        source = PrometheusSeries(settings.prometheus_url, interval_s=interval_s, range_s=capacity * interval_s)
    else:
        source = StatusSeries(interval_s=interval_s, capacity=capacity)
    try:
        server = serve_in_thread(create_dashboard_app(source), settings.dashboard_host, settings.dashboard_port)
    except (RuntimeError, TimeoutError) as exc:
        raise ConfigError(
            f"dashboard could not listen on {settings.dashboard_host}:{settings.dashboard_port} ({exc}); "
            "set SITN_METRICS_DASHBOARD_PORT to a free port (0 = any)"
        ) from exc
    url = f"http://{_advertised(settings, settings.dashboard_host)}:{server.port}"
    target_file = register_existing(settings, "driver", url, directory)
    log.info("dashboard url=%s/dashboard source=%s targets_dir=%s", url, _source_name(source), directory)
    return DashboardHandle(url, source, server, target_file)
