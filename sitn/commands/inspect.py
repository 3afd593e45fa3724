"""``sitn inspect``: what ``sitn run`` would make of an events.csv, before anything starts.

Reads the file twice, streaming (memory grows with users and items, not rows): once to detect the
timestamp unit, once to count. Reports rows, users, items and events per domain, the time range and the
unit (detected or given, as ``sitn run`` would read it), the history length per user per domain
(min / median / p90 / max), the overlap users (events in both the source and the target domain), and how
many rows would be dead-lettered and why. The dead-letter check is the stream's own: each row is converted
as the replay converts it, encoded as the replay sends it and decoded by ``stream.events.decode_event``,
the consumer's validation.

    sitn inspect --events ../shared/data/amazon_movie_book_c2dsr/events.csv --source movie --target book
    sitn inspect --events my.csv --time-unit ms --json

Without ``--source``/``--target`` every domain of the file is reported and accepted. The exit status is 1
when a run of the file would fail by ``sitn run``'s own verdict (nothing to train, or more than
``--dead-letter-max-ratio`` of the rows dead-lettered) or the file cannot be read, else 0. ``--time-unit``,
``--limit`` and ``--dead-letter-max-ratio`` are ``sitn run``'s own settings, with its variables
(``SITN_RUN_TIME_UNIT``, ``SITN_RUN_LIMIT``, ``SITN_RUN_DEAD_LETTER_MAX_RATIO``): the file is inspected as a run
in the same environment would read it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sitn.commands import events_file_flags
from stream.errors import DataFormatError, EventDecodeError
from stream.time_unit import TimeColumnStats

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="report what sitn run would make of an events.csv (counts, time unit, histories, dead letters)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--events", type=Path, required=True, help="events.csv in the shared format")
    p.add_argument("--source", default=None, help="source domain (default: every domain of the file)")
    p.add_argument("--target", default=None, help="target domain (default: every domain of the file)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    events_file_flags("dead_letter_max_ratio").add_to(
        p.add_argument_group("read and judged as sitn run would: its settings (sitn.settings.RunSettings)"))
    p.set_defaults(func=run)


def percentiles(values: list[int]) -> dict[str, float]:
    """min / median / p90 (nearest rank) / max of ``values``.

    >>> percentiles([1, 2, 3, 4, 10])
    {'min': 1, 'median': 3, 'p90': 10, 'max': 10}
    >>> percentiles([])
    {'min': 0, 'median': 0, 'p90': 0, 'max': 0}
    """
    if not values:
        return {"min": 0, "median": 0, "p90": 0, "max": 0}
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "p90": ordered[math.ceil(0.9 * len(ordered)) - 1],
            "max": ordered[-1]}


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def inspect_events(path: Path, source: str | None = None, target: str | None = None, time_unit: str = "auto",
                   limit: int | None = None) -> dict[str, Any]:
    """The report of ``path`` as a JSON-ready dict (see the module docstring). Raises ``DataFormatError`` for
    a file ``sitn run`` could not read at all (no header, a row with the wrong number of fields, an empty id)."""
    from stream.dataset import read_rows, to_event
    from stream.events import decode_event, encode_event

    if (source is None) != (target is None):
        raise ValueError(f"give both --source and --target, or neither; got source={source!r} target={target!r}")
    if source is not None and source == target:
        raise ValueError(f"source and target domains must differ, got {source!r} twice")
    wanted = None if source is None else {source, target}
    rows_by_domain: Counter[str] = Counter()
    stats = TimeColumnStats()
    rows = 0
    for row in read_rows(path, limit):  # pass 1: the time unit, over the rows a run would keep
        rows += 1
        rows_by_domain[row.domain] += 1
        if wanted is None or row.domain in wanted:
            stats.add(row.raw_timestamp)
    time = stats.choose(time_unit)
    domains = (source, target) if source is not None and target is not None else tuple(sorted(rows_by_domain))
    history: dict[str, Counter[str]] = {d: Counter() for d in domains}  # domain -> user -> events
    items: dict[str, set[str]] = {d: set() for d in domains}
    dead: Counter[str] = Counter()
    dead_examples: dict[str, str] = {}
    unreadable = 0
    unreadable_example: str | None = None
    lo_s, hi_s = math.inf, -math.inf
    for row in read_rows(path, limit):  # pass 2: convert and validate exactly as the replay and the consumer do
        if row.domain not in history:
            continue
        try:
            event = to_event(path, row, time)
        except DataFormatError as exc:
            unreadable += 1
            unreadable_example = unreadable_example or str(exc)
            continue
        try:
            decode_event(encode_event(event), domains)
        except EventDecodeError as exc:
            dead[exc.reason] += 1
            dead_examples.setdefault(exc.reason, f"line {row.line}: {exc.detail}")
            continue
        history[row.domain][row.user_id] += 1
        items[row.domain].add(row.item_id)
        lo_s, hi_s = min(lo_s, event.timestamp), max(hi_s, event.timestamp)
    kept = sum(rows_by_domain[d] for d in domains)
    users = set().union(*(set(h) for h in history.values())) if history else set()
    pair = domains if len(domains) == 2 else None
    overlap = len(set(history[pair[0]]) & set(history[pair[1]])) if pair else sum(
        1 for u in users if sum(u in h for h in history.values()) >= 2)
    valid = sum(sum(h.values()) for h in history.values())
    return {
        "path": str(path),
        "rows": rows,
        "rows_by_domain": dict(rows_by_domain.most_common()),
        "domains": list(domains),
        "source_target": source is not None,  # domains are (source, target) as given, else every domain found
        "rows_kept": kept,  # rows of the domains a run reads; the others are skipped by the reader
        "rows_skipped_other_domains": rows - kept,
        "time": {**time.as_dict(), "describe": time.describe(),
                 "first": _iso(int(lo_s)) if valid else None, "last": _iso(int(hi_s)) if valid else None,
                 "first_unix_s": int(lo_s) if valid else None, "last_unix_s": int(hi_s) if valid else None},
        "users": len(users),
        "overlap_users": overlap,  # users with valid events in both domains (any two, without --source/--target)
        "per_domain": {
            d: {"events": sum(history[d].values()), "users": len(history[d]), "items": len(items[d]),
                "history_length": percentiles(list(history[d].values()))}
            for d in domains
        },
        "events_valid": valid,
        "dead_letters": sum(dead.values()),
        "dead_letters_by_reason": dict(dead.most_common()),
        "dead_letter_examples": dead_examples,
        "unreadable_timestamps": unreadable,  # sitn run stops at the first of these (the reader's error)
        "unreadable_example": unreadable_example,
    }


def verdict(report: dict[str, Any], max_ratio: float) -> list[str]:
    """Why a run of the file would fail (``sitn.dead_letter_watch.judge_run`` on the report's counts), or []."""
    from sitn.dead_letter_watch import judge_run

    problems = []
    if report["unreadable_timestamps"]:
        problems.append(f"the reader would stop: {report['unreadable_example']}")
    if not report["rows_kept"]:
        problems.append(f"no rows of domains {report['domains']}")
    judged = judge_run(report["rows_kept"], report["events_valid"], report["rows_kept"],
                       report["dead_letters_by_reason"], max_ratio)
    return problems + [p.replace("trained nothing", "would train nothing").replace("dead-lettered", "would dead-letter")
                       .replace("records consumed", "rows") for p in judged.problems]


def render(report: dict[str, Any], problems: list[str]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = report["time"]
    head = Table(title=f"sitn inspect {report['path']}", show_header=False)
    head.add_column("what", style="cyan")
    head.add_column("value")
    by_domain = ", ".join(f"{d} {n:,}" for d, n in report["rows_by_domain"].items())
    head.add_row("rows", f"{report['rows']:,} ({by_domain})")
    read = (f"{report['domains'][0]} -> {report['domains'][1]} (source -> target)" if report["source_target"]
            else f"{', '.join(report['domains'])} (every domain of the file)")
    head.add_row("domains read", f"{read}; {report['rows_skipped_other_domains']:,} rows of other domains skipped")
    head.add_row("time unit", t["describe"])
    head.add_row("time range", f"{t['first']} .. {t['last']}" if t["first"] else "-")
    head.add_row("users / overlap users", f"{report['users']:,} / {report['overlap_users']:,} (events in both domains)")
    head.add_row("valid events", f"{report['events_valid']:,}")
    reasons = ", ".join(f"{r} {n:,}" for r, n in report["dead_letters_by_reason"].items())
    head.add_row("would be dead-lettered", f"{report['dead_letters']:,}" + (f" ({reasons})" if reasons else ""))
    for reason, example in report["dead_letter_examples"].items():
        head.add_row(f"  e.g. {reason}", example)
    if report["unreadable_timestamps"]:
        head.add_row("unreadable timestamps", f"{report['unreadable_timestamps']:,}, e.g. {report['unreadable_example']}")
    domains = Table(title="per domain (valid events; history = events per user)")
    for column in ("domain", "events", "users", "items", "history min", "median", "p90", "max"):
        domains.add_column(column, justify="left" if column == "domain" else "right")
    for d, s in report["per_domain"].items():
        h = s["history_length"]
        domains.add_row(d, f"{s['events']:,}", f"{s['users']:,}", f"{s['items']:,}",
                        *(f"{h[k]:,g}" for k in ("min", "median", "p90", "max")))
    verdict_line = (Text("a run would fail: " + "; ".join(problems), style="bold red") if problems
                    else Text("a run would read every kept row", style="green") if not report["dead_letters"]
                    else Text(f"a run would dead-letter {report['dead_letters']:,} rows (under the threshold)"))
    return Group(head, domains, verdict_line)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    settings = events_file_flags("dead_letter_max_ratio").build(args)  # refused: exit 2, naming the flag or variable
    try:
        report = inspect_events(args.events, args.source, args.target, settings.time_unit, settings.limit)
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        Console(stderr=True).print(f"[bold red]sitn inspect:[/bold red] {exc}")
        return 1
    problems = verdict(report, settings.dead_letter_max_ratio)
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        Console().print(render(report, problems))
    return 1 if problems else 0
