"""Prometheus metrics of the learner process, defined once, and the function that records a step.
Labels are bounded (loss terms, domains, prototype granularities). Catalogue: ``docs/metrics.md``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

STEP_SECONDS = Histogram(
    "sitn_learner_step_seconds",
    "Wall seconds of one learn_many step (prequential ranking included).",
    buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5),
)
STEPS = Counter("sitn_learner_steps", "Optimizer steps taken.")
EXAMPLES_TRAINED = Counter("sitn_learner_examples_trained", "Examples trained on, by domain.", ["domain"])
EXAMPLES_PER_SECOND = Gauge("sitn_learner_examples_per_second", "Examples per second of the last step.")
LOSS = Gauge("sitn_learner_loss", "Loss of the last step, by term (total, main, i2i, i2c).", ["term"])
PROTOTYPES_NONEMPTY = Gauge(
    "sitn_learner_prototypes_nonempty", "Prototypes with at least one member, by side (source, target) and granularity K.",
    ["side", "k"],
)
PROTOTYPE_LARGEST_SHARE = Gauge(
    "sitn_learner_prototype_largest_share",
    "Share of the reservoir in the largest prototype (1 = collapsed), by side and granularity K.",
    ["side", "k"],
)
PROTOTYPE_ENTROPY = Gauge(
    "sitn_learner_prototype_assignment_entropy_ratio",
    "Mean assignment entropy over prototype sets, divided by log K (1 = uniform use of the prototypes).",
)
PROTOTYPE_AGREEMENT = Gauge(
    "sitn_learner_prototype_agreement",
    "Cross-domain prototype agreement: matched-cluster share of users with both domains, by granularity K.",
    ["k"],
)
PREQUENTIAL_HR = Gauge(
    "sitn_learner_prequential_hr_at_10",
    "Served model's prequential HR@10 over the last window of target events (test-then-train; ties against the "
    "item, consumed items excluded, an item not served yet is a miss).",
)
PREQUENTIAL_NDCG = Gauge(
    "sitn_learner_prequential_ndcg_at_10",
    "Served model's prequential NDCG@10 over the last window of target events (as the HR@10 gauge).",
)
PREQUENTIAL_RANKED = Counter(
    "sitn_learner_prequential_ranked", "Target events ranked (by the model and every baseline) before training on them."
)
RANKER_HR = Gauge(
    "sitn_learner_ranker_hr_at_10",
    "Prequential HR@10 by ranker (model and fused as served at that moment of the replay; model_live and fused_live "
    "at data time, from the event's own history; popularity, cooc_target, cooc_target_source), over all target "
    "events or the rankable ones (events), whole stream or last window (span).",
    ["ranker", "events", "span"],
)
RANKER_NDCG = Gauge(
    "sitn_learner_ranker_ndcg_at_10", "Prequential NDCG@10 by ranker, events (all, rankable) and span (stream, window).",
    ["ranker", "events", "span"],
)
RANKABLE_RATIO = Gauge(
    "sitn_learner_prequential_rankable_ratio",
    "Share of target events whose item occurred in the target stream before, by span (stream, window).",
    ["span"],
)
MODEL_LIFT = Gauge(
    "sitn_learner_model_lift_ratio",
    "The model's NDCG@10 at data time (model_live: the event's own history, as the baselines) divided by the best "
    "baseline's, whole stream, all target events (1 = as good).",
)
SERVED_RANKER = Gauge(
    "sitn_learner_served_ranker",
    "1 for the ranker serving is told to use (model, fused, popularity, cooccurrence), 0 for the others.",
    ["served_by"],
)
SERVED_RANKER_SWITCHES = Counter(
    "sitn_learner_served_ranker_switches",
    "Switches of the ranker serving is told to use (between model and fused, to a baseline and back).",
)
FUSED_WEIGHT = Gauge(
    "sitn_learner_fused_weight",
    "w of the fused ranker z(model) + w * z(cooc) serving is told to use (best windowed NDCG@10 of the grid).",
)
TRANSFER_SCALE = Gauge(
    "sitn_learner_transfer_scale",
    "Query-time transfer scale of the target queries, by slot (warm: users with target history; cold: without), "
    "chosen online by windowed NDCG@10 (learner.online.transfer_scale).",
    ["slot"],
)
FUSED_WEIGHT_COLD = Gauge(
    "sitn_learner_fused_weight_cold",
    "w of the fused ranker for users with no target history (0: the model's score alone), chosen on their events.",
)
POPULARITY_HALF_LIFE = Gauge(
    "sitn_learner_popularity_half_life",
    "Half-life (in target labels) of the counts the popularity prior reads, 0 = all-time counts, chosen online by "
    "windowed NDCG@10 (learner.online.prior_tuner).",
)
FUSED_LIFT = Gauge(
    "sitn_learner_fused_lift_ratio",
    "Fused ranker's NDCG@10 at data time (fused_live) divided by the best baseline's, whole stream, all target "
    "events (1 = as good).",
)
FALLBACK_Z = Gauge(
    "sitn_learner_fallback_z",
    "Paired z of the best learnt ranker's (model or fused) windowed NDCG@10 minus the best servable baseline's "
    "(negative: worse).",
)
PUBLISH_LAG_SECONDS = Histogram(
    "sitn_learner_publish_lag_seconds",
    "Seconds from an event's arrival at the learner to the publish that carries its user's vectors.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
)
PUBLISH_SECONDS = Histogram(
    "sitn_learner_publish_seconds", "Seconds to build and hand over one published version.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PUBLISHED_VERSION = Gauge("sitn_learner_published_version", "Last embedding version published to serving.")
PUBLISHES = Counter("sitn_learner_publishes", "Versions published, by kind (delta, full).", ["kind"])
PUBLISH_HELD = Counter(
    "sitn_learner_publish_held", "Versions held back by the publish gate (prequential NDCG@10 dropped)."
)
PUBLISH_GATE_CLOSED = Gauge(
    "sitn_learner_publish_gate_closed", "1 while the publish gate holds new versions back, else 0."
)
CHECKPOINT_SECONDS = Histogram(
    "sitn_learner_checkpoint_seconds", "Seconds from the start of one checkpoint until its file is durable.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
CHECKPOINT_STALL_SECONDS = Histogram(
    "sitn_learner_checkpoint_stall_seconds",
    "Seconds one checkpoint holds up training: reading the state out (the write runs on a writer thread).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
EVENTS_APPLIED = Gauge("sitn_learner_events_applied", "Events whose effect the model holds (restored + trained).")

_LOSS_TERMS = {"loss": "total", "loss_main": "main", "loss_i2i": "i2i", "loss_i2c": "i2c"}
SERVED_BY = ("model", "fused", "popularity", "cooccurrence")


def record_step(stats: Mapping[str, float], seconds: float, examples_by_domain: Mapping[str, int]) -> None:
    """Export one step's statistics (the dict ``learn_many`` returns, plus the prequential stats)."""
    STEP_SECONDS.observe(seconds)
    STEPS.inc()
    for domain, n in examples_by_domain.items():
        EXAMPLES_TRAINED.labels(domain).inc(n)
    if seconds > 0:
        EXAMPLES_PER_SECOND.set(sum(examples_by_domain.values()) / seconds)
    for key, term in _LOSS_TERMS.items():
        value = stats.get(key)
        if value is not None and not math.isnan(value):
            LOSS.labels(term).set(value)
    entropy = stats.get("proto_entropy")
    if entropy is not None and not math.isnan(entropy):
        PROTOTYPE_ENTROPY.set(entropy)
    hr, ndcg = stats.get("prequential_hr_at_10"), stats.get("prequential_ndcg_at_10")
    if hr is not None and not math.isnan(hr):
        PREQUENTIAL_HR.set(hr)
    if ndcg is not None and not math.isnan(ndcg):
        PREQUENTIAL_NDCG.set(ndcg)
    for slot in ("warm", "cold"):
        scale = stats.get(f"transfer_scale_{slot}")
        if scale is not None:
            TRANSFER_SCALE.labels(slot).set(scale)
    half_life = stats.get("popularity_half_life")
    if half_life is not None:
        POPULARITY_HALF_LIFE.set(half_life)
    z = stats.get("fallback_z")
    if z is not None and not math.isnan(z):
        FALLBACK_Z.set(z)


