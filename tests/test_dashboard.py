"""The driver's dashboard: the collector's parsing and derivation on hand-written expositions (exact
numbers), its HTTP API over real exporters, and, marked ray/slow, the page in headless Chromium against
a small live pipeline (every chart has data; the screenshot is kept as an artifact)."""

from __future__ import annotations

import html.parser
import math
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from sitn import dashboard
from sitn.dashboard import (
    MetricsCollector,
    PipelineMetrics,
    Scrape,
    create_dashboard_app,
    derive,
    histogram_quantile,
    increase,
    parse_exposition,
)
from stream.exporter import TelemetrySettings, write_target
from tests.conftest import skip_or_fail
from tests.test_pipeline import wait_for

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "var" / "artifacts" / "dashboard.png"

# -- hand-written expositions: a learner, two consumers and serving, two rounds 2 s apart ----------------
LEARNER_0 = """\
# HELP sitn_learner_examples_trained_total Examples trained on, by domain.
# TYPE sitn_learner_examples_trained_total counter
sitn_learner_examples_trained_total{domain="movie"} 1000.0
sitn_learner_examples_trained_total{domain="book"} 200.0
sitn_learner_examples_trained_created{domain="movie"} 1.7e9
# HELP sitn_learner_loss Loss of the last step, by term.
# TYPE sitn_learner_loss gauge
sitn_learner_loss{term="total"} 6.0
# HELP sitn_learner_prequential_ndcg_at_10 NDCG
# TYPE sitn_learner_prequential_ndcg_at_10 gauge
sitn_learner_prequential_ndcg_at_10 0.0
# HELP sitn_learner_publish_lag_seconds lag
# TYPE sitn_learner_publish_lag_seconds histogram
sitn_learner_publish_lag_seconds_bucket{le="0.5"} 10.0
sitn_learner_publish_lag_seconds_bucket{le="1.0"} 10.0
sitn_learner_publish_lag_seconds_bucket{le="+Inf"} 10.0
sitn_learner_publish_lag_seconds_count 10.0
sitn_learner_publish_lag_seconds_sum 2.0
"""
LEARNER_2 = """\
# HELP sitn_learner_examples_trained_total Examples trained on, by domain.
# TYPE sitn_learner_examples_trained_total counter
sitn_learner_examples_trained_total{domain="movie"} 1192.0
sitn_learner_examples_trained_total{domain="book"} 264.0
# HELP sitn_learner_loss Loss of the last step, by term.
# TYPE sitn_learner_loss gauge
sitn_learner_loss{term="total"} 5.25
sitn_learner_loss{term="main"} 4.5
sitn_learner_loss{term="i2i"} 0.5
sitn_learner_loss{term="i2c"} 0.25
# HELP sitn_learner_ranker_ndcg_at_10 NDCG
# TYPE sitn_learner_ranker_ndcg_at_10 gauge
sitn_learner_ranker_ndcg_at_10{events="all",ranker="model",span="window"} 0.125
sitn_learner_ranker_ndcg_at_10{events="rankable",ranker="model",span="window"} 0.25
sitn_learner_ranker_ndcg_at_10{events="all",ranker="model",span="stream"} 0.1
sitn_learner_ranker_ndcg_at_10{events="all",ranker="cooc_target",span="window"} 0.375
sitn_learner_ranker_ndcg_at_10{events="all",ranker="fused",span="window"} 0.5
# HELP sitn_learner_ranker_hr_at_10 HR
# TYPE sitn_learner_ranker_hr_at_10 gauge
sitn_learner_ranker_hr_at_10{events="all",ranker="model",span="window"} 0.25
sitn_learner_ranker_hr_at_10{events="all",ranker="popularity",span="window"} 0.5
# HELP sitn_learner_model_lift_ratio lift
# TYPE sitn_learner_model_lift_ratio gauge
sitn_learner_model_lift_ratio 0.5
# HELP sitn_learner_fused_lift_ratio lift
# TYPE sitn_learner_fused_lift_ratio gauge
sitn_learner_fused_lift_ratio 1.25
# HELP sitn_learner_fused_weight w
# TYPE sitn_learner_fused_weight gauge
sitn_learner_fused_weight 2.0
# HELP sitn_learner_prequential_rankable_ratio rankable
# TYPE sitn_learner_prequential_rankable_ratio gauge
sitn_learner_prequential_rankable_ratio{span="window"} 0.75
sitn_learner_prequential_rankable_ratio{span="stream"} 0.5
# HELP sitn_learner_publish_gate_closed gate
# TYPE sitn_learner_publish_gate_closed gauge
sitn_learner_publish_gate_closed 1.0
# HELP sitn_learner_prototype_agreement agreement
# TYPE sitn_learner_prototype_agreement gauge
sitn_learner_prototype_agreement{k="4"} 0.75
sitn_learner_prototype_agreement{k="8"} 0.5
# HELP sitn_learner_publish_lag_seconds lag
# TYPE sitn_learner_publish_lag_seconds histogram
sitn_learner_publish_lag_seconds_bucket{le="0.5"} 10.0
sitn_learner_publish_lag_seconds_bucket{le="1.0"} 110.0
sitn_learner_publish_lag_seconds_bucket{le="+Inf"} 110.0
sitn_learner_publish_lag_seconds_count 110.0
sitn_learner_publish_lag_seconds_sum 80.0
# HELP sitn_drift_alarms_total Drift alarms raised, by signal and detector.
# TYPE sitn_drift_alarms_total counter
sitn_drift_alarms_total{detector="psi",signal="input_domain_mix"} 2.0
sitn_drift_alarms_total{detector="js",signal="input_domain_mix"} 1.0
# HELP sitn_drift_alarm_active active
# TYPE sitn_drift_alarm_active gauge
sitn_drift_alarm_active{signal="input_domain_mix"} 1.0
sitn_drift_alarm_active{signal="loss"} 0.0
"""


