"""Memory per event: what grows as a long synthetic stream is fed into the per-event structures (issue 12).

A seeded synthetic stream from the project's generator (``stream.synthetic``, shaped like issue 12's large
case: 500,000 items split 400k source / 100k target, target share 0.2, a fixed population, no new users)
is fed, event by event and in order, into the structures the pipeline grows per event, outside Ray:

- ``shadow_cooc``: the learner's shadow baselines' :class:`stream.cooccurrence.ItemCooccurrence` (both
  domains, every event, ``learner.online.shadow``);
- ``serving_cooc``: serving's :class:`serving.cooccurrence.CooccurrenceRanker`, fed each target event with
  the user's target items before it (the learner's history stands in for serving's consumed set);
- ``item_tables``: the learner's item id maps (a real ``learner.core.idmap.IdMap`` per domain) plus its item
  tables and their lazy-Adam state (``weight``, ``exp_avg``, ``exp_avg_sq`` of ``dim`` float32 each, and
  two int64 buffers per row), computed from the table capacity the learner would have grown to
  (``learner.core.idmap.next_capacity``), not allocated;
- ``histories``: the learner's ``RecentHistories`` (``SITNConfig.max_users`` users) and the consumers'
  ``UserStateStore``, which builds the causal examples;
- ``replay``: the learner's replay buffer, a ``deque(maxlen=--replay-buffer-size)`` of the examples.

How bytes are counted (no tracemalloc: it slows the feed several times and cannot split one heap by
structure): for the co-occurrence counts, ``sys.getsizeof`` of every neighbour dict and of the row
containers, plus 28 B per count above 256 (CPython caches smaller ints) or 24 B per float count, plus
the item index (its dict, id list, id strings and count array); the column ints are shared with the
index. Other structures: a deep ``sys.getsizeof`` walk of their containers, each object counted once per
structure (an item id string held by several structures is counted in each). The process RSS is shown
next to them as a cross-check. Growth per 100k events is the slope between the last two points.

    python bench/bench_memory.py [--events 300000] [--users 1000] [--max-neighbours 500|none]
        [--points 6] [--seed 0] [--json PATH]

``--trainer`` measures the learner process itself instead: an in-process ``learner.online.trainer.OnlineTrainer``
built as ``sitn run`` builds it (``RunSettings`` defaults: batch 256, replay buffer 20,000 at ratio 1, fused
ranker, publish gate, fallback, drift monitor, a checkpoint every 200 steps into a temporary directory;
no Ray, no Kafka, a publish goes nowhere) is fed the same stream in batches of ``--poll-events``, and the
process RSS is printed at ``--points`` with the item tables' and lazy-Adam state's bytes, the last
checkpoint's size, the target items known, wall and CPU seconds, and the newest checkpoint's two costs: the
seconds it held up training (reading the state out) and the seconds its write took on the writer thread
(``OnlineTrainer.checkpoint(background=True)``, as the learner actor checkpoints). ``--malloc trimmed`` (the default) calls
``malloc_trim`` after each batch as the learner actor does (``learner.online.allocator``), ``dynamic`` does
nothing (as before issue 12), ``pinned`` fixes glibc's mmap threshold at 128 KiB instead:

    python bench/bench_memory.py --trainer [--events 100000] [--users 5000] [--malloc trimmed|dynamic|pinned]

Measured (issue 12's shape: 5,000 users, 400k + 100k items, target share 0.2, seed 0, batches of 2,000;
the 2-core machine shared with other work), RSS in MiB; about 900 MiB of it is there before the first event
(torch, the generator):

    events              10k    20k    30k    40k    50k    60k   cpu_s
    --malloc dynamic   1048   1113   1195   1295   1444   1553     47
    --malloc trimmed    992   1018   1034   1063   1098   1106     47

Dynamic, RSS grew about 10 MiB per 1,000 events (1,989 MiB at 100k in a longer run, of which a
``malloc_trim`` gave back 793 MiB: free memory malloc kept, not live objects; tracemalloc saw about
140 MiB of Python and numpy allocations at 40k). Trimmed, about 2.3 MiB per 1,000 events, what the live
structures grow by (co-occurrence, histories filling, item tables doubling: 30.6 MiB with their Adam state
at 60k, 61.2 MiB at 100k, where RSS was 1,189 MiB); the trims took 0.68 s over 60k events. ``pinned`` reached 1,154 MiB at 60k but took about 30 % more CPU (63-65 s against 48-50 s in
batches of 500). The checkpoint payload (43 MiB at 50k events, 83 MiB at 100k) is no longer copied whole
in memory when it is written (``learner.core.checkpoint``).

Issue 12's whole stream (``--events 3000000 --users 5000 --points 6 --seed 1``, 2026-12-06, co-occurrence
capped at the default 50 neighbours per item), MiB:

    events          0.5M    1M   1.5M    2M   2.5M    3M   per 100k at 3M
    shadow_cooc      186   439    706   867   1001  1105   20.8
    serving_cooc      43   103    180   194    218   236    3.7
    item_tables      166   277    283   532    535   537    0.5
    histories         77    97    107   107    107   107    0
    replay            57    68     74    74     74    74    0
    rss             1004  1363   1750  1933   2094  2213   23.8

Histories (full at 50 items per domain) and the replay buffer are flat; the item tables step with the
catalogue's doubling capacity and stop with it (500k items); the co-occurrence counts still grow, ever more
slowly, towards their bound (items x 2 x the neighbour cap).

With 1,000 users (300 events each at the default) histories are full (50 items per domain) after about
a third of the stream, so the last points show the steady per-event growth; ``--users 5000`` is issue 12's
population (its histories fill only after ~1.25M events).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import BenchRecord, add_json_option  # noqa: E402
from learner.core.config import SITNConfig  # noqa: E402
from learner.core.history import RecentHistories  # noqa: E402
from learner.core.idmap import IdMap, next_capacity  # noqa: E402
from serving.cooccurrence import CooccurrenceRanker  # noqa: E402
from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS, ItemCooccurrence  # noqa: E402
from stream.synthetic import SyntheticConfig, SyntheticStream  # noqa: E402
from stream.user_state import Example, UserStateStore  # noqa: E402

STRUCTURES = ("shadow_cooc", "serving_cooc", "item_tables", "histories", "replay")
_INT_CACHE_MAX = 256  # CPython keeps one object per int in [-5, 256]
_ATOMS = (str, bytes, int, float, bool, type(None))


def deep_size(root: object) -> int:
    """Bytes of ``root`` and everything its containers (dict, list, tuple, set, deque, objects with
    ``__dict__`` or ``__slots__``) reach, each object once; cached small ints are free."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or (type(obj) is int and -5 <= obj <= _INT_CACHE_MAX) or obj is None:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, _ATOMS):
            continue
        if isinstance(obj, np.ndarray):
            continue  # getsizeof counts the data of an array that owns it
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            stack.extend(obj)
        else:
            if hasattr(obj, "__dict__"):
                stack.append(vars(obj))
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return total


