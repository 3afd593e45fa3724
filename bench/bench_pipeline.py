"""The live pipeline end to end, in one run: training throughput, freshness and /recommend latency.

Replays the shipped data set (or its first ``--limit`` rows) through the real pipeline — Kafka broker
(started here) or the embedded log -> consumer actors -> learner actor (all losses on) -> serving actor
-> HTTP — and reports:

- events/s trained end to end: replayed events / (time the last one was trained - replay start);
- events read twice and dropped by the learner (``redelivered_dropped``; 0 in a fault-free run);
- freshness, from an event's arrival at the learner to its user's vectors being served: p50 / p99;
- ``/recommend`` latency at a fixed open-loop rate while the replay streams updates, then the same load
  on the idle pipeline (after the last publish): p50 / p99 of each, and their ratio; with each phase, the
  answers by the path that served them (``served_by``), the model path's share and the learnt rankers'
  (model or fused; the learner may switch serving to fused, which ranks with the user's vectors too;
  ``--ranker model`` keeps serving on the model, so the model share is the share answered from vectors);
- quality next to speed: the prequential HR@10 / NDCG@10 of the run and the final loss terms.

The load is aimed at users the model already serves: ``--known-share`` (default 0.9) of the requests name
a user serving has query vectors for, read from the serving actor once the first users are published and
every second while the streaming load runs (so it follows the users as training reaches them); the rest
name new users (popularity or co-occurrence answers). Drawing from every user in the replayed file instead
would aim most of the streaming load at users not trained yet, which measures the popularity path.

    python bench/bench_pipeline.py [--backend kafka|embedded] [--limit N] [--rate 200] [--duration-s 15]
                                   [--known-share 0.9] [--ranker learnt|model] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402

EVENTS = REPO.parent / "shared" / "data" / "amazon_movie_book_c2dsr" / "events.csv"


def load_driver() -> Any:
    spec = importlib.util.spec_from_file_location("bench_serving_http", REPO / "bench" / "bench_serving_http.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.drive


DRIVE_KNOWN_SHARE = 0.9  # drive() sends this share of its requests at an entry of user_ids, the rest at new users


class RequestUsers(Sequence[str]):
    """The ``user_ids`` handed to ``drive()``: users serving has vectors for, interleaved with new users so
    that ``known_fraction`` of the entries are served users.

    ``known`` may grow while the load runs (the served users, refreshed from serving); an entry's user never
    changes as it grows. ``drive()`` sends 90 % of its requests at an entry and 10 % at a new user, so the
    share of requests at served users is ``0.9 * known_fraction``.

    >>> users = RequestUsers(["a", "b", "c"], 0.5)
    >>> len(users), list(users)
    (6, ['new-user-0', 'a', 'new-user-2', 'b', 'new-user-4', 'c'])
    >>> list(RequestUsers(["a", "b"], 1.0)), list(RequestUsers(["a", "b"], 0.0))
    (['a', 'b'], ['new-user-0'])
    """

    def __init__(self, known: list[str], known_fraction: float) -> None:
        if not 0.0 <= known_fraction <= 1.0:
            raise ValueError(f"known_fraction must be in [0, 1], got {known_fraction}")
        self.known = known
        self.known_fraction = known_fraction

    def __len__(self) -> int:
        if self.known_fraction == 0.0:
            return 1  # one new user: every request misses
        return math.ceil(len(self.known) / self.known_fraction - 1e-9)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} entries")
        j = math.floor(i * self.known_fraction)  # entry i is known[j] where the fraction's floor steps up
        if math.floor((i + 1) * self.known_fraction) > j and j < len(self.known):
            return self.known[j]
        return f"new-user-{i}"


def _served_user_ids(core: Any) -> list[str]:
    """Runs inside the serving actor (``__ray_call__``): the users it has query vectors for."""
    return [user_id for user_id, _, _ in core.service.users.export()]


class ServedUsers:
    """The users serving has vectors for, refreshed from the serving actor every ``every_s`` in a thread
    while the streaming load runs, until all ``n_users`` of the replayed events are there; ``ids`` only
    grows (an append-only list ``RequestUsers`` reads). A refresh costs the serving actor a walk over its
    user ids: about 5 ms at the shipped data's 15k users."""

    def __init__(self, pipeline: Any, n_users: int, every_s: float = 1.0) -> None:
        self.pipeline = pipeline
        self.n_users = n_users
        self.every_s = every_s
        self.ids: list[str] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> int:
        """Add the users serving has now; return how many it has."""
        import ray

        now = ray.get(self.pipeline.serving.__ray_call__.remote(_served_user_ids), timeout=30)
        for user_id in now:
            if user_id not in self._seen:
                self._seen.add(user_id)
                self.ids.append(user_id)
        return len(now)

    def start(self) -> None:
        def body() -> None:
            while len(self.ids) < self.n_users and not self._stop.wait(self.every_s):
                self.refresh()

        self._thread = threading.Thread(target=body, name="served-users", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def phase_figures(result: dict[str, Any], known_at_start: int, known_at_end: int) -> dict[str, Any]:
    """One load phase: requests, errors, answers by path (``served_by``), the model path's share and the
    learnt rankers' (model or fused),
    latency p50/p99 (ms), and the served users requests were drawn from at its start and end."""
    lat_ms = np.asarray(result["latencies_s"]) * 1e3
    p50, p99 = np.percentile(lat_ms, [50, 99]) if len(lat_ms) else (np.nan, np.nan)
    served_by = dict(sorted(result["served_by"].items()))
    answered = sum(served_by.values())
    return {
        "requests": len(lat_ms), "errors": len(result["errors"]), "served_by": served_by,
        "model_share": served_by.get("model", 0) / answered if answered else float("nan"),
        # model or fused: a learnt ranker, which ranks with the user's vectors where serving has them
        "learnt_share": (served_by.get("model", 0) + served_by.get("fused", 0)) / answered if answered else float("nan"),
        "p50_ms": float(p50), "p99_ms": float(p99),
        "served_users_at_start": known_at_start, "served_users_at_end": known_at_end,
    }


def print_phase(name: str, phase: dict[str, Any]) -> None:
    print(f"  /recommend {name:<10} n={phase['requests']:<5} errors={phase['errors']} "
          f"served_by={phase['served_by']} model_share={phase['model_share']:.3f} "
          f"learnt_share={phase['learnt_share']:.3f} "
          f"p50_ms={phase['p50_ms']:.2f} p99_ms={phase['p99_ms']:.2f} "
          f"(served users {phase['served_users_at_start']:,} -> {phase['served_users_at_end']:,})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["kafka", "embedded"], default="kafka")
    parser.add_argument("--events", type=Path, default=EVENTS)
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--replay-rate", type=float, default=None, help="events/s (default: as fast as possible)")
    parser.add_argument("--rate", type=float, default=200.0, help="/recommend requests per second (open loop)")
    parser.add_argument("--known-share", type=float, default=DRIVE_KNOWN_SHARE,
                        help="share of /recommend requests at users serving has vectors for, at most "
                        f"{DRIVE_KNOWN_SHARE} (the load driver sends the rest at new users); default %(default)s")
    parser.add_argument("--ranker", choices=["learnt", "model"], default="learnt",
                        help="learnt: the learner picks serving's ranker (model or fused, or a baseline while both "
                        "are worse), as sitn run does; model: fallback and fused ranker off, the model answers")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args()
    if not 0.0 <= args.known_share <= DRIVE_KNOWN_SHARE:
        parser.error(f"--known-share must be in [0, {DRIVE_KNOWN_SHARE}] (the load driver sends "
                     f"{1 - DRIVE_KNOWN_SHARE:.0%} of requests at new users), got {args.known_share}")
    record = BenchRecord("bench_pipeline", args)
    known_fraction = args.known_share / DRIVE_KNOWN_SHARE

    from serving.settings import ServingSettings
    from sitn.pipeline import Pipeline
    from sitn.ray_cluster import init_ray
    from sitn.settings import RunSettings
    from stream.dataset import load_events
    from stream.settings import StreamSettings

    drive = load_driver()
    events = load_events(args.events, "movie", "book", limit=args.limit).events
    users = {e.user_id for e in events}
    tmp = Path(tempfile.mkdtemp(prefix="sitn-bench-"))
    broker = None
    bootstrap = None
    if args.backend == "kafka":
        import socket

        from sitn.broker import KafkaBroker

        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            port, controller = a.getsockname()[1], b.getsockname()[1]
        broker = KafkaBroker(tmp / "kafka", port=port, controller_port=controller)
        broker.start(timeout_s=120)
        bootstrap = broker.bootstrap_servers
    # --ranker model: no fallback and no fused ranker, so serving answers every user with vectors by the model
    pinned = {"fallback_enabled": False, "fused_weights": ()} if args.ranker == "model" else {}
    run = RunSettings(rate_events_per_s=args.replay_rate, batch_size=args.batch_size, **pinned)
    config = run.sitn_config()  # the model sitn run trains: all losses on, the stream's learning rate and replay
    stream = StreamSettings(kafka_bootstrap_servers=bootstrap, embedded_log_dir=tmp / "log")
    serving = ServingSettings(port=0)
    print(f"backend={args.backend} events={len(events)} users={len(users)} batch={args.batch_size} "
          f"config(dim={config.dim}, V={config.n_views}, L={config.max_len}, layers={config.n_layers}, "
          f"K={config.cluster_counts}, i2i={config.use_i2i}, i2c={config.use_i2c}) index={serving.index_factory} "
          f"known_share={args.known_share} ranker={args.ranker}")
    init_ray()
    pipeline = Pipeline(run, stream, serving, config, tmp / "run")
    served = ServedUsers(pipeline, len(users))
    try:
        pipeline.start()
        url = pipeline.serving_url
        t0 = time.monotonic()
        pipeline.start_replay(events)
        # The load starts once serving has users to ask about; it then follows the served users as they grow.
        while served.refresh() == 0:
            pipeline.supervise()
            time.sleep(0.2)
        streaming: dict[str, Any] = {}
        streaming_known_at_start = len(served.ids)

        def load() -> None:
            streaming.update(drive(url, args.rate, args.warmup_s, args.duration_s,
                                   RequestUsers(served.ids, known_fraction), args.seed))

        served.start()
        loader = threading.Thread(target=load)
        loader.start()
        while not pipeline.caught_up():
            pipeline.supervise()
            time.sleep(0.2)
        trained_s = time.monotonic() - t0
        load_outlived_training = loader.is_alive()  # then the tail of the load phase met an idle pipeline
        loader.join()
        served.stop()
        streaming_known_at_end = len(served.ids)
        status = pipeline.status()
        summary = pipeline.finish_training()
        # the prequential figures of every ranker on the same tested events (model, fused, the baselines), as
        # summary.json has them: a model figure means something only beside its baselines
        prequential = pipeline.summary(time.monotonic() - t0).get("prequential") or {}
        pipeline.learner = None
        # Idle means idle: wait until serving has applied the last (full) publish and nothing more arrives.
        applied = -1.0
        while (now := pipeline.status().get("batches_applied", 0.0)) != applied:
            applied = now
            time.sleep(3.0)
        idle_known = served.refresh()
        idle = drive(url, args.rate, args.warmup_s, args.duration_s, RequestUsers(served.ids, known_fraction),
                     args.seed + 1)
        final = pipeline.status()
    finally:
        served.stop()
        pipeline.stop()
        if broker is not None:
            broker.stop()
    s = phase_figures(streaming, streaming_known_at_start, streaming_known_at_end)
    i = phase_figures(idle, idle_known, idle_known)
    figures = {
        "events": len(events), "users_in_events": len(users), "model_config": config.to_dict(),
        "index_factory": serving.index_factory, "trained_s": trained_s, "events_per_s": len(events) / trained_s,
        "replay_events_per_s": status["replay_rate"], "steps": int(summary["step"]), "restarts": status["restarts"],
        "redelivered_dropped": int(summary["redelivered_dropped"]),
        "redelivered_share": summary["redelivered_dropped"] / len(events),
        "freshness_s": {"p50": final["freshness_p50_s"], "p99": final["freshness_p99_s"]},
        "load_outlived_training": load_outlived_training,
        "recommend": {"streaming": s, "idle": i, "p99_streaming_over_idle": s["p99_ms"] / i["p99_ms"],
                      "ranker_at_end": final.get("served_by")},
        "quality": {"prequential_hr_at_10": status.get("prequential_hr_at_10", float("nan")),
                    "prequential_ndcg_at_10": status.get("prequential_ndcg_at_10", float("nan")),
                    **{f"final_{name}": summary.get(name, float("nan")) for name in ("loss_main", "loss_i2i", "loss_i2c")},
                    "prequential": prequential},
    }
    print(f"  trained {figures['events']} events in {trained_s:.1f} s: {figures['events_per_s']:,.0f} events/s end to "
          f"end (replay {figures['replay_events_per_s']:,.0f}/s, steps={figures['steps']}, restarts={figures['restarts']})")
    print(f"  read twice and dropped by the learner: {figures['redelivered_dropped']:,} events "
          f"({figures['redelivered_share']:.1%} of the stream)")
    print(f"  freshness p50_s={figures['freshness_s']['p50']:.2f} p99_s={figures['freshness_s']['p99']:.2f}")
    if load_outlived_training:
        print("  note: training caught up before the load phase ended; the tail of 'streaming' ran idle")
    print_phase("streaming", s)
    print_phase("idle", i)
    print(f"  p99 streaming / idle = {figures['recommend']['p99_streaming_over_idle']:.2f}x; "
          f"ranker at the end: {figures['recommend']['ranker_at_end']}")
    q = figures["quality"]
    print(f"  quality: prequential HR@10={q['prequential_hr_at_10']:.4f} NDCG@10={q['prequential_ndcg_at_10']:.4f}"
          f"  final loss main={q['final_loss_main']:.3f} i2i={q['final_loss_i2i']:.3f} i2c={q['final_loss_i2c']:.3f}")
    for line in prequential_lines(prequential):
        print(line)
    if args.json is not None:
        record.write(args.json, figures)
        print(f"wrote {args.json}")


def _ratio(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}x"


def prequential_lines(prequential: dict[str, Any]) -> list[str]:
    """NDCG@10 of every ranker over the whole stream and the last window (all tested book events, and the
    rankable ones), with the rankable fraction and each learnt ranker's lift over the best baseline.

    >>> figures = {"ndcg": 0.02, "ndcg_rankable": 0.04, "hr": 0.1, "hr_rankable": 0.2}
    >>> lines = prequential_lines({"target_events": 10, "prequential_sample": 1.0, "rankable_ratio": {"stream": 0.5,
    ...     "window": 0.5}, "rankers": {"model": {"stream": figures, "window": figures}}, "best_baseline": "model",
    ...     "lifts": {"model": {"stream": 1.0, "window": 1.0}}})
    >>> lines[1].split()
    ['model', 'stream', '0.0200', '0.0400', 'window', '0.0200', '0.0400']
    >>> lines[-1]
    '  over the best baseline (model), whole stream / last window: model 1.000x / 1.000x'
    """
    if not prequential.get("rankers"):
        return ["  prequential: no figures (the learner reported none)"]
    ratio = prequential["rankable_ratio"]
    lines = [f"  prequential NDCG@10 over {prequential['target_events']:,} tested book events (sample "
             f"{prequential['prequential_sample']:g}; rankable {ratio['stream']:.1%} whole stream, {ratio['window']:.1%} "
             f"last window), all / rankable:"]
    for name, spans in prequential["rankers"].items():
        lines.append(f"    {name:<20} stream {spans['stream']['ndcg']:.4f} {spans['stream']['ndcg_rankable']:.4f}   "
                     f"window {spans['window']['ndcg']:.4f} {spans['window']['ndcg_rankable']:.4f}")
    lines.append(f"  over the best baseline ({prequential['best_baseline']}), whole stream / last window: " + "; ".join(
        f"{name} {_ratio(spans['stream'])} / {_ratio(spans['window'])}" for name, spans in prequential["lifts"].items()))
    return lines


if __name__ == "__main__":
    main()