def consumer(movie: float, book: float | None, lag: dict[str, float], lift_zero: bool = False) -> str:
    """A consumer's exposition; ``book=None``: no book event decoded yet (no ``book`` child)."""
    lines = ["# HELP sitn_stream_events_decoded_total decoded", "# TYPE sitn_stream_events_decoded_total counter",
             f'sitn_stream_events_decoded_total{{domain="movie"}} {movie}']
    if book is not None:
        lines.append(f'sitn_stream_events_decoded_total{{domain="book"}} {book}')
    lines += ["# HELP sitn_stream_consumer_lag_records lag", "# TYPE sitn_stream_consumer_lag_records gauge"]
    lines += [f'sitn_stream_consumer_lag_records{{partition="{p}"}} {v}' for p, v in lag.items()]
    if lift_zero:  # imported the learner's module: its unlabelled gauge exports 0 from here too
        lines += ["# HELP sitn_learner_model_lift_ratio lift", "# TYPE sitn_learner_model_lift_ratio gauge",
                  "sitn_learner_model_lift_ratio 0.0"]
    return "\n".join(lines) + "\n"


def serving(buckets: dict[str, float], ranker: str | None = None) -> str:
    lines = ["# HELP sitn_serving_freshness_seconds freshness", "# TYPE sitn_serving_freshness_seconds histogram"]
    lines += [f'sitn_serving_freshness_seconds_bucket{{le="{le}"}} {v}' for le, v in buckets.items()]
    if ranker is not None:
        lines += ["# HELP sitn_serving_ranker ranker", "# TYPE sitn_serving_ranker gauge"]
        lines += [f'sitn_serving_ranker{{served_by="{r}"}} {float(r == ranker)}'
                  for r in ("model", "fused", "popularity", "cooccurrence")]
    return "\n".join(lines) + "\n"


ROUND_0 = {"l:1": LEARNER_0, "c:1": consumer(100, 10, {"0": 5, "1": 7}), "c:2": consumer(50, 0, {"2": 1}),
           "s:1": serving({"0.1": 0, "0.5": 2, "1.0": 2, "+Inf": 2})}
ROUND_2 = {"l:1": LEARNER_2, "c:1": consumer(160, 30, {"0": 3, "1": 4}, lift_zero=True),
           "c:2": consumer(90, 0, {"2": 2}), "s:1": serving({"0.1": 2, "0.5": 6, "1.0": 8, "+Inf": 8}, "cooccurrence")}