def _count_bytes(values: Iterable[Any]) -> int:
    out = 0
    for v in values:
        if type(v) is float:
            out += 24
        elif not -5 <= v <= _INT_CACHE_MAX:
            out += 28
    return out


def cooc_bytes(cooc: ItemCooccurrence) -> int:
    """Bytes of one co-occurrence model (module docstring: how they are counted)."""
    total = sys.getsizeof(cooc)
    for rows in (cooc._target, cooc._source):
        total += sys.getsizeof(rows.neighbours) + rows.counts.nbytes
        total += sys.getsizeof(rows.index) + sys.getsizeof(rows.ids) + sum(map(sys.getsizeof, rows.ids))
        for row in rows.neighbours:
            total += sys.getsizeof(row) + _count_bytes(row.values())
    total += cooc._scale.nbytes + sys.getsizeof(cooc._stale)
    return total


def item_table_bytes(idmaps: dict[str, IdMap], config: SITNConfig) -> int:
    """The id maps (walked) plus each domain's table, lazy-Adam state and per-row buffers at the capacity
    the learner would have grown to."""
    per_row = 3 * config.dim * 4 + 2 * 8  # weight + exp_avg + exp_avg_sq (float32), item_cluster + item_count
    total = 0
    for idmap in idmaps.values():
        total += deep_size(idmap)
        total += next_capacity(config.initial_item_capacity, idmap.n_rows) * per_row
    return total


