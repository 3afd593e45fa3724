"""Settings of the main job (``sitn run``): one frozen, typed object read from ``SITN_RUN_*`` variables.

The settings tree. Each layer has one settings class, and its environment prefix is the public name of its
fields: ``stream.settings.StreamSettings`` (``SITN_*``), ``serving.settings.ServingSettings``
(``SITN_SERVING_*``), ``RunSettings`` here (``SITN_RUN_*``), ``stream.exporter.TelemetrySettings``
(``SITN_METRICS_*``), ``learner.online.drift.DriftSettings`` (``SITN_DRIFT_*``). A command builds the ones it
needs once, at start-up, from its flags and the environment (``sitn.cli_settings``, which also writes the
flags and their ``--help``), and logs them with secrets hidden.

A setting that two layers need has one owner; the other's field is derived from it by the composition
root and reads neither a flag nor a variable of its own:

- embedding width: the learner's (``learner_dim``, ``SITN_RUN_LEARNER_DIM``; a warm start's model decides
  it); serving's ``dim`` follows it in ``sitn run`` and ``sitn serve`` (whose ``--dim`` is this field, as
  ``sitn train --dim`` and ``sitn eval --dim`` are).
- history length L and interest views V: ``learner_max_len``, ``learner_views`` (``sitn train`` and
  ``sitn eval``: ``--max-len``, ``--n-views``).
- how an events file is read: ``time_unit`` and ``limit`` (``sitn replay`` and ``sitn inspect`` read them too;
  ``sitn inspect`` also judges the file by ``dead_letter_max_ratio``).
- co-occurrence cap: ``cooc_max_neighbours``; serving's follows it.
- users kept: serving's ``max_users`` (``SITN_SERVING_MAX_USERS``); the learner's history store and its
  mirror of the served users follow it; so does the publisher's copy of serving's consumed sets, with
  serving's ``max_consumed_per_user`` (``SITN_SERVING_MAX_CONSUMED_PER_USER``).
- broker address and updates topic: the stream's (``SITN_KAFKA_BOOTSTRAP_SERVERS``,
  ``SITN_TOPIC_EMBEDDING_UPDATES``), which both the learner and a ``sitn serve`` replica read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from learner.core.config import SITNConfig
from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS

# RunSettings field -> the SITNConfig field it sets (RunSettings.sitn_config; sitn.run_config keeps a run's).
LEARNER_FIELDS = {
    "learner_dim": "dim", "learner_views": "n_views", "learner_max_len": "max_len",
    "learner_replay_buffer_size": "replay_buffer_size", "learner_replay_ratio": "replay_ratio", "learner_lr": "lr",
    "learner_popularity_prior": "popularity_prior", "learner_popularity_half_lives": "popularity_half_lives",
}


class RunSettings(BaseSettings):
    """The live pipeline: what to replay, how fast, where state goes, how the cluster is reached."""

    model_config = SettingsConfigDict(env_prefix="SITN_RUN_", frozen=True, extra="forbid")

    events: Path | None = Field(None, description="events.csv to replay; unset = consume only (events arrive from elsewhere)")
    source: str = Field("movie", description="source domain name")
    target: str = Field("book", description="target domain name")
    rate_events_per_s: float | None = Field(
        1000.0, gt=0, description="replay pace in events per wall second; unset with --max = as fast as possible"
    )
    limit: int | None = Field(None, ge=1, description="read (and replay) only the first N rows of the events file")
    time_unit: Literal["auto", "s", "ms", "iso", "ordinal"] = Field(
        "auto", description="unit of the events file's timestamp column: unix s, ms, ISO-8601, ordinal positions "
        "(order only, one position = one day), or auto = detected from the data (stream.time_unit)")
    dead_letter_max_ratio: float = Field(
        0.01, ge=0, lt=1, description="dead letters per record consumed above which the live table warns (over "
        "the window) and the run exits non-zero (over the whole run)")
    dead_letter_window_records: int = Field(10_000, ge=1, description="records consumed the live dead-letter rate "
                                            "is measured over")
    exit_after_replay: bool = Field(False, description="stop once every replayed event is trained and published")
    warm_start: Path | None = Field(
        None, description="start the learner from this `sitn train` model (its events are burnt in, not trained "
        "or ranked again; learner.offline.warm_start); the model's config replaces the learner flags")
    run_dir: Path | None = Field(None, description="state directory (log, checkpoints); reused = resumed; unset = "
                                    "var/run-<UTC time>")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one")
    ray_temp_dir: Path | None = Field(None, description="temp dir of the local Ray cluster; unset = a fresh one under /tmp")
    consumers: int = Field(2, ge=1, le=64, description="consumer actors")
    consumer_resource: str | None = Field(
        None, min_length=1, description="Ray custom resource the consumer actors need (a hundredth of a unit "
        "each): they run only on nodes started with it (`ray start --resources '{\"<name>\": 1}'`); unset = "
        "wherever Ray places them")
    learner_resource: str | None = Field(
        None, min_length=1, description="Ray custom resource the learner and serving actors need (a hundredth "
        "of a unit each), like consumer_resource")
    serving_replicas: int = Field(
        1, ge=1, le=64, description="serving actors listening on one host:port (SO_REUSEPORT, Linux; the kernel "
        "spreads connections over them), each fed every version by the learner")
    queue_maxsize: int = Field(8, ge=1, description="bounded queue between consumers and the learner (batches)")
    batch_size: int = Field(256, ge=1, le=65536, description="examples per learner step")
    checkpoint_every_steps: int = Field(200, ge=1, description="learner steps between checkpoints (and commits)")
    publish_every_steps: int = Field(20, ge=1, description="learner steps between publishes")
    publish_every_s: float = Field(0.25, gt=0, description="seconds between publishes (whichever comes first)")
    publish_max_share: float = Field(
        1.0, gt=0, le=1, description="while events wait for the learner, the most of its time publishing may "
        "take: after a publish of c seconds the next waits c * (1 / share - 1) s whatever the two above say (1: no "
        "wait). Below 1 a learner behind a backlog trains more events per second and serves staler vectors "
        "(bench_pipeline, shipped data, flat out: 1 -> 865 events/s, freshness p50 1.5 s; 0.1 -> 1,293-1,363, 6-7 s)")
    full_publish_every: int = Field(
        0, ge=0, description="every Nth publish is a full snapshot (0: only forced ones: the first, a new serving "
        "replica, the last)")
    cooc_max_neighbours: int = Field(
        DEFAULT_MAX_NEIGHBOURS, ge=0, description="item co-occurrence neighbours kept per item, in the learner's "
        "shadow baselines and in serving (the fused and co-occurrence rankers); 0 keeps every pair (memory grows "
        "with every distinct pair)")
    refresh_users_per_publish: int = Field(
        128, ge=0, description="users not touched since the last publish re-encoded and re-published with each "
        "publish, in turn, so every served vector follows the encoder")
    torch_threads: int = Field(1, ge=1, le=64, description="torch threads in the learner actor (1 leaves a core to serving on 2-core machines)")
    # The model's shape: SITNConfig's defaults (learner/core/config.py says why); a warm start's model replaces them.
    # 1..4096, serving's index bounds: `sitn serve --dim` is this field. SITNConfig checks what the model needs
    # (its attention heads divide d).
    learner_dim: int = Field(SITNConfig.dim, ge=1, le=4096, description="embedding width d of the SITN model "
                             "(serving's dim follows it)")
    learner_views: int = Field(SITNConfig.n_views, ge=1, description="interest views V per user and domain")
    learner_max_len: int = Field(SITNConfig.max_len, ge=1, description="history length L per domain")
    # 20,000: chosen on the first half of the shipped stream (74,000 events): the live model's data-time NDCG@10
    # 0.0064 with 20,000 at ratio 1 against 0.0047 without (fused 0.0152 against 0.0150); 50,000 gave the same as
    # 20,000, ratio 3 0.0075 at about 40 percent more learner time.
    learner_replay_buffer_size: int = Field(
        20_000, ge=0, description="last N trained examples each step also replays a sample of (0 = no replay)")
    # 8e-3, not SITNConfig's offline 2e-3: one pass per event needs larger steps. Chosen on the first half of the
    # shipped stream, replay on: the live model's data-time NDCG@10 0.0064 at 2e-3, 0.0079 at 4e-3, 0.0088 at
    # 8e-3, 0.0087 at 1.6e-2; fused 0.0152 / 0.0154 / 0.0156 / 0.0155.
    learner_lr: float = Field(
        8e-3, gt=0, description="learning rate of the stream learner (a warm start keeps its model's)")
    learner_replay_ratio: float = Field(
        1.0, ge=0, description="replayed examples per fresh example in each step (each event trains ~1 + this often)")
    # 1.0: the model's scores then estimate log p(item | user) (the logQ-corrected softmax learns them without the
    # items' popularity). Chosen on the first half of the shipped stream (74,000 events; live model's data-time
    # NDCG@10 0.0091 at 0, 0.0108 at 0.5, 0.0110 at 1, 0.0109 at 1.5, 0.0103 at 2, 0.0097 at 3); on the second half,
    # which did not choose it: 0.0098 at 0 against 0.0108 at 1 (fused 0.0190 against 0.0192).
    learner_popularity_prior: float = Field(
        1.0, ge=0, description="beta of the popularity prior the model ranks with: every item's score gains "
        "beta * log(1 + its training labels) (SITNConfig.popularity_prior; 0 = none)")
    # Kept beside the all-time counts; the learner ranks with whichever the stream's windowed NDCG@10 favours
    # (learner/online/prior_tuner.py). A grid from fast to slow change, so no one data set's pace is built in.
    # Shipped stream, in-process, data-time NDCG@10 of the live model / fused ranker on the first half (74,000
    # events), counts decaying in quarter half-life steps: all-time counts 0.0110 / 0.0161; one fixed half-life
    # 1,000: 0.0134 / 0.0174, 3,000: 0.0131 / 0.0170, 10,000: 0.0120 / 0.0163; this grid chosen online 0.0134 /
    # 0.0172. On the second half, which chose nothing: all-time 0.0108 / 0.0192, the grid 0.0111 / 0.0196
    # (co-occurrence 0.0166). With whole half-life steps (learner/core/popularity.py says why) and the cold users'
    # own fused weight: first half 0.0134 / 0.0177, second half 0.0113 / 0.0197.
    learner_popularity_half_lives: tuple[int, ...] = Field(
        (1000, 3000, 10000, 30000), description="half-lives, in target labels, of the decayed label counts the "
        "popularity prior may read instead of all-time counts, chosen online (empty: all-time counts only)")
    prior_window: int = Field(
        5_000, ge=0, description="target events over which the popularity prior's half-life is chosen online "
        "(learner/online/prior_tuner.py; 0: keep all-time counts)")

    def sitn_config(self) -> SITNConfig:
        """The stream learner's model settings: SITNConfig's defaults with this run's shape and stream training."""
        values = {name: getattr(self, field) for field, name in LEARNER_FIELDS.items()}
        values["popularity_half_lives"] = tuple(values["popularity_half_lives"])
        return SITNConfig(**values)
    status_every_s: float = Field(1.0, gt=0, description="progress display refresh period")
    max_lag_events: int | None = Field(
        None, ge=1, description="replay backpressure: wait while the consumer group's lag is above this "
        "(must exceed one checkpoint interval plus the queue, since offsets are committed with checkpoints)",
    )
    gate_enabled: bool = Field(True, description="publish gate: hold back versions whose shadow NDCG@10 dropped")
    gate_max_drop: float = Field(0.5, gt=0, le=1, description="largest allowed relative NDCG@10 drop vs served")
    gate_window: int = Field(2000, ge=1, description="paired target events in the gate's window")
    gate_min_events: int = Field(200, ge=1, description="paired events since the last publish needed before the gate can close")
    gate_z_critical: float = Field(2.33, ge=0, description="paired z-test bound: a drop must also be this significant")
    gate_sample_per_step: int = Field(64, ge=1, description="target events per step also ranked by the live model")
    fallback_enabled: bool = Field(
        True, description="serve the best learnt ranker (model or fused), or the best servable baseline "
        "(popularity, co-occurrence) while both learnt rankers' prequential NDCG@10 is significantly below it "
        "(learner.online.gate.RankerFallback)",
    )
    fallback_window: int = Field(2000, ge=2, description="paired target events (model vs baselines) the fallback judges")
    fallback_min_events: int = Field(200, ge=2, description="paired events needed before the fallback can switch")
    fallback_z_critical: float = Field(2.33, gt=0, description="switch to a baseline when z(learnt - best) <= -this "
                                       "for every learnt ranker (model, fused); switch between learnt rankers at +this")
    fallback_recover_z: float = Field(0.0, description="switch back to the best learnt ranker when z(it - best) >= this")
    fused_weights: tuple[float, ...] = Field(
        (0.25, 0.5, 1.0, 2.0, 4.0), description="weights w of the fused ranker z(model) + w z(cooc) ranked on "
        "every target event; serving gets the best by windowed NDCG@10 (empty: no fused ranker)",
    )
    fused_window: int = Field(10_000, ge=1, description="target events the fused weights are judged on")
    transfer_scale_window: int = Field(
        5_000, ge=0, description="target events per slot (with / without target history) over which the query-time "
        "transfer scale is chosen online from 1, 0.5, 0.25, 0 (learner/online/transfer_scale.py; 0: keep the model's)",
    )
    prequential_sample: float = Field(
        1.0, gt=0, le=1, description="share of target events tested before training (prequential figures, shadow "
        "baselines, fused weights, tuners, gate, fallback: all on the same events, chosen by a hash of the event "
        "id); every event trains. Below 1 on large streams: testing took about a quarter of the learner's time")

    @model_validator(mode="after")
    def _fallback_consistent(self) -> RunSettings:
        if self.fallback_min_events > self.fallback_window:
            raise ValueError(f"fallback_min_events must be <= fallback_window ({self.fallback_window}), "
                             f"got {self.fallback_min_events}")
        if self.fallback_recover_z <= -self.fallback_z_critical:
            raise ValueError(f"fallback_recover_z must be > -fallback_z_critical ({-self.fallback_z_critical}), "
                             f"got {self.fallback_recover_z}")
        if len(set(self.fused_weights)) != len(self.fused_weights) or not all(0 < w < 1e6 for w in self.fused_weights):
            raise ValueError(f"fused_weights must be distinct numbers in (0, 1e6), got {list(self.fused_weights)}")
        return self
