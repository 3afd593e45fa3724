"""The driver's ops server: a local dashboard of the live system, and the driver's own ``/metrics``.

No Grafana is needed to watch a run. A :class:`MetricsCollector` thread scrapes every process registered
in the targets directory (``stream.exporter``: learner, consumers, serving) every ``interval_s``, parses
the text exposition, sums each metric across processes and appends *derived* points (rates, quantiles,
gauges) to bounded ring buffers. ``create_dashboard_app`` serves them:

- ``GET /dashboard``: one self-contained HTML page (``sitn/dashboard.html``) that polls ``/api/series``;
- ``GET /api/series``: every series as ``{"t": [unix s...], "v": [...]}``;
- ``GET /api/targets``: what the last round scraped, and whether each target answered;
- ``GET /metrics``: the driver's own registry (:data:`REGISTRY`); ``GET /healthz``.

How each series is derived (``derive``):

- *rates* (``events_decoded_per_s{domain}``, ``examples_trained_per_s``): counter increase between the
  last two rounds divided by their time apart. Increases are taken per process, then summed: a process
  whose counter went down was restarted, and its new value is its increase (as Prometheus's ``rate``
  does). A child (label value) that appeared since the previous round counts from 0 when it was created
  since then (``increase``); a process first seen with counts of unknown age contributes nothing.
- *quantiles* (``freshness_p50_s``, ``freshness_p99_s``, ``publish_lag_p99_s``): linear interpolation
  in the histogram's buckets, from the bucket *increases over the last* ``window_s`` (30 s by default),
  not the cumulative counts: what a run does now, not its average since start. It is the number
  ``histogram_quantile(q, sum by (le) (increase(x_bucket[30s])))`` gives in Prometheus. No observation
  in the window: no point.
- *gauges* (losses, consumer lag, prototype agreement, drift, the publish gate, quality): the sum over
  processes. Only one process sets each of these; an unlabelled gauge exports 0 from every other process
  that imported its module, so the sum is the owner's value.
- *quality*, the headline: ``ndcg_at_10{ranker}`` and ``hr_at_10{ranker}``, the prequential figures of the
  model and of the fused ranker (model and co-occurrence, ``serving.fused``), each as served at that moment
  of the replay (``model``, ``fused``) and at data time (``model_live``, ``fused_live``; ``learner.trainer``),
  and of each shadow baseline (popularity, co-occurrence with target history, with target and source
  history) over the last window of target events, all events (an unseen item is a miss);
  ``model_lift_ratio`` and ``fused_lift_ratio`` (data-time NDCG@10 / best baseline's, whole stream); ``fused_weight`` (the w served); ``rankable_ratio`` (window);
  ``serving_ranker{served_by}`` (1 for the ranker ``/recommend`` answers with, from serving).

Every series with a label (``domain``, ``term``, ``k``) has one buffer per label value; all those labels
are bounded (docs: ``stream.exporter``), so the number of buffers is too.
"""

from __future__ import annotations

import http.client
import logging
import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from stream.exporter import TelemetrySettings, read_targets

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
SCRAPE_FAILURES = Counter(
    "sitn_dashboard_scrape_failures", "Dashboard scrapes of a target that failed, by component.", ["component"],
    registry=REGISTRY,
)
TARGETS_UP = Gauge("sitn_dashboard_targets_up", "Targets that answered the dashboard's last round.",
                   registry=REGISTRY)
