"""Per-user interaction history and the causal training example built from it.

For each incoming event the store first builds the example from the history *before* the event, then
adds the event. This is the offline way to build examples (evaluation splits, benchmarks, the tests'
references); the live pipeline builds them in the learner from the model's own history store
(``learner.online.trainer``, ``learner.core.history``), the only one it keeps. Memory is bounded: at most ``max_len`` items per user per domain, and at most
``max_users`` users, evicting the least recently seen.

>>> store = UserStateStore(domains=("movie", "book"), max_len=2)
>>> _ = store.observe(InteractionEvent("e1", "u", "m1", "movie", 10))
>>> ex = store.observe(InteractionEvent("e2", "u", "b1", "book", 11))
>>> ex.history["movie"], ex.history["book"]
((('m1',), (10,)), ((), ()))
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stream.events import InteractionEvent

Sequence_ = tuple[tuple[str, ...], tuple[int, ...]]  # (item_ids, timestamps), oldest first


@dataclass(frozen=True, slots=True)
class Example:
    """The spec's causal training example: the event plus the user's history strictly before it."""

    event_id: str
    user_id: str
    domain: str  # domain of the event
    item_id: str  # the next item, the label
    timestamp: int
    history: dict[str, Sequence_]  # per domain name, the last max_len items before this event


class UserStateStore:
    """Last ``max_len`` (item, timestamp) pairs per user per domain, with LRU eviction of users.

    Each user's history is kept as the immutable tuples an :class:`Example` carries, so building an
    example shares them instead of copying; an event rebuilds only its own domain's pair of tuples.
    """

    def __init__(self, domains: tuple[str, ...], max_len: int = 50, max_users: int = 1_000_000) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        self.domains = tuple(domains)
        self.max_len = max_len
        self.max_users = max_users
        self._users: OrderedDict[str, dict[str, Sequence_]] = OrderedDict()
        self._empty: dict[str, Sequence_] = {d: ((), ()) for d in self.domains}
        self.evicted_users = 0

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def history(self, user_id: str) -> dict[str, Sequence_]:
        """The user's current history per domain (empty tuples for an unknown user). Does not touch LRU."""
        return dict(self._users.get(user_id, self._empty))

    def observe(self, event: InteractionEvent) -> Example:
        """Build the example for ``event`` from the history before it, then record the event."""
        users = self._users
        state = users.get(event.user_id)
        if state is None:
            state = dict(self._empty)
            users[event.user_id] = state
            if len(users) > self.max_users:
                users.popitem(last=False)
                self.evicted_users += 1
        else:
            users.move_to_end(event.user_id)
        example = Example(
            event.event_id, event.user_id, event.domain, event.item_id, event.timestamp, dict(state)
        )
        old = state.get(event.domain)
        if old is not None:
            items, stamps = old
            keep = self.max_len - 1  # room for the new event
            if len(items) > keep:
                items, stamps = (items[len(items) - keep :], stamps[len(items) - keep :]) if keep else ((), ())
            state[event.domain] = ((*items, event.item_id), (*stamps, event.timestamp))
        return example

    def observe_many(self, events: Iterable[InteractionEvent]) -> list[Example]:
        return [self.observe(e) for e in events]

    def user_ids(self) -> list[str]:
        return list(self._users)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "max_len": self.max_len,
            "max_users": self.max_users,
            "evicted_users": self.evicted_users,
            "users": [
                (u, {d: list(zip(items, stamps, strict=True)) for d, (items, stamps) in s.items()})
                for u, s in self._users.items()
            ],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> UserStateStore:
        store = cls(tuple(state["domains"]), state["max_len"], state["max_users"])
        store.evicted_users = state["evicted_users"]
        for user_id, per_domain in state["users"]:
            restored = dict(store._empty)
            for d in store.domains:
                pairs = per_domain.get(d, [])[-store.max_len :]
                restored[d] = (tuple(p[0] for p in pairs), tuple(int(p[1]) for p in pairs))
            store._users[user_id] = restored
        return store
