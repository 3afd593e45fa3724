"""The driver's dashboard: its status-snapshot source on hand-written snapshots (exact points and rates),
the PromQL source's pure parts and its failures against a real unreachable address, the HTTP API over a
real server, and, marked ray/slow, the page in headless Chromium against a small live pipeline fed by its
own status snapshots (every chart has data; the screenshot is kept as an artifact). The query_range path
against a real Prometheus server is in ``tests/test_prometheus_scrape.py``."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from sitn import dashboard
from sitn.dashboard import (
    PipelineMetrics,
    PrometheusSeries,
    StatusSeries,
    create_dashboard_app,
    status_points,
    status_targets,
)
from sitn.promql import QUERIES, matrix_series
from stream.exporter import TelemetrySettings
from tests.conftest import skip_or_fail
from tests.test_pipeline import wait_for

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "var" / "artifacts" / "dashboard.png"


def snapshot(events_decoded: float, events_applied: float, **more: Any) -> dict[str, Any]:
    """A status snapshot as ``Pipeline.status()`` builds it (the keys the dashboard reads, and some it ignores)."""
    status: dict[str, Any] = {
        "replay_sent": 3000, "restarts": 0, "rss_mb": {"learner": 900.0}, "step": 40.0,
        "events_decoded": events_decoded, "events_applied": events_applied, "records_in": events_decoded,
        "loss": 5.25, "loss_main": 4.5, "loss_i2i": 0.5, "loss_i2c": 0.25, "proto_agreement": 0.625,
        "prequential_ndcg_at_10": 0.125, "prequential_rankable_ratio": 0.75, "prequential_lift": 0.25,
        "model_live_lift": 0.5, "fused_lift": 1.0, "fused_live_lift": 1.25,
        "model_ndcg_at_10_window": 0.125, "model_ndcg_at_10_window_rankable": 0.25,
        "model_ndcg_at_10_stream": 0.1, "cooc_target_ndcg_at_10_window": 0.375, "fused_live_ndcg_at_10_window": 0.5,
        "model_hr_at_10_window": 0.25, "popularity_hr_at_10_window": 0.5,
        "gate_closed": 1.0, "gate_served_ndcg": 0.2, "drift_alarms_total": 3.0, "drift_alarms_active": 1.0,
        "publish_lag_window_p99_s": 0.75, "served_by": "fused", "fused_weight": 2.0, "freshness_p50_s": 9.0, "freshness_window_s": 30.0,
        "freshness_window_p50_s": 0.5, "freshness_window_p99_s": 2.0, "consumer_lag_records": 13,
        "serving_replicas": [{"replica": 0, "alive": True, "pid": 4242, "listening": True, "served_version": 7.0}],
    }
    status.update(more)
    return status


POINTS = {
    'loss{term="total"}': 5.25, 'loss{term="main"}': 4.5, 'loss{term="i2i"}': 0.5, 'loss{term="i2c"}': 0.25,
    "model_lift_ratio": 0.5, "fused_lift_ratio": 1.25, "fused_weight": 2.0, "rankable_ratio": 0.75,
    "freshness_p50_s": 0.5, "freshness_p99_s": 2.0, "consumer_lag_records": 13.0, "prototype_agreement": 0.625,
    "drift_alarms_total": 3.0, "drift_alarms_active": 1.0, "publish_lag_p99_s": 0.75, "publish_gate_closed": 1.0,
    'ndcg_at_10{ranker="model"}': 0.125, 'ndcg_at_10{ranker="cooc_target"}': 0.375,
    'ndcg_at_10{ranker="fused_live"}': 0.5, 'hr_at_10{ranker="model"}': 0.25, 'hr_at_10{ranker="popularity"}': 0.5,
    'serving_ranker{served_by="model"}': 0.0, 'serving_ranker{served_by="fused"}': 1.0,
    'serving_ranker{served_by="popularity"}': 0.0, 'serving_ranker{served_by="cooccurrence"}': 0.0,
}


def test_status_points_read_each_figure_the_processes_computed() -> None:
    assert status_points(snapshot(100, 50)) == POINTS
    # the model's lift at data time when the learner has it, else the served model's; nan is no point
    assert status_points({"prequential_lift": 0.25, "freshness_window_p99_s": float("nan")}) == {"model_lift_ratio": 0.25}
    assert status_points({"learner_error": "RayActorError"}) == {}


def test_status_series_rates_skip_a_total_that_went_down_and_buffers_are_bounded() -> None:
    s = StatusSeries(interval_s=2.0, capacity=3)
    assert "events_decoded_per_s" not in s.observe(snapshot(100, 50), t_s=10.0)  # one snapshot: no rate yet
    assert {k: v for k, v in s.observe(snapshot(300, 90), t_s=12.0).items() if k.endswith("_per_s")} == {
        "events_decoded_per_s": 100.0, "examples_trained_per_s": 20.0}
    # a consumer replaced (its count starts again) and a learner restored from its checkpoint: no rate point
    assert not any(k.endswith("_per_s") for k in s.observe(snapshot(250, 60), t_s=14.0))
    assert s.observe(snapshot(290, 61), t_s=18.0)["events_decoded_per_s"] == 10.0  # from the snapshot after the drop
    body = s.series()
    assert body["series"]["events_decoded_per_s"] == {"t": [12.0, 18.0], "v": [100.0, 10.0]}
    assert body["series"]['loss{term="total"}'] == {"t": [12.0, 14.0, 18.0], "v": [5.25] * 3}  # capacity 3
    assert (body["source"], body["window_s"], body["rounds"], body["scrape_failures"]) == ("status", 30.0, 4, 0)
    assert (body["targets_up"], body["targets"], body["errors"]) == (3, 3, [])
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        StatusSeries(interval_s=0)
    with pytest.raises(ValueError, match="capacity must be >= 2 points, got 1"):
        StatusSeries(capacity=1)


def test_status_targets_say_which_part_did_not_answer() -> None:
    rows = status_targets(snapshot(0, 0, consumer_error="RayActorError", serving_replicas=[
        {"replica": 0, "alive": True, "pid": 11}, {"replica": 1, "alive": False, "pid": None}]))
    assert [(r["component"], r["address"], r["up"], r["error"]) for r in rows] == [
        ("learner", "", True, None), ("consumers", "", False, "RayActorError"),
        ("serving-0", "pid 11", True, None), ("serving-1", "", False, None)]
    s = StatusSeries()
    s.observe(snapshot(0, 0, learner_error="GetTimeoutError"), t_s=1.0)
    assert (s.failures, s.series()["targets_up"]) == (1, 2)


def test_pipeline_metrics_count_increases_only() -> None:
    def value(name: str) -> float:
        got = dashboard.REGISTRY.get_sample_value(name)
        assert got is not None
        return got

    sent0, restarts0 = value("sitn_pipeline_replay_events_sent_total"), value("sitn_pipeline_restarts_total")
    m = PipelineMetrics()
    for status in ({"replay_sent": 100, "restarts": 0}, {"replay_sent": 250, "restarts": 1},
                   {"replay_sent": 40, "restarts": 1}):  # a new replay starts again at 0
        m.observe(status)
    assert value("sitn_pipeline_replay_events_sent_total") - sent0 == 290
    assert value("sitn_pipeline_restarts_total") - restarts0 == 1


# -- the PromQL source -------------------------------------------------------------------------------------
def test_queries_render_their_window_and_name_a_series_per_label_value() -> None:
    decoded = next(q for q in QUERIES if q.series == "events_decoded_per_s")
    assert decoded.render(30) == "sum by (domain) (rate(sitn_stream_events_decoded_total[30s]))"
    assert decoded.render(2.5) == "sum by (domain) (rate(sitn_stream_events_decoded_total[2.5s]))"
    with pytest.raises(ValueError, match="window_s must be > 0, got 0"):
        decoded.render(0)
    result = [{"metric": {"domain": "book"}, "values": [[100, "2"], [102, "3.5"]]},
              {"metric": {"domain": "movie"}, "values": [[100, "NaN"], [102, "+Inf"]]}]  # nothing finite: no series
    assert matrix_series(decoded, result) == {'events_decoded_per_s{domain="book"}': {"t": [100.0, 102.0],
                                                                                        "v": [2.0, 3.5]}}
    # every series the page draws has a query, every query a series the page draws
    page = dashboard.PAGE.read_text()
    prefixes = [p for chart in page.split('data-series="')[1:] for p in chart.split('"')[0].split(",")]
    assert {q.series for q in QUERIES} == {p.rstrip("{") for p in prefixes}
    assert len({q.series for q in QUERIES}) == len(QUERIES)


def test_prometheus_source_validates_and_reports_an_unreachable_server() -> None:
    with pytest.raises(ValueError, match="range_s / interval_s must be <= 11000 points, got 36000"):
        PrometheusSeries("http://127.0.0.1:9", interval_s=0.1, range_s=3600)
    with pytest.raises(ValueError, match="window_s must be > 0, got -1"):
        PrometheusSeries("http://127.0.0.1:9", window_s=-1)
    failures0 = dashboard.REGISTRY.get_sample_value("sitn_dashboard_prometheus_query_failures_total") or 0.0
    source = PrometheusSeries("http://127.0.0.1:9/", timeout_s=2)  # discard port: connection refused
    body = source.series()
    # the first query fails and ends the round: the others would wait for the same answer
    assert (body["source"], body["prometheus_url"], body["series"], body["targets"]) == (
        "prometheus", "http://127.0.0.1:9", {}, 0)
    assert len(body["errors"]) == 1 and body["errors"][0].startswith(f"{QUERIES[0].series}: /api/v1/query_range: ")
    assert "ConnectionRefused" in body["errors"][0] or "Connection refused" in body["errors"][0]
    assert source.targets() == []
    assert (source.failures, dashboard.REGISTRY.get_sample_value(
        "sitn_dashboard_prometheus_query_failures_total")) == (2, failures0 + 2)
    assert source.health() == {"ok": True, "source": "prometheus", "prometheus_url": "http://127.0.0.1:9",
                               "prometheus_ready": False}


# -- HTTP ----------------------------------------------------------------------------------------------------
def test_app_serves_the_status_series_page_and_driver_metrics() -> None:
    from serving.api import serve_in_thread

    source = StatusSeries(interval_s=2.0, clock=lambda: 1003.0)
    source.observe(snapshot(100, 50), t_s=1000.0)
    source.observe(snapshot(300, 90), t_s=1002.0)
    server = serve_in_thread(create_dashboard_app(source))
    client = httpx.Client(base_url=server.url, timeout=5)
    try:
        body = client.get("/api/series").json()
        assert body["series"]["consumer_lag_records"] == {"t": [1000.0, 1002.0], "v": [13.0, 13.0]}
        assert body["series"]["examples_trained_per_s"] == {"t": [1002.0], "v": [20.0]}
        assert (body["now_s"], body["targets_up"], body["targets"], body["rounds"]) == (1003.0, 3, 3, 2)
        targets = client.get("/api/targets").json()
        assert targets["source"] == "status"
        assert [(t["component"], t["up"]) for t in targets["targets"]] == [
            ("learner", True), ("consumers", True), ("serving-0", True)]
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert chart_points(page.text) == dict.fromkeys(CHARTS, 0)  # before the script runs
        assert "http" not in page.text.split("<script>")[1]  # nothing fetched from elsewhere
        metrics = client.get("/metrics").text
        for name in ("sitn_pipeline_replay_events_sent_total", "sitn_pipeline_restarts_total",
                     "sitn_dashboard_prometheus_query_failures_total", "process_cpu_seconds_total"):
            assert name in metrics
        assert "sitn_stream_events_decoded" not in metrics  # the driver's own registry only
        assert client.get("/healthz").json() == {"ok": True, "source": "status", "snapshots": 2,
                                                 "last_snapshot_age_s": 1.0}
    finally:
        client.close()
        server.stop()


def test_start_dashboard_serves_registers_the_driver_observes_and_stops(tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    handle = dashboard.start_dashboard(TelemetrySettings(dashboard_port=0), targets, interval_s=0.5)
    try:
        assert isinstance(handle.source, StatusSeries)
        assert handle.target_file is not None and handle.target_file.is_file()
        sent0 = dashboard.REGISTRY.get_sample_value("sitn_pipeline_replay_events_sent_total") or 0.0
        handle.observe(snapshot(100, 50, replay_sent=120))
        assert dashboard.REGISTRY.get_sample_value("sitn_pipeline_replay_events_sent_total") == sent0 + 120
        series = httpx.get(f"{handle.url}/api/series", timeout=5).json()["series"]
        assert series["publish_gate_closed"]["v"] == [1.0]
    finally:
        handle.stop()
    assert handle.target_file is None and not list(targets.glob("driver-*.json"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{handle.url}/healthz", timeout=2)
    with_prometheus = dashboard.start_dashboard(
        TelemetrySettings(dashboard_port=0, prometheus_url="http://127.0.0.1:9/"), targets, interval_s=2.0, capacity=900)
    try:
        source = with_prometheus.source
        assert isinstance(source, PrometheusSeries)
        assert (source.url, source.interval_s, source.range_s) == ("http://127.0.0.1:9", 2.0, 1800.0)
        with_prometheus.observe(snapshot(100, 50))  # the driver's counters only: Prometheus keeps the series
    finally:
        with_prometheus.stop()


def test_prometheus_url_setting_is_validated_and_sitn_run_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sitn.commands.run as run_command
    from sitn.cli import build_parser
    from stream.errors import ConfigError

    with pytest.raises(ValueError, match=r"prometheus_url must be http\(s\)://host\[:port\]\[/path\], got '127.0.0.1:9090'"):
        TelemetrySettings(prometheus_url="127.0.0.1:9090")
    assert TelemetrySettings(prometheus_url="https://prom.example:9090/").prometheus_url == "https://prom.example:9090"
    flags = run_command._telemetry_flags()
    monkeypatch.setenv("SITN_METRICS_PROMETHEUS_URL", "http://from-env:9090")
    assert flags.build(build_parser().parse_args(["run"])).prometheus_url == "http://from-env:9090"
    given = build_parser().parse_args(["run", "--prometheus-url", "http://127.0.0.1:9090/"])
    assert flags.build(given).prometheus_url == "http://127.0.0.1:9090"  # the flag wins
    with pytest.raises(ConfigError, match=r"--prometheus-url: .*prometheus_url must be http\(s\)://"):
        flags.build(build_parser().parse_args(["run", "--prometheus-url", "prometheus:9090"]))


CHARTS = ("chart-quality", "chart-hr", "chart-lift", "chart-throughput", "chart-loss", "chart-freshness",
          "chart-lag", "chart-agreement", "chart-drift")


class _Charts(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.points: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("class") == "chart":
            self.points[str(a.get("id"))] = int(a.get("data-points") or -1)


def chart_points(page: str) -> dict[str, int]:
    """``data-points`` of every chart container in an HTML document, by element id."""
    parser = _Charts()
    parser.feed(page)
    return parser.points


# -- against a small live pipeline, in a real browser -----------------------------------------------------
N_EVENTS = 3000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_metrics_pipeline(tmp_path: Path, rate_events_per_s: float | None) -> Any:
    """A small pipeline on the embedded log whose actors expose metrics under ``<run>/metrics/targets``
    (the settings of ``tests/test_pipeline.py``'s, plus telemetry)."""
    from serving.settings import ServingSettings
    from sitn.pipeline import Pipeline
    from sitn.settings import RunSettings
    from stream.settings import StreamSettings
    from tests.test_pipeline import small_config

    run = RunSettings(events=None, rate_events_per_s=rate_events_per_s, batch_size=64, checkpoint_every_steps=20,
                      publish_every_steps=3, publish_every_s=0.5, full_publish_every=5, torch_threads=1,
                      learner_dim=16, learner_views=2, learner_max_len=10, consumers=2)
    stream = StreamSettings(
        embedded_log_dir=tmp_path / "log", topic_interactions=f"t-{uuid.uuid4().hex[:8]}",
        topic_dead_letters=f"dl-{uuid.uuid4().hex[:8]}", topic_embedding_updates=f"up-{uuid.uuid4().hex[:8]}",
        consumer_group=f"g-{uuid.uuid4().hex[:8]}", partitions=2, batch_size=500, poll_timeout_s=0.2,
    )
    serving_settings = ServingSettings(port=0, dim=16, index_factory="Flat", index_search_params={})
    metrics = TelemetrySettings(enabled=True, host="127.0.0.1", actor_port=0, dashboard_port=0)
    return Pipeline(run, stream, serving_settings, small_config(), tmp_path / "run", metrics=metrics)


def run_chromium(args: list[str], profile: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


@pytest.mark.ray
@pytest.mark.slow
def test_dashboard_in_headless_chromium(tmp_path: Path, ray_cluster: Any, events_csv: Path) -> None:
    if CHROMIUM is None:
        skip_or_fail("chromium not installed (infra/test.sh installs the Debian package)")
    from stream.dataset import load_events

    events = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
    pipeline = make_metrics_pipeline(tmp_path, rate_events_per_s=1000.0)
    t0 = time.monotonic()
    pipeline.start()
    phases_s = {"pipeline start": time.monotonic() - t0}
    handle = None
    try:
        assert pipeline.targets_dir is not None and pipeline.metrics is not None
        handle = dashboard.start_dashboard(pipeline.metrics, pipeline.targets_dir, interval_s=1.0)
        pipeline.start_replay(events)
        wanted = {c: PREFIXES[c] for c in CHARTS}

        def status_tick() -> bool:  # what sitn run's status loop does each tick
            assert handle is not None
            status = pipeline.status()
            handle.observe(status)
            series = handle.source.series()["series"]
            return (all(any(name.startswith(p) for name in series for p in prefixes) for prefixes in wanted.values())
                    and pipeline.caught_up(status))

        wait_for(status_tick, 75, "points on every chart", pipeline)
        phases_s["replay until every chart has points"] = time.monotonic() - t0 - sum(phases_s.values())
        series = handle.source.series()["series"]
        for prefix in ("events_decoded_per_s", "examples_trained_per_s"):  # the replay was seen flowing
            assert max(v for name, s in series.items() if name.startswith(prefix) for v in s["v"]) > 0, prefix
        components = {t["component"] for t in handle.source.targets() if t["up"]}
        assert components == {"learner", "consumers", "serving-0"}
        url = f"{handle.url}/dashboard"
        dom = run_chromium(["--virtual-time-budget=4000", "--dump-dom", url], tmp_path / "profile").stdout
        points = chart_points(dom)
        assert set(points) == set(CHARTS)
        assert all(n > 0 for n in points.values()), points
        shot = tmp_path / "dashboard.png"
        run_chromium(["--virtual-time-budget=4000", "--window-size=1400,1000", f"--screenshot={shot}", url],
                     tmp_path / "profile")
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        phases_s["chromium: DOM and screenshot"] = time.monotonic() - t0 - sum(phases_s.values())
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, ARTIFACT)
        print(f"dashboard screenshot: {ARTIFACT} (and {shot}); chart points {points}; "
              f"seconds {({k: round(v, 1) for k, v in phases_s.items()})}")
    finally:
        if handle is not None:
            handle.stop()
        pipeline.stop()


# The series-name prefixes each chart draws (the page's data-series attributes).
PREFIXES = {
    "chart-throughput": ("events_decoded_per_s", "examples_trained_per_s"),
    "chart-loss": ("loss{",),
    "chart-quality": ("ndcg_at_10{",),
    "chart-hr": ("hr_at_10{",),
    "chart-lift": ("model_lift_ratio", "fused_lift_ratio", "fused_weight", "rankable_ratio", "serving_ranker{"),
    "chart-freshness": ("freshness_p50_s", "freshness_p99_s", "publish_lag_p99_s"),
    "chart-lag": ("consumer_lag_records",),
    "chart-agreement": ("prototype_agreement",),
    "chart-drift": ("drift_alarms_total", "drift_alarms_active", "publish_gate_closed"),
}
