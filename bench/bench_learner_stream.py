"""The learner process's throughput on a large stream: events trained per second, with quality beside it.

The learner actor is the pipeline's bottleneck on issue 12's stream shape (400k source + 100k target items,
target share 0.2, histories of 50 per domain). Besides ``learn_many`` each step tests every target event
before training (the served and live model, the fused ranker's weight grid, the popularity and
co-occurrence baselines, the transfer-scale and prior tuners, the gate) and publishes the touched users.
This bench feeds the same seeded synthetic stream (``stream.synthetic``) to an in-process
``learner.online.trainer.OnlineTrainer`` built as ``sitn run`` builds it (``bench_memory.stream_trainer``:
RunSettings defaults, no Ray, a publish goes nowhere, no checkpoints) once per variant, in batches of
``--poll-events`` as the consumers deliver them, and prints per variant:

- events/s over the batches after ``--warmup-events`` (histories filled: a small population, so each user
  has long histories early): median and p10/p90 over batches, and the CPU seconds of the timed part;
- what publishing cost: versions published and the mean seconds per version;
- quality next to speed: the prequential NDCG@10 (ties against, consumed excluded, unseen items missed)
  of the model, fused ranker, popularity and co-occurrence over the whole stream, and how many target
  events were tested.

A variant is ``name:field=value,...`` over RunSettings fields (``prequential_sample``, ``publish_max_share``,
``batch_size``, ...); ``old`` = every event tested and no publish budget (the behaviour before issue 13's
changes), ``default`` = RunSettings as shipped.

    python bench/bench_learner_stream.py                       # old vs default, 40k events after 20k warm-up
    python bench/bench_learner_stream.py --variants "old:prequential_sample=1,publish_max_share=1" \\
        "sample:prequential_sample=0.1" --events 60000 --json learner_stream.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import stream_trainer
from report import BenchRecord, add_json_option

from stream.synthetic import SyntheticConfig, SyntheticStream

DEFAULT_VARIANTS = ("old:prequential_sample=1,publish_max_share=1", "default:")
RANKERS = ("model", "fused", "popularity", "cooc_target")


def parse_variant(text: str) -> tuple[str, dict[str, float]]:
    """``name:field=value,...`` -> (name, overrides).

    >>> parse_variant("sample:prequential_sample=0.1,publish_max_share=1")
    ('sample', {'prequential_sample': 0.1, 'publish_max_share': 1.0})
    >>> parse_variant("default:")
    ('default', {})
    """
    name, _, rest = text.partition(":")
    overrides = {}
    for part in filter(None, rest.split(",")):
        field, _, value = part.partition("=")
        overrides[field.strip()] = float(value)
    return name, overrides


def run_variant(name: str, overrides: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sitn.settings import RunSettings
    from stream.consumer import EventBatch

    base = RunSettings.model_construct()  # the documented defaults, not this shell's SITN_RUN_* variables
    r = RunSettings.model_validate({**base.model_dump(), **overrides})
    torch.manual_seed(args.seed)
    torch.set_num_threads(r.torch_threads)
    syn = SyntheticConfig(events=args.warmup_events + args.events, n_users=args.users, new_user_share=0.0,
                          n_source_items=400_000, n_target_items=100_000, target_share=0.2, seed=args.seed)
    trainer = stream_trainer(r, r.sitn_config(), syn.source, syn.target, None)
    process = psutil.Process()
    rates: list[float] = []
    poll: list[Any] = []
    offset = 0
    cpu_start = 0.0
    timed_start = 0.0
    publish_start = (0, 0.0)
    for n, event in enumerate(SyntheticStream(syn).events(), start=1):
        poll.append(event)
        if len(poll) < args.poll_events and n < syn.events:
            continue
        start_s = time.perf_counter()
        trainer.process(EventBatch.of(poll, 0, offset, "c0"), behind=True)  # fed flat out: always a backlog
        if n > args.warmup_events:
            rates.append(len(poll) / (time.perf_counter() - start_s))
        offset += len(poll)
        poll = []
        if n == args.warmup_events:
            cpu_start, timed_start = sum(process.cpu_times()[:2]), time.perf_counter()
            publish_start = (trainer.publisher.version, _publish_seconds())
    versions = trainer.publisher.version - publish_start[0]
    figures = trainer.quality.figures()["rankers"]
    q = statistics.quantiles(rates, n=10) if len(rates) > 1 else rates * 9
    return {
        "variant": name, "overrides": overrides, "events_timed": args.events,
        "events_per_s": {"median": statistics.median(rates), "p10": q[0], "p90": q[-1],
                         "mean": args.events / (time.perf_counter() - timed_start), "per_batch": rates},
        "cpu_s": sum(process.cpu_times()[:2]) - cpu_start,
        "publishes": versions,
        "publish_s_mean": (_publish_seconds() - publish_start[1]) / versions if versions else float("nan"),
        "tested_target_events": trainer.quality.tallies["model"].events,
        "ndcg_at_10": {ranker: figures[ranker]["stream"]["ndcg"] for ranker in RANKERS if ranker in figures},
    }


def _publish_seconds() -> float:
    """Seconds spent publishing so far in this process (the trainer's PUBLISH_SECONDS histogram's sum)."""
    from learner.online import telemetry

    return sum(s.value for m in telemetry.PUBLISH_SECONDS.collect() for s in m.samples if s.name.endswith("_sum"))


def print_row(row: dict[str, Any]) -> None:
    e = row["events_per_s"]
    quality = " ".join(f"{k} {v:.4f}" for k, v in row["ndcg_at_10"].items())
    print(f"{row['variant']:>10} events/s median {e['median']:7,.0f} p10 {e['p10']:7,.0f} p90 {e['p90']:7,.0f}"
          f" mean {e['mean']:7,.0f} | cpu {row['cpu_s']:6.0f} s | publishes {row['publishes']:5d}"
          f" ({row['publish_s_mean'] * 1e3:5.0f} ms) | tested {row['tested_target_events']:6,d}"
          f" | NDCG@10 {quality}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="name:field=value,... over RunSettings (default: old, default)")
    parser.add_argument("--events", type=int, default=40_000, help="timed events per variant")
    parser.add_argument("--warmup-events", type=int, default=20_000, help="events before the timing starts")
    parser.add_argument("--users", type=int, default=500,
                        help="fixed population (500: 60k events give about 90 movies and 24 books per user)")
    parser.add_argument("--poll-events", type=int, default=2000, help="events per delivered batch")
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args()
    record = BenchRecord("bench_learner_stream", args)
    print(f"in-process OnlineTrainer, synthetic stream: {args.warmup_events:,} warm-up + {args.events:,} timed "
          f"events, {args.users:,} users, 400k source + 100k target items, batches of {args.poll_events:,}, "
          f"seed {args.seed}; load average {psutil.getloadavg()[0]:.1f}")
    rows = []
    for text in args.variants:
        name, overrides = parse_variant(text)
        rows.append(run_variant(name, overrides, args))
        print_row(rows[-1])
    if args.json is not None:
        record.write(args.json, {"rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