def test_parse_exposition_keys_samples_by_name_and_sorted_labels() -> None:
    samples, families = parse_exposition(LEARNER_0)
    assert samples[("sitn_learner_examples_trained_total", (("domain", "movie"),))] == 1000.0
    assert samples[("sitn_learner_publish_lag_seconds_bucket", (("le", "+Inf"),))] == 10.0
    assert samples[("sitn_learner_examples_trained_created", (("domain", "movie"),))] == 1.7e9  # kept, own name
    assert families == {"sitn_learner_examples_trained", "sitn_learner_examples_trained_created", "sitn_learner_loss",
                        "sitn_learner_prequential_ndcg_at_10", "sitn_learner_publish_lag_seconds"}
    with pytest.raises(ValueError):
        parse_exposition("sitn_x{broken 1\n")


def test_derive_two_rounds_exact() -> None:
    first, second = Scrape.from_texts(100.0, ROUND_0), Scrape.from_texts(102.0, ROUND_2)
    points = derive(second, previous=first, window_start=first)
    assert points == pytest.approx({
        'events_decoded_per_s{domain="movie"}': (60 + 40) / 2,  # two consumers, summed
        'events_decoded_per_s{domain="book"}': 20 / 2,
        "examples_trained_per_s": (192 + 64) / 2,
        # freshness bucket increases {0.1: 2, 0.5: 4, 1.0: 6, +Inf: 6}: p50 rank 3 lies half way in (0.1, 0.5]
        "freshness_p50_s": 0.3,
        "freshness_p99_s": 0.5 + 0.5 * (0.99 * 6 - 4) / 2,  # 0.985
        # publish lag increases {0.5: 0, 1.0: 100, +Inf: 100}: rank 99 in (0.5, 1.0]
        "publish_lag_p99_s": 0.5 + 0.5 * 99 / 100,
        'loss{term="total"}': 5.25, 'loss{term="main"}': 4.5, 'loss{term="i2i"}': 0.5, 'loss{term="i2c"}': 0.25,
        # the model and the baselines: last window, all events (the rankable and stream ones are not drawn)
        'ndcg_at_10{ranker="model"}': 0.125, 'ndcg_at_10{ranker="cooc_target"}': 0.375,
        'ndcg_at_10{ranker="fused"}': 0.5, "fused_lift_ratio": 1.25, "fused_weight": 2.0,
        'hr_at_10{ranker="model"}': 0.25, 'hr_at_10{ranker="popularity"}': 0.5,
        "model_lift_ratio": 0.5,  # the consumer's exported 0 does not change the sum
        "rankable_ratio": 0.75,
        'serving_ranker{served_by="model"}': 0.0, 'serving_ranker{served_by="popularity"}': 0.0,
        'serving_ranker{served_by="fused"}': 0.0,
        'serving_ranker{served_by="cooccurrence"}': 1.0,
        "publish_gate_closed": 1.0,
        "consumer_lag_records": 3 + 4 + 2,
        'prototype_agreement{k="4"}': 0.75, 'prototype_agreement{k="8"}': 0.5,
        "drift_alarms_total": 3.0,
        "drift_alarms_active": 1.0,
    }, abs=1e-12)


def test_derive_first_round_has_gauges_only_and_skips_undeclared_metrics() -> None:
    points = derive(Scrape.from_texts(100.0, ROUND_0))
    assert points == {'loss{term="total"}': 6.0, "consumer_lag_records": 13.0}


def test_increase_treats_a_decrease_as_a_restart_and_skips_new_processes() -> None:
    old = Scrape.from_texts(0.0, {"c:1": consumer(100, 10, {}), "c:2": consumer(50, 0, {})})
    new = Scrape.from_texts(2.0, {"c:1": consumer(30, 15, {}), "c:2": consumer(55, 0, {}),
                                  "c:3": consumer(999, 999, {})})
    assert increase(old, new, "sitn_stream_events_decoded_total", "domain") == {"movie": 30 + 5, "book": 5}
    assert derive(new, old)['events_decoded_per_s{domain="movie"}'] == 17.5
    # c:2's first book events (its "book" child is new since the old round) count from 0
    newer = Scrape.from_texts(4.0, {"c:1": consumer(30, 15, {}), "c:2": consumer(55, 12, {})})
    no_book = Scrape.from_texts(2.0, {"c:1": consumer(30, 15, {}), "c:2": consumer(55, None, {})})
    assert increase(no_book, newer, "sitn_stream_events_decoded_total", "domain") == {"movie": 0.0, "book": 12.0}