def measure(events_seen: int, parts: dict[str, Any], started_s: float, learn_s: dict[str, float]) -> dict[str, Any]:
    shadow, serving, idmaps, config, histories, store, replay = parts.values()
    row: dict[str, Any] = {
        "events": events_seen,
        "shadow_cooc": cooc_bytes(shadow),
        "serving_cooc": cooc_bytes(serving._cooc),
        "item_tables": item_table_bytes(idmaps, config),
        "histories": deep_size(histories) + deep_size(store),
        "replay": deep_size(replay),
        "shadow_pairs": sum(shadow.n_pairs().values()),
        "serving_pairs": sum(serving._cooc.n_pairs().values()),
        "pruned_rows": shadow.pruned_rows + serving._cooc.pruned_rows,
        "rss": psutil.Process().memory_info().rss,
        "wall_s": time.perf_counter() - started_s,
    }
    row.update({f"{name}_learn_s": round(s, 2) for name, s in learn_s.items()})
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    cap = None if args.max_neighbours == "none" else int(args.max_neighbours)
    syn = SyntheticConfig(events=args.events, n_users=args.users, new_user_share=0.0, n_source_items=400_000,
                          n_target_items=100_000, target_share=0.2, seed=args.seed)
    config = SITNConfig(max_len=args.max_len, replay_buffer_size=args.replay_buffer_size)
    source, target = syn.source, syn.target
    shadow = ItemCooccurrence(source, target, max_history=config.max_len, max_neighbours=cap)
    serving = CooccurrenceRanker(max_history=config.max_len, max_neighbours=cap)
    idmaps = {source: IdMap(), target: IdMap()}
    histories = RecentHistories((source, target), config.max_len, config.max_users)
    store = UserStateStore((source, target), max_len=config.max_len)
    replay: deque[Example] = deque(maxlen=config.replay_buffer_size)
    parts = {"shadow": shadow, "serving": serving, "idmaps": idmaps, "config": config, "histories": histories,
             "store": store, "replay": replay}
    every = max(1, args.events // args.points)
    learn_s = {"shadow": 0.0, "serving": 0.0}
    rows = []
    started = time.perf_counter()
    for n, event in enumerate(SyntheticStream(syn).events(), start=1):
        ex = store.observe(event)
        t0 = time.perf_counter()
        shadow.learn_example(ex)
        t1 = time.perf_counter()
        if ex.domain == target:
            serving.learn([(ex.history[target][0], ex.item_id)])
        t2 = time.perf_counter()
        learn_s["shadow"] += t1 - t0
        learn_s["serving"] += t2 - t1
        idmaps[ex.domain].add((ex.item_id,))
        histories.record(ex.user_id, ex.domain, ex.item_id, ex.timestamp, ex.history)
        replay.append(ex)
        if n % every == 0 or n == args.events:
            rows.append(measure(n, parts, started, learn_s))
            print_row(rows[-1], header=len(rows) == 1)
    return {"max_neighbours": cap, "events": args.events, "users": args.users, "seed": args.seed,
            "max_len": config.max_len, "replay_buffer_size": config.replay_buffer_size,
            "counting": "container sizes (sys.getsizeof), not tracemalloc; see the module docstring",
            "rows": rows, "growth_per_100k_events": growth(rows)}


def stream_trainer(r: Any, config: Any, source: str, target: str, store: Any) -> Any:
    """An in-process OnlineTrainer built as ``sitn run`` builds the learner actor's from ``r`` (RunSettings):
    fused ranker, publish gate, fallback and drift monitor on; a publish goes nowhere."""
    from learner.core.learner import SITNLearner
    from learner.online.drift import DriftMonitor, DriftSettings
    from learner.online.gate import PublishGate, RankerFallback
    from learner.online.publisher import CallableTransport
    from learner.online.trainer import OnlineTrainer
    from serving.settings import ServingSettings

    return OnlineTrainer(
        SITNLearner(config, source, target), CallableTransport(lambda _batch: None), store,
        batch_size=r.batch_size, checkpoint_every_steps=r.checkpoint_every_steps,
        publish_every_steps=r.publish_every_steps, publish_every_s=r.publish_every_s,
        publish_max_share=r.publish_max_share, prequential_sample=r.prequential_sample,
        full_publish_every=r.full_publish_every, served_max_users=ServingSettings.model_construct().max_users,
        served_max_consumed_per_user=ServingSettings.model_construct().max_consumed_per_user,
        gate=PublishGate(r.gate_max_drop, r.gate_window, r.gate_min_events, z_critical=r.gate_z_critical),
        gate_sample_per_step=r.gate_sample_per_step, drift=DriftMonitor(DriftSettings.model_construct()),
        fallback=RankerFallback(("popularity", "cooccurrence"), r.fallback_window, r.fallback_min_events,
                                r.fallback_z_critical, r.fallback_recover_z,
                                learnt=("fused",) if r.fused_weights else ()),
        fused_weights=tuple(r.fused_weights), fused_window=r.fused_window,
        transfer_scale_window=r.transfer_scale_window, prior_window=r.prior_window,
    )


def run_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """Feed an in-process OnlineTrainer with ``sitn run``'s defaults; RSS and tensor bytes at ``--points``."""
    import torch

    from learner.online.allocator import pin_mmap_threshold, trim_free_memory
    from learner.online.checkpoint_store import CheckpointStore
    from sitn.settings import RunSettings
    from stream.consumer import EventBatch

    pinned = args.malloc == "pinned" and pin_mmap_threshold()
    r = RunSettings.model_construct()  # the documented defaults, not this shell's SITN_RUN_* variables
    torch.set_num_threads(r.torch_threads)
    syn = SyntheticConfig(events=args.events, n_users=args.users, new_user_share=0.0, n_source_items=400_000,
                          n_target_items=100_000, target_share=0.2, seed=args.seed)
    config = r.sitn_config()
    every = max(1, args.events // args.points)
    rows: list[dict[str, Any]] = []
    process = psutil.Process()
    rss_start = process.memory_info().rss
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        store = CheckpointStore(Path(tmp), keep=3)
        trainer = stream_trainer(r, config, syn.source, syn.target, store)
        started = time.perf_counter()
        poll: list[Any] = []
        offset = 0
        trim_s = 0.0
        for n, event in enumerate(SyntheticStream(syn).events(), start=1):
            poll.append(event)
            if len(poll) == args.poll_events or n == args.events:
                trainer.process(EventBatch.of(poll, 0, offset, "c0"))
                offset += len(poll)
                poll = []
                trainer.collect_checkpoint()
                if trainer.checkpoint_due():
                    trainer.checkpoint(background=True)  # as learner.online.actor does: written on the writer thread
                if args.malloc == "trimmed":  # where learner.online.actor does it
                    t0 = time.perf_counter()
                    trim_free_memory()
                    trim_s += time.perf_counter() - t0
            if n % every == 0 or n == args.events:
                rows.append({**trainer_row(n, trainer, store, started), "trim_s": trim_s})
                print_trainer_row(rows[-1], header=len(rows) == 1)
    return {"mode": "trainer", "malloc": args.malloc, "mmap_threshold_pinned": pinned, "events": args.events,
            "users": args.users, "seed": args.seed, "poll_events": args.poll_events, "rss_start": rss_start,
            "rows": rows, "growth_per_100k_events": growth(rows, ("rss",))}


def trainer_row(events_seen: int, trainer: Any, store: Any, started_s: float) -> dict[str, Any]:
    learner = trainer.learner
    tables = 0
    for role in learner.domains:
        encoder = learner.model.encoder(role)
        tables += sum(t.numel() * t.element_size() for t in (encoder.item_weight, encoder.item_cluster,
                                                             encoder.item_count))
    state = learner._sparse_opt.state.values()
    tables += sum(t.numel() * t.element_size() for s in state for t in s.values() if hasattr(t, "numel"))
    checkpoints = store.manifests()
    return {
        "events": events_seen,
        "rss": psutil.Process().memory_info().rss,
        "item_tables": tables,
        "checkpoint": json.loads(checkpoints[0].read_text())["size_bytes"] if checkpoints else 0,
        "target_items": len(learner.idmaps["target"]),
        "step": int(learner.step),
        "published_version": trainer.publisher.version,
        "wall_s": time.perf_counter() - started_s,
        "cpu_s": sum(psutil.Process().cpu_times()[:2]),  # user + system, less disturbed by a busy machine
        # The newest checkpoint: seconds it held up training (reading the state out), seconds its write took.
        "checkpoint_stall_s": trainer.checkpoint_stall_s[-1] if trainer.checkpoint_stall_s else math.nan,
        "checkpoint_write_s": trainer.checkpoint_write_s[-1] if trainer.checkpoint_write_s else math.nan,
    }


def print_trainer_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'events':>9} {'rss':>9} {'item_tables':>12} {'checkpoint':>11} {'target_items':>13} {'step':>6}"
              f" {'version':>8} {'wall_s':>7} {'cpu_s':>6} {'trim_s':>6} {'ckpt_stall_s':>12} {'ckpt_write_s':>12}"
              "   (MiB)")
    print(f"{row['events']:>9,} {_mb(row['rss'])} {_mb(row['item_tables']):>12} {_mb(row['checkpoint']):>11}"
          f" {row['target_items']:>13,} {row['step']:>6} {row['published_version']:>8} {row['wall_s']:>7.0f}"
          f" {row['cpu_s']:>6.0f} {row['trim_s']:>6.2f} {row['checkpoint_stall_s']:>12.3f}"
          f" {row['checkpoint_write_s']:>12.3f}",
          flush=True)


