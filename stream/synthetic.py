"""A seeded synthetic cross-domain interaction stream, with optional drift injected at a known event.

The model: ``n_clusters`` latent interest clusters. The items of each domain are dealt into the clusters
(sizes differ by at most one) and ranked inside their cluster by a random order; popularity within a
cluster is Zipf-like (``1 / (rank + 1) ** zipf_exponent``). Every user has a primary and a secondary
cluster per domain (a hash of the user and the seed, so nothing per user is stored). How far the two
domains share them is ``shared_interest``: a user *shares* their interests (a hash of the user and the
seed, true with probability ``shared_interest``) has the same clusters in both domains, so their source
items predict their target items; any other user's target clusters come from independent hash keys, so
their source items say nothing about their target items. At the default 1.0 every user shares them.
Each event:

1. picks its user: with probability ``new_user_share`` a brand-new user (ids keep growing), else a
   uniformly drawn user among those who have arrived so far;
2. picks its domain: the target with probability ``target_share``, else the source;
3. picks its item: with probability ``noise`` uniformly among the domain's items, else from the user's
   primary cluster (probability ``primary_share``) or secondary cluster in that domain, by within-cluster
   popularity;
4. with ``unique_pairs``, is dropped if its user already had its item (the offline evaluation assumes
   that a user never repeats an item, as in the shipped data): the kept events are numbered
   consecutively, and ``events`` counts the events drawn, before any is dropped.

Event time advances by ``1 / events_per_second`` per event, so timestamps never decrease and
``stream.dataset.load_events`` keeps the file order.

Drift (``drift``), from event index ``drift_at_event`` (0-based, or ``drift_at_fraction`` of ``events``) on:

- ``"interest_swap"``: every cluster is renamed by a cyclic permutation without fixed points, so each user's
  interests move to other items. The marginal item and domain distributions stay the same: only a
  model of user preferences (its loss, its ranking quality) can see it.
- ``"domain_mix"``: the target share jumps from ``target_share`` to ``drift_target_share``.
- ``"popularity"``: the popularity order inside every cluster is re-drawn.

The same config gives the same events, byte for byte, whatever the platform (numpy's PCG64 streams are
seeded from ``(seed, purpose, chunk number)``); ``chunk_events`` is part of that contract. Events are made
lazily, ``chunk_events`` at a time, so memory stays flat however many are drawn.

>>> config = SyntheticConfig(events=5, n_users=3, n_source_items=20, n_target_items=10, n_clusters=2, seed=7)
>>> for event in SyntheticStream(config).events():
...     print(event.event_id, event.user_id, event.item_id, event.domain, event.timestamp)
syn:0 u2 movie1 movie 1500000000
syn:1 u1 movie12 movie 1500000000
syn:2 u2 book4 book 1500000000
syn:3 u0 movie4 movie 1500000000
syn:4 u0 movie10 movie 1500000000
>>> SyntheticConfig(drift="seasonal", drift_at_event=10)
Traceback (most recent call last):
...
ValueError: drift must be one of ('interest_swap', 'domain_mix', 'popularity') or None, got 'seasonal'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream.events import MAX_TIMESTAMP_S, MIN_TIMESTAMP_S, InteractionEvent

DRIFT_KINDS = ("interest_swap", "domain_mix", "popularity")
CSV_HEADER = "timestamp,user_id,item_id,domain\n"

# Purposes that seed independent random streams: (seed, purpose[, chunk number]).
_STATIC, _CHUNK, _DRIFT = 0, 1, 2


@dataclass(frozen=True)
class SyntheticConfig:
    events: int | None = 1_000_000  # events to generate; None = an endless stream
    # -- population --------------------------------------------------------------------------------
    n_users: int = 10_000  # users present at the start
    new_user_share: float = 0.01  # fraction of events made by a user never seen before (ids keep growing)
    source: str = "movie"  # source domain name
    target: str = "book"  # target domain name
    n_source_items: int = 5_000  # catalogue size of the source domain (fixed)
    n_target_items: int = 5_000  # catalogue size of the target domain (fixed)
    # -- preferences -------------------------------------------------------------------------------
    n_clusters: int = 16  # K latent interest clusters, shared by both domains
    primary_share: float = 0.8  # a user's events drawn from their primary cluster; the rest: the secondary
    target_share: float = 0.3  # probability that an event is in the target domain
    noise: float = 0.1  # probability that the item is uniform over the domain instead of from a cluster
    zipf_exponent: float = 1.0  # within-cluster popularity ~ 1 / (rank + 1) ** zipf_exponent
    shared_interest: float = 1.0  # probability that a user's target clusters are their source clusters;
    #                               otherwise they are drawn independently (0: the source says nothing)
    unique_pairs: bool = False  # drop every repeat of a (user, item) pair (the set of pairs seen grows)
    # -- time --------------------------------------------------------------------------------------
    events_per_second: float = 10.0  # event-time pace: timestamps advance by 1 / events_per_second per event
    start_timestamp: int = 1_500_000_000  # unix seconds of the first event
    # -- drift -------------------------------------------------------------------------------------
    drift: str | None = None  # None or one of DRIFT_KINDS
    drift_at_event: int | None = None  # 0-based index of the first drifted event ...
    drift_at_fraction: float | None = None  # ... or the same as a fraction of ``events``
    drift_target_share: float = 0.7  # the target share after a "domain_mix" drift
    # -- reproducibility ---------------------------------------------------------------------------
    seed: int = 0
    chunk_events: int = 65_536  # events made per numpy pass; part of the seed contract (changes the events)

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{field} must be {allowed}, got {getattr(self, field)!r}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int | np.integer) and not isinstance(value, bool)

        need(self.events is None or (is_int(self.events) and self.events >= 0), "events", "None or an int >= 0")
        for name in ("n_users", "n_source_items", "n_target_items", "chunk_events"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        need(is_int(self.n_clusters) and self.n_clusters >= 2, "n_clusters", "an int >= 2")
        need(min(self.n_source_items, self.n_target_items) >= self.n_clusters, "n_clusters",
             f"at most the smaller catalogue ({min(self.n_source_items, self.n_target_items)} items)")
        for name in ("new_user_share", "primary_share", "target_share", "noise", "drift_target_share",
                     "shared_interest"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]")
        need(self.zipf_exponent >= 0, "zipf_exponent", ">= 0")
        need(isinstance(self.unique_pairs, bool), "unique_pairs", "a bool")
        need(self.events_per_second > 0, "events_per_second", "> 0")
        need(MIN_TIMESTAMP_S <= self.start_timestamp < MAX_TIMESTAMP_S, "start_timestamp",
             f"in [{MIN_TIMESTAMP_S}, {MAX_TIMESTAMP_S}) unix seconds")
        need(bool(self.source) and bool(self.target) and self.source != self.target, "target",
             f"a non-empty domain name other than source={self.source!r}")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0")
        need(self.drift is None or self.drift in DRIFT_KINDS, "drift", f"one of {DRIFT_KINDS} or None")
        if self.drift_at_event is not None and self.drift_at_fraction is not None:
            raise ValueError(
                f"give drift_at_event or drift_at_fraction, not both; got {self.drift_at_event} and "
                f"{self.drift_at_fraction}"
            )
        need(self.drift_at_event is None or (is_int(self.drift_at_event) and self.drift_at_event >= 0),
             "drift_at_event", "None or an int >= 0")
        if self.drift_at_fraction is not None:
            need(0.0 <= self.drift_at_fraction <= 1.0, "drift_at_fraction", "in [0, 1]")
            need(self.events is not None, "events", "set when drift_at_fraction is given (an endless stream has none)")
        if self.drift is not None and self.drift_at_event is None and self.drift_at_fraction is None:
            raise ValueError(f"drift={self.drift!r} needs drift_at_event or drift_at_fraction")

    @property
    def drift_index(self) -> int | None:
        """0-based index of the first drifted event, or None without drift.

        >>> SyntheticConfig(events=1000, drift="popularity", drift_at_fraction=0.25).drift_index
        250
        """
        if self.drift is None:
            return None
        if self.drift_at_event is not None:
            return int(self.drift_at_event)
        assert self.events is not None and self.drift_at_fraction is not None  # checked in __post_init__
        return round(self.events * self.drift_at_fraction)

    def replace(self, **changes: Any) -> SyntheticConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EventChunk:
    """Consecutive events as arrays; ``start`` is the index of the first. Item indices are per domain."""

    start: int
    timestamp: np.ndarray  # (n,) int64 unix seconds
    user: np.ndarray  # (n,) int64 user index: user_id is f"u{user}"
    is_target: np.ndarray  # (n,) bool: the event is in the target domain
    item: np.ndarray  # (n,) int64 item index within its domain: item_id is f"{domain}{item}"
    cluster: np.ndarray  # (n,) int64 the interest cluster the item was drawn for (after any swap)
    noise: np.ndarray  # (n,) bool: the item was drawn uniformly, not from ``cluster``
    domains: tuple[str, str]  # (source, target)

    def __len__(self) -> int:
        return len(self.timestamp)

    def domain_names(self) -> list[str]:
        source, target = self.domains
        return [target if t else source for t in self.is_target.tolist()]

    def user_ids(self) -> list[str]:
        return [f"u{u}" for u in self.user.tolist()]

    def item_ids(self) -> list[str]:
        return [f"{d}{i}" for d, i in zip(self.domain_names(), self.item.tolist(), strict=True)]

    def events(self) -> list[InteractionEvent]:
        return [
            InteractionEvent(f"syn:{self.start + k}", f"u{u}", f"{d}{i}", d, t)
            for k, (t, u, d, i) in enumerate(
                zip(self.timestamp.tolist(), self.user.tolist(), self.domain_names(), self.item.tolist(), strict=True)
            )
        ]

    def csv_text(self) -> str:
        """The rows in the shared CSV format (no header)."""
        return "".join(
            f"{t},u{u},{d}{i},{d}\n"
            for t, u, d, i in zip(self.timestamp.tolist(), self.user.tolist(), self.domain_names(),
                                  self.item.tolist(), strict=True)
        )


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 values (wraps on overflow).

    >>> _mix64(np.array([0, 1], dtype=np.uint64)).tolist()
    [16294208416658607535, 10451216379200822465]
    """
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Catalogue:
    """One domain's items by cluster: ``members`` is flat, cluster-major, most popular first.

    ``cdf`` holds, for cluster c, ``c + (cumulative within-cluster popularity)``, so a search for
    ``c + u`` with ``u ~ U[0, 1)`` lands on a member of cluster c: one ``searchsorted`` for all clusters.
    """

    def __init__(self, n_items: int, n_clusters: int, zipf_exponent: float, rng: np.random.Generator) -> None:
        self.n_items = n_items
        order = rng.permutation(n_items)
        groups = [order[c::n_clusters] for c in range(n_clusters)]  # cluster c: rank order = popularity order
        self.members = np.concatenate(groups).astype(np.int64)
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        self.lo = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # (K,) first flat position
        self.hi = self.lo + sizes - 1  # (K,) last flat position
        parts = []
        for c, size in enumerate(sizes.tolist()):
            weights = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** zipf_exponent
            cum = np.cumsum(weights) / weights.sum()
            cum[-1] = 1.0
            parts.append(c + cum)
        self.cdf = np.concatenate(parts)

    def redraw_popularity(self, rng: np.random.Generator) -> _Catalogue:
        """A copy whose popularity order inside every cluster is re-drawn (the same cluster membership)."""
        out = object.__new__(_Catalogue)
        out.n_items, out.lo, out.hi, out.cdf = self.n_items, self.lo, self.hi, self.cdf
        out.members = self.members.copy()
        for lo, hi in zip(self.lo.tolist(), self.hi.tolist(), strict=True):
            out.members[lo : hi + 1] = rng.permutation(out.members[lo : hi + 1])
        return out

    def draw(self, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item indices for clusters ``cluster`` (n,) given uniforms ``u`` (n,) in [0, 1)."""
        pos = np.searchsorted(self.cdf, cluster + u, side="right")
        pos = np.clip(pos, self.lo[cluster], self.hi[cluster])  # guards c + u rounding up to c + 1
        return self.members[pos]


class SyntheticStream:
    """The events of one :class:`SyntheticConfig`, made lazily in chunks. Iterate it more than once freely."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        c = config
        static = np.random.default_rng([c.seed, _STATIC])
        self._catalogues = (
            _Catalogue(c.n_source_items, c.n_clusters, c.zipf_exponent, static),
            _Catalogue(c.n_target_items, c.n_clusters, c.zipf_exponent, static),
        )
        self._keys = static.integers(0, 2**63, size=2, dtype=np.uint64)  # hash keys: primary, secondary cluster
        # Drawn after everything above, so the catalogues and the source clusters do not depend on them.
        self._target_keys = static.integers(0, 2**63, size=3, dtype=np.uint64)  # shares?, own primary, own secondary
        drift = np.random.default_rng([c.seed, _DRIFT])
        order = drift.permutation(c.n_clusters)
        self.swap = np.empty(c.n_clusters, dtype=np.int64)  # cluster -> cluster after "interest_swap": one K-cycle
        self.swap[order] = np.roll(order, -1)
        self._drifted = (
            tuple(cat.redraw_popularity(drift) for cat in self._catalogues)
            if c.drift == "popularity" else self._catalogues
        )

    def shares_interest(self, user: np.ndarray) -> np.ndarray:
        """(n,) bool: whether each of the user indices ``user`` has the same clusters in both domains.

        True with probability ``shared_interest`` per user, by a hash of the user and the seed.

        >>> stream = SyntheticStream(SyntheticConfig(shared_interest=0.5, seed=3))
        >>> stream.shares_interest(np.arange(8)).astype(int).tolist()
        [1, 0, 1, 1, 1, 0, 0, 1]
        >>> SyntheticStream(SyntheticConfig(seed=3)).shares_interest(np.arange(8)).all()  # the default: 1.0
        np.True_
        """
        user = np.asarray(user, dtype=np.uint64)
        uniform = (_mix64(user ^ self._target_keys[0]) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        return uniform < self.config.shared_interest

    def user_clusters(self, user: np.ndarray, target: bool | np.ndarray = False) -> tuple[np.ndarray, np.ndarray]:
        """(primary, secondary) interest clusters of user indices ``user``, before any drift: in the source
        domain, or in the target domain where ``target`` (a bool, or one per user) is true.

        Users 1, 5 and 6 do not share (see :meth:`shares_interest`): their target clusters are drawn
        anew, and only chance (1 in ``n_clusters``) would make one equal its source cluster.

        >>> stream = SyntheticStream(SyntheticConfig(n_clusters=4, shared_interest=0.5, seed=3))
        >>> users = np.arange(8)
        >>> stream.user_clusters(users)[0].tolist()
        [0, 0, 1, 1, 2, 2, 0, 2]
        >>> stream.user_clusters(users, target=True)[0].tolist()
        [0, 3, 1, 1, 2, 1, 3, 2]
        """
        user = np.asarray(user, dtype=np.uint64)
        k = np.uint64(self.config.n_clusters)
        primary = _mix64(user ^ self._keys[0]) % k
        secondary = _mix64(user ^ self._keys[1]) % k
        if self.config.shared_interest < 1.0:
            own = np.broadcast_to(np.asarray(target, dtype=bool), user.shape) & ~self.shares_interest(user)
            if own.any():
                primary = np.where(own, _mix64(user ^ self._target_keys[1]) % k, primary)
                secondary = np.where(own, _mix64(user ^ self._target_keys[2]) % k, secondary)
        return primary.astype(np.int64), secondary.astype(np.int64)

    def item_clusters(self, target: bool) -> np.ndarray:
        """(n_items,) the interest cluster of every item of the target (or source) domain; fixed by the seed."""
        cat = self._catalogues[int(target)]
        out = np.empty(cat.n_items, dtype=np.int64)
        for c, (lo, hi) in enumerate(zip(cat.lo.tolist(), cat.hi.tolist(), strict=True)):
            out[cat.members[lo : hi + 1]] = c
        return out

    def chunks(self) -> Iterator[EventChunk]:
        """Every event, ``chunk_events`` drawn at a time (the last chunk may be shorter, and with
        ``unique_pairs`` any chunk)."""
        c = self.config
        drift_at = c.drift_index
        arrived = c.n_users  # users 0..arrived-1 have appeared
        start = 0  # index of the next event drawn
        kept = 0  # index of the next event yielded (less than ``start`` once unique_pairs drops repeats)
        n_pair_items = c.n_source_items + c.n_target_items
        seen = np.empty(0, dtype=np.int64)  # sorted (user, item) pair keys yielded so far (unique_pairs)
        chunk_no = 0
        while c.events is None or start < c.events:
            n = c.chunk_events if c.events is None else min(c.chunk_events, c.events - start)
            rng = np.random.default_rng([c.seed, _CHUNK, chunk_no])
            # Every draw covers a whole chunk, in a fixed order, whatever the masks and however many events are
            # asked for: same seed, same events, and a shorter run is a prefix of a longer one.
            r_new, r_user, r_domain, r_primary, r_noise, r_uniform, r_rank = rng.random((7, c.chunk_events))[:, :n]
            index = start + np.arange(n, dtype=np.int64)  # (n,)
            after = np.zeros(n, dtype=bool) if drift_at is None else index >= drift_at

            is_new = r_new < c.new_user_share
            arrived_here = arrived + np.cumsum(is_new)  # (n,) users arrived up to and including each event
            user = np.where(is_new, arrived_here - 1, (r_user * arrived_here).astype(np.int64))
            arrived = int(arrived_here[-1])

            share = np.where(after, c.drift_target_share, c.target_share) if c.drift == "domain_mix" else c.target_share
            is_target = r_domain < share

            primary, secondary = self.user_clusters(user, is_target)
            cluster = np.where(r_primary < c.primary_share, primary, secondary)
            if c.drift == "interest_swap":
                cluster = np.where(after, self.swap[cluster], cluster)

            noise = r_noise < c.noise
            item = np.empty(n, dtype=np.int64)
            for d, in_domain in ((0, ~is_target), (1, is_target)):
                before_cat, after_cat = self._catalogues[d], self._drifted[d]
                for cat, mask in ((before_cat, in_domain & ~after), (after_cat, in_domain & after)):
                    if mask.any():
                        item[mask] = cat.draw(cluster[mask], r_rank[mask])
                uniform = (r_uniform * before_cat.n_items).astype(np.int64)
                item = np.where(in_domain & noise, uniform, item)

            timestamp = c.start_timestamp + np.floor(index / c.events_per_second).astype(np.int64)
            if c.unique_pairs:
                pair = user * n_pair_items + np.where(is_target, c.n_source_items + item, item)  # (n,) pair key
                keep = np.zeros(n, dtype=bool)
                keep[np.unique(pair, return_index=True)[1]] = True  # first in this chunk ...
                keep &= ~np.isin(pair, seen)  # ... and never seen before it
                seen = np.union1d(seen, pair[keep])
                timestamp, user, is_target = timestamp[keep], user[keep], is_target[keep]
                item, cluster, noise = item[keep], cluster[keep], noise[keep]
            yield EventChunk(kept, timestamp, user, is_target, item, cluster, noise, (c.source, c.target))
            kept += len(timestamp)
            start += n
            chunk_no += 1

    def events(self) -> Iterator[InteractionEvent]:
        """Every event as an :class:`InteractionEvent`, ``event_id`` ``syn:<index>`` (0-based)."""
        for chunk in self.chunks():
            yield from chunk.events()

    __iter__ = events


CSV_TIME_UNITS = ("s", "ms", "iso", "ordinal")


def per_user_positions(user: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each event's 0-based position in its user's sequence, given ``counts`` (events per user index before
    this chunk); returns the positions and the counts after the chunk (grown to cover new users).

    >>> positions, counts = per_user_positions(np.array([2, 0, 2, 2]), np.array([5, 0, 1]))
    >>> positions.tolist(), counts.tolist()
    ([1, 5, 2, 3], [6, 0, 4])
    """
    if len(user) and user.max() >= len(counts):
        counts = np.concatenate([counts, np.zeros(int(user.max()) + 1 - len(counts), dtype=counts.dtype)])
    order = np.argsort(user, kind="stable")  # (n,) events grouped by user, in stream order within a user
    sorted_user = user[order]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_user)) + 1]  # first index of each user's run
    rank = np.arange(len(user)) - np.repeat(group_start, np.diff(np.r_[group_start, len(user)]))
    positions = np.empty(len(user), dtype=np.int64)
    positions[order] = counts[sorted_user] + rank
    counts = counts.copy()
    np.add.at(counts, user, 1)
    return positions, counts


def _time_column(chunk: EventChunk, time_unit: str, config: SyntheticConfig,
                 counts: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The chunk's timestamp column written in ``time_unit`` (and the per-user counts for ``ordinal``)."""
    if time_unit == "s":
        return [str(t) for t in chunk.timestamp.tolist()], counts
    if time_unit == "ms":  # the same instants to the millisecond: floor(ms / 1000) is the seconds column
        index = np.arange(chunk.start, chunk.start + len(chunk), dtype=np.int64)
        if config.unique_pairs:  # kept events are renumbered: fall back to whole seconds
            return [str(t * 1000) for t in chunk.timestamp.tolist()], counts
        ms = config.start_timestamp * 1000 + np.floor(index * 1000 / config.events_per_second).astype(np.int64)
        return [str(t) for t in ms.tolist()], counts
    if time_unit == "iso":
        return [f"{t}Z" for t in np.datetime_as_string(chunk.timestamp.astype("datetime64[s]"), unit="s")], counts
    positions, counts = per_user_positions(chunk.user, counts)
    return [str(p) for p in positions.tolist()], counts


def write_csv(path: str | Path, config: SyntheticConfig, time_unit: str = "s") -> int:
    """Write the events of ``config`` to ``path`` in the shared format; returns the number of rows.

    Streams chunk by chunk: memory stays flat whatever ``config.events`` (plus one counter per user for
    ``ordinal``). ``time_unit`` is how the timestamp column is written: ``s`` (unix seconds, the default),
    ``ms``, ``iso`` (``2017-07-14T02:40:00Z``), or ``ordinal``: each event's 0-based position in its user's
    sequence (both domains), the shape of logs without clock times. Readable by
    :func:`stream.dataset.load_events` with ``source=config.source, target=config.target`` and that
    ``time_unit`` (or ``auto``).
    """
    if config.events is None:
        raise ValueError("events is None (an endless stream): set events to write a file")
    if time_unit not in CSV_TIME_UNITS:
        raise ValueError(f"time_unit must be one of {CSV_TIME_UNITS}, got {time_unit!r}")
    path = Path(path)
    rows = 0
    counts = np.zeros(config.n_users, dtype=np.int64)
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(CSV_HEADER)
        for chunk in SyntheticStream(config).chunks():
            if time_unit == "s":
                fh.write(chunk.csv_text())
            else:
                stamps, counts = _time_column(chunk, time_unit, config, counts)
                fh.write("".join(f"{t},u{u},{d}{i},{d}\n" for t, u, d, i in zip(
                    stamps, chunk.user.tolist(), chunk.domain_names(), chunk.item.tolist(), strict=True)))
            rows += len(chunk)
    return rows