SCRAPE_ROUND_SECONDS = Histogram(
    "sitn_dashboard_scrape_round_seconds", "Seconds of one dashboard round over every target.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY,
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


# -- parsing and derivation (pure) -----------------------------------------------------------------------
SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


def parse_exposition(text: str) -> tuple[dict[SampleKey, float], set[str]]:
    """Samples of a Prometheus text exposition, and the names of the families it declares.

    ``_created`` samples (when a counter or histogram child was created, in the process's clock) are kept
    under their own names. A labelled metric with no child yet declares its family but has no samples:
    its sum is 0, not missing.

    >>> samples, families = parse_exposition('# HELP x_total X.\\n# TYPE x_total counter\\n'
    ...                                      'x_total{domain="book"} 3.0\\n# TYPE y gauge\\n')
    >>> samples, sorted(families)
    ({('x_total', (('domain', 'book'),)): 3.0}, ['x', 'y'])
    """
    samples: dict[SampleKey, float] = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples, families


@dataclass(frozen=True)
class Scrape:
    """One round: the samples of every target that answered, by address, and every family declared."""

    t_s: float
    samples: Mapping[str, Mapping[SampleKey, float]]
    families: frozenset[str] = frozenset()

    @classmethod
    def from_texts(cls, t_s: float, texts: Mapping[str, str]) -> Scrape:
        """Parse each target's exposition (``address -> text``)."""
        samples, families = {}, set()
        for address, text in texts.items():
            samples[address], declared = parse_exposition(text)
            families |= declared
        return cls(t_s, samples, frozenset(families))

    def select(self, name: str, **labels: str) -> Iterable[tuple[str, SampleKey, float]]:
        """``(address, key, value)`` of the samples called ``name`` whose labels include ``labels``."""
        for address, samples in self.samples.items():
            for key, value in samples.items():
                if key[0] == name and all((k, v) in key[1] for k, v in labels.items()):
                    yield address, key, value

    def total(self, name: str, **labels: str) -> float:
        return sum(v for _, _, v in self.select(name, **labels))

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """Samples called ``name`` whose labels include ``labels``, summed by the value of ``label``."""
        out: dict[str, float] = {}
        for _, key, value in self.select(name, **labels):
            group = dict(key[1]).get(label)
            if group is not None:
                out[group] = out.get(group, 0.0) + value
        return out


def increase(old: Scrape, new: Scrape, name: str, label: str | None = None) -> dict[str | None, float]:
    """Counter increase from ``old`` to ``new``, per process (a decrease is a restart), summed by ``label``.

    A child that did not exist at ``old`` counts from 0 if it was created after ``old`` was taken: a label
    value new in a process ``old`` has, or any child whose ``_created`` time is later than ``old.t_s`` (a
    process that started in between, such as a consumer actor whose first events came in a burst). A
    child of a process absent from ``old`` without such proof is skipped: it may have counted for long
    before the dashboard first saw it.

    >>> a = Scrape(0.0, {"p": {("c_total", ()): 5.0}, "q": {("c_total", ()): 9.0}})
    >>> b = Scrape(2.0, {"p": {("c_total", ()): 8.0}, "q": {("c_total", ()): 4.0}, "r": {("c_total", ()): 7.0},
    ...                  "s": {("c_total", ()): 6.0, ("c_created", ()): 1.5}})
    >>> increase(a, b, "c_total")  # p: +3; q restarted: +4; r: unknown start, skipped; s: created at 1.5: +6
    {None: 13.0}
    """
    out: dict[str | None, float] = {}
    for address, key, value in new.select(name):
        known = old.samples.get(address)
        if known is not None and key in known:
            before = known[key]
        elif known is not None or new.samples[address].get(_created_key(key), -math.inf) >= old.t_s:
            before = 0.0
        else:
            continue
        group = dict(key[1]).get(label) if label is not None else None
        out[group] = out.get(group, 0.0) + (value - before if value >= before else value)
    return out


def _created_key(key: SampleKey) -> SampleKey:
    """The ``_created`` sample of a counter's or histogram bucket's child (``x_total`` / ``x_bucket{le}``)."""
    name, labels = key
    base = name.removesuffix("_total").removesuffix("_bucket")
    return f"{base}_created", tuple(kv for kv in labels if kv[0] != "le")


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of cumulative bucket counts ``{upper bound: count}``, as Prometheus computes it.

    Linear interpolation inside the bucket that holds rank ``q * count``; the first bucket starts at 0; a
    rank in the ``+Inf`` bucket gives the highest finite bound. ``None`` without observations.

    >>> round(histogram_quantile(0.5, {0.1: 2.0, 0.5: 6.0, math.inf: 8.0}), 12)  # rank 4: half way in (0.1, 0.5]
    0.3
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf or buckets[math.inf] <= 0:
        return None
    rank = q * buckets[math.inf]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == math.inf:
                return lower if len(bounds) > 1 else None
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None


def bucket_increase(old: Scrape, new: Scrape, name: str) -> dict[float, float]:
    """Per-bucket increase of histogram ``name`` (its ``_bucket`` samples), summed over processes."""
    return {float(le): v for le, v in increase(old, new, f"{name}_bucket", label="le").items() if le is not None}


def derive(new: Scrape, previous: Scrape | None = None, window_start: Scrape | None = None) -> dict[str, float]:
    """The points of one round: rates since ``previous``, quantiles since ``window_start``, gauges now.

    A series whose metric no target declares has no point (e.g. drift, when no drift monitor runs).
    """
    out: dict[str, float] = {}
    has = new.families.__contains__
    if previous is not None and new.t_s > previous.t_s:
        dt_s = new.t_s - previous.t_s
        if has("sitn_stream_events_decoded"):
            for domain, n in increase(previous, new, "sitn_stream_events_decoded_total", "domain").items():
                out[f'events_decoded_per_s{{domain="{domain}"}}'] = n / dt_s
        if has("sitn_learner_examples_trained"):
            trained = increase(previous, new, "sitn_learner_examples_trained_total")
            out["examples_trained_per_s"] = trained.get(None, 0.0) / dt_s
    if window_start is not None:
        for series, metric, q in (("freshness_p50_s", "sitn_serving_freshness_seconds", 0.5),
                                  ("freshness_p99_s", "sitn_serving_freshness_seconds", 0.99),
                                  ("publish_lag_p99_s", "sitn_learner_publish_lag_seconds", 0.99)):
            value = histogram_quantile(q, bucket_increase(window_start, new, metric))
            if value is not None:
                out[series] = value
    for term, value in new.by_label("sitn_learner_loss", "term").items():
        out[f'loss{{term="{term}"}}'] = value
    for series, metric in (("ndcg_at_10", "sitn_learner_ranker_ndcg_at_10"), ("hr_at_10", "sitn_learner_ranker_hr_at_10")):
        for ranker, value in new.by_label(metric, "ranker", events="all", span="window").items():
            out[f'{series}{{ranker="{ranker}"}}'] = value
    for served_by, value in new.by_label("sitn_serving_ranker", "served_by").items():
        out[f'serving_ranker{{served_by="{served_by}"}}'] = value
    for series, metric, labels in (("model_lift_ratio", "sitn_learner_model_lift_ratio", {}),
                                   ("fused_lift_ratio", "sitn_learner_fused_lift_ratio", {}),
                                   ("fused_weight", "sitn_learner_fused_weight", {}),
                                   ("rankable_ratio", "sitn_learner_prequential_rankable_ratio", {"span": "window"})):
        if has(metric) and any(True for _ in new.select(metric, **labels)):
            out[series] = new.total(metric, **labels)
    for series, metric in (("publish_gate_closed", "sitn_learner_publish_gate_closed"),
                           ("consumer_lag_records", "sitn_stream_consumer_lag_records"),
                           ("drift_alarms_active", "sitn_drift_alarm_active")):
        if has(metric):
            out[series] = new.total(metric)
    if has("sitn_drift_alarms"):
        out["drift_alarms_total"] = new.total("sitn_drift_alarms_total")
    for k, value in new.by_label("sitn_learner_prototype_agreement", "k").items():
        out[f'prototype_agreement{{k="{k}"}}'] = value
    return {name: value for name, value in out.items() if math.isfinite(value)}


# -- the collector thread ----------------------------------------------------------------------------------
@dataclass
class TargetStatus:
    component: str
    address: str
    up: bool
    error: str | None = None
    scrape_s: float = 0.0


@dataclass
class MetricsCollector:
    """Scrapes every target in ``targets_dir`` each ``interval_s`` and keeps ``capacity`` points per series.

    ``skip_components``: targets not scraped (the driver itself: its registry is local, see ``REGISTRY``).
    Scrapes use the standard library's ``urllib``, not httpx: httpx logs every request at INFO, which
    would put two lines a second into the operator's log (and through ``sitn run``'s live table).
    """

    targets_dir: Path
    interval_s: float = 2.0
    capacity: int = 1800
    window_s: float = 30.0
    timeout_s: float = 1.5
    skip_components: tuple[str, ...] = ("driver",)
    clock: Callable[[], float] = time.time
    _series: dict[str, deque[tuple[float, float]]] = field(default_factory=dict, init=False)
    _history: deque[Scrape] = field(default_factory=deque, init=False)
    _targets: list[TargetStatus] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    rounds: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s!r}")
        if self.capacity < 2:
            raise ValueError(f"capacity must be >= 2 points, got {self.capacity!r}")
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sitn-dashboard-scrape")

    def ingest(self, scrape: Scrape) -> dict[str, float]:
        """Derive this round's points from ``scrape`` and the rounds before it; append and return them."""
        with self._lock:
            previous = self._history[-1] if self._history else None
            while len(self._history) > 1 and self._history[1].t_s <= scrape.t_s - self.window_s:
                self._history.popleft()  # keep one round at or before the window's start
            window_start = self._history[0] if self._history else None
            points = derive(scrape, previous, window_start)
            self._history.append(scrape)
            for name, value in points.items():
                self._series.setdefault(name, deque(maxlen=self.capacity)).append((scrape.t_s, value))
            self.rounds += 1
        return points

    def scrape_once(self) -> dict[str, float]:
        """Fetch every target's ``/metrics`` (unreachable ones are skipped and counted), then ``ingest``."""
        started_s = time.perf_counter()
        t_s = self.clock()
        targets = [(c, a) for c, a in read_targets(self.targets_dir) if c not in self.skip_components]
        # Concurrently: one slow process (a busy learner) must not delay the others' samples.
        results = list(self._pool.map(lambda target: self._fetch(*target), targets))
        samples: dict[str, dict[SampleKey, float]] = {}
        families: set[str] = set()
        for status, parsed in results:
            if parsed is not None:
                samples[status.address], declared = parsed
                families |= declared
        statuses = [status for status, _ in results]
        scrape = Scrape(t_s, samples, frozenset(families))
        with self._lock:
            self._targets = statuses
        TARGETS_UP.set(sum(s.up for s in statuses))
        points = self.ingest(scrape)
        SCRAPE_ROUND_SECONDS.observe(time.perf_counter() - started_s)
        return points

    def _fetch(self, component: str, address: str) -> tuple[TargetStatus, tuple[dict[SampleKey, float], set[str]] | None]:
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=self.timeout_s) as response:
                text = response.read().decode("utf-8")
            parsed = parse_exposition(text)
        except (OSError, http.client.HTTPException, ValueError) as exc:  # restarting, gone or unparsable: counted
            SCRAPE_FAILURES.labels(component).inc()
            with self._lock:
                self.failures += 1
            error = f"{type(exc).__name__}: {exc}"
            log.warning("scrape failed component=%s address=%s error=%s", component, address, error)
            return TargetStatus(component, address, False, error, time.perf_counter() - t0), None
        return TargetStatus(component, address, True, scrape_s=time.perf_counter() - t0), parsed

    def series(self) -> dict[str, Any]:
        """Every series as parallel lists ``{"t": [...], "v": [...]}`` (JSON-ready)."""
        with self._lock:
            series = {name: {"t": [t for t, _ in buf], "v": [v for _, v in buf]}
                      for name, buf in sorted(self._series.items())}
            up = sum(s.up for s in self._targets)
            return {"now_s": self.clock(), "interval_s": self.interval_s, "window_s": self.window_s,
                    "rounds": self.rounds, "scrape_failures": self.failures, "targets_up": up,
                    "targets": len(self._targets), "series": series}

    def targets(self) -> list[dict[str, Any]]:
        with self._lock:
            return [vars(s).copy() for s in self._targets]

    # -- thread --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sitn-dashboard-collector", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The collector thread runs (False before ``start()`` and after a round failed with a bug)."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scrape_once()
            except Exception:  # a bug: logged, re-raised (the thread ends; /healthz answers 503)
                log.exception("dashboard round failed")
                raise
            self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._pool.shutdown(wait=True)


