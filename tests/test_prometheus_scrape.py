"""A real Prometheus server (the Debian binary) scrapes a small live pipeline through file-based service
discovery (``stream.exporter``): every process is found and up, the queries an operator would run return
the numbers the pipeline itself reports, and the driver's dashboard, pointed at it, draws its series from
``query_range`` (``sitn.dashboard.PrometheusSeries``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sitn import dashboard
from sitn.dashboard import PrometheusSeries
from sitn.promql import QUERIES, SeriesQuery
from tests.conftest import skip_or_fail
from tests.test_dashboard import make_metrics_pipeline, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
N_EVENTS = 3000
SCRAPE_INTERVAL_S = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """``prometheus`` in a child process, scraping the file_sd files in ``targets_dir`` every second."""

    def __init__(self, targets_dir: Path, work_dir: Path) -> None:
        assert PROMETHEUS is not None
        work_dir.mkdir(parents=True, exist_ok=True)
        config = work_dir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
            "scrape_configs:\n"
            "  - job_name: sitn\n"
            "    file_sd_configs:\n"
            f"      - files: ['{targets_dir}/*.json']\n"
            "        refresh_interval: 1s\n"
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = work_dir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work_dir / 'tsdb'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = 30) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout_s, "prometheus to be ready")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of ``promql`` (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{promql}: {r.status_code} {r.text[:500]}"
        return list(body["data"]["result"])

    def scalar(self, promql: str) -> float | None:
        """The single value of a one-element result, or None when the result is empty."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: expected at most one series, got {result}"
        return float(result[0]["value"][1]) if result else None

    def active_targets(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=5)
        return list(r.json()["data"]["activeTargets"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log.close()


@pytest.fixture
def pipeline(tmp_path: Path, ray_cluster: Any) -> Iterator[Any]:
    p = make_metrics_pipeline(tmp_path, rate_events_per_s=1000.0)  # 3 s: rates need scrapes while it flows
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def prometheus(pipeline: Any, tmp_path: Path) -> Iterator[PrometheusServer]:
    if PROMETHEUS is None:
        skip_or_fail("prometheus not installed (infra/test.sh installs the Debian package)")
    server = PrometheusServer(pipeline.targets_dir, tmp_path / "prometheus")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_prometheus_scrapes_every_process_of_a_live_pipeline(pipeline: Any, prometheus: PrometheusServer,
                                                              events_csv: Path) -> None:
    from stream.dataset import load_events

    settings = pipeline.metrics.model_copy(update={"prometheus_url": prometheus.url})
    driver = dashboard.start_dashboard(settings, pipeline.targets_dir, interval_s=1.0, capacity=300)
    try:
        events = load_events(events_csv, "movie", "book", limit=N_EVENTS).events
        # Prometheus must see the run unfold: a counter child first scraped with its final count has no
        # increase (rate 0; a quantile of no observations is NaN), so every target is scraped before the
        # replay, which is paced (3 s) to span several scrapes
        wait_for(lambda: len(prometheus.active_targets()) == 5
                 and all(t["health"] == "up" for t in prometheus.active_targets()), 20, "every target scraped")
        pipeline.start_replay(events)
        wait_for(pipeline.caught_up, 75, "every replayed event trained", pipeline)
        wait_for(lambda: pipeline.status().get("served_version", 0) > 0, 30, "a publish")
        url = pipeline.serving_url
        for user_id in sorted({e.user_id for e in events})[:40]:
            r = httpx.get(f"{url}/recommend", params={"user_id": user_id, "k": 10}, timeout=10)
            assert r.status_code == 200, r.text
        status = pipeline.status()
        driver.observe(status)  # as sitn run's status loop does
        # Prometheus has the pipeline's own numbers once it scraped after the last step (1 s interval).
        wait_for(lambda: prometheus.scalar("sum(sitn_learner_steps_total)") == status["step"]
                 and prometheus.scalar('sum(sitn_serving_http_request_seconds_count{route="/recommend"})') == 40,
                 20, "prometheus to scrape the final step and the requests")

        # each target is "unknown" until its first scrape (the driver's dashboard started last)
        wait_for(lambda: len(prometheus.active_targets()) == 5
                 and all(t["health"] != "unknown" for t in prometheus.active_targets()), 20, "every target scraped")
        by_component: dict[str, list[str]] = {}
        for t in prometheus.active_targets():
            by_component.setdefault(t["labels"]["component"], []).append(t["health"])
        assert by_component == {"learner": ["up"], "consumer": ["up", "up"], "serving": ["up"], "driver": ["up"]}
        assert prometheus.scalar('count(up{job="sitn"} == 1)') == 5

        assert prometheus.scalar("sum(sitn_stream_events_decoded_total)") == N_EVENTS - status.get("dead_letters", 0)
        assert prometheus.scalar("sum(sitn_learner_examples_trained_total)") == status["events_applied"]
        assert prometheus.scalar("sum(sitn_stream_consumer_lag_records)") == 0  # caught up
        ndcg = prometheus.scalar("sitn_learner_prequential_ndcg_at_10 > 0")
        assert ndcg is not None and ndcg == pytest.approx(status["prequential_ndcg_at_10"], abs=1e-9)
        # over the cumulative buckets, not a rate: a series first scraped with all 40 requests has no increase
        p99 = prometheus.scalar('histogram_quantile(0.99, sum by (le) '
                                '(sitn_serving_http_request_seconds_bucket{route="/recommend"}))')
        assert p99 is not None and 0 < p99 <= 2.5  # within the histogram's finite buckets
        freshness = prometheus.scalar("histogram_quantile(0.5, sum by (le) (sitn_serving_freshness_seconds_bucket))")
        assert freshness is not None and freshness > 0
        wait_for(lambda: (prometheus.scalar("sitn_pipeline_replay_events_sent_total") or 0) >= N_EVENTS,
                 15, "the driver's own metrics")
        check_driver_page_series(driver.url, prometheus.url, status)
    finally:
        driver.stop()


def check_driver_page_series(driver_url: str, prometheus_url: str, status: dict[str, Any]) -> None:
    """The driver's ``/api/series`` from Prometheus's ``query_range``: the run's figures, at the driver's step."""
    body = httpx.get(f"{driver_url}/api/series", timeout=30).json()
    assert (body["source"], body["prometheus_url"], body["errors"]) == ("prometheus", prometheus_url, [])
    assert (body["targets_up"], body["targets"], body["window_s"]) == (5, 5, 30.0)
    series = body["series"]
    expected = {'loss{term="total"}', 'ndcg_at_10{ranker="model"}', 'ndcg_at_10{ranker="cooc_target"}',
                'hr_at_10{ranker="popularity"}', "rankable_ratio", "freshness_p50_s",
                "freshness_p99_s", "publish_lag_p99_s", 'events_decoded_per_s{domain="movie"}',
                'events_decoded_per_s{domain="book"}', 'examples_trained_per_s{domain="book"}',
                "consumer_lag_records", "publish_gate_closed"}
    assert expected <= set(series), f"missing {sorted(expected - set(series))}; got {sorted(series)}"
    for name, points in series.items():
        steps = {round(b - a, 6) for a, b in zip(points["t"], points["t"][1:], strict=False)}
        assert steps <= {float(n) for n in range(1, 301)}, f"{name}: points off the 1 s step: {sorted(steps)[:5]}"
        assert body["now_s"] - 300 <= points["t"][0] and points["t"][-1] <= body["now_s"], name
    # gauges: the last point is the pipeline's own figure (caught up, the learner no longer steps)
    assert series['loss{term="total"}']["v"][-1] == pytest.approx(status["loss"], abs=1e-9)
    assert series['ndcg_at_10{ranker="model"}']["v"][-1] == pytest.approx(status["model_ndcg_at_10_window"], abs=1e-9)
    assert series["rankable_ratio"]["v"][-1] == pytest.approx(status["prequential_rankable_ratio"], abs=1e-9)
    assert series["consumer_lag_records"]["v"][-1] == 0
    # rates and quantiles over the 30 s window, while the replay flowed
    assert max(series['examples_trained_per_s{domain="book"}']["v"]) > 0
    assert max(series['events_decoded_per_s{domain="movie"}']["v"]) > 0
    assert 0 < max(series["freshness_p99_s"]["v"]) <= 30.0  # within the histogram's finite buckets
    targets = httpx.get(f"{driver_url}/api/targets", timeout=10).json()
    assert targets["source"] == "prometheus"
    assert sorted((t["component"], t["up"]) for t in targets["targets"]) == [
        ("consumer", True), ("consumer", True), ("driver", True), ("learner", True), ("serving", True)]
    # a query Prometheus refuses is named in errors; the others still answer
    broken = PrometheusSeries(prometheus_url, interval_s=1.0, range_s=60.0, queries=(
        SeriesQuery("broken", "sum(rate(sitn_learner_loss[$__rate_interval])", in_grafana=False), QUERIES[0]))
    answer = broken.series()
    assert len(answer["errors"]) == 1 and answer["errors"][0].startswith("broken: /api/v1/query_range answered 400")
    assert 'ndcg_at_10{ranker="model"}' in answer["series"] and broken.failures == 1
