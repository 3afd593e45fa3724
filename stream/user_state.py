"""Per-user interaction history and the causal training example built from it.

For each incoming event the store first builds the example from the history *before* the event, then
adds the event. Memory is bounded: at most ``max_len`` items per user per domain, and at most
``max_users`` users, evicting the least recently seen.

>>> store = UserStateStore(domains=("movie", "book"), max_len=2)
>>> _ = store.observe(InteractionEvent("e1", "u", "m1", "movie", 10))
>>> ex = store.observe(InteractionEvent("e2", "u", "b1", "book", 11))
>>> ex.history["movie"], ex.history["book"]
((('m1',), (10,)), ((), ()))
"""

from __future__ import annotations

from collections import OrderedDict, deque
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
    """Last ``max_len`` (item, timestamp) pairs per user per domain, with LRU eviction of users."""

    def __init__(self, domains: tuple[str, ...], max_len: int = 50, max_users: int = 1_000_000) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        self.domains = tuple(domains)
        self.max_len = max_len
        self.max_users = max_users
        self._users: OrderedDict[str, dict[str, deque[tuple[str, int]]]] = OrderedDict()
        self.evicted_users = 0

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def history(self, user_id: str) -> dict[str, Sequence_]:
        """The user's current history per domain (empty tuples for an unknown user). Does not touch LRU."""
        state = self._users.get(user_id)
        out: dict[str, Sequence_] = {}
        for d in self.domains:
            q = state[d] if state is not None else ()
            out[d] = (tuple(i for i, _ in q), tuple(t for _, t in q))
        return out

    def observe(self, event: InteractionEvent) -> Example:
        """Build the example for ``event`` from the history before it, then record the event."""
        example = Example(
            event.event_id, event.user_id, event.domain, event.item_id, event.timestamp,
            self.history(event.user_id),
        )
        state = self._users.get(event.user_id)
        if state is None:
            state = {d: deque(maxlen=self.max_len) for d in self.domains}
            self._users[event.user_id] = state
            if len(self._users) > self.max_users:
                self._users.popitem(last=False)
                self.evicted_users += 1
        else:
            self._users.move_to_end(event.user_id)
        if event.domain in state:
            state[event.domain].append((event.item_id, event.timestamp))
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
            "users": [(u, {d: list(q) for d, q in s.items()}) for u, s in self._users.items()],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> UserStateStore:
        store = cls(tuple(state["domains"]), state["max_len"], state["max_users"])
        store.evicted_users = state["evicted_users"]
        for user_id, per_domain in state["users"]:
            store._users[user_id] = {
                d: deque((tuple(p) for p in per_domain.get(d, [])), maxlen=store.max_len) for d in store.domains
            }
        return store
