"""The learner's own bounded per-user histories (what ``embed_users`` and ``recommend`` read).

Each learned example overwrites the user's stored history with the example's history plus the event
itself, so the store always reflects the newest example seen, even after a restart mid-stream. At most
``max_len`` items per domain and ``max_users`` users are kept; the least recently learned user goes first.

>>> store = RecentHistories(("movie", "book"), max_len=2, max_users=10)
>>> store.record("u", "movie", "m3", 30, {"movie": (("m1", "m2"), (10, 20)), "book": ((), ())})
>>> store.get("u")["movie"]
(('m2', 'm3'), (20, 30))
>>> store.get("nobody")["book"]
((), ())
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

History = tuple[tuple[str, ...], tuple[int, ...]]  # (item_ids, timestamps), oldest first
EMPTY: History = ((), ())


class RecentHistories:
    """user_id -> {domain: History}, LRU-bounded."""

    def __init__(self, domains: tuple[str, ...], max_len: int, max_users: int) -> None:
        self.domains = tuple(domains)
        self.max_len = max_len
        self.max_users = max_users
        self._users: OrderedDict[str, dict[str, History]] = OrderedDict()
        self.evicted_users = 0

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def record(
        self, user_id: str, domain: str, item_id: str, timestamp: int, history: Mapping[str, History]
    ) -> None:
        """Store ``history`` plus the event (``item_id`` at ``timestamp`` in ``domain``) for the user."""
        stored: dict[str, History] = {}
        for d in self.domains:
            items, times = history.get(d, EMPTY)
            if d == domain:
                items, times = (*items, item_id), (*times, timestamp)
            stored[d] = (tuple(items[-self.max_len :]), tuple(times[-self.max_len :]))
        self._users[user_id] = stored
        self._users.move_to_end(user_id)
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)
            self.evicted_users += 1

    def get(self, user_id: str) -> dict[str, History]:
        """The stored histories (empty tuples for an unknown user); does not touch the LRU order."""
        stored = self._users.get(user_id)
        return dict(stored) if stored is not None else dict.fromkeys(self.domains, EMPTY)

    def user_ids(self) -> list[str]:
        return list(self._users)

    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains), "max_len": self.max_len, "max_users": self.max_users,
            "evicted_users": self.evicted_users, "users": list(self._users.items()),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RecentHistories:
        out = cls(tuple(state["domains"]), state["max_len"], state["max_users"])
        out.evicted_users = state["evicted_users"]
        out._users = OrderedDict(state["users"])
        return out