def test_increase_counts_a_new_process_from_zero_only_if_its_children_were_created_since() -> None:
    old = Scrape.from_texts(100.0, {"c:1": consumer(10, 10, {})})
    late = consumer(500, 400, {}) + (
        '# HELP sitn_x_total x\n# TYPE sitn_x_total counter\n'  # (another family, to keep the text realistic)
        'sitn_x_total 1.0\n'
        '# HELP sitn_stream_events_decoded_created when\n# TYPE sitn_stream_events_decoded_created gauge\n'
        'sitn_stream_events_decoded_created{domain="movie"} 100.5\n'  # after the old round: counts from 0
        'sitn_stream_events_decoded_created{domain="book"} 99.0\n')  # before it: its age is unknown, skipped
    new = Scrape.from_texts(102.0, {"c:1": consumer(10, 10, {}), "c:2": late})
    assert increase(old, new, "sitn_stream_events_decoded_total", "domain") == {"movie": 500.0, "book": 0.0}



def test_histogram_quantile_edges() -> None:
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None  # nothing observed
    assert histogram_quantile(0.99, {1.0: 2.0, 5.0: 2.0, math.inf: 10.0}) == 5.0  # in +Inf: highest bound
    assert histogram_quantile(0.0, {1.0: 0.0, 2.0: 4.0, math.inf: 4.0}) == 1.0
    assert histogram_quantile(1.0, {1.0: 4.0, 2.0: 4.0, math.inf: 4.0}) == 1.0
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got 1.5"):
        histogram_quantile(1.5, {math.inf: 1.0})


def test_collector_keeps_bounded_buffers_and_a_quantile_window(tmp_path: Path) -> None:
    c = MetricsCollector(tmp_path, interval_s=2.0, capacity=3, window_s=4.0)
    for i in range(5):  # round i at t = 2i: one observation per round, in (0.1, 0.5] for the first two
        fresh = {"0.1": 0, "0.5": min(i, 2), "1.0": i, "+Inf": i}
        c.ingest(Scrape.from_texts(2.0 * i, {"s:1": serving(fresh)}))
    p50 = c.series()["series"]["freshness_p50_s"]
    # capacity 3: the rounds at t = 4, 6, 8. Window 4 s: increases since the rounds at t = 0, 2, 4:
    # t=4: {0.5: 2, 1.0: 2} -> rank 1 of 2 in (0.1, 0.5]: 0.1 + 0.4 * 1/2 = 0.3
    # t=6: {0.5: 1, 1.0: 2} -> rank 1 of 2 at the top of (0.1, 0.5]: 0.5
    # t=8: {0.5: 0, 1.0: 2} -> rank 1 of 2 half way through (0.5, 1.0]: 0.75
    assert p50["t"] == [4.0, 6.0, 8.0]
    assert p50["v"] == pytest.approx([0.3, 0.5, 0.75], abs=1e-12)
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        MetricsCollector(tmp_path, interval_s=0)


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