def growth(rows: list[dict[str, Any]], names: tuple[str, ...] = (*STRUCTURES, "rss")) -> dict[str, float]:
    """Bytes per 100k events of each structure (and RSS) between the last two points."""
    if len(rows) < 2:
        return {}
    a, b = rows[-2], rows[-1]
    span = (b["events"] - a["events"]) / 100_000
    return {name: (b[name] - a[name]) / span for name in names}


def _mb(x: float) -> str:
    return f"{x / 2**20:9.1f}"


def print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'events':>9} " + " ".join(f"{n:>12}" for n in (*STRUCTURES, "rss")) + f" {'pairs(shadow)':>14}"
              f" {'pruned':>8} {'learn_s':>8} {'wall_s':>7}   (MiB)")
    print(f"{row['events']:>9,} " + " ".join(f"{_mb(row[n]):>12}" for n in (*STRUCTURES, "rss"))
          + f" {row['shadow_pairs']:>14,} {row['pruned_rows']:>8,} {row['shadow_learn_s']:>8.1f} {row['wall_s']:>7.0f}",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", action="store_true", help="measure an in-process OnlineTrainer instead")
    parser.add_argument("--malloc", choices=("trimmed", "dynamic", "pinned"), default="trimmed",
                        help="--trainer: malloc_trim after each batch as the learner actor does (trimmed), "
                        "nothing (dynamic), or glibc's mmap threshold pinned at 128 KiB (pinned)")
    parser.add_argument("--poll-events", type=int, default=2000,
                        help="--trainer: events per delivered batch (the consumers' batch_size default)")
    parser.add_argument("--events", type=int, default=None, help="default 300,000 (--trainer: 100,000)")
    parser.add_argument("--users", type=int, default=None, help="fixed population (default 1,000; --trainer and "
                        "issue 12: 5,000)")
    parser.add_argument("--max-neighbours", default=str(DEFAULT_MAX_NEIGHBOURS),
                        help=f"co-occurrence cap per row, or 'none' (default: {DEFAULT_MAX_NEIGHBOURS})")
    parser.add_argument("--max-len", type=int, default=50, help="history length per domain")
    parser.add_argument("--replay-buffer-size", type=int, default=20_000,
                        help="replay buffer length (the pipeline's default is 0: off)")
    parser.add_argument("--points", type=int, default=6, help="measurements along the stream")
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args()
    record = BenchRecord("bench_memory", args)
    args.events = args.events or (100_000 if args.trainer else 300_000)
    args.users = args.users or (5_000 if args.trainer else 1_000)
    if args.trainer:
        print(f"in-process OnlineTrainer, sitn run defaults: {args.events:,} events, {args.users:,} users, "
              f"400k source + 100k target items, seed {args.seed}; malloc mmap threshold {args.malloc}")
        _report(run_trainer(args), "RSS growth", record, args.json)
        return 0
    if args.max_neighbours != "none" and not (args.max_neighbours.isdigit() and int(args.max_neighbours) >= 1):
        parser.error(f"--max-neighbours must be an int >= 1 or 'none', got {args.max_neighbours!r}")
    print(f"synthetic stream: {args.events:,} events, {args.users:,} users, 400k source + 100k target items, "
          f"seed {args.seed}; max_neighbours={args.max_neighbours}, max_len={args.max_len}, "
          f"replay buffer {args.replay_buffer_size:,}")
    _report(run(args), "growth", record, args.json)
    return 0


def _report(result: dict[str, Any], what: str, record: BenchRecord, json_path: Path | None) -> None:
    """Print the growth per 100k events of each structure and write ``result`` (the printed rows and
    growth) as the figures of ``record`` to ``json_path``."""
    print(f"{what} per 100k events (last two points), MiB: "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in result["growth_per_100k_events"].items()))
    if json_path is not None:
        record.write(json_path, result)
        print(f"wrote {json_path}")


if __name__ == "__main__":
    raise SystemExit(main())
