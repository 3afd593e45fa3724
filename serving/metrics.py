"""Serving metrics, defined once for the package. Labels are bounded: never a user or item id."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 2.5)

HTTP_REQUEST_SECONDS = Histogram(
    "sitn_serving_http_request_seconds",
    "HTTP request latency by route template, method and status code.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS_S,
)
RECOMMENDATIONS = Counter(
    "sitn_serving_recommendations",
    "Recommendation requests answered, by the path that served them (model, fused, popularity, cooccurrence).",
    ["served_by"],
)
RANKER = Gauge(
    "sitn_serving_ranker",
    "1 for the ranker /recommend answers with (model, fused, popularity, cooccurrence; the learner decides), 0 for the others.",
    ["served_by"],
)
RANKER_SWITCHES = Counter("sitn_serving_ranker_switches", "Switches of the ranker /recommend answers with.")
INDEX_VERSION = Gauge("sitn_serving_index_version", "Highest item-embedding version in the live index.")
INDEX_SIZE = Gauge("sitn_serving_index_items", "Items in the live index.")
INDEX_AGE_SECONDS = Gauge("sitn_serving_index_age_seconds", "Seconds since the live index was last swapped.")
INDEX_MERGING = Gauge("sitn_serving_index_merging", "1 while a new index base is being built in the background.")
INDEX_MERGES = Counter("sitn_serving_index_merges", "Index bases built and swapped in (delta folded into the base).")
INDEX_BUILD_SECONDS = Gauge("sitn_serving_index_build_seconds", "Seconds the last index base took to build.")
USERS = Gauge("sitn_serving_users", "Users with query vectors.")
USERS_EVICTED = Counter(
    "sitn_serving_users_evicted",
    "Users evicted at the max_users cap (least recently updated), by store: vectors or consumed.",
    ["store"],
)
UPDATES_APPLIED = Counter("sitn_serving_updates_applied", "Embedding updates applied, by kind.", ["kind"])
UPDATES_REJECTED = Counter(
    "sitn_serving_updates_rejected", "Embedding updates rejected (bad or stale), by reason.", ["reason"]
)
CONSUMER_OFFSET_LAG = Gauge(
    "sitn_serving_consumer_lag_messages", "Messages between the update consumer's position and the log end."
)

ROUTE_UNMATCHED = "unmatched"  # the route label for paths that match no route (bounded)