@pytest.fixture
def exporters(tmp_path: Path) -> Iterator[tuple[Path, CollectorRegistry]]:
    """A real exporter (its own registry) and a registered target nobody listens on."""
    registry = CollectorRegistry()
    decoded = Counter("sitn_stream_events_decoded", "decoded", ["domain"], registry=registry)
    Gauge("sitn_stream_consumer_lag_records", "lag", ["partition"], registry=registry).labels("0").set(12)
    decoded.labels("movie").inc(10)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    targets = tmp_path / "targets"
    write_target(targets, "consumer", f"127.0.0.1:{server.server_port}")
    write_target(targets, "learner", "127.0.0.1:9")  # discard port: connection refused
    write_target(targets, "driver", "127.0.0.1:9")  # the driver's own: not scraped
    try:
        yield targets, registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_collector_scrapes_real_exporters_and_serves_the_api(exporters: tuple[Path, CollectorRegistry]) -> None:
    from serving.api import serve_in_thread

    targets, _ = exporters
    clock = iter([1000.0, 1002.0, 1002.5])
    c = MetricsCollector(targets, interval_s=2.0, timeout_s=0.5, clock=lambda: next(clock))
    failures0 = dashboard.REGISTRY.get_sample_value("sitn_dashboard_scrape_failures_total", {"component": "learner"})
    assert c.scrape_once() == {"consumer_lag_records": 12.0}
    assert c.scrape_once() == {'events_decoded_per_s{domain="movie"}': 0.0, "consumer_lag_records": 12.0}
    assert c.failures == 2
    assert dashboard.REGISTRY.get_sample_value(
        "sitn_dashboard_scrape_failures_total", {"component": "learner"}) == (failures0 or 0) + 2
    server = serve_in_thread(create_dashboard_app(c))
    client = httpx.Client(base_url=server.url, timeout=5)
    try:
        check_api(client)
    finally:
        client.close()
        server.stop()


def check_api(client: httpx.Client) -> None:
    body = client.get("/api/series").json()
    assert body["series"]["consumer_lag_records"] == {"t": [1000.0, 1002.0], "v": [12.0, 12.0]}
    assert (body["targets_up"], body["targets"], body["rounds"], body["scrape_failures"]) == (1, 2, 2, 2)
    listed = {(t["component"], t["up"]) for t in client.get("/api/targets").json()["targets"]}
    assert listed == {("consumer", True), ("learner", False)}
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert chart_points(page.text) == dict.fromkeys(CHARTS, 0)  # before the script runs
    assert "http" not in page.text.split("<script>")[1]  # nothing fetched from elsewhere
    metrics = client.get("/metrics").text
    for name in ("sitn_pipeline_replay_events_sent_total", "sitn_pipeline_restarts_total",
                 "sitn_dashboard_scrape_failures_total", "process_cpu_seconds_total"):
        assert name in metrics
    assert "sitn_stream_events_decoded" not in metrics  # the driver's own registry only
    health = client.get("/healthz")  # the thread was never started: the collector is not alive
    assert (health.status_code, health.json()["collector_alive"]) == (503, False)


def test_start_dashboard_serves_registers_the_driver_and_stops(exporters: tuple[Path, CollectorRegistry]) -> None:
    targets, _ = exporters
    handle = dashboard.start_dashboard(TelemetrySettings(dashboard_port=0), targets, interval_s=0.2)
    try:
        assert handle.target_file is not None and handle.target_file.is_file()
        wait_for(lambda: handle.collector.rounds >= 2, 10, "two collector rounds")
        assert httpx.get(f"{handle.url}/healthz", timeout=5).json()["ok"] is True
        driver = httpx.get(f"{handle.url}/metrics", timeout=5)
        assert "sitn_dashboard_targets_up 1.0" in driver.text
    finally:
        handle.stop()
    assert handle.target_file is None and not list(targets.glob("driver-*.json"))
    assert not handle.collector.alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{handle.url}/healthz", timeout=2)


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

        def every_chart_has_points() -> bool:
            series = handle.collector.series()["series"]
            return all(any(name.startswith(p) for name in series for p in prefixes) for prefixes in wanted.values())

        wait_for(lambda: every_chart_has_points() and pipeline.caught_up(), 75, "points on every chart", pipeline)
        phases_s["replay until every chart has points"] = time.monotonic() - t0 - sum(phases_s.values())
        series = handle.collector.series()["series"]
        for prefix in ("events_decoded_per_s", "examples_trained_per_s"):  # the replay was seen flowing
            assert max(v for name, s in series.items() if name.startswith(prefix) for v in s["v"]) > 0, prefix
        components = {t["component"] for t in handle.collector.targets() if t["up"]}
        assert components == {"learner", "consumer", "serving"}
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
    "chart-agreement": ("prototype_agreement{",),
    "chart-drift": ("drift_alarms_total", "drift_alarms_active", "publish_gate_closed"),
}
