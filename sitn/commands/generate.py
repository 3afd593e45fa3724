"""``sitn generate``: write a seeded synthetic cross-domain events.csv, optionally with drift injected.

The model (interest clusters, Zipf popularity inside a cluster, users arriving over time) and the drift
kinds are described in ``stream/synthetic.py``. The same options and seed give the same file, byte for
byte. Every option can also come from its environment variable (shown in brackets); a flag wins.

    sitn generate --output var/synthetic.csv --events 1000000 --seed 1
    sitn generate --output var/drift.csv --events 200000 --drift domain_mix --drift-at 0.5
    sitn generate --output var/no-transfer.csv --shared-interest 0 --unique-pairs true

A log shaped like issue 12's large case (5,000 users with about 600 events each, 500,000 items split 80/20,
the timestamp column holding each event's position in its user's sequence), written chunk by chunk:

    sitn generate --output var/big.csv --users 5000 --events-per-user 600 --source-items 400000 \\
        --target-items 100000 --target-share 0.2 --time-unit ordinal

``--events-per-user N`` sets ``--events`` to users x N with no new users arriving (users are drawn
uniformly, so each has about N events: N on average, a binomial spread around it). ``--time-unit`` writes
the timestamp column as ``s`` (default), ``ms``, ``iso`` or ``ordinal`` (per-user positions); ``sitn run``
and ``sitn inspect`` read each back with ``--time-unit auto``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stream.synthetic import CSV_TIME_UNITS, SyntheticConfig

log = logging.getLogger(__name__)

DRIFT_CHOICES = ("none", "interest_swap", "domain_mix", "popularity")


def boolean(raw: str) -> bool:
    """A flag's boolean value.

    >>> boolean("true"), boolean("0")
    (True, False)
    >>> boolean("maybe")
    Traceback (most recent call last):
    ...
    ValueError: 'maybe' is not one of 1, 0, true, false, yes, no
    """
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(raw.lower())
    if value is None:
        raise ValueError(f"{raw!r} is not one of 1, 0, true, false, yes, no")
    return value


# flag -> (SyntheticConfig field, parser, help). Every flag also reads SITN_GENERATE_<FLAG> (shown in --help).
FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "events": ("events", int, "events to write (default: 1000000)"),
    "seed": ("seed", int, "random seed; the same seed and options give the same file (default: 0)"),
    "drift": ("drift", str, f"drift kind, one of {DRIFT_CHOICES} (default: none)"),
    "drift-at": ("drift_at_fraction", float, "where the drift starts, as a fraction of --events"),
    "drift-at-event": ("drift_at_event", int, "where the drift starts, as a 0-based event index"),
    "drift-target-share": ("drift_target_share", float, "target share after a domain_mix drift (default: 0.7)"),
    "users": ("n_users", int, "users present at the start (default: 10000)"),
    "new-user-share": ("new_user_share", float, "fraction of events by a brand-new user (default: 0.01)"),
    "source": ("source", str, "source domain name (default: movie)"),
    "target": ("target", str, "target domain name (default: book)"),
    "source-items": ("n_source_items", int, "source catalogue size (default: 5000)"),
    "target-items": ("n_target_items", int, "target catalogue size (default: 5000)"),
    "clusters": ("n_clusters", int, "latent interest clusters (default: 16)"),
    "primary-share": ("primary_share", float, "share of a user's events from their primary cluster (default: 0.8)"),
    "target-share": ("target_share", float, "probability of a target-domain event (default: 0.3)"),
    "noise": ("noise", float, "probability of a uniformly drawn item (default: 0.1)"),
    "zipf-exponent": ("zipf_exponent", float, "within-cluster popularity exponent (default: 1.0)"),
    "shared-interest": ("shared_interest", float,
                        "probability that a user's target-domain clusters are their source-domain ones; "
                        "0 = the source says nothing about the target (default: 1.0)"),
    "unique-pairs": ("unique_pairs", boolean,
                     "drop every repeat of a (user, item) pair, as `sitn eval` expects (default: false)"),
    "events-per-second": ("events_per_second", float, "event-time pace: events per second of event time (default: 10)"),
    "start-timestamp": ("start_timestamp", int, "unix seconds of the first event (default: 1500000000)"),
}


def env_name(flag: str) -> str:
    """The environment variable of a flag.

    >>> env_name("drift-at")
    'SITN_GENERATE_DRIFT_AT'
    """
    return "SITN_GENERATE_" + flag.upper().replace("-", "_")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="write a seeded synthetic events.csv, optionally with drift injected",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", type=Path, default=None,
                   help=f"the events.csv to write (required) [env {env_name('output')}]")
    p.add_argument("--events-per-user", type=int, default=None, metavar="N",
                   help="events = users x N, no new users (about N events each; instead of --events)")
    p.add_argument("--time-unit", choices=CSV_TIME_UNITS, default="s",
                   help="how the timestamp column is written: unix s (default), ms, iso, or ordinal "
                        "(each event's position in its user's sequence)")
    for flag, (_field, parse, help_) in FLAGS.items():
        metavar = {int: "N", float: "X", boolean: "BOOL"}.get(parse, "NAME")
        p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), default=None, metavar=metavar,
                       help=f"{help_} [env {env_name(flag)}]")
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    """The output path and SyntheticConfig keyword arguments: each flag, else its environment variable.

    >>> ns = argparse.Namespace(output=None, **{f.replace("-", "_"): None for f in FLAGS})
    >>> ns.events = "10"
    >>> resolve(ns, {"SITN_GENERATE_OUTPUT": "x.csv", "SITN_GENERATE_EVENTS": "99", "SITN_GENERATE_DRIFT": "none"})
    (PosixPath('x.csv'), {'events': 10, 'drift': None})
    >>> ns.events = "ten"
    >>> resolve(ns, {"SITN_GENERATE_OUTPUT": "x.csv"})
    Traceback (most recent call last):
    ...
    ValueError: --events: expected int, got 'ten'
    """
    output = args.output if args.output is not None else environ.get(env_name("output"))
    if not output:
        raise ValueError(f"--output is required (or set {env_name('output')})")
    kwargs: dict[str, Any] = {}
    for flag, (field, parse, _help) in FLAGS.items():
        raw = getattr(args, flag.replace("-", "_"))
        where = f"--{flag}"
        if raw is None:
            raw, where = environ.get(env_name(flag)), env_name(flag)
        if raw is None or raw == "":
            continue
        try:
            value = parse(raw)
        except ValueError:
            raise ValueError(f"{where}: expected {parse.__name__}, got {raw!r}") from None
        if field == "drift":
            if value not in DRIFT_CHOICES:
                raise ValueError(f"{where}: expected one of {DRIFT_CHOICES}, got {value!r}")
            value = None if value == "none" else value
        kwargs[field] = value
    per_user = getattr(args, "events_per_user", None)
    if per_user is not None:
        if per_user < 1:
            raise ValueError(f"--events-per-user must be >= 1, got {per_user}")
        if "events" in kwargs:
            raise ValueError(f"give --events or --events-per-user, not both; got {kwargs['events']} and {per_user}")
        if kwargs.get("new_user_share", 0.0) != 0.0:
            raise ValueError(f"--events-per-user needs --new-user-share 0 (a fixed population), got "
                             f"{kwargs['new_user_share']}")
        kwargs["events"] = kwargs.get("n_users", SyntheticConfig.n_users) * per_user
        kwargs["new_user_share"] = 0.0
    return Path(output), kwargs


def run(args: argparse.Namespace) -> int:
    from stream.synthetic import write_csv

    try:
        output, kwargs = resolve(args, os.environ)
        config = SyntheticConfig(**kwargs)
    except ValueError as exc:
        raise SystemExit(f"sitn generate: {exc}") from None
    log.info("generate output=%s config=%r", output, config)
    output.parent.mkdir(parents=True, exist_ok=True)
    started_s = time.perf_counter()
    rows = write_csv(output, config, time_unit=args.time_unit)
    elapsed_s = time.perf_counter() - started_s
    drift = "no drift" if config.drift is None else f"drift={config.drift} from event {config.drift_index}"
    stamps = "" if args.time_unit == "s" else f", {args.time_unit} timestamps"
    print(f"wrote {rows:,} events ({config.source} -> {config.target}, seed {config.seed}, {drift}){stamps} to {output} "
          f"in {elapsed_s:.2f} s: {rows / max(elapsed_s, 1e-9):,.0f} events/s")
    return 0
