"""The consumer core: poll raw records -> decode and validate -> dead letters -> batches of events.

Plain Python over any :class:`~stream.source.Source`; the Ray actor in ``stream.actors`` is a shell around it.

A consumer is a stateless decoder. It owns no progress and no per-user state: it reads the partitions it
was given from the offsets it was given, and hands on each valid event with the offset it was read at.
The learner owns everything that follows (``learner.online.trainer``): it builds each user's history, trains,
and keeps, in its checkpoint, the position (next offset to read) of every partition. A consumer started
at those positions resumes exactly after what the model holds; one started lower re-reads records the
learner has trained, and the learner drops them by their offsets (``EventBatch.offsets``).

Order of a poll: the records are decoded; the invalid ones are sent to the dead-letter topic, and that
topic is flushed *before* the batch is returned, so a bad record is stored before anyone can count its
offset as done. The batch names each of them (``EventBatch.letters``: partition, offset, reason), so the
learner counts every dead letter once, with the positions it owns: a consumer's own tally
(``ConsumerStats``) starts again at zero when it is replaced, and a replacement re-reads (and re-sends)
the letters after the learner's positions.
"""

from __future__ import annotations

import logging
import operator
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from stream import telemetry
from stream.dead_letter import DeadLetter, DeadLetterSink
from stream.errors import EventDecodeError
from stream.events import InteractionEvent, decode_events
from stream.source import Offsets, Source

log = logging.getLogger(__name__)
_domain = operator.attrgetter("domain")


@dataclass(frozen=True, slots=True)
class LetterMark:
    """Where a dead-lettered record was and why: what a batch tells the learner of it."""

    partition: int
    offset: int
    reason: str


@dataclass(frozen=True, slots=True)
class EventBatch:
    """The valid events of one poll, each with its offset, and how far each partition was read.

    >>> e = [InteractionEvent(f"e{i}", "u", f"m{i}", "movie", 1_400_000_000 + i) for i in range(3)]
    >>> b = EventBatch(e, [10, 12, 4], {0: (0, 2), 1: (2, 3)}, {0: (10, 13), 1: (4, 5)},
    ...                (LetterMark(0, 11, "bad_json"),))
    >>> b.positions, len(b), b.dead_letters
    ({0: 13, 1: 5}, 3, 1)
    """

    events: list[InteractionEvent]
    offsets: list[int]  # offsets[i]: the offset of events[i] in its partition
    spans: dict[int, tuple[int, int]]  # partition -> events[start:end], in offset order
    read: dict[int, tuple[int, int]]  # partition -> (first offset read, next offset to read), dead letters too
    letters: tuple[LetterMark, ...] = ()  # records of this poll that went to the dead-letter topic, in read order
    consumer_id: str = ""  # which consumer read it
    # reason -> DeadLetter.example() of this poll's first letter of that reason (bounded: reasons are a fixed set)
    letter_examples: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert len(self.events) == len(self.offsets), "one offset per event"

    def __len__(self) -> int:
        return len(self.events)

    @property
    def dead_letters(self) -> int:
        return len(self.letters)

    @classmethod
    def of(cls, events: list[InteractionEvent], partition: int = 0, first_offset: int = 0,
           consumer_id: str = "") -> EventBatch:
        """Consecutive records of one partition, all valid (for tests and benchmarks that feed a learner).

        >>> EventBatch.of([InteractionEvent("e", "u", "m", "movie", 1_400_000_000)], 3, 41).read
        {3: (41, 42)}
        """
        n = len(events)
        return cls(list(events), list(range(first_offset, first_offset + n)), {partition: (0, n)} if n else {},
                   {partition: (first_offset, first_offset + n)} if n else {}, (), consumer_id)

    @property
    def positions(self) -> Offsets:
        """Next offset to read per partition after this batch."""
        return {p: end for p, (_start, end) in self.read.items()}


