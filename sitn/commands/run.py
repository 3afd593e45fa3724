"""``sitn run``: the live pipeline (replay, consume, train, publish, serve) until interrupted.

When it ends, by ``--exit-after-replay`` or Ctrl-C (SIGINT/SIGTERM), the learner finishes (last
checkpoint, commit and full publish) and ``<run dir>/summary.json`` gets the run's figures
(``sitn.pipeline.Pipeline.summary``): events replayed, trained and dead-lettered, restarts, wall time,
end-to-end events/s, freshness p50/p99, and the prequential HR@10/NDCG@10 of the served model and of
each shadow baseline on the same target events, the fused ranker's (and the weight it ended on), the lift
of the model and of the fused ranker over the best baseline and the ranker serving ended on.

A run that learns nothing says so (``sitn.dead_letter_watch``): the live table shows the dead-letter rate over
the last ``--dead-letter-window-records`` records and its top reasons; when that rate passes
``--dead-letter-max-ratio`` a warning names the top reason and an example record. At exit, a run that trained
nothing, or dead-lettered more than that ratio of everything it consumed, prints the reasons with their
counts and exits with status 1 (``summary.json``: ``ok``, ``problems``, ``dead_letters_by_reason``). A file
with no rows of the two domains stops before anything starts, naming the domains it has.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sitn.cli_settings import SettingsFlags
from sitn.run_config import RunConfigConflict, resume_learner_config
from stream.replay_journal import ReplayJournal, ReplayPlan, ReplayRefused, ReplaySource

if TYPE_CHECKING:
    from stream.dataset import EventFile, EventLog
    from stream.events import InteractionEvent

log = logging.getLogger(__name__)

def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the live pipeline: replay, consume, train, publish, serve",
        description=(
            "Start (or join) a Ray cluster, the serving actor (HTTP on --host/--port), the learner actor and "
            "the consumer actors; replay --events into the log (embedded by default, Kafka with "
            "--kafka-bootstrap-servers); train, publish and serve until Ctrl-C (or --exit-after-replay). "
            "A flag given wins over its environment variable, which wins over the default."
        ),
        epilog=(
            "also read from the environment (sitn.settings says which layer owns what): the other serving "
            "settings SITN_SERVING_* (sitn serve --help; dim and cooc_max_neighbours follow the learner), the "
            "other stream settings SITN_* with Kafka security SITN_SECURITY_PROTOCOL, SITN_SASL_*, SITN_SSL_* "
            "(stream/settings.py), metrics SITN_METRICS_* (stream/exporter.py), drift detectors SITN_DRIFT_* "
            "(learner/online/drift.py)"
        ),
    )
    run, serving, stream = _flags()
    run.add_to(p.add_argument_group("the run (sitn.settings.RunSettings)"))
    p.add_argument("--max", action="store_true", help="replay as fast as possible (unsets --rate-events-per-s)")
    serving.add_to(p.add_argument_group("the in-cluster serving (serving.settings.ServingSettings)"))
    stream.add_to(p.add_argument_group("the event stream (stream.settings.StreamSettings)"))
    _telemetry_flags().add_to(p.add_argument_group("metrics and the dashboard (stream.exporter.TelemetrySettings)"))
    p.set_defaults(func=main)


def _flags() -> tuple[SettingsFlags, SettingsFlags, SettingsFlags]:
    """The options of ``sitn run``: every run setting, serving's address, the stream's backend."""
    from serving.settings import ServingSettings
    from sitn.settings import RunSettings
    from stream.settings import StreamSettings

    return (SettingsFlags(RunSettings),
            SettingsFlags(ServingSettings, ("host", "port"), derived=("dim", "cooc_max_neighbours")),
            SettingsFlags(StreamSettings, ("kafka_bootstrap_servers", "partitions"),
                          derived=("domains", "embedded_log_dir")))


def _telemetry_flags() -> SettingsFlags:
    """The telemetry option of ``sitn run``: the Prometheus the dashboard draws from (the other
    ``SITN_METRICS_*`` settings are read from the environment only)."""
    from stream.exporter import TelemetrySettings

    return SettingsFlags(TelemetrySettings, ("prometheus_url",))


def _explicit_learner_fields(run: Any, run_flags: SettingsFlags, args: argparse.Namespace,
                             environ: Mapping[str, str] | None = None) -> set[str]:
    """SITNConfig fields this start sets on purpose: a ``--learner-*`` flag or its variable, serving's
    ``SITN_SERVING_MAX_USERS``; every field with a warm start (its model decides them)."""
    from learner.core.config import SITNConfig
    from sitn.settings import LEARNER_FIELDS

    if run.warm_start is not None:
        return {f.name for f in dataclasses.fields(SITNConfig)}
    environ = os.environ if environ is None else environ
    present = {key.upper() for key in environ}
    given = run_flags.given(args)
    explicit = {name for field, name in LEARNER_FIELDS.items() if field in given or run_flags.env_var(field) in present}
    if "SITN_SERVING_MAX_USERS" in present:
        explicit.add("max_users")
    return explicit


def main(args: argparse.Namespace) -> int:
    from learner.online.drift import DriftSettings

    run_flags, serving_flags, stream_flags = _flags()
    run = run_flags.build(args)
    if args.max:
        run = run.model_copy(update={"rate_events_per_s": None})
    run_dir = run.run_dir or Path("var") / f"run-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    stream = stream_flags.build(args, domains=(run.source, run.target), embedded_log_dir=(run_dir / "log").resolve())
    config = run.sitn_config()
    if run.warm_start is not None:
        from learner.core.warm_checkpoint import warm_start_config

        config, warm = warm_start_config(run.warm_start)  # the model's own shape and training settings
        print(f"sitn run: warm start from {run.warm_start}: trained on {warm['events']:,} events up to "
              f"{datetime.fromtimestamp(warm['trained_until'], UTC).isoformat()} ({warm['epochs']} epochs); those "
              f"are burnt in, the prequential figures count the events after them")
    # Derived from their owners (sitn.settings): serving's width is the model's, a warm start's included.
    serving = serving_flags.build(args, dim=config.dim, cooc_max_neighbours=run.cooc_max_neighbours)
    config = dataclasses.replace(config, max_users=serving.max_users)  # the learner keeps the users serving keeps
    try:  # a resumed run keeps the learner settings its checkpoints were trained with (sitn.run_config)
        resumed = resume_learner_config(run_dir, config, _explicit_learner_fields(run, run_flags, args))
    except RunConfigConflict as exc:
        print(f"sitn run: not started: {exc}", file=sys.stderr)
        return 1
    if resumed.kept:
        print(f"sitn run: {resumed.message(run_dir)}", file=sys.stderr)
    config = resumed.config
    serving = serving.model_copy(update={"dim": config.dim, "max_users": config.max_users})
    telemetry = _telemetry_flags().build(args)  # --prometheus-url; the rest from the environment (SITN_METRICS_*)
    drift = DriftSettings()  # environment only (SITN_DRIFT_*), read here in the driver
    log.info("settings run=%r", run)
    log.info("settings stream=%r", stream)
    log.info("settings serving=%r", serving)
    log.info("settings telemetry=%r", telemetry)
    log.info("settings drift=%r", drift)
    log.info("settings learner=%r", config)
    if stream.uses_kafka:
        from stream.kafka_login import check_kafka_login

        check_kafka_login(stream)  # a refused login fails here, in a second, with the broker's reason
    return run_pipeline(run, stream, serving, config, run_dir.resolve(), telemetry, drift)


def replay_plan(journal: ReplayJournal, replay_log: EventFile | EventLog | None, run: Any,
                has_checkpoint: bool) -> ReplayPlan | None:
    """What this run replays into its log, from ``<run dir>/replay.json`` (``stream.replay_journal``): all of
    ``--events`` on a new run, the rest of it on a resume, nothing twice; without ``--events``, the journal's
    replay as it stands (so ``--exit-after-replay`` knows when the log's events are trained); None when there
    is neither. Raises ReplayRefused when ``--events`` would mix another file into the log."""
    if replay_log is None:
        return journal.plan_without_file()
    assert replay_log.time is not None
    source = ReplaySource.of(run.events, (run.source, run.target), replay_log.time.unit, run.limit, len(replay_log))
    return journal.plan(source, has_checkpoint)


def run_pipeline(run: Any, stream: Any, serving: Any, config: Any, run_dir: Path, telemetry: Any = None,
                 drift: Any = None) -> int:
    """``telemetry``: every process exposes metrics and the driver serves the dashboard (``sitn.dashboard``).
    ``drift``: the drift detectors' settings (``learner.online.drift.DriftSettings``)."""
    from rich.console import Console
    from rich.live import Live

    from sitn.dashboard import start_dashboard
    from sitn.dead_letter_watch import DeadLetterWatch
    from sitn.pipeline import Pipeline, load_replay_log
    from sitn.ray_cluster import init_ray

    started_s = time.monotonic()
    console = Console(stderr=True)
    replay_log = load_replay_log(run)
    # a chronological file streams from disk (stream.dataset.open_events)
    events: EventFile | EventLog | list[InteractionEvent] = replay_log if replay_log is not None else []
    if replay_log is not None:
        assert replay_log.time is not None
        console.print(f"[bold]sitn run[/bold]: timestamps of {run.events}: {replay_log.time.describe()}")
        if not events:
            others = ", ".join(f"{d} ({n:,} rows)" for d, n in replay_log.skipped_by_domain.most_common()) or "none"
            console.print(f"[bold red]sitn run: no events of domains {run.source!r} and {run.target!r} in "
                          f"{run.events}[/bold red]; its other domains: {others}. Nothing was started.")
            return 1
    journal = ReplayJournal.in_run_dir(run_dir)
    has_checkpoint = any((run_dir / "checkpoints").glob("ckpt-*.json"))
    try:
        plan = replay_plan(journal, replay_log, run, has_checkpoint)
    except ReplayRefused as exc:
        console.print(f"[bold red]sitn run: not started[/bold red]: {exc}")
        return 1
    if plan is not None and plan.message:
        console.print(f"[bold]sitn run[/bold]: {plan.message}")
    console.print(f"[bold]sitn run[/bold]: {len(events):,} events to replay from {run.events}, state in {run_dir}")
    watch = DeadLetterWatch(run.dead_letter_max_ratio, run.dead_letter_window_records)
    init_ray(run.ray_address, run.ray_temp_dir or Path(tempfile.mkdtemp(prefix="sitn-ray-", dir="/tmp")))
    pipeline = Pipeline(run, stream, serving, config, run_dir, metrics=telemetry, drift=drift)
    dashboard: Any = None
    stopping = {"flag": False}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        pipeline.start()
        console.print(f"serving on [bold]{pipeline.serving_url}[/bold]  "
                      f"(try {pipeline.serving_url}/recommend?user_id=...&k=10, /docs, /metrics)")
        if pipeline.metrics is not None and pipeline.targets_dir is not None:
            dashboard = start_dashboard(pipeline.metrics, pipeline.targets_dir, interval_s=run.status_every_s)
            console.print(f"dashboard on [bold]{dashboard.url}/dashboard[/bold]  "
                          f"(/metrics; Prometheus targets in {pipeline.targets_dir})")
        if plan is not None and events:
            source = plan.source
            pipeline.start_replay(events, skip=plan.skip, on_sent=lambda n: journal.record(source, n))
        elif plan is not None:  # no --events: the journal's replay, already in the log, is what there is to train
            pipeline.note_replayed(plan.skip)
        with Live(console=console, refresh_per_second=2) as live:
            while not stopping["flag"]:
                pipeline.supervise()
                status = pipeline.status()
                alert = None
                if "records_in" in status:  # the learner's tally; absent while a dead learner is replaced
                    alert = watch.observe(int(status["records_in"]), status.get("dead_letters_by_reason") or {},
                                          status.get("dead_letter_examples") or {})
                status["dead_letter_window_ratio"] = watch.window_ratio
                status["dead_letter_window_records"] = watch.window_size
                if alert is not None:
                    log.warning("%s", alert.message())
                    live.console.print(f"[bold yellow]warning[/bold yellow]: {alert.message()}")
                if dashboard is not None:
                    dashboard.observe(status)  # the driver's /metrics, and the page's series
                live.update(render_status(status, pipeline.serving_url))
                if not console.is_terminal:  # the table is drawn only on a terminal: a line per tick instead
                    log.info("status %s", status_line(status))
                if pipeline.caught_up(status) and run.exit_after_replay:
                    break
                time.sleep(run.status_every_s)
        if pipeline.learner is not None and pipeline.recovering is None:
            pipeline.finish_training()  # last checkpoint, commit and full publish: the summary covers them
        summary = pipeline.write_summary(run_dir / "summary.json", time.monotonic() - started_s)
        final = pipeline.status()
        if "records_in" in final:
            watch.observe(int(final["records_in"]), final.get("dead_letters_by_reason") or {}, {})
        final["dead_letter_window_ratio"] = watch.window_ratio
        final["dead_letter_window_records"] = watch.window_size
        console.print(render_status(final, pipeline.serving_url))
        console.print(render_summary(summary, run_dir / "summary.json"))
        if summary["problems"]:
            console.print(render_failure(summary))
            return 1
    finally:
        try:
            pipeline.stop()
        finally:
            if dashboard is not None:
                dashboard.stop()
            import ray

            ray.shutdown()
    return 0


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def render_status(s: dict[str, Any], url: str | None) -> Any:
    from rich.table import Table

    from sitn.dead_letter_watch import format_reasons

    table = Table(title=f"sitn-stream  {url or ''}", show_header=False, expand=False)
    table.add_column("metric", style="cyan")
    table.add_column("value", justify="right")
    rows = [
        ("events replayed", f"{_fmt(s.get('replay_sent'))} / {_fmt(s.get('replay_total'))}"
                            f"  ({_fmt(s.get('replay_rate'))}/s)"),
        ("events trained", _fmt(s.get("events_applied"))),
        ("dead letters", _fmt(s.get("dead_letters"))),
        ("dead-letter rate (window) / top reasons", f"{_fmt(s.get('dead_letter_window_ratio'), '.1%')} of "
                                                    f"{_fmt(s.get('dead_letter_window_records'))} / "
                                                    f"{format_reasons(s.get('dead_letters_by_reason') or {})}"),
        ("learner step", _fmt(s.get("step"))),
        ("examples/s (last step)", _fmt(s.get("examples_per_s"))),
        ("loss (main / i2i / i2c)", f"{_fmt(s.get('loss_main'), '.3f')} / {_fmt(s.get('loss_i2i'), '.3f')}"
                                    f" / {_fmt(s.get('loss_i2c'), '.3f')}"),
        ("prototype agreement", _fmt(s.get("proto_agreement"), ".3f")),
        ("prequential HR@10 / NDCG@10 (model, window)", f"{_fmt(s.get('prequential_hr_at_10'), '.4f')} / "
                                                        f"{_fmt(s.get('prequential_ndcg_at_10'), '.4f')}"),
        ("NDCG@10 data time: model / fused (window)", f"{_fmt(s.get('model_live_ndcg_at_10_window'), '.4f')} / "
                                                      f"{_fmt(s.get('fused_live_ndcg_at_10_window'), '.4f')}"),
        ("NDCG@10 popularity / cooc target / +source", f"{_fmt(s.get('popularity_ndcg_at_10_window'), '.4f')} / "
                                                       f"{_fmt(s.get('cooc_target_ndcg_at_10_window'), '.4f')} / "
                                                       f"{_fmt(s.get('cooc_target_source_ndcg_at_10_window'), '.4f')}"),
        ("NDCG@10 replay time: fused (window) / weight w", f"{_fmt(s.get('fused_ndcg_at_10_window'), '.4f')} / "
                                                           f"{_fmt(s.get('fused_weight'), 'g')}"),
        ("lift over best baseline, data time: model / fused", f"{_fmt(s.get('model_live_lift'), '.3f')} / "
                                                              f"{_fmt(s.get('fused_live_lift'), '.3f')}"),
        ("served by", str(s.get("served_by", "-"))),
        ("served version / items / users", f"{_fmt(s.get('served_version'))} / {_fmt(s.get('index_items'))}"
                                           f" / {_fmt(s.get('users'))}"),
        *_replica_rows(s.get("serving_replicas")),
        ("freshness p50 / p99 (s)", f"{_fmt(s.get('freshness_p50_s'), '.2f')} / "
                                    f"{_fmt(s.get('freshness_p99_s'), '.2f')}"),
        ("restarts", _fmt(s.get("restarts"))),
        ("memory MiB: total / learner / serving / consumers", _memory_row(s.get("rss_mb"))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _replica_rows(replicas: list[dict[str, Any]] | None) -> list[tuple[str, str]]:
    """With several serving replicas: one row, each replica's served version (``down`` for a dead one)."""
    if not replicas or len(replicas) < 2:
        return []
    versions = [_fmt(r["served_version"]) if r["alive"] else "down" for r in replicas]
    return [("served version per replica", " / ".join(versions))]


def status_line(s: dict[str, Any]) -> str:
    """The live table's main figures on one line, for a run whose output is not a terminal (a log file, a
    service manager), where the table is not redrawn.

    >>> print(status_line({"replay_sent": 2000, "replay_total": 3000, "replay_rate": 1000.0, "events_applied": 1500,
    ...                    "dead_letters": 3, "dead_letters_by_reason": {"bad_json": 3}, "served_by": "fused",
    ...                    "fused_live_ndcg_at_10_window": 0.0123, "cooc_target_ndcg_at_10_window": 0.011,
    ...                    "rss_mb": {"learner": 900.0, "serving": 300.0}}))
    replayed 2,000/3,000 (1,000/s) | trained 1,500 | dead letters 3 (bad_json 3) | NDCG@10 window: model - \
fused 0.0123 popularity - cooc 0.0110 | served by fused, version - | freshness p50/p99 -/- s | restarts - | \
RSS MiB total 1,200 learner 900
    """
    from sitn.dead_letter_watch import format_reasons

    reasons = format_reasons(s.get("dead_letters_by_reason") or {}) if s.get("dead_letters") else ""
    rss = s.get("rss_mb") or {}
    return (f"replayed {_fmt(s.get('replay_sent'))}/{_fmt(s.get('replay_total'))} ({_fmt(s.get('replay_rate'))}/s) | "
            f"trained {_fmt(s.get('events_applied'))} | dead letters {_fmt(s.get('dead_letters'))}"
            f"{f' ({reasons})' if reasons else ''} | NDCG@10 window: "
            f"model {_fmt(s.get('model_live_ndcg_at_10_window'), '.4f')} "
            f"fused {_fmt(s.get('fused_live_ndcg_at_10_window'), '.4f')} "
            f"popularity {_fmt(s.get('popularity_ndcg_at_10_window'), '.4f')} "
            f"cooc {_fmt(s.get('cooc_target_ndcg_at_10_window'), '.4f')} | "
            f"served by {s.get('served_by', '-')}, version {_fmt(s.get('served_version'))} | "
            f"freshness p50/p99 {_fmt(s.get('freshness_p50_s'), '.2f')}/{_fmt(s.get('freshness_p99_s'), '.2f')} s | "
            f"restarts {_fmt(s.get('restarts'))} | "
            f"RSS MiB total {_fmt(sum(rss.values()) if rss else None)} learner {_fmt(rss.get('learner'))}")


def _memory_row(rss: dict[str, float] | None) -> str:
    if not rss:
        return "-"
    return " / ".join(_fmt(v) for v in (sum(rss.values()), rss.get("learner"), rss.get("serving"), rss.get("consumers")))


def render_summary(summary: dict[str, Any], path: Path) -> Any:
    """The summary's quality table: HR@10/NDCG@10 of every ranker, whole stream, all and rankable events."""
    from rich.table import Table

    pq = summary.get("prequential") or {}
    ratio = (pq.get("rankable_ratio") or {}).get("stream")
    lifts = pq.get("lifts") or {}
    model_lift = (lifts.get("model_live") or {}).get("stream")
    fused_lift = (lifts.get("fused_live") or {}).get("stream")
    fused_weight = (pq.get("fused") or {}).get("weight")
    table = Table(title=f"{path}  (whole stream; rankable share {_fmt(ratio, '.3f')}; lift over the best "
                        f"baseline at data time: model {_fmt(model_lift, '.3f')}, fused {_fmt(fused_lift, '.3f')} "
                        f"(w {_fmt(fused_weight, 'g')}); served by {summary.get('served_by')})")
    for column in ("ranker", "HR@10", "NDCG@10", "HR@10 rankable", "NDCG@10 rankable"):
        table.add_column(column, justify="left" if column == "ranker" else "right")
    for name, spans in (pq.get("rankers") or {}).items():
        f = spans["stream"]
        table.add_row(name, *(_fmt(f[key], ".4f") for key in ("hr", "ndcg", "hr_rankable", "ndcg_rankable")))
    return table


def render_failure(summary: dict[str, Any]) -> Any:
    """Why the run failed (``summary['problems']``), and every dead-letter reason with its count and an example."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from sitn.dead_letter_watch import REASON_HINTS

    lines = [Text(f"sitn run failed: {problem}", style="bold red") for problem in summary["problems"]]
    by_reason = summary.get("dead_letters_by_reason") or {}
    if not by_reason:
        return Group(*lines)
    table = Table(title="dead letters by reason (every record is kept in the dead-letter topic)")
    table.add_column("reason")
    table.add_column("records", justify="right")
    table.add_column("first record")
    examples = summary.get("dead_letter_examples") or {}
    for reason, count in sorted(by_reason.items(), key=lambda rc: (-rc[1], rc[0])):
        table.add_row(reason, f"{count:,}", examples.get(reason, "-"))
    hints = [Text(f"hint ({reason}): {REASON_HINTS[reason]}") for reason in by_reason if reason in REASON_HINTS]
    return Group(*lines, table, *hints)