def record_prototypes(learner: Any) -> None:
    """Export prototype sizes and cross-domain agreement (after a publish: cheap, not every step)."""
    prototypes = getattr(learner, "prototypes", None)
    if prototypes is None:
        return
    for (side, k), proto in prototypes.sets.items():
        sizes = np.asarray(proto.sizes)
        total = float(sizes.sum())
        PROTOTYPES_NONEMPTY.labels(side, str(k)).set(float((sizes > 0).sum()))
        if total > 0:
            PROTOTYPE_LARGEST_SHARE.labels(side, str(k)).set(float(sizes.max()) / total)
    for k, value in prototypes.reservoir_agreement.items():
        if not math.isnan(value):
            PROTOTYPE_AGREEMENT.labels(str(k)).set(value)


def record_quality(quality: Any) -> None:
    """Export the tallies of a :class:`learner.online.prequential.StreamQuality` (each step; a few dozen gauges).
    A figure not defined yet (no events; no baseline hit for the lift) is exported as NaN, not 0."""
    for ranker, tally in quality.tallies.items():
        for span, f in tally.figures().items():
            for events, suffix in (("all", ""), ("rankable", "_rankable")):
                RANKER_HR.labels(ranker, events, span).set(f["hr" + suffix])
                RANKER_NDCG.labels(ranker, events, span).set(f["ndcg" + suffix])
            if ranker == quality.model:
                RANKABLE_RATIO.labels(span).set(f["rankable_ratio"])
    MODEL_LIFT.set(quality.lift(ranker="model_live" if "model_live" in quality.tallies else None))
    if "fused_live" in quality.tallies:
        FUSED_LIFT.set(quality.lift(ranker="fused_live"))


def record_served_ranker(served_by: str, switched: bool) -> None:
    """Export the ranker serving is told to use; ``switched``: it changed at this publish."""
    for name in SERVED_BY:
        SERVED_RANKER.labels(name).set(1.0 if name == served_by else 0.0)
    if switched:
        SERVED_RANKER_SWITCHES.inc()
