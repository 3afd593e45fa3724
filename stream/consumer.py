"""The consumer core: poll raw records -> decode and validate -> dead letters -> per-user state -> examples.

Plain Python over any :class:`~stream.source.Source`; the Ray actor in ``stream.actors`` is a shell around it.

Commit order (the only order that loses nothing and repeats only what was not yet committed):

1. ``poll()`` returns an :class:`ExampleBatch` whose ``positions`` are the next offsets to read after it.
2. The caller trains on the examples and writes the checkpoint that contains their effect.
3. ``commit(positions)`` first flushes the dead letters of those records (so a bad message is never
   committed before it is stored), then commits the offsets of partitions this consumer still owns in
   the same assignment epoch. Positions of partitions revoked meanwhile are dropped: their new owner
   re-reads them from the last commit.

Per-user state is kept per partition (one :class:`UserStateStore` each), because a user lives in exactly
one partition: when a partition is revoked its state is dropped with it, and the next owner rebuilds it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sitn.errors import EventDecodeError
from stream import telemetry
from stream.dead_letter import DeadLetter, DeadLetterSink
from stream.events import decode_event
from stream.source import Source
from stream.user_state import Example, UserStateStore

log = logging.getLogger(__name__)


class Position(NamedTuple):
    """Next offset to read in a partition, tagged with the assignment epoch it was read in.

    Tuples order by epoch first, so ``max`` keeps the newest position:

    >>> max(Position(epoch=1, offset=90), Position(epoch=2, offset=10))
    Position(epoch=2, offset=10)
    """

    epoch: int
    offset: int


Positions = dict[int, Position]  # partition -> position


def merge_positions(older: Mapping[int, Position], newer: Mapping[int, Position]) -> Positions:
    """Positions covering both arguments: per partition, the newest.

    >>> merge_positions({0: Position(1, 5), 1: Position(1, 7)}, {0: Position(1, 9)})
    {0: Position(epoch=1, offset=9), 1: Position(epoch=1, offset=7)}
    """
    out = dict(older)
    for p, pos in newer.items():
        out[p] = max(out[p], pos) if p in out else pos
    return out


@dataclass(frozen=True, slots=True)
class ExampleBatch:
    """Examples built from one poll, and the positions to commit once they are trained on."""

    examples: list[Example]
    positions: Positions  # only the partitions that had records in this poll
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> examples[start:end]
    dead_letters: int = 0  # records of this poll that went to the dead-letter topic
    consumer_id: str = ""  # which consumer built it (routes commits back to it)

    def __len__(self) -> int:
        return len(self.examples)

    def without_partitions(self, partitions: frozenset[int]) -> ExampleBatch:
        """The batch minus the examples and positions of ``partitions`` (revoked before it was delivered)."""
        examples: list[Example] = []
        spans: dict[int, tuple[int, int]] = {}
        for p, (start, end) in self.spans.items():
            if p not in partitions:
                spans[p] = (len(examples), len(examples) + end - start)
                examples.extend(self.examples[start:end])
        positions = {p: pos for p, pos in self.positions.items() if p not in partitions}
        return ExampleBatch(examples, positions, spans, self.dead_letters, self.consumer_id)


class PendingCommits:
    """Positions of delivered batches, per consumer, waiting for the checkpoint that makes them done.

    >>> pending = PendingCommits()
    >>> pending.add(ExampleBatch([], {0: Position(1, 5)}, consumer_id="c0"))
    >>> pending.add(ExampleBatch([], {0: Position(1, 9), 2: Position(1, 3)}, consumer_id="c0"))
    >>> pending.take()
    {'c0': {0: Position(epoch=1, offset=9), 2: Position(epoch=1, offset=3)}}
    >>> pending.take()
    {}
    """

    def __init__(self) -> None:
        self._by_consumer: dict[str, Positions] = {}

    def add(self, batch: ExampleBatch) -> None:
        if batch.positions:
            self._by_consumer[batch.consumer_id] = merge_positions(
                self._by_consumer.get(batch.consumer_id, {}), batch.positions
            )

    def take(self) -> dict[str, Positions]:
        out, self._by_consumer = self._by_consumer, {}
        return out


@dataclass
class ConsumerStats:
    records_in: int = 0
    examples_out: int = 0
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)
    # reason -> the first dead letter of that reason (DeadLetter.example); bounded: reasons are a fixed set
    dead_letter_examples: dict[str, str] = field(default_factory=dict)
    partitions_revoked: int = 0
    commits_skipped_partitions: int = 0

    @property
    def dead_letters(self) -> int:
        return sum(self.dead_letters_by_reason.values())


class StreamConsumer:
    """Turns a source's records into training examples; the source's rebalance listener.

    ``initial_user_state`` maps a partition to a ``UserStateStore.state_dict()`` (from a checkpoint made
    together with that partition's committed offset); it is used the first time the partition is assigned.
    """

    def __init__(
        self,
        source: Source,
        dead_letters: DeadLetterSink,
        domains: Iterable[str],
        max_history: int = 50,
        max_users: int = 1_000_000,
        consumer_id: str = "",
        initial_user_state: Mapping[int, dict[str, Any]] | None = None,
    ) -> None:
        self.domains = tuple(domains)
        if len(self.domains) < 1:
            raise ValueError("domains must name at least one domain")
        self.source = source
        self.dead_letters = dead_letters
        self.max_history = max_history
        self.max_users = max_users
        self.consumer_id = consumer_id
        self._initial_user_state = dict(initial_user_state or {})
        self._stores: dict[int, UserStateStore] = {}
        self._epochs: dict[int, int] = {}
        self._epoch_counter = 0
        self.stats = ConsumerStats()
        self._lag_exported: set[int] = set()
        source.listener = self

    # -- rebalance listener (called by the source inside next_batch / close) -------------------------
    def on_assigned(self, partitions: frozenset[int]) -> None:
        self._epoch_counter += 1
        for p in partitions:
            if p in self._stores:  # kept across a cooperative rebalance
                continue
            state = self._initial_user_state.pop(p, None)
            self._stores[p] = (
                UserStateStore.from_state_dict(state)
                if state is not None
                else UserStateStore(self.domains, self.max_history, self.max_users)
            )
            self._epochs[p] = self._epoch_counter
        log.info("partitions assigned consumer=%s partitions=%s epoch=%s", self.consumer_id, sorted(partitions),
                 self._epoch_counter)

    def on_revoked(self, partitions: frozenset[int]) -> None:
        for p in partitions:
            self._stores.pop(p, None)
            self._epochs.pop(p, None)
        self.stats.partitions_revoked += len(partitions)
        log.info("partitions revoked consumer=%s partitions=%s", self.consumer_id, sorted(partitions))

    # -- the loop body -------------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> ExampleBatch:
        """One batched poll: decode each record, dead-letter the invalid ones, build examples for the rest."""
        batches = self.source.next_batch(timeout_s)
        examples: list[Example] = []
        positions: Positions = {}
        spans: dict[int, tuple[int, int]] = {}
        dead = 0
        domains = self.domains
        for batch in batches:
            store = self._stores.get(batch.partition)
            assert store is not None, f"records of partition {batch.partition}, which is not assigned"
            observe = store.observe
            start = len(examples)
            for offset, raw in zip(batch.offsets, batch.values, strict=True):
                try:
                    event = decode_event(raw, domains)
                except EventDecodeError as exc:
                    self._dead_letter(batch.topic, batch.partition, offset, raw, exc)
                    dead += 1
                    continue
                examples.append(observe(event))
            positions[batch.partition] = Position(self._epochs[batch.partition], batch.next_offset)
            spans[batch.partition] = (start, len(examples))
            self.stats.records_in += len(batch)
            telemetry.RECORDS_CONSUMED.inc(len(batch))
        self.stats.examples_out += len(examples)
        if examples:
            by_domain = Counter(ex.domain for ex in examples)
            for domain, n in by_domain.items():
                telemetry.EVENTS_DECODED.labels(domain).inc(n)
        return ExampleBatch(examples, positions, spans, dead, self.consumer_id)

    def _dead_letter(self, topic: str, partition: int, offset: int, raw: bytes | None, exc: EventDecodeError) -> None:
        letter = DeadLetter(exc.reason, exc.detail, topic, partition, offset, raw, failed_at_ms=int(time.time() * 1000))
        self.dead_letters.send(letter)
        if exc.reason not in self.stats.dead_letter_examples:
            self.stats.dead_letter_examples[exc.reason] = letter.example()
        self.stats.dead_letters_by_reason[exc.reason] += 1
        telemetry.DEAD_LETTERS.labels(exc.reason).inc()
        log.debug("dead letter topic=%s partition=%s offset=%s reason=%s", topic, partition, offset, exc.reason)

    def positions(self) -> Positions:
        """Next offset to read of every assigned partition (everything polled so far)."""
        snapshot = self.source.snapshot()
        return {p: Position(self._epochs[p], o) for p, o in snapshot.items() if p in self._epochs}

    def stale_partitions(self, positions: Mapping[int, Position]) -> frozenset[int]:
        """Partitions of ``positions`` revoked (or revoked and assigned again) since they were read."""
        return frozenset(p for p, pos in positions.items() if self._epochs.get(p) != pos.epoch)

    def commit(self, positions: Mapping[int, Position]) -> dict[int, int]:
        """Flush dead letters, then commit the positions still owned in their epoch; return what was committed."""
        self.dead_letters.flush()
        owned: dict[int, int] = {}
        for p, pos in positions.items():
            if self._epochs.get(p) == pos.epoch:
                owned[p] = pos.offset
            else:
                self.stats.commits_skipped_partitions += 1
                log.info("not committing a revoked partition consumer=%s partition=%s epoch=%s", self.consumer_id,
                         p, pos.epoch)
        if owned and not self.source.commit(owned):
            telemetry.COMMITS.labels("rejected").inc()
            return {}
        if owned:
            telemetry.COMMITS.labels("committed").inc()
        return owned

    def export_lag(self) -> dict[int, int]:
        """Set the per-partition lag gauge (partitions revoked since are set to 0); returns the lag."""
        lag = self.source.lag()
        for p, n in lag.items():
            telemetry.CONSUMER_LAG.labels(str(p)).set(n)
        for p in self._lag_exported - lag.keys():
            telemetry.CONSUMER_LAG.labels(str(p)).set(0)
        self._lag_exported = set(lag)
        return lag

    def user_state(self) -> dict[int, dict[str, Any]]:
        """Per-partition ``UserStateStore.state_dict()``, for a checkpoint taken with ``positions()``."""
        return {p: s.state_dict() for p, s in self._stores.items()}

    def assignment(self) -> frozenset[int]:
        return frozenset(self._stores)

    def close(self) -> None:
        """Close the source (which revokes its partitions) and flush the dead letters. Commits nothing."""
        try:
            self.source.close()
        finally:
            self.dead_letters.close()
