"""Subcommands of ``sitn``; each module exposes ``register(subparsers)``.

The settings options that several commands take are defined here once (``sitn.cli_settings``), so each keeps
one flag name, one help text and one environment variable in every command.
"""

from __future__ import annotations

from sitn.cli_settings import SettingsFlags


def events_file_flags(*more: str) -> SettingsFlags:
    """How an events file is read, as ``sitn run`` reads it: the timestamp unit and the rows read
    (``--time-unit``, ``--limit``; ``sitn replay``, ``sitn train``, ``sitn inspect``), and ``more`` fields of
    ``RunSettings``."""
    from sitn.settings import RunSettings

    return SettingsFlags(RunSettings, ("time_unit", "limit", *more))


def learner_shape_flags() -> SettingsFlags:
    """The model's shape, the learner's settings: ``sitn train`` and ``sitn eval`` take them as ``--dim``,
    ``--n-views``, ``--max-len`` (``sitn run`` as ``--learner-dim``...; the same variables)."""
    from sitn.settings import RunSettings

    return SettingsFlags(RunSettings, ("learner_dim", "learner_views", "learner_max_len"),
                         names={"learner_dim": "dim", "learner_views": "n-views", "learner_max_len": "max-len"})
