"""Load an interaction data set in the shared generic format (``events.csv``).

Columns ``timestamp``, ``user_id``, ``item_id``, ``domain``; other columns are ignored. The timestamp
column is read in a unit (``time_unit``: unix seconds, milliseconds, ISO-8601, ordinal positions, or
``auto`` to detect it; ``stream.time_unit``) and converted to the wire's unix seconds here, at the file.
Rows come back in chronological order with ties kept in file order (a stable sort), so no example ever
sees a later event. Rows of domains other than the two requested are skipped and counted.

Two readers: :func:`load_events` holds every event in memory (the offline evaluation needs them all at
once); :func:`open_events` streams a chronological file in bounded memory (the replay of ``sitn run``),
reading it once to count, detect the time unit and check the order, then once per iteration. A file that
is not chronological cannot be streamed in order: ``open_events`` then loads and sorts it, and says so.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from stream.errors import DataFormatError
from stream.events import InteractionEvent
from stream.time_unit import TimeColumnStats, TimeUnitChoice

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("timestamp", "user_id", "item_id", "domain")


class CsvRow(NamedTuple):
    """One data row as read, before its timestamp is converted. ``line`` is 1-based (the header is 1)."""

    line: int
    raw_timestamp: str
    user_id: str
    item_id: str
    domain: str


@dataclass
class EventLog:
    """Events of one data set, chronological, plus what was skipped while loading and the time unit used."""

    path: Path
    events: list[InteractionEvent]
    domains: tuple[str, str]
    skipped_by_domain: Counter[str] = field(default_factory=Counter)
    time: TimeUnitChoice | None = None

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[InteractionEvent]:
        return iter(self.events)


@dataclass
class EventFile:
    """A chronological events file, streamed: each iteration reads the file again and yields the events of
    the two domains in file order, one at a time (memory does not grow with the file). ``n_events``,
    ``skipped_by_domain`` and ``time`` come from the opening pass (:func:`open_events`)."""

    path: Path
    domains: tuple[str, str]
    n_events: int
    time: TimeUnitChoice
    limit: int | None = None
    skipped_by_domain: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return self.n_events

    def __iter__(self) -> Iterator[InteractionEvent]:
        wanted = set(self.domains)
        for row in read_rows(self.path, self.limit):
            if row.domain in wanted:
                yield to_event(self.path, row, self.time)


def read_rows(path: str | Path, limit: int | None = None) -> Iterator[CsvRow]:
    """The data rows of ``path`` (the first ``limit`` only, if given), each checked for shape and empty fields.

    Raises :class:`DataFormatError` naming the file, the line and the problem at the first malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"events file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(f"{path}:1: empty file, expected a header with {REQUIRED_COLUMNS}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(f"{path}:1: header lacks column(s) {missing}; has {header}")
        i_ts, i_user, i_item, i_dom = (header.index(c) for c in REQUIRED_COLUMNS)
        width = len(header)
        for n, row in enumerate(reader):
            if limit is not None and n >= limit:
                return
            line = reader.line_num
            if len(row) != width:
                raise DataFormatError(f"{path}:{line}: expected {width} fields, got {len(row)}")
            out = CsvRow(line, row[i_ts], row[i_user], row[i_item], row[i_dom])
            for name in ("user_id", "item_id", "domain"):
                if not getattr(out, name):
                    raise DataFormatError(f"{path}:{line}: {name} is empty")
            yield out


def to_event(path: Path, row: CsvRow, time: TimeUnitChoice) -> InteractionEvent:
    """The event of one row, ``event_id`` ``<file stem>:<line>``; its timestamp converted by ``time``."""
    try:
        timestamp = time.to_unix_s(row.raw_timestamp)
    except ValueError as exc:
        raise DataFormatError(f"{path}:{row.line}: timestamp {exc}") from None
    if timestamp < 0:
        raise DataFormatError(f"{path}:{row.line}: timestamp {row.raw_timestamp} is negative")
    return InteractionEvent(f"{path.stem}:{row.line}", row.user_id, row.item_id, row.domain, timestamp)


def load_events(path: str | Path, source: str, target: str, limit: int | None = None,
                time_unit: str = "s") -> EventLog:
    """Read ``path`` and return the events of domains ``source`` and ``target``, chronologically.

    ``event_id`` is ``<file stem>:<line>`` (1-based line numbers, the header is line 1), stable across runs.
    ``limit`` keeps the first ``limit`` data rows of the file (before sorting), for quick runs.
    ``time_unit``: ``s`` (the default, for callers that know their data), ``ms``, ``iso``, ``ordinal`` or
    ``auto``, detected from the kept rows; ``EventLog.time`` says what was used.
    """
    path = Path(path)
    if source == target:
        raise ValueError(f"source and target domains must differ, got {source!r} twice")
    wanted = {source, target}
    rows: list[CsvRow] = []
    skipped: Counter[str] = Counter()
    stats = TimeColumnStats()
    for row in _kept_rows(path, wanted, limit, skipped):
        rows.append(row)
        stats.add(row.raw_timestamp)
    time = stats.choose(time_unit)
    events: list[InteractionEvent] = []
    for i, row in enumerate(rows):  # each row is released as its event is made: one copy in memory at a time
        rows[i] = None  # type: ignore[call-overload]
        events.append(to_event(path, row, time))
    events.sort(key=lambda e: e.timestamp)  # stable: same-second ties keep file order
    if skipped:
        log.info("skipped rows of other domains path=%s skipped=%s", path, dict(skipped))
    log.info("timestamps path=%s unit=%s requested=%s fitting=%d rows=%d", path, time.unit, time.requested,
             time.fitting, time.rows)
    return EventLog(path=path, events=events, domains=(source, target), skipped_by_domain=skipped, time=time)


def _kept_rows(path: Path, wanted: set[str], limit: int | None, skipped: Counter[str]) -> Iterable[CsvRow]:
    for row in read_rows(path, limit):
        if row.domain in wanted:
            yield row
        else:
            skipped[row.domain] += 1


def open_events(path: str | Path, source: str, target: str, limit: int | None = None,
                time_unit: str = "s") -> EventFile | EventLog:
    """The events of ``source`` and ``target`` in ``path`` in chronological order, for one pass or more.

    A chronological file (timestamps never decrease in file order, the usual shape of a log) comes back as
    an :class:`EventFile` that streams it: two passes here (time unit, then order), memory independent of
    the file's length. Any other file comes back from :func:`load_events`, sorted in memory (logged). The
    events, their ids and their order are the same either way.
    """
    path = Path(path)
    if source == target:
        raise ValueError(f"source and target domains must differ, got {source!r} twice")
    wanted = {source, target}
    skipped: Counter[str] = Counter()
    stats = TimeColumnStats()
    n_events = 0
    for row in _kept_rows(path, wanted, limit, skipped):
        stats.add(row.raw_timestamp)
        n_events += 1
    time = stats.choose(time_unit)
    previous = -math.inf
    for row in _kept_rows(path, wanted, limit, Counter()):
        timestamp = to_event(path, row, time).timestamp
        if timestamp < previous:
            log.info("not chronological, loading it into memory to sort path=%s line=%d", path, row.line)
            return load_events(path, source, target, limit=limit, time_unit=time_unit)
        previous = timestamp
    if skipped:
        log.info("skipped rows of other domains path=%s skipped=%s", path, dict(skipped))
    log.info("timestamps path=%s unit=%s requested=%s fitting=%d rows=%d (streamed, chronological)", path,
             time.unit, time.requested, time.fitting, time.rows)
    return EventFile(path, (source, target), n_events, time, limit, skipped)
