"""Load an interaction data set in the shared generic format (``events.csv``).

Columns ``timestamp`` (unix seconds), ``user_id``, ``item_id``, ``domain``; other columns are ignored.
Rows come back in chronological order with ties kept in file order (a stable sort), so no example ever
sees a later event. Rows of domains other than the two requested are skipped and counted.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sitn.errors import DataFormatError
from stream.events import InteractionEvent

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("timestamp", "user_id", "item_id", "domain")


@dataclass
class EventLog:
    """Events of one data set, chronological, plus what was skipped while loading."""

    path: Path
    events: list[InteractionEvent]
    domains: tuple[str, str]
    skipped_by_domain: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.events)


def load_events(path: str | Path, source: str, target: str, limit: int | None = None) -> EventLog:
    """Read ``path`` and return the events of domains ``source`` and ``target``, chronologically.

    ``event_id`` is ``<file stem>:<line>`` (1-based line numbers, the header is line 1), stable across runs.
    ``limit`` keeps the first ``limit`` data rows of the file (before sorting), for quick runs.
    """
    path = Path(path)
    if source == target:
        raise ValueError(f"source and target domains must differ, got {source!r} twice")
    if not path.is_file():
        raise FileNotFoundError(f"events file not found: {path}")
    wanted = {source, target}
    events: list[InteractionEvent] = []
    skipped: Counter[str] = Counter()
    stem = path.stem
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
        for row in reader:
            line = reader.line_num
            if limit is not None and len(events) + sum(skipped.values()) >= limit:
                break
            if len(row) != width:
                raise DataFormatError(f"{path}:{line}: expected {width} fields, got {len(row)}")
            raw_ts, user_id, item_id, domain = row[i_ts], row[i_user], row[i_item], row[i_dom]
            try:
                timestamp = int(raw_ts)
            except ValueError:
                raise DataFormatError(f"{path}:{line}: timestamp {raw_ts!r} is not an integer") from None
            if timestamp < 0:
                raise DataFormatError(f"{path}:{line}: timestamp {timestamp} is negative")
            if not user_id:
                raise DataFormatError(f"{path}:{line}: user_id is empty")
            if not item_id:
                raise DataFormatError(f"{path}:{line}: item_id is empty")
            if not domain:
                raise DataFormatError(f"{path}:{line}: domain is empty")
            if domain not in wanted:
                skipped[domain] += 1
                continue
            events.append(InteractionEvent(f"{stem}:{line}", user_id, item_id, domain, timestamp))
    events.sort(key=lambda e: e.timestamp)  # stable: same-second ties keep file order
    if skipped:
        log.info("skipped rows of other domains path=%s skipped=%s", path, dict(skipped))
    return EventLog(path=path, events=events, domains=(source, target), skipped_by_domain=skipped)
