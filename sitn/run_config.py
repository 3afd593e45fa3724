"""The learner config a run directory was started with, kept for every later start of that run.

A run directory is resumed by starting ``sitn run`` on it again, often with newer code. Its checkpoints
were trained with the config of its first start; the learner refuses a checkpoint trained with another
config (``learner.online.checkpoint_store.same_config``), so a default changed by an upgrade (say a new
training switch turned on) would otherwise set every checkpoint aside and restart the run from nothing.
Here the run keeps its config: ``<run dir>/learner_config.json`` is written on the first start and read on
every later one.

- A field this start asks for explicitly (a ``--learner-*`` flag or its ``SITN_RUN_LEARNER_*`` variable) that
  differs from the run's is an error that names it: the run directory or the flag has to change.
- Any other difference (this code's defaults) is kept as the run had it, and reported.
- A run directory from before this file (checkpoints, no config file) takes the config of its newest
  checkpoint that reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from learner.core.config import SITNConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "learner_config.json"


class RunConfigConflict(ValueError):
    """This start asks for a learner setting the run directory was not started with."""


@dataclass(frozen=True)
class ResumedConfig:
    config: SITNConfig
    # field -> (this start's value, the run's value), for the differences kept as the run had them
    kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def message(self, run_dir: Path) -> str | None:
        if not self.kept:
            return None
        fields = "; ".join(f"{name} {run!r} (this code's default {ours!r})" for name, (ours, run) in self.kept.items())
        return f"run directory {run_dir} keeps the learner settings it was started with: {fields}"


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(values)))


def _from_checkpoints(checkpoint_dir: Path) -> SITNConfig | None:
    from learner.core.checkpoint import CheckpointError, load_checkpoint

    for manifest in sorted(checkpoint_dir.glob("ckpt-*.json"), reverse=True):
        try:
            state = load_checkpoint(manifest.with_suffix(".pt"))
            return SITNConfig.from_dict(state["config"])
        except (CheckpointError, KeyError, ValueError, TypeError) as exc:
            log.warning("no config from checkpoint path=%s: %s", manifest, exc)
    return None


def write_run_config(run_dir: Path, config: SITNConfig) -> Path:
    path = run_dir / CONFIG_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(config.to_dict(), fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def resume_learner_config(run_dir: Path, config: SITNConfig, explicit: Collection[str] = (),
                          checkpoint_dir: Path | None = None) -> ResumedConfig:
    """The learner config for a start of the run in ``run_dir``: ``config`` on a new run (and written), the
    run's own otherwise. ``explicit``: SITNConfig fields this start set on purpose; one that differs from
    the run's raises :class:`RunConfigConflict`."""
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoints" if checkpoint_dir is None else Path(checkpoint_dir)
    path = run_dir / CONFIG_FILE
    from_file = path.is_file()
    if from_file:
        stored: SITNConfig | None = SITNConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    else:  # a run directory from before the file: its newest checkpoint's (read once, then written)
        stored = _from_checkpoints(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if stored is None:
        write_run_config(run_dir, config)
        return ResumedConfig(config)
    ours, theirs = _plain(config.to_dict()), _plain(stored.to_dict())
    diffs = {name: (ours.get(name), theirs.get(name)) for name in sorted(set(ours) | set(theirs))
             if ours.get(name) != theirs.get(name)}
    asked = {name: diff for name, diff in diffs.items() if name in explicit}
    if asked:
        told = "; ".join(f"{name} {ours!r} asked, {run!r} in the run" for name, (ours, run) in asked.items())
        raise RunConfigConflict(
            f"run directory {run_dir} was started with other learner settings ({told}); its checkpoints were "
            f"trained with those: start a new run directory for the new settings, or drop them to resume")
    if not from_file:
        write_run_config(run_dir, stored)
    return ResumedConfig(stored, diffs)
