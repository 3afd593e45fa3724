"""Per-user state: causal examples, bounded length, LRU eviction, checkpoint round trip."""

from __future__ import annotations

import pytest

from stream.events import InteractionEvent
from stream.user_state import UserStateStore


def ev(n: int, user: str, item: str, domain: str) -> InteractionEvent:
    return InteractionEvent(f"e{n}", user, item, domain, 1_000 + n)


def test_example_sees_only_earlier_events() -> None:
    store = UserStateStore(("movie", "book"), max_len=3)
    events = [ev(1, "u", "m1", "movie"), ev(2, "u", "b1", "book"), ev(3, "u", "m2", "movie"), ev(4, "v", "b9", "book")]
    examples = store.observe_many(events)
    assert examples[0].history == {"movie": ((), ()), "book": ((), ())}
    assert examples[2].history == {"movie": (("m1",), (1001,)), "book": (("b1",), (1002,))}
    assert examples[2].item_id == "m2" and examples[2].domain == "movie" and examples[2].event_id == "e3"
    assert examples[3].history == {"movie": ((), ()), "book": ((), ())}


def test_history_bounded_per_domain() -> None:
    store = UserStateStore(("movie", "book"), max_len=2)
    store.observe_many([ev(i, "u", f"m{i}", "movie") for i in range(5)])
    assert store.history("u")["movie"] == (("m3", "m4"), (1003, 1004))


def test_lru_eviction() -> None:
    store = UserStateStore(("movie", "book"), max_len=2, max_users=2)
    store.observe_many([ev(1, "a", "x", "movie"), ev(2, "b", "x", "movie"), ev(3, "a", "y", "book")])
    store.observe(ev(4, "c", "z", "movie"))  # evicts b, the least recently seen
    assert store.user_ids() == ["a", "c"]
    assert store.evicted_users == 1
    assert store.history("b") == {"movie": ((), ()), "book": ((), ())}


def test_state_dict_round_trip() -> None:
    store = UserStateStore(("movie", "book"), max_len=2, max_users=5)
    store.observe_many([ev(1, "a", "x", "movie"), ev(2, "b", "y", "book"), ev(3, "a", "z", "book")])
    clone = UserStateStore.from_state_dict(store.state_dict())
    assert clone.user_ids() == store.user_ids()
    for user in ("a", "b"):
        assert clone.history(user) == store.history(user)
    assert clone.observe(ev(4, "a", "w", "movie")).history == store.observe(ev(4, "a", "w", "movie")).history


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="max_len must be >= 1, got 0"):
        UserStateStore(("a", "b"), max_len=0)