@dataclass
class ConsumerStats:
    records_in: int = 0
    events_out: int = 0
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)
    # reason -> the first dead letter of that reason (DeadLetter.example); bounded: reasons are a fixed set
    dead_letter_examples: dict[str, str] = field(default_factory=dict)
    lag_records: int = 0  # behind the log end, all assigned partitions, at the last export_lag()

    @property
    def dead_letters(self) -> int:
        return sum(self.dead_letters_by_reason.values())


class StreamConsumer:
    """Turns a source's records into event batches (see the module docstring)."""

    def __init__(
        self, source: Source, dead_letters: DeadLetterSink, domains: Iterable[str], consumer_id: str = ""
    ) -> None:
        self.domains = tuple(domains)
        if len(self.domains) < 1:
            raise ValueError("domains must name at least one domain")
        self.source = source
        self.dead_letters = dead_letters
        self.consumer_id = consumer_id
        self.stats = ConsumerStats()
        self._lag_exported: set[int] = set()

    def poll(self, timeout_s: float) -> EventBatch:
        """One batched poll: decode the records, dead-letter (and flush) the invalid ones, return the rest.

        Dead letters are sent in offset order within each partition, as the records were read.
        """
        batches = self.source.next_batch(timeout_s)
        events: list[InteractionEvent] = []
        offsets: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        read: dict[int, tuple[int, int]] = {}
        letters: list[LetterMark] = []
        examples: dict[str, str] = {}
        domains = self.domains
        for batch in batches:
            start = len(events)
            decoded, errors = decode_events(batch.values, domains)
            events += decoded
            if not errors:
                offsets += batch.offsets
            else:
                bad = {i for i, _ in errors}
                offsets += [offset for i, offset in enumerate(batch.offsets) if i not in bad]
                for i, exc in errors:
                    letter = self._dead_letter(batch.topic, batch.partition, batch.offsets[i], batch.values[i], exc)
                    letters.append(LetterMark(batch.partition, letter.source_offset, letter.reason))
                    if letter.reason not in examples:
                        examples[letter.reason] = letter.example()
            read[batch.partition] = (batch.offsets[0], batch.next_offset)
            if len(events) > start:
                spans[batch.partition] = (start, len(events))
            self.stats.records_in += len(batch)
            telemetry.RECORDS_CONSUMED.inc(len(batch))
        if letters:
            self.dead_letters.flush()  # stored before the batch (and so its positions) goes anywhere
        self.stats.events_out += len(events)
        if events:
            for domain, n in Counter(map(_domain, events)).items():
                telemetry.EVENTS_DECODED.labels(domain).inc(n)
        return EventBatch(events, offsets, spans, read, tuple(letters), self.consumer_id, examples)

    def _dead_letter(
        self, topic: str, partition: int, offset: int, raw: bytes | None, exc: EventDecodeError
    ) -> DeadLetter:
        letter = DeadLetter(exc.reason, exc.detail, topic, partition, offset, raw, failed_at_ms=int(time.time() * 1000))
        self.dead_letters.send(letter)
        if exc.reason not in self.stats.dead_letter_examples:
            self.stats.dead_letter_examples[exc.reason] = letter.example()
        self.stats.dead_letters_by_reason[exc.reason] += 1
        telemetry.DEAD_LETTERS.labels(exc.reason).inc()
        log.debug("dead letter topic=%s partition=%s offset=%s reason=%s", topic, partition, offset, exc.reason)
        return letter

    def positions(self) -> Offsets:
        """Next offset to read of every assigned partition (everything polled so far)."""
        return self.source.snapshot()

    def export_lag(self) -> dict[int, int]:
        """Set the per-partition lag gauge (of this consumer's read position); returns the lag."""
        lag = self.source.lag()
        self.stats.lag_records = sum(lag.values())
        for p, n in lag.items():
            telemetry.CONSUMER_LAG.labels(str(p)).set(n)
        for p in self._lag_exported - lag.keys():
            telemetry.CONSUMER_LAG.labels(str(p)).set(0)
        self._lag_exported = set(lag)
        return lag

    def assignment(self) -> frozenset[int]:
        return self.source.assignment()

    def close(self) -> None:
        """Close the source and flush the dead letters."""
        try:
            self.source.close()
        finally:
            self.dead_letters.close()
