"""What each user consumed, bounded: the one structure serving's exclusions and the learner's record of them
share (``serving.store`` re-exports it; ``learner.online.publisher`` keeps the same sets, so a full version can
hand a new serving replica the consumed state it would have built from every version before).

>>> consumed = ConsumedItems(max_items_per_user=2)
>>> consumed.add("u1", ["a", "b", "c"])
>>> sorted(consumed.get("u1")), consumed.history("u1")
(['b', 'c'], ('b', 'c'))
>>> group_by_user([("u2", "x"), ("u1", "y"), ("u2", "z")])
[('u2', ['x', 'z']), ('u1', ['y'])]
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable


def check_max_users(max_users: int) -> None:
    if isinstance(max_users, bool) or not isinstance(max_users, int) or max_users < 1:
        raise ValueError(f"max_users must be an int >= 1, got {max_users!r}")


def group_by_user(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """``(user_id, item_id)`` pairs grouped per user, users in order of first appearance, items in order: how a
    version's consumed pairs are applied (so every holder of the sets evicts users in the same order)."""
    by_user: dict[str, list[str]] = {}
    for user_id, item_id in pairs:
        by_user.setdefault(user_id, []).append(item_id)
    return list(by_user.items())


class ConsumedItems:
    """The last ``max_items_per_user`` items each user consumed (oldest evicted first), for at most
    ``max_users`` users: adding for a new user beyond that evicts the least recently updated user."""

    def __init__(self, max_items_per_user: int = 500, max_users: int = 1_000_000) -> None:
        if max_items_per_user < 1:
            raise ValueError(f"max_items_per_user must be >= 1, got {max_items_per_user}")
        check_max_users(max_users)
        self.max_items_per_user = max_items_per_user
        self.max_users = max_users
        self.evicted_users = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()  # least recently updated first

    def __len__(self) -> int:
        return len(self._items)

    def add(self, user_id: str, item_ids: Iterable[str]) -> None:
        with self._lock:
            items = self._items.get(user_id)
            if items is None:
                items = self._items[user_id] = OrderedDict()
            else:
                self._items.move_to_end(user_id)
            for item_id in item_ids:
                items[item_id] = None
                items.move_to_end(item_id)
            while len(items) > self.max_items_per_user:
                items.popitem(last=False)
            while len(self._items) > self.max_users:
                self._items.popitem(last=False)
                self.evicted_users += 1

    def get(self, user_id: str) -> frozenset[str]:
        with self._lock:
            items = self._items.get(user_id)
            return frozenset(items) if items else frozenset()

    def history(self, user_id: str) -> tuple[str, ...]:
        """The user's consumed items, least recently consumed first (a repeat moves to the end)."""
        with self._lock:
            items = self._items.get(user_id)
            return tuple(items) if items else ()

    def export(self) -> list[tuple[str, str]]:
        """``(user_id, item_id)`` pairs, least recently updated user first and oldest item first per user,
        so re-adding them restores both orders."""
        with self._lock:
            return [(user_id, item_id) for user_id, items in self._items.items() for item_id in items]

    def replace_all(self, pairs: Iterable[tuple[str, str]]) -> None:
        fresh = ConsumedItems(self.max_items_per_user, self.max_users)
        for user_id, item_id in pairs:
            fresh.add(user_id, (item_id,))
        with self._lock:
            self._items = fresh._items
            self.evicted_users += fresh.evicted_users
