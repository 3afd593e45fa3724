"""What a run directory's replay has sent into its log, so a resumed ``sitn run`` continues it or refuses.

``sitn run --events FILE`` replays the file into the run's log; the log and the learner's checkpoints live on
in the run directory. Before this journal, giving ``--events`` again on a resume replayed the whole file a
second time (every event trained twice). Now ``<run dir>/replay.json`` records which file was replayed (its
content fingerprint and the options that select its events) and how many of its events the log has
acknowledged, rewritten after every acknowledged chunk. A resume then:

- with the same file (same content, wherever it now lies; same domains, time unit and ``--limit``): sends only
  the events after the ones acknowledged, or nothing when the replay was complete;
- with another file, or the same file read with other options: refuses, naming both (its events would be
  mixed into a log that holds the first's); ``sitn replay`` appends a file to a topic deliberately;
- without ``--events``: learns the replay's total from the journal, so ``--exit-after-replay`` still ends the
  run, and says so when the replay was left unfinished;
- in a run directory that holds a checkpoint but no journal (written before the journal existed): refuses
  ``--events``, since what the log holds cannot be known.

A process killed between a chunk's acknowledgement and the journal's rewrite resends that chunk on resume
(at most one flush: 65,536 events flat out, one 0.1 s tick paced); a Ctrl-C ends after the chunk in hand and
the journal is exact.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()); f = d / "e.csv"; _ = f.write_text("timestamp,user_id,item_id,domain\\n")
>>> source = ReplaySource.of(f, ("movie", "book"), "s", None, total=10)
>>> journal = ReplayJournal(d / "run" / "replay.json")
>>> journal.plan(source, has_checkpoint=False).skip
0
>>> journal.record(source, 4); journal.plan(source, has_checkpoint=True).skip
4
>>> journal.record(source, 10); plan = journal.plan(source, has_checkpoint=True); (plan.skip, plan.remaining)
(10, 0)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

JOURNAL_NAME = "replay.json"
FINGERPRINT_BYTES = 1 << 20  # hashed from each end of the file, with its size


class ReplayRefused(Exception):
    """The run directory's log already holds another replay (or an unknown one); the message says which."""


def file_fingerprint(path: Path) -> str:
    """sha256 over the file's size and its first and last MiB: equal for a copy or a moved file, different for
    an edited or grown one (a file that differs only in its middle MiBs is taken as the same)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(fh.read(FINGERPRINT_BYTES))
    return f"sha256:{size}:{digest.hexdigest()}"


@dataclass(frozen=True)
class ReplaySource:
    """A replay's identity: which file (by content), which of its events (domains, time unit, limit), how many."""

    path: str
    fingerprint: str
    domains: tuple[str, str]
    time_unit: str  # the unit the timestamps were read in (after auto-detection)
    limit: int | None
    total: int

    @classmethod
    def of(cls, path: Path, domains: tuple[str, str], time_unit: str, limit: int | None, total: int) -> ReplaySource:
        return cls(str(Path(path).resolve()), file_fingerprint(Path(path)), (domains[0], domains[1]), time_unit,
                   limit, total)

    def same_events(self, other: ReplaySource) -> bool:
        """Both select the same events in the same order (the path may differ: a moved or copied file)."""
        return (self.fingerprint, self.domains, self.time_unit, self.limit, self.total) == (
            other.fingerprint, other.domains, other.time_unit, other.limit, other.total)

    def describe(self) -> str:
        limit = f", limit {self.limit:,}" if self.limit is not None else ""
        return (f"{self.path} ({self.total:,} events, {self.domains[0]} -> {self.domains[1]}, time unit "
                f"{self.time_unit}{limit})")


@dataclass(frozen=True)
class ReplayPlan:
    """What this run sends: the events after ``skip`` of ``source`` (``skip == total``: nothing)."""

    source: ReplaySource
    skip: int
    message: str | None  # said at start when the run resumes a replay

    @property
    def remaining(self) -> int:
        return self.source.total - self.skip


@dataclass(frozen=True)
class JournalEntry:
    source: ReplaySource
    sent: int


class ReplayJournal:
    """``<run dir>/replay.json``: one replay's source and how many of its events the log acknowledged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_run_dir(cls, run_dir: Path) -> ReplayJournal:
        return cls(Path(run_dir) / JOURNAL_NAME)

    def read(self) -> JournalEntry | None:
        """The recorded replay, None when there is none. A journal that cannot be read raises ReplayRefused."""
        if not self.path.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            src = data["source"]
            source = ReplaySource(str(src["path"]), str(src["fingerprint"]), (src["domains"][0], src["domains"][1]),
                                  str(src["time_unit"]), None if src["limit"] is None else int(src["limit"]),
                                  int(src["total"]))
            return JournalEntry(source, int(data["sent"]))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ReplayRefused(f"{self.path} cannot be read ({type(exc).__name__}: {exc}); it records what this "
                                f"run directory's log holds, so nothing is replayed: fix or remove it") from exc

    def record(self, source: ReplaySource, sent: int) -> None:
        """Atomically rewrite the journal: ``sent`` of ``source``'s events are acknowledged by the log."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        body = {"source": {**asdict(source), "domains": list(source.domains)}, "sent": int(sent)}
        tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def plan(self, source: ReplaySource, has_checkpoint: bool) -> ReplayPlan:
        """What to send of ``source`` into this run directory's log; raises ReplayRefused when it must not."""
        entry = self.read()
        if entry is None:
            if has_checkpoint:
                raise ReplayRefused(
                    f"this run directory already holds a trained model but no {JOURNAL_NAME} (a run from before the "
                    f"replay journal, or one fed by another producer), so what its log holds is unknown and "
                    f"--events {source.path} could replay events it has already trained on. Resume without "
                    f"--events, start a new --run-dir, or append the file on purpose with `sitn replay`")
            self.record(source, 0)  # before the first event is sent: a checkpoint never exists without it
            return ReplayPlan(source, 0, None)
        if not entry.source.same_events(source):
            raise ReplayRefused(
                f"this run directory's log holds the replay of {entry.source.describe()}, {entry.sent:,} sent; "
                f"--events now names {source.describe()}, and replaying it would mix the two. Resume with the "
                f"same file and options, without --events, in a new --run-dir, or append it on purpose with "
                f"`sitn replay`")
        sent = min(max(entry.sent, 0), source.total)
        if sent >= source.total:
            msg = (f"every one of the {source.total:,} events of {source.path} is already in this run's log "
                   f"(replay.json); nothing is replayed, the run consumes and trains what is left")
        elif sent:
            msg = (f"resuming the replay of {source.path} after the {sent:,} events already in this run's log "
                   f"(replay.json); {source.total - sent:,} to go")
        else:
            msg = None
        return ReplayPlan(source, sent, msg)

    def plan_without_file(self) -> ReplayPlan | None:
        """A run without ``--events``: the recorded replay as it stands (nothing is sent; ``skip`` events are in
        the log, for ``--exit-after-replay`` to wait on), None when nothing was recorded."""
        entry = self.read()
        if entry is None:
            return None
        source, sent = entry.source, min(entry.sent, entry.source.total)
        if sent < source.total:
            msg = (f"the replay of {source.path} stopped after {sent:,} of its {source.total:,} events "
                   f"({JOURNAL_NAME}): this run trains the ones in the log; --events {source.path} sends the rest")
        else:
            msg = f"this run's log holds all {source.total:,} events of {source.path} ({JOURNAL_NAME})"
        return ReplayPlan(source, sent, msg)