# -- HTTP ------------------------------------------------------------------------------------------------------
def create_dashboard_app(collector: MetricsCollector) -> Any:
    """FastAPI app: ``/dashboard``, ``/api/series``, ``/api/targets``, ``/metrics``, ``/healthz``."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
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
        return collector.series()

    @app.get("/api/targets")
    def targets() -> dict[str, Any]:
        return {"targets_dir": str(collector.targets_dir), "targets": collector.targets()}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        alive = collector.alive
        return JSONResponse({"ok": alive, "collector_alive": alive, "rounds": collector.rounds},
                              status_code=200 if alive else 503)

    return app


@dataclass
class DashboardHandle:
    """The running ops server: ``url`` (of ``/dashboard``'s server), ``collector``; ``stop()`` ends both."""

    url: str
    collector: MetricsCollector
    server: Any
    target_file: Path | None

    def stop(self) -> None:
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)
            self.target_file = None
        self.collector.stop()
        self.server.stop()


def start_dashboard(settings: TelemetrySettings, targets_dir: Path, interval_s: float = 2.0,
                    capacity: int = 1800) -> DashboardHandle:
    """Serve the dashboard on ``settings.dashboard_host:dashboard_port`` (0: any free port), start the
    collector, and register the driver's ``/metrics`` in ``targets_dir`` so Prometheus scrapes it too."""
    from serving.api import serve_in_thread
    from stream.errors import ConfigError
    from stream.exporter import _advertised, register_existing

    directory = Path(settings.targets_dir or targets_dir)
    collector = MetricsCollector(directory, interval_s=interval_s, capacity=capacity)
    try:
        server = serve_in_thread(create_dashboard_app(collector), settings.dashboard_host, settings.dashboard_port)
    except (RuntimeError, TimeoutError) as exc:
        raise ConfigError(
            f"dashboard could not listen on {settings.dashboard_host}:{settings.dashboard_port} ({exc}); "
            "set SITN_METRICS_DASHBOARD_PORT to a free port (0 = any)"
        ) from exc
    url = f"http://{_advertised(settings, settings.dashboard_host)}:{server.port}"
    target_file = register_existing(settings, "driver", url, directory)
    collector.start()
    log.info("dashboard url=%s/dashboard targets_dir=%s interval_s=%s", url, directory, interval_s)
    return DashboardHandle(url, collector, server, target_file)

