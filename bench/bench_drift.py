"""Drift detection: delay after an injected drift and false alarms on stationary streams, over seeds.

Two parts, both on the seeded synthetic stream (``stream/synthetic.py``) with the default DriftSettings
unless a flag says otherwise:

- ``input``: ``DriftMonitor.observe_events`` in batches of 256 events. Each drift kind is injected at
  the middle of ``--events``; the delay is events from the injection to the first alarm of each signal.
  False alarms are the alarms before the injection, plus every alarm of the ``none`` stream, per million
  events. The cost of one ``observe_events`` call is printed next to it.
- ``model``: the real ``OnlineTrainer`` (no Ray) with a small SITN (dim 16) trains on the stream, and
  ``observe_step`` sees every step's statistics (losses, prequential HR/NDCG), ``observe_events`` every
  batch and ``observe_assignments`` the prototype sizes every 25 steps. The first ``--burn-in-steps``
  train unmonitored (the learning curve is not drift); the drift lands at 2/3 of ``--steps``. The delay
  is in steps; false alarms are per 1000 monitored steps before the injection (``none``: all of them).

Medians and [min, max] over seeds; "found k/n" counts the seeds where the signal alarmed after the drift.

    python bench/bench_drift.py --quick        # ~3 minutes on one shared core
    python bench/bench_drift.py                # input: 5 seeds x 1M events; model: 3 seeds x 800 steps
    python bench/bench_drift.py --part model --model-kinds interest_swap popularity none
    python bench/bench_drift.py --quick --json drift.json   # also the figures, configuration and load as JSON
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402
from learner.online.drift import DriftAlarm, DriftMonitor, DriftSettings  # noqa: E402
from stream.synthetic import SyntheticConfig, SyntheticStream  # noqa: E402

BATCH = 256
INPUT_KINDS = ("none", "domain_mix", "popularity", "interest_swap")


@dataclass
class RunResult:
    first_after: dict[str, int] = field(default_factory=dict)  # signal -> delay (events or steps)
    first_detector: dict[str, str] = field(default_factory=dict)  # signal -> detector of that first alarm
    false_alarms: dict[str, int] = field(default_factory=dict)  # signal -> alarms in the stationary part
    stationary: int = 0  # events or steps watched before the drift (all of them without drift)
    cost_us: list[float] = field(default_factory=list)


def tally(alarms: list[DriftAlarm], drift_at: int | None, result: RunResult) -> None:
    for alarm in alarms:
        if drift_at is not None and alarm.index >= drift_at:
            if alarm.signal not in result.first_after:
                result.first_after[alarm.signal] = alarm.index - drift_at
                result.first_detector[alarm.signal] = alarm.detector
        else:
            result.false_alarms[alarm.signal] = result.false_alarms.get(alarm.signal, 0) + 1


# -- input part --------------------------------------------------------------------------------------


def input_run(kind: str, seed: int, n_events: int, settings: DriftSettings) -> RunResult:
    drift = None if kind == "none" else kind
    config = SyntheticConfig(events=n_events, seed=seed, drift=drift, drift_at_fraction=0.5 if drift else None)
    monitor = DriftMonitor(settings)
    result = RunResult()
    alarms: list[DriftAlarm] = []
    for chunk in SyntheticStream(config).chunks():
        domains, items = chunk.domain_names(), chunk.item_ids()  # outside the timed region
        for i in range(0, len(domains), BATCH):
            started = time.perf_counter()
            alarms += monitor.observe_events(domains[i : i + BATCH], items[i : i + BATCH])
            result.cost_us.append((time.perf_counter() - started) * 1e6)
    drift_at = config.drift_index
    result.stationary = n_events if drift_at is None else drift_at
    tally(alarms, drift_at, result)
    return result


# -- model part --------------------------------------------------------------------------------------


def model_run(kind: str, seed: int, args: argparse.Namespace, settings: DriftSettings) -> RunResult:
    import torch

    from learner import SITNConfig, SITNLearner
    from learner.online.publisher import CallableTransport
    from learner.online.trainer import OnlineTrainer
    from stream.consumer import EventBatch

    torch.set_num_threads(args.threads)
    drift = None if kind == "none" else kind
    drift_step = args.steps * 2 // 3
    config = SyntheticConfig(
        events=args.steps * BATCH, seed=seed, n_users=2_000, n_source_items=2_000, n_target_items=2_000,
        new_user_share=0.002, drift=drift, drift_at_event=drift_step * BATCH if drift else None,
    )
    model = SITNConfig(
        dim=args.dim, max_len=10, n_views=2, cluster_counts=(16,), n_item_clusters=16, n_sampled_negatives=32,
        i2c_warmup_steps=25, recluster_every_steps=25, reservoir_size=1024, initial_item_capacity=2048,
        proj_dim=args.dim, view_hidden=args.dim, seed=seed,
    )
    trainer = OnlineTrainer(SITNLearner(model, config.source, config.target), CallableTransport(lambda _b: None),
                            None, batch_size=BATCH, publish_every_steps=10, publish_every_s=1e9,
                            full_publish_every=1000)
    monitor = DriftMonitor(settings)
    result = RunResult()
    alarms: list[DriftAlarm] = []
    offset = 0
    step = 0
    for chunk in SyntheticStream(config.replace(chunk_events=BATCH)).chunks():
        events = chunk.events()
        stats = trainer.process(EventBatch.of(events, 0, offset, "c0"))
        offset += len(events)
        step = int(trainer.learner.step)
        if step <= args.burn_in_steps:
            continue
        started = time.perf_counter()
        for s in stats:
            alarms += monitor.observe_step(s, int(s["step"]))
        alarms += monitor.observe_events([e.domain for e in events], [e.item_id for e in events])
        if step % 25 == 0 and trainer.learner.prototypes is not None:
            for (role, k), proto in trainer.learner.prototypes.sets.items():
                alarms += monitor.observe_assignments(f"proto_{role}_k{k}", proto.sizes, step=step)
        result.cost_us.append((time.perf_counter() - started) * 1e6)
    result.stationary = (step if drift is None else drift_step) - args.burn_in_steps
    # Event-indexed alarms (input signals) are converted to steps so every delay is in steps.
    as_steps = [a if a.index_unit != "event" else
                DriftAlarm(a.signal, a.detector, a.index // BATCH, "step", a.value, a.threshold, a.wall_time_s)
                for a in alarms]
    tally(as_steps, drift_step if drift else None, result)
    return result


# -- report ------------------------------------------------------------------------------------------


def summarize(kind: str, results: list[RunResult], unit: str, per: float) -> dict[str, Any]:
    """The figures of one drift kind over seeds: false alarms, monitor cost, and per signal the delays
    (median, min, max, each seed's), the seeds that found the drift, first detectors, false alarms."""
    cost = np.concatenate([r.cost_us for r in results]) if results else np.zeros(1)
    stationary = sum(r.stationary for r in results)
    total_false = sum(sum(r.false_alarms.values()) for r in results)
    signals: dict[str, dict[str, Any]] = {}
    for signal in sorted({s for r in results for s in (*r.first_after, *r.false_alarms)}):
        delays = [float(r.first_after[signal]) for r in results if signal in r.first_after]
        signals[signal] = {
            "delay_median": float(np.median(delays)) if delays else None,
            "delay_min": min(delays) if delays else None,
            "delay_max": max(delays) if delays else None,
            "delays": delays,
            "found": len(delays),
            "first_detectors": sorted({r.first_detector[signal] for r in results if signal in r.first_detector}),
            "false_alarms_per_seed": [r.false_alarms.get(signal, 0) for r in results],
        }
    return {
        "kind": kind, "seeds": len(results), "unit": unit, "stationary": stationary, "false_alarms": total_false,
        "false_alarms_per": per, "false_alarm_rate": total_false / stationary * per,
        "monitor_cost_us": {"median": float(np.median(cost)), "p90": float(np.percentile(cost, 90))},
        "signals": signals,
    }


def print_summary(part: str, summary: dict[str, Any]) -> None:
    unit, per = summary["unit"], summary["false_alarms_per"]
    print(f"[{part}] drift={summary['kind']:13s} seeds={summary['seeds']} stationary_{unit}={summary['stationary']:,} "
          f"false_alarms={summary['false_alarms']} ({summary['false_alarm_rate']:.2f} per {per:,.0f} {unit}) | "
          f"monitor cost per call: median {summary['monitor_cost_us']['median']:.0f} us, "
          f"p90 {summary['monitor_cost_us']['p90']:.0f} us")
    for signal, fig in summary["signals"].items():
        delay = "-" if fig["delay_median"] is None else (
            f"{fig['delay_median']:9.0f} [{fig['delay_min']:.0f}, {fig['delay_max']:.0f}]")
        found = f"found {fig['found']}/{summary['seeds']}" if summary["kind"] != "none" else "no drift"
        print(f"    {signal:24s} delay_{unit} median {delay}  {found:11s} first by "
              f"{','.join(fig['first_detectors']) or '-':18s} false alarms per seed {fig['false_alarms_per_seed']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["input", "model", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 200k events, 300 model steps (interest_swap)")
    parser.add_argument("--seeds", type=int, default=5, help="input part seeds (default 5)")
    parser.add_argument("--model-seeds", type=int, default=3, help="model part seeds (default 3)")
    parser.add_argument("--events", type=int, default=1_000_000, help="events per input run (drift at the middle)")
    parser.add_argument("--kinds", nargs="+", default=list(INPUT_KINDS), choices=INPUT_KINDS)
    parser.add_argument("--model-kinds", nargs="+", default=["interest_swap", "none"], choices=INPUT_KINDS)
    parser.add_argument("--steps", type=int, default=800, help="learner steps per model run (drift at 2/3)")
    parser.add_argument("--burn-in-steps", type=int, default=200, help="steps trained before monitoring starts")
    parser.add_argument("--min-observations", type=int, default=None, help="override DriftSettings.min_observations")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.model_seeds, args.events = 2, 2, 200_000
        args.model_kinds, args.steps, args.burn_in_steps = ["interest_swap"], 300, 50
        args.min_observations = args.min_observations or 50
    record = BenchRecord("bench_drift", args)  # the configuration as run: --quick's sizes, not the defaults
    logging.basicConfig(level=logging.ERROR)  # alarms are logged at WARNING: keep the report readable
    settings = DriftSettings()
    # The model part runs its own unmonitored burn-in (--burn-in-steps), so the monitor's is off.
    model_settings = DriftSettings(burn_in_steps=0, **(
        {} if args.min_observations is None else {"min_observations": args.min_observations}))
    figures: dict[str, Any] = {"settings": settings.model_dump(exclude={"log_path"}), "input": [], "model": []}
    print(f"settings: {figures['settings']}")
    print(f"cpus={os.cpu_count()} load_avg_1m={os.getloadavg()[0]:.1f}")
    if args.part in ("input", "both"):
        for kind in args.kinds:
            results = [input_run(kind, seed, args.events, settings) for seed in range(args.seeds)]
            figures["input"].append(summarize(kind, results, "events", 1e6))
            print_summary("input", figures["input"][-1])
    if args.part in ("model", "both"):
        figures["model_settings"] = model_settings.model_dump(exclude={"log_path"})
        print(f"model: dim={args.dim} steps={args.steps} burn_in={args.burn_in_steps} drift_at_step={args.steps * 2 // 3} "
              f"min_observations={model_settings.min_observations} threads={args.threads}")
        for kind in args.model_kinds:
            started = time.perf_counter()
            results = [model_run(kind, seed, args, model_settings) for seed in range(args.model_seeds)]
            summary = summarize(kind, results, "steps", 1e3)
            print_summary("model", summary)
            summary["wall_s"], summary["load_avg_1m"] = time.perf_counter() - started, os.getloadavg()[0]
            figures["model"].append(summary)
            print(f"    ({summary['wall_s']:.0f} s, load_avg_1m={summary['load_avg_1m']:.1f})")
    if args.json is not None:
        record.write(args.json, figures)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
