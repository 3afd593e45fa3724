"""Dead letters as the operator of ``sitn run`` sees them: the rate over a window, its top reasons, a warning
when the rate passes a threshold, and the run's verdict at exit.

A run whose records all fail validation (a file of millisecond or ordinal timestamps read as seconds, wrong
domain names) trains nothing; it must say so and why, not end quietly. ``DeadLetterWatch`` is fed the
run's cumulative counts (``Pipeline.status()``: the learner's tally, which counts each record once as its
positions pass it, across consumer and learner restarts) and keeps the rate over about the last
``window_records`` records consumed; it returns an alert when that rate first passes ``max_ratio`` (and again
after it has come back under). ``judge_run`` gives the exit verdict: a run that trained nothing, or
dead-lettered more than ``max_ratio`` of what it consumed, has problems, and ``sitn run`` exits non-zero.

>>> watch = DeadLetterWatch(max_ratio=0.01, window_records=1000)
>>> watch.observe(500, {}, {}) is None
True
>>> alert = watch.observe(1500, {"bad_timestamp": 400}, {"bad_timestamp": "partition 0 offset 9: got 0"})
>>> print(alert.message())
dead letters: 40.0% of the last 1,000 records (threshold 1.0%); top reason bad_timestamp (400), e.g. partition 0 offset 9: got 0
>>> watch.observe(1600, {"bad_timestamp": 401}, {}) is None  # still above: warned once
True
>>> judge_run(records_in=1600, events_trained=1199, events_to_replay=1600, by_reason={"bad_timestamp": 401},
...           max_ratio=0.01).problems
['dead-lettered 401 of 1,600 records consumed (25.1%), above the threshold of 1.0%']
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

# What to do about a reason, where the fix is known (printed with the reasons when a run fails).
REASON_HINTS = {
    "bad_timestamp": "the timestamps are not unix seconds in [1990, 2100): give the file's unit with --time-unit "
                     "(s, ms, iso, ordinal; auto detects it); `sitn inspect --events FILE` shows what it detects",
    "unknown_domain": "the record's domain is neither --source nor --target",
}


def top_reasons(by_reason: Mapping[str, int], n: int = 3) -> list[tuple[str, int]]:
    """The ``n`` most frequent reasons, most first (ties by name).

    >>> top_reasons({"bad_json": 2, "bad_timestamp": 9, "empty": 2, "oversize": 1}, n=3)
    [('bad_timestamp', 9), ('bad_json', 2), ('empty', 2)]
    """
    return sorted(((r, c) for r, c in by_reason.items() if c > 0), key=lambda rc: (-rc[1], rc[0]))[:n]


def format_reasons(by_reason: Mapping[str, int], n: int = 3) -> str:
    """``reason count, ...`` of the top ``n`` reasons, or ``-``.

    >>> format_reasons({"bad_timestamp": 1234, "bad_json": 1}), format_reasons({})
    ('bad_timestamp 1,234, bad_json 1', '-')
    """
    return ", ".join(f"{r} {c:,}" for r, c in top_reasons(by_reason, n)) or "-"


@dataclass(frozen=True)
class DeadLetterAlert:
    """The window's dead-letter rate passed the threshold: the rate, the top reason and an example record."""

    ratio: float
    window_records: int
    max_ratio: float
    reason: str
    count: int  # dead letters of ``reason`` in the window
    example: str

    def message(self) -> str:
        return (f"dead letters: {self.ratio:.1%} of the last {self.window_records:,} records (threshold "
                f"{self.max_ratio:.1%}); top reason {self.reason} ({self.count:,}), e.g. {self.example}")


@dataclass
class _Sample:
    records_in: int
    by_reason: Counter[str]


class DeadLetterWatch:
    """The dead-letter rate over about the last ``window_records`` records consumed, and its alert."""

    def __init__(self, max_ratio: float = 0.01, window_records: int = 10_000) -> None:
        if not 0 <= max_ratio < 1:
            raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
        if window_records < 1:
            raise ValueError(f"window_records must be >= 1, got {window_records}")
        self.max_ratio = max_ratio
        self.window_records = window_records
        self._samples: deque[_Sample] = deque([_Sample(0, Counter())])
        self.alerting = False
        self.window_ratio = 0.0
        self.window_by_reason: Counter[str] = Counter()
        self.window_size = 0  # records the window spans

    def observe(self, records_in: int, by_reason: Mapping[str, int],
                examples: Mapping[str, str]) -> DeadLetterAlert | None:
        """Take the run's cumulative counts (the learner's: records its positions passed, and their dead letters
        by reason); return an alert when the window's rate first passes the threshold.

        Counts that went down (a learner restored from an older checkpoint) start a new window.
        """
        now = _Sample(records_in, Counter(by_reason))
        if records_in < self._samples[-1].records_in:
            self._samples = deque([_Sample(0, Counter())])
        self._samples.append(now)
        while len(self._samples) > 2 and self._samples[1].records_in <= records_in - self.window_records:
            self._samples.popleft()
        base = self._samples[0]
        self.window_size = records_in - base.records_in
        if self.window_size <= 0:
            return None
        self.window_by_reason = now.by_reason - base.by_reason
        self.window_ratio = sum(self.window_by_reason.values()) / self.window_size
        if self.window_ratio <= self.max_ratio:
            self.alerting = False
            return None
        if self.alerting:
            return None
        self.alerting = True
        reason, count = top_reasons(self.window_by_reason, 1)[0]
        return DeadLetterAlert(self.window_ratio, self.window_size, self.max_ratio, reason, count,
                               examples.get(reason, "no example recorded"))


@dataclass(frozen=True)
class RunVerdict:
    """Whether a run learned something: ``problems`` is empty when it did."""

    records_in: int
    dead_letters: int
    ratio: float  # dead letters per record consumed, whole run
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def judge_run(records_in: int, events_trained: int, events_to_replay: int, by_reason: Mapping[str, int],
              max_ratio: float) -> RunVerdict:
    """The exit verdict of a run: trained nothing, or dead-lettered more than ``max_ratio`` of its records.

    A run given nothing (no file, nothing consumed) is not judged to have failed.

    >>> judge_run(0, 0, 0, {}, 0.01).ok
    True
    >>> judge_run(50, 0, 50, {"bad_timestamp": 50}, 0.01).problems  # doctest: +NORMALIZE_WHITESPACE
    ['trained nothing: 0 of 50 events to replay',
     'dead-lettered 50 of 50 records consumed (100.0%), above the threshold of 1.0%']
    """
    dead = sum(by_reason.values())
    ratio = dead / records_in if records_in else 0.0
    problems = []
    if events_trained == 0 and (events_to_replay > 0 or records_in > 0):
        given = f"{events_to_replay:,} events to replay" if events_to_replay else f"{records_in:,} records consumed"
        problems.append(f"trained nothing: 0 of {given}")
    if ratio > max_ratio:
        problems.append(f"dead-lettered {dead:,} of {records_in:,} records consumed ({ratio:.1%}), above the "
                        f"threshold of {max_ratio:.1%}")
    return RunVerdict(records_in, dead, ratio, problems)
