"""Load and soak: the live pipeline fed at twice its sustainable rate, with backpressure, for N minutes.

An endless synthetic stream from the seeded generator (``stream.synthetic``; new users keep arriving,
produced lazily, a chunk per tick) goes into the pipeline's log (embedded by default, ``--kafka`` for a
broker started here) through ``stream.producer.paced_send`` with a ``LagThrottle`` on the consumer
group's lag. The full pipeline runs on real Ray actors (consumers -> learner -> serving). The caps on
users (consumers' user state, the learner's histories, serving's vectors and consumed sets) are set
small (``--max-users``) so they are reached in the first minutes and "flat after warm-up" means something.

1. **Measure** (``--measure-s``): produce flat out with backpressure; the sustainable rate is the trained
   events/s over the second half (skipped with ``--rate`` or ``--sustainable-rate``).
2. **Soak** (``--minutes``): offer ``--rate`` (default 2 x sustainable); the throttle holds the producer
   to what the pipeline sustains, so lag stays bounded.

Every ``--sample-s``: resident memory of every process (the driver, each Ray actor by its process title,
Ray's own processes, the broker), the group's lag, events produced and trained, users served and
evicted, errors (dead letters, restarts, actor errors, a failing ``/recommend`` probe, a producer error).
At the end: a table (medians, p5-p95, max, memory slope in MB per 10 min by a linear fit over the
second half of the soak, max lag), and ``soak.csv`` + ``soak.png`` in ``--output``.

Exit status: 1 if any error occurred; 2 if the total memory slope after warm-up exceeds
``--max-slope-mb-per-10min`` (judged only when the second half lasts at least 5 minutes); else 0.

    python bench/bench_soak.py [--minutes 30] [--rate X | --sustainable-rate Y] [--kafka] [--max-users 20000]
                               [--json PATH]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402
from sitn.resources import COMPONENTS, rss_by_component  # noqa: E402

MIN_JUDGED_S = 300.0  # the post-warm-up window needed before a slope is judged

@dataclass
class Producer:
    """The producing thread: one ``paced_send`` per phase over one lazy synthetic event iterator."""

    events: Any
    producer: Any
    throttle: Any
    sent: int = 0
    error: str | None = None
    throttled_s: float = 0.0
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, rate_events_per_s: float | None) -> None:
        from stream.producer import paced_send

        self._stop = threading.Event()
        base = self.sent

        def body() -> None:
            try:
                stats = paced_send(self.events, self.producer, rate_events_per_s, throttle=self.throttle,
                                   stop=self._stop, on_sent=lambda n: setattr(self, "sent", base + n))
                self.throttled_s += stats.throttled_s
            except Exception as exc:  # reported as an error of the run, and the run goes on to report it
                self.error = f"{type(exc).__name__}: {exc}"
                raise

        self._thread = threading.Thread(target=body, name="soak-producer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def probe(url: str, user_id: str) -> str | None:
    """One ``/recommend``; the error, or None."""
    import httpx

    try:
        r = httpx.get(f"{url}/recommend", params={"user_id": user_id, "k": 10}, timeout=10)
    except httpx.HTTPError as exc:
        return f"recommend: {exc!r}"
    return None if r.status_code == 200 else f"recommend: HTTP {r.status_code} {r.text[:80]}"


def slope_mb_per_10min(t_s: np.ndarray, mb: np.ndarray) -> float:
    if len(t_s) < 3 or t_s[-1] - t_s[0] <= 0:
        return math.nan
    return float(np.polyfit(t_s, mb, 1)[0] * 600.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="soak duration (after the measurement)")
    parser.add_argument("--rate", type=float, default=None, help="offered events/s (default: 2 x sustainable)")
    parser.add_argument("--sustainable-rate", type=float, default=None, help="skip the measurement, use this")
    parser.add_argument("--measure-s", type=float, default=90.0, help="flat-out phase that measures it")
    parser.add_argument("--kafka", action="store_true", help="a Kafka broker (started here) instead of the embedded log")
    parser.add_argument("--max-users", type=int, default=20_000, help="user caps: learner, consumers, serving")
    parser.add_argument("--users", type=int, default=50_000, help="synthetic users present at the start")
    parser.add_argument("--new-user-share", type=float, default=0.05, help="share of events by a brand-new user")
    parser.add_argument("--max-lag-events", type=int, default=None,
                        help="backpressure bound (default: 2 x (one checkpoint interval + the queue))")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--max-slope-mb-per-10min", type=float, default=25.0, help="total RSS slope allowed after warm-up")
    parser.add_argument("--output", type=Path, default=REPO / "var" / "artifacts" / "soak")
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args()
    record = BenchRecord("bench_soak", args)

    from learner.core.config import SITNConfig
    from serving.settings import ServingSettings
    from sitn.pipeline import Pipeline
    from sitn.ray_cluster import init_ray
    from sitn.settings import RunSettings
    from stream.group_offsets import GroupLag
    from stream.producer import LagThrottle, open_producer
    from stream.settings import StreamSettings
    from stream.synthetic import SyntheticConfig, SyntheticStream

    tmp = Path(tempfile.mkdtemp(prefix="sitn-soak-"))
    broker = None
    bootstrap = None
    if args.kafka:
        from sitn.broker import KafkaBroker
        from tests.fixtures.kafka import free_ports

        port, controller = free_ports(2)
        broker = KafkaBroker(tmp / "kafka", port=port, controller_port=controller)
        broker.start(timeout_s=120)
        bootstrap = broker.bootstrap_servers
    run = RunSettings(events=None, rate_events_per_s=None, batch_size=256, checkpoint_every_steps=50)
    stream = StreamSettings(kafka_bootstrap_servers=bootstrap, embedded_log_dir=tmp / "log", batch_size=500,
                            partitions=4)
    serving = ServingSettings(port=0, max_users=args.max_users)
    config = SITNConfig(max_users=args.max_users)
    need = run.checkpoint_every_steps * run.batch_size + run.queue_maxsize * stream.batch_size
    max_lag = args.max_lag_events or 2 * need
    synthetic = SyntheticConfig(events=None, n_users=args.users, new_user_share=args.new_user_share, seed=args.seed)
    print(f"backend={'kafka' if args.kafka else 'embedded'} max_users={args.max_users} "
          f"synthetic(users={args.users}, new_user_share={args.new_user_share}, items={synthetic.n_source_items}"
          f"+{synthetic.n_target_items}, seed={args.seed}) checkpoint_every={run.checkpoint_every_steps}x"
          f"{run.batch_size} max_lag_events={max_lag} dim={config.dim} index={serving.index_factory}", flush=True)

    init_ray()
    pipeline = Pipeline(run, stream, serving, config, tmp / "run")
    lag = None
    producer: Producer | None = None
    rows: list[dict[str, float]] = []
    errors: list[str] = []
    seen_errors: set[str] = set()
    phase_marks: dict[str, float] = {}
    sustainable: float | None = args.sustainable_rate
    rate = math.nan
    produced_at_soak = throttled_at_soak = 0.0

    def note(error: str) -> None:
        if error not in seen_errors:
            seen_errors.add(error)
            errors.append(error)
            print(f"  ERROR {error}", flush=True)

    try:
        pipeline.start()
        lag = GroupLag(stream)
        throttle = LagThrottle(GroupLag(stream), max_lag)
        throttle.check_headroom(run.checkpoint_every_steps * run.batch_size, run.queue_maxsize * stream.batch_size)
        producer = Producer(SyntheticStream(synthetic).events(), open_producer(stream), throttle)
        url = pipeline.serving_url
        assert url is not None
        t0 = time.monotonic()
        restarts0 = (pipeline.restarts, pipeline.serving_restarts)

        def sample(phase: str) -> dict[str, float]:
            try:
                pipeline.supervise()
            except Exception as exc:
                note(f"supervise: {type(exc).__name__}: {exc}")
            status = pipeline.status()
            for key in ("learner_error", "serving_error", "consumer_error"):
                if key in status:
                    note(f"{key}: {status[key]}")
            assert producer is not None and lag is not None
            if producer.error:
                note(f"producer: {producer.error}")
            if pipeline.restarts > restarts0[0] or pipeline.serving_restarts > restarts0[1]:
                note(f"restarts: learner+consumers {pipeline.restarts - restarts0[0]}, "
                     f"serving {pipeline.serving_restarts - restarts0[1]}")
            if status.get("dead_letters", 0):
                note(f"dead letters: {status['dead_letters']}")
            user = f"u{np.random.default_rng(len(rows)).integers(0, args.users)}"
            if (failure := probe(pipeline.serving_url or url, user)) is not None:
                note(failure)
            lags = lag()
            row: dict[str, float] = {
                "t_s": time.monotonic() - t0, "phase": float(phase == "soak"),
                "produced": float(producer.sent), "trained": float(status.get("events_applied", 0)),
                "lag_events": float(sum(lags.values())), "lag_max_partition": float(max(lags.values())),
                "throttled_s": throttle.throttled_s, "serving_users": float(status.get("users", 0)),
                "dead_letters": float(status.get("dead_letters", 0)), "errors": float(len(errors)),
                "hr_at_10": float(status.get("prequential_hr_at_10", math.nan)),
            }
            mem = rss_by_component()
            row.update({f"rss_{c}_mb": mb for c, mb in mem.items()})
            row["rss_total_mb"] = sum(mem.values())
            rows.append(row)
            print(f"  {phase:<7} t={row['t_s']:6.0f}s produced={row['produced']:>9,.0f} trained={row['trained']:>9,.0f} "
                  f"lag={row['lag_events']:>7,.0f} throttled={row['throttled_s']:6.0f}s users={row['serving_users']:>7,.0f} "
                  f"rss_total={row['rss_total_mb']:7.0f}MB learner={mem['learner']:5.0f} serving={mem['serving']:5.0f} "
                  f"consumers={mem['consumers']:5.0f} driver={mem['driver']:5.0f} errors={len(errors)}", flush=True)
            return row

        def run_phase(phase: str, rate: float | None, duration_s: float) -> None:
            assert producer is not None
            producer.stop()
            producer.start(rate)
            phase_marks[phase] = time.monotonic() - t0
            end_s = time.monotonic() + duration_s
            next_s = time.monotonic()
            while time.monotonic() < end_s:
                next_s = max(next_s + args.sample_s, time.monotonic())  # a slow sample delays, never bunches, the next
                sample(phase)
                time.sleep(max(0.0, next_s - time.monotonic()))

        if args.rate is None and sustainable is None:
            run_phase("measure", None, args.measure_s)
            half = [r for r in rows if r["t_s"] >= phase_marks["measure"] + args.measure_s / 2]
            if len(half) < 2 or half[-1]["t_s"] <= half[0]["t_s"]:
                raise SystemExit(f"--measure-s {args.measure_s} is too short to measure a rate")
            sustainable = (half[-1]["trained"] - half[0]["trained"]) / (half[-1]["t_s"] - half[0]["t_s"])
        rate = args.rate if args.rate is not None else 2 * float(sustainable or 0.0)
        if rate <= 0:
            raise SystemExit(f"offered rate must be > 0 events/s, got {rate} (sustainable {sustainable})")
        print(f"sustainable rate: {sustainable if sustainable is not None else float('nan'):,.0f} events/s "
              f"({'given' if args.sustainable_rate is not None else 'measured' if args.rate is None else 'not used'}); "
              f"offered rate: {rate:,.0f} events/s", flush=True)
        produced_at_soak, throttled_at_soak = float(producer.sent), throttle.throttled_s
        run_phase("soak", rate, args.minutes * 60.0)
        producer.stop()
        if producer.error:
            note(f"producer: {producer.error}")
    except Exception as exc:  # the run failed: still report what was sampled, and exit non-zero
        note(f"run: {type(exc).__name__}: {exc}")
    finally:
        if producer is not None:
            producer.stop()
            producer.producer.close()
        if lag is not None:
            lag.close()
        pipeline.stop()
        if broker is not None:
            broker.stop()
    if "soak" not in phase_marks or not any(r["phase"] == 1.0 for r in rows):
        print("FAIL: the soak did not run: " + "; ".join(errors))
        if args.json is not None:
            record.write(args.json, {"soak_ran": False, "errors": errors, "samples": rows})
        return 1
    figures = {"soak_ran": True, **soak_figures(args, rows, errors, phase_marks, sustainable, rate, max_lag,
                                                 produced_at_soak, throttled_at_soak)}
    status = report(args, rows, phase_marks, max_lag, figures)
    if args.json is not None:
        record.write(args.json, {**figures, "exit_status": status})
        print(f"wrote {args.json}")
    return status


def soak_figures(args: argparse.Namespace, rows: list[dict[str, float]], errors: list[str], marks: dict[str, float],
                 sustainable: float | None, rate: float, max_lag: int, produced_at_soak: float,
                 throttled_at_soak: float) -> dict[str, Any]:
    """What the soak prints: rates, memory per component over the second half (median, p5, p95, max,
    slope), lag, users and HR@10 at the end, the errors, the verdict on memory flatness, and every sample."""
    soak = [r for r in rows if r["phase"] == 1.0]
    col = defaultdict(list)
    for r in soak:
        for k, v in r.items():
            col[k].append(v)
    t = np.array(col["t_s"])
    t_start, t_end = marks["soak"], t[-1]
    late = t >= t_start + (t_end - t_start) / 2  # the second half: after warm-up
    span_s = t_end - t_start
    produced = col["produced"][-1] - produced_at_soak
    rss_mb: dict[str, dict[str, float]] = {}
    for c in (*COMPONENTS, "total"):
        mb = np.array(col[f"rss_{c}_mb"])[late]
        if not mb.size or mb.max() == 0:
            continue
        p5, p50, p95 = np.percentile(mb, [5, 50, 95])
        rss_mb[c] = {"median": float(p50), "p5": float(p5), "p95": float(p95), "max": float(mb.max()),
                     "slope_per_10min": slope_mb_per_10min(t[late], mb)}
    lag = np.array(col["lag_events"])
    judged = bool(t_end - (t_start + span_s / 2) >= MIN_JUDGED_S)
    return {
        "soak_s": float(span_s), "offered_events_per_s": rate, "sustainable_events_per_s": sustainable,
        "produced": produced, "achieved_events_per_s": produced / span_s,
        "throttled_s": col["throttled_s"][-1] - throttled_at_soak, "trained_in_all": col["trained"][-1],
        "rss_mb_second_half": rss_mb,
        "lag_events": {"median": float(np.median(lag)), "p95": float(np.percentile(lag, 95)), "max": float(lag.max()),
                       "second_half": {"median": float(np.percentile(lag[late], 50)),
                                       "p95": float(np.percentile(lag[late], 95)), "max": float(lag[late].max())},
                       "bound": max_lag},
        "serving_users_end": col["serving_users"][-1], "max_users": args.max_users,
        "prequential_hr_at_10_end": col["hr_at_10"][-1],
        "errors": errors, "memory_judged": judged,
        # judged and not growing faster than allowed (a slope that cannot be fitted, NaN, does not fail)
        "memory_flat": not rss_mb["total"]["slope_per_10min"] > args.max_slope_mb_per_10min if judged else None,
        "samples": rows,  # every printed sample line (soak.csv holds the same rows)
    }


def report(args: argparse.Namespace, rows: list[dict[str, float]], marks: dict[str, float], max_lag: int,
           figures: dict[str, Any]) -> int:
    """Print ``figures`` (``soak_figures``), write soak.csv and soak.png; the exit status."""
    args.output.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = args.output / "soak.csv", args.output / "soak.png"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    f = figures
    sustainable = f["sustainable_events_per_s"]
    print(f"\nsoak {f['soak_s'] / 60:.1f} min, offered {f['offered_events_per_s']:,.0f} events/s "
          f"(sustainable {sustainable if sustainable is not None else float('nan'):,.0f}): "
          f"produced {f['produced']:,.0f} = {f['achieved_events_per_s']:,.0f} events/s achieved, "
          f"throttled {f['throttled_s']:,.0f} s, trained {f['trained_in_all']:,.0f} in all")
    print(f"{'component':<12}{'median MB':>10}{'p5-p95 MB':>16}{'max MB':>9}{'slope MB/10min':>16}  (second half)")
    for c, mb in f["rss_mb_second_half"].items():
        p5_p95 = f"{mb['p5']:.0f}-{mb['p95']:.0f}"
        print(f"{c:<12}{mb['median']:>10.0f}{p5_p95:>16}{mb['max']:>9.0f}{mb['slope_per_10min']:>16.1f}")
    lag = f["lag_events"]
    print(f"lag events: median {lag['median']:,.0f}, p95 {lag['p95']:,.0f}, max {lag['max']:,.0f} "
          f"(second half: median {lag['second_half']['median']:,.0f}, p95 {lag['second_half']['p95']:,.0f}, "
          f"max {lag['second_half']['max']:,.0f}); bound {lag['bound']:,}")
    print(f"serving users at the end: {f['serving_users_end']:,.0f} (cap {f['max_users']:,}); "
          f"prequential HR@10 at the end: {f['prequential_hr_at_10_end']:.4f}")
    plot(png_path, rows, marks, max_lag)
    print(f"wrote {csv_path} and {png_path}")
    errors = f["errors"]
    if errors:
        print(f"FAIL: {len(errors)} error(s): " + "; ".join(errors[:10]))
        return 1
    if not f["memory_judged"]:
        print(f"memory flatness not judged: the second half lasted {f['soak_s'] / 2:.0f} s < {MIN_JUDGED_S:.0f} s")
    elif not f["memory_flat"]:
        print(f"FAIL: total RSS grows {f['rss_mb_second_half']['total']['slope_per_10min']:.1f} MB per 10 min "
              f"after warm-up (allowed {args.max_slope_mb_per_10min})")
        return 2
    print("OK: no errors" + (", memory flat after warm-up" if f["memory_judged"] else ""))
    return 0


def plot(path: Path, rows: list[dict[str, float]], marks: dict[str, float], max_lag: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_min = np.array([r["t_s"] for r in rows]) / 60
    fig, (ax_mem, ax_lag) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    for c in (*COMPONENTS, "total"):
        mb = np.array([r[f"rss_{c}_mb"] for r in rows])
        if mb.max() > 0:
            ax_mem.plot(t_min, mb, label=c, linewidth=2.0 if c == "total" else 1.2)
    ax_mem.set_ylabel("resident memory (MB)")
    ax_mem.legend(loc="upper left", ncol=3, fontsize=8)
    ax_lag.plot(t_min, [r["lag_events"] for r in rows], label="group lag (events)", color="tab:red")
    ax_lag.axhline(max_lag, color="tab:red", linestyle="--", linewidth=0.8, label="backpressure bound")
    ax_lag.set_ylim(bottom=0)
    ax_mem.set_ylim(bottom=0)
    ax_lag.set_ylabel("consumer group lag (events)")
    ax_rate = ax_lag.twinx()
    produced = np.array([r["produced"] for r in rows])
    trained = np.array([r["trained"] for r in rows])
    dt_s = np.diff(t_min * 60, prepend=np.nan)
    ax_rate.plot(t_min, np.diff(produced, prepend=np.nan) / dt_s, label="produced/s", color="tab:blue", alpha=0.6)
    ax_rate.plot(t_min, np.diff(trained, prepend=np.nan) / dt_s, label="trained/s", color="tab:green", alpha=0.6)
    ax_rate.set_ylabel("events/s")
    for ax in (ax_mem, ax_lag):
        for phase, start in marks.items():
            ax.axvline(start / 60, color="grey", linestyle=":")
            ax.text(start / 60, ax.get_ylim()[1], f" {phase}", va="top", fontsize=8, color="grey")
    ax_lag.legend(loc="upper left", fontsize=8)
    ax_rate.legend(loc="upper right", fontsize=8)
    ax_lag.set_xlabel("minutes")
    fig.suptitle("sitn-stream soak: resident memory per component and consumer lag")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
