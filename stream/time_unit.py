"""The timestamp column of an events.csv: its unit (detected or given) and its conversion to unix seconds.

The wire schema (``stream.events``) takes event time as whole unix seconds in
``[MIN_TIMESTAMP_S, MAX_TIMESTAMP_S)`` and nothing else. Logs in the wild hold other forms, so the CSV
readers (``stream.dataset.load_events``, ``sitn replay``, ``sitn run``, ``sitn inspect``) convert at the
file, never on the wire. The units (``--time-unit``):

- ``s``: unix seconds (a fraction is floored);
- ``ms``: unix milliseconds (floored to seconds);
- ``iso``: ISO-8601 as ``datetime.fromisoformat`` reads it (``2014-05-03``, ``2014-05-03T10:00:00Z``,
  ``2014-05-03 10:00:00+02:00``); without an offset the time is taken as UTC;
- ``ordinal``: whole numbers >= 0 that only *order* events (a position in the user's sequence, a global
  sequence number). Position ``p`` becomes ``ORDINAL_EPOCH_S + p * step_s``: one position = one day
  (``ORDINAL_STEP_S``) from 2000-01-01, a date inside the wire window and far from its edges. If the
  largest position would pass the window's end (more than 36,524 positions), ``step_s`` shrinks to the
  largest whole number of seconds that fits, and the choice says so;
- ``auto`` (the default of the commands): each value is classified by what it can be -- a whole number
  in ``[0, MIN_TIMESTAMP_S)`` (ordinal), a number in the seconds window, a number in the milliseconds
  window (the seconds window times 1000), or an ISO-8601 text -- and the unit most values fit wins (ties
  in the order s, ms, iso, ordinal). Values that fit no unit are not guessed at: converted in the chosen
  unit they fail the wire check and are dead-lettered (``sitn inspect`` counts them beforehand), or,
  when they cannot be read in that unit at all, the reader stops naming the file and line.

**Why one day per ordinal position.** The model's time-gap embedding (``use_time_gap`` in
``learner/core/config.py``) buckets ``floor(log2(1 + gap_days))`` of the gap between an event and each
history item. With one position per day the bucket becomes ``floor(log2(1 + positions back))``: the
feature degrades from "how long ago" to "how many events ago" on the same log scale, which is still
informative, instead of collapsing to one bucket (one position per second would make every gap under a
day, bucket 0) or saturating the last bucket. What is lost is real elapsed time: two positions a minute
apart and two positions a year apart look the same. With per-user positions, a user's source and target
histories share one axis only if the file numbers a user's events across both domains; if it numbers
each domain separately, cross-domain gaps mean little (the order within a domain is still exact).

Per-user order and the causal rule hold because conversion is monotone (a larger position or time never
becomes an earlier second) and ``load_events`` sorts stably: ties (every user's event ``k`` shares time
``k`` under per-user positions) keep file order, and each example is built only from events before it
in that order.

>>> stats = TimeColumnStats()
>>> for raw in ["0", "1", "2", "799"]:
...     stats.add(raw)
>>> choice = stats.choose("auto")
>>> choice.unit, choice.step_s, choice.to_unix_s("1") - choice.to_unix_s("0")
('ordinal', 86400, 86400)
>>> choice.describe()
'ordinal positions, one position = 1 day from 2000-01-01 (auto-detected: 4 of 4 values fit)'
>>> seconds = TimeColumnStats.of(["1400000000", "1400000000123", "1400000001"]).choose("auto")
>>> seconds.unit, seconds.fitting, seconds.to_unix_s("1400000000.9")
('s', 2, 1400000000)
>>> TimeColumnStats.of(["0", "1"]).choose("s").describe()
'unix seconds (as given: 0 of 2 values fit); --time-unit auto would read them as ordinal positions (2 fit)'
>>> TimeColumnStats.of(["2014-05-03T10:00:00Z"]).choose("auto").to_unix_s("2014-05-03T10:00:00Z")
1399111200
>>> TimeColumnStats.of(["x"]).choose("minutes")
Traceback (most recent call last):
...
ValueError: time unit must be one of ('auto', 's', 'ms', 'iso', 'ordinal'), got 'minutes'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from stream.events import MAX_TIMESTAMP_S, MIN_TIMESTAMP_S

TIME_UNITS = ("auto", "s", "ms", "iso", "ordinal")
UNIT_NAMES = {"s": "unix seconds", "ms": "unix milliseconds", "iso": "ISO-8601", "ordinal": "ordinal positions"}
ORDINAL_EPOCH_S = 946_684_800  # 2000-01-01T00:00:00Z: ordinal position 0
ORDINAL_STEP_S = 86_400  # one position = one day (see the module docstring)
_AUTO_ORDER = ("s", "ms", "iso", "ordinal")  # tie-break of auto-detection


def parse_number(raw: str) -> int | float | None:
    """``raw`` as an int, else as a finite float, else None.

    >>> parse_number("12"), parse_number(" 1.5 "), parse_number("nan"), parse_number("2014-05-03")
    (12, 1.5, None, None)
    """
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_iso_s(raw: str) -> int:
    """Unix seconds (floored) of an ISO-8601 text; no offset = UTC. Raises ``ValueError`` otherwise.

    >>> parse_iso_s("1970-01-02"), parse_iso_s("1970-01-01T01:00:00+01:00")
    (86400, 0)
    """
    moment = datetime.fromisoformat(raw.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.floor(moment.timestamp())


def _is_iso(raw: str) -> bool:
    try:
        parse_iso_s(raw)
    except ValueError:
        return False
    return True


def ordinal_step_s(max_position: int) -> int:
    """Seconds per ordinal position: one day, or less when ``max_position`` days would leave the wire window.

    >>> ordinal_step_s(799), ordinal_step_s(36_524), ordinal_step_s(1_000_000)
    (86400, 86400, 3155)
    >>> ordinal_step_s(10**10)
    Traceback (most recent call last):
    ...
    ValueError: ordinal positions up to 10000000000 do not fit the wire window [631152000, 4102444800) even at one second each
    """
    room_s = MAX_TIMESTAMP_S - 1 - ORDINAL_EPOCH_S
    if max_position * ORDINAL_STEP_S <= room_s:
        return ORDINAL_STEP_S
    step = room_s // max_position
    if step < 1:
        raise ValueError(f"ordinal positions up to {max_position} do not fit the wire window "
                         f"[{MIN_TIMESTAMP_S}, {MAX_TIMESTAMP_S}) even at one second each")
    return step


@dataclass
class TimeColumnStats:
    """What the values of a timestamp column could be, accumulated one raw value at a time (``add``)."""

    rows: int = 0
    fits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_AUTO_ORDER, 0))
    max_whole: int = 0  # the largest whole number >= 0 seen (the last ordinal position)

    @classmethod
    def of(cls, raw_values: Iterable[str]) -> TimeColumnStats:
        stats = cls()
        for raw in raw_values:
            stats.add(raw)
        return stats

    def add(self, raw: str) -> None:
        self.rows += 1
        number = parse_number(raw)
        if number is None:
            if _is_iso(raw):
                self.fits["iso"] += 1
            return
        if MIN_TIMESTAMP_S <= number < MAX_TIMESTAMP_S:
            self.fits["s"] += 1
        elif MIN_TIMESTAMP_S * 1000 <= number < MAX_TIMESTAMP_S * 1000:
            self.fits["ms"] += 1
        if number >= 0 and number == int(number):
            whole = int(number)
            self.max_whole = max(self.max_whole, whole)
            if whole < MIN_TIMESTAMP_S:
                self.fits["ordinal"] += 1

    def choose(self, requested: str) -> TimeUnitChoice:
        """The unit to read the column in: ``requested``, or for ``auto`` the one most values fit."""
        if requested not in TIME_UNITS:
            raise ValueError(f"time unit must be one of {TIME_UNITS}, got {requested!r}")
        unit = requested
        if requested == "auto":
            unit = max(_AUTO_ORDER, key=lambda u: (self.fits[u], -_AUTO_ORDER.index(u))) if self.rows else "s"
            auto = unit
        else:
            auto = max(_AUTO_ORDER, key=lambda u: (self.fits[u], -_AUTO_ORDER.index(u))) if self.rows else "s"
        step = ordinal_step_s(self.max_whole) if unit == "ordinal" else None
        return TimeUnitChoice(unit, requested, self.rows, self.fits[unit], step, auto, self.fits[auto])


@dataclass(frozen=True)
class TimeUnitChoice:
    """The unit a timestamp column is read in, why, and the conversion of one raw value to unix seconds."""

    unit: str  # one of "s", "ms", "iso", "ordinal" (never "auto")
    requested: str  # what was asked for: "auto" or the unit itself
    rows: int  # values looked at
    fitting: int  # of those, values that fit ``unit`` (the rest are likely dead letters or reader errors)
    step_s: int | None = None  # ordinal only: seconds per position
    auto_unit: str | None = None  # what auto-detection picks for the same values (a hint when a unit was given)
    auto_fitting: int = 0  # values that fit ``auto_unit``

    def to_unix_s(self, raw: str) -> int:
        """Unix seconds of one raw value; ``ValueError`` naming the unit if it cannot be read in it.

        The result is not range-checked: the wire schema does that (a value out of its window is a dead letter).

        >>> TimeUnitChoice("ms", "ms", 1, 1).to_unix_s("1400000000999")
        1400000000
        >>> TimeUnitChoice("ordinal", "ordinal", 1, 1, step_s=86_400).to_unix_s("2.5")
        Traceback (most recent call last):
        ...
        ValueError: '2.5' is not a whole number >= 0 (ordinal positions)
        """
        if self.unit == "iso":
            try:
                return parse_iso_s(raw)
            except ValueError:
                raise ValueError(f"{raw!r} is not an ISO-8601 date or time") from None
        number = parse_number(raw)
        if number is None:
            raise ValueError(f"{raw!r} is not a number ({UNIT_NAMES[self.unit]})")
        if self.unit == "s":
            return math.floor(number)
        if self.unit == "ms":
            return number // 1000 if isinstance(number, int) else math.floor(number / 1000)
        if number < 0 or number != int(number):
            raise ValueError(f"{raw!r} is not a whole number >= 0 (ordinal positions)")
        assert self.step_s is not None, "an ordinal choice carries its step"
        return ORDINAL_EPOCH_S + int(number) * self.step_s

    def describe(self) -> str:
        """One line for the operator: the unit, the ordinal mapping, and how it was chosen."""
        what = UNIT_NAMES[self.unit]
        if self.unit == "ordinal":
            step = "1 day" if self.step_s == ORDINAL_STEP_S else f"{self.step_s:,} s"
            what += f", one position = {step} from 2000-01-01"
        how = "auto-detected" if self.requested == "auto" else "as given"
        out = f"{what} ({how}: {self.fitting:,} of {self.rows:,} values fit)"
        if self.auto_unit is not None and self.auto_unit != self.unit and self.auto_fitting > self.fitting:
            out += (f"; --time-unit auto would read them as {UNIT_NAMES[self.auto_unit]} "
                    f"({self.auto_fitting:,} fit)")
        return out

    def as_dict(self) -> dict[str, object]:
        return {"unit": self.unit, "requested": self.requested, "rows": self.rows, "fitting": self.fitting,
                "ordinal_step_s": self.step_s, "ordinal_epoch_s": ORDINAL_EPOCH_S if self.unit == "ordinal" else None}
