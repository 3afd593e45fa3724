"""The PromQL of the driver's dashboard page, defined once.

With a Prometheus configured (``SITN_METRICS_PROMETHEUS_URL``), ``sitn.dashboard`` draws each series of its
page from Prometheus's ``query_range`` API with the expression below. Where the Grafana dashboard
(``infra/grafana/dashboards/sitn-stream.json``) shows the same figure, the expression is the very text its
panel runs (``in_grafana``); ``tests/test_deploy_static.py`` checks that those appear in the Grafana JSON
verbatim, that the others do not, and that ``promtool`` parses every one. Expressions are written as Grafana
writes them, with ``$__rate_interval`` for the range of ``rate``; the page substitutes its own window
(:meth:`SeriesQuery.render`).

``series`` is the name the page knows the figure by (``sitn/dashboard.html``'s ``data-series`` prefixes);
an expression that keeps a label (``by``) gives one series per value of it, named ``series{by="value"}``,
the same names the status-snapshot source (``sitn.dashboard.StatusSeries``) gives its series.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RATE_INTERVAL = "$__rate_interval"


@dataclass(frozen=True)
class SeriesQuery:
    series: str  # the page's series name
    expr: str  # PromQL, with RATE_INTERVAL where a range goes
    by: str | None = None  # the one label the expression keeps: a series per value
    in_grafana: bool = True  # the Grafana dashboard runs this exact text too

    def render(self, window_s: float) -> str:
        """The expression with ``window_s`` as the range of ``rate``.

        >>> FRESHNESS_P99.render(30)
        'histogram_quantile(0.99, sum by (le) (rate(sitn_serving_freshness_seconds_bucket[30s])))'
        """
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        return self.expr.replace(RATE_INTERVAL, f"{window_s:g}s")

    def name(self, labels: Mapping[str, str]) -> str:
        """The series name of one result series (``labels``: its metric labels)."""
        if self.by is None:
            return self.series
        return f'{self.series}{{{self.by}="{labels.get(self.by, "")}"}}'


def _quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q:g}, sum by (le) (rate({histogram}_bucket[{RATE_INTERVAL}])))"


FRESHNESS_P99 = SeriesQuery("freshness_p99_s", _quantile(0.99, "sitn_serving_freshness_seconds"))

QUERIES: tuple[SeriesQuery, ...] = (
    SeriesQuery("ndcg_at_10", 'max by (ranker) (sitn_learner_ranker_ndcg_at_10{events="all",span="window"})', "ranker"),
    SeriesQuery("hr_at_10", 'max by (ranker) (sitn_learner_ranker_hr_at_10{events="all",span="window"})', "ranker"),
    SeriesQuery("model_lift_ratio", 'max(sitn_learner_model_lift_ratio{component="learner"})'),
    SeriesQuery("fused_lift_ratio", 'max(sitn_learner_fused_lift_ratio{component="learner"})'),
    SeriesQuery("fused_weight", 'max(sitn_learner_fused_weight{component="learner"})'),
    SeriesQuery("rankable_ratio", 'max(sitn_learner_prequential_rankable_ratio{span="window"})', in_grafana=False),
    SeriesQuery("serving_ranker", 'max by (served_by) (sitn_serving_ranker{component=~"serving.*"})', "served_by"),
    SeriesQuery("events_decoded_per_s",
                f"sum by (domain) (rate(sitn_stream_events_decoded_total[{RATE_INTERVAL}]))", "domain"),
    SeriesQuery("examples_trained_per_s",
                f"sum by (domain) (rate(sitn_learner_examples_trained_total[{RATE_INTERVAL}]))", "domain"),
    SeriesQuery("loss", "max by (term) (sitn_learner_loss)", "term"),
    SeriesQuery("freshness_p50_s", _quantile(0.5, "sitn_serving_freshness_seconds")),
    FRESHNESS_P99,
    SeriesQuery("publish_lag_p99_s", _quantile(0.99, "sitn_learner_publish_lag_seconds")),
    SeriesQuery("consumer_lag_records", "sum(sitn_stream_consumer_lag_records)", in_grafana=False),
    SeriesQuery("prototype_agreement", "max by (k) (sitn_learner_prototype_agreement)", "k"),
    SeriesQuery("drift_alarms_total", "sum(sitn_drift_alarms_total)", in_grafana=False),
    SeriesQuery("drift_alarms_active", "sum(sitn_drift_alarm_active)", in_grafana=False),
    SeriesQuery("publish_gate_closed", "max(sitn_learner_publish_gate_closed)"),
)


def matrix_series(query: SeriesQuery, result: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """The page's series from a ``query_range`` matrix result (``data.result``); non-finite values dropped.

    >>> matrix_series(QUERIES[-1], [{"metric": {}, "values": [[10, "0"], [12, "NaN"], [14, "1"]]}])
    {'publish_gate_closed': {'t': [10.0, 14.0], 'v': [0.0, 1.0]}}
    """
    out: dict[str, dict[str, list[float]]] = {}
    for row in result:
        points = [(float(t), float(v)) for t, v in row["values"] if math.isfinite(float(v))]
        if points:
            out[query.name(row["metric"])] = {"t": [t for t, _ in points], "v": [v for _, v in points]}
    return out
