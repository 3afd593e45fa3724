"""The ``sitn`` console command: one entry point, one subcommand per module in ``sitn.commands``.

Each command module exposes ``register(subparsers)`` which adds its parser and sets ``func``; the
function receives the parsed arguments and returns the process exit code. A command's settings options
are generated from its settings classes (``sitn.cli_settings``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

import sitn.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sitn",
        description="sitn-stream: a streaming, online-learning cross-domain recommender (SITN).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(sitn.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"sitn.commands.{info.name}")
        module.register(subparsers)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level)
    from stream.errors import ConfigError, KafkaAuthenticationError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # a setting refused (sitn.cli_settings names the flag or variable): as argparse does
        print(f"sitn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KafkaAuthenticationError as exc:  # an operator's error, not a bug: the reason, without a traceback
        print(f"sitn {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
