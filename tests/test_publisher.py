"""The publisher's choice of what each version carries: forced and scheduled full versions, and the rolling
refresh of users nobody touched (pure logic, a stand-in learner)."""

from __future__ import annotations

import numpy as np
import pytest

from learner.online.publisher import CallableTransport, Publisher
from stream.events import EmbeddingBatch


class _Learner:
    """Known users in least-recently-learned order; each user's vector is its number, so a batch shows whose
    vectors it carries."""

    class config:  # mimics SITNLearner.config
        n_views, dim = 1, 2

    def __init__(self, n_users: int) -> None:
        self.users = [f"u{n}" for n in range(n_users)]

    def embed_items(self) -> tuple[list[str], np.ndarray]:
        return ["i0"], np.zeros((1, 2), np.float32)

    def known_users(self) -> list[str]:
        return list(self.users)

    def embed_users(self, user_ids: list[str]) -> np.ndarray:
        return np.array([[[float(u[1:]), 0.0]] for u in user_ids], np.float32).reshape(len(user_ids), 1, 2)

    def learn(self, user_id: str) -> None:  # the user moves to the most recently learned end
        self.users.remove(user_id)
        self.users.append(user_id)


def _publisher(learner: _Learner, **kwargs: int) -> tuple[Publisher, list[EmbeddingBatch]]:
    sent: list[EmbeddingBatch] = []
    return Publisher(learner, CallableTransport(sent.append), **kwargs), sent


def test_rolling_refresh_renews_every_user_in_turn_beside_the_touched_ones() -> None:
    learner = _Learner(10)
    publisher, _ = _publisher(learner, refresh_users=4)
    assert publisher.publish(step=0).full  # the first version is full: everyone
    seen: set[str] = set()
    for step in range(1, 4):  # ceil(10 / 4) publishes renew all 10
        learner.learn("u7")
        publisher.touch(["u7"], [("u7", "i0")], ingest_wall_s=100.0 + step)
        batch = publisher.publish(step=step)
        assert not batch.full
        assert batch.user_ids[0] == "u7" and batch.user_ids.count("u7") == 1  # touched first, never twice
        assert batch.event_ingest_wall_s == [100.0 + step]  # freshness is measured on events, not refreshes
        assert len(batch.user_ids) <= 1 + 4
        assert batch.user_vectors[:, 0, 0].tolist() == [float(u[1:]) for u in batch.user_ids]
        seen.update(batch.user_ids)
    assert seen == set(learner.users)


def test_without_refresh_only_touched_users_are_published() -> None:
    publisher, _ = _publisher(_Learner(10))
    publisher.publish(step=0)
    publisher.touch(["u3"], [], ingest_wall_s=1.0)
    assert publisher.publish(step=1).user_ids == ["u3"]
    assert publisher.publish(step=2).user_ids == []


@pytest.mark.parametrize(("full_every", "expected"), [(0, [True, False, False, False, False, False]),
                                                      (3, [True, False, True, False, False, True])])
def test_full_versions_are_forced_or_every_full_every(full_every: int, expected: list[bool]) -> None:
    publisher, sent = _publisher(_Learner(3), full_every=full_every)
    for step in range(6):
        publisher.publish(step=step)
    assert [batch.full for batch in sent] == expected
    assert [len(batch.user_ids) for batch in sent if batch.full] == [3] * expected.count(True)
    assert publisher.publish(step=6, force_full=True).full


def test_bad_settings_name_what_was_received() -> None:
    with pytest.raises(ValueError, match="full_every must be >= 0, got -1"):
        Publisher(_Learner(1), None, full_every=-1)
    with pytest.raises(ValueError, match="refresh_users must be >= 0, got -2"):
        Publisher(_Learner(1), None, refresh_users=-2)


def test_each_event_carries_its_own_arrival_into_the_version_that_reflects_it() -> None:
    publisher, _ = _publisher(_Learner(3))
    publisher.publish(step=0)  # the first version is full
    publisher.touch(["u0", "u1", "u0"], [], ingest_wall_s=10.0)  # three events, two users
    publisher.touch(["u0"], [], ingest_wall_s=12.0)
    first = publisher.publish(step=1)
    assert first.event_ingest_wall_s == [10.0, 10.0, 10.0, 12.0]  # per event, not per user
    assert first.user_ids == ["u0", "u1"]
    publisher.hold(step=2)  # a held publish keeps what is pending
    publisher.touch(["u2"], [], ingest_wall_s=13.0)
    assert publisher.publish(step=3).event_ingest_wall_s == [13.0]
    assert publisher.publish(step=4).event_ingest_wall_s == []


class _SlowLearner(_Learner):
    """Embedding users takes ``cost_s`` of the monotonic clock (patched), as a large model's would."""

    def __init__(self, n_users: int, clock: list[float], cost_s: float) -> None:
        super().__init__(n_users)
        self.clock, self.cost_s = clock, cost_s

    def embed_users(self, user_ids: list[str]) -> np.ndarray:
        self.clock[0] += self.cost_s
        return super().embed_users(user_ids)


def test_a_publish_budget_spaces_publishes_by_their_cost_while_behind_and_changes_nothing_when_cheap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("learner.online.publisher.time.monotonic", lambda: clock[0])
    learner = _SlowLearner(4, clock, cost_s=0.5)
    publisher, _ = _publisher(learner, every_steps=1, every_s=0.25, max_share=0.2)  # type: ignore[arg-type]
    publisher.behind = True  # events wait for the learner
    publisher.publish(step=0)
    assert publisher.wait_s == pytest.approx(0.5 * (1 / 0.2 - 1))  # 2 s: publishing takes 20 % of the time
    publisher.touch(["u1"], [], ingest_wall_s=1.0)
    assert not publisher.due(step=5, now_s=clock[0] + 1.9)  # due by steps and by time, but within the wait
    assert publisher.due(step=5, now_s=clock[0] + 2.0)
    learner.cost_s = 0.001  # cheap publishes: the wait (4 ms) is below every_s, which decides as before
    publisher.publish(step=5)
    assert publisher.wait_s == pytest.approx(0.004)
    publisher.touch(["u1"], [], ingest_wall_s=2.0)
    assert not publisher.due(step=5, now_s=clock[0] + 0.2) and publisher.due(step=5, now_s=clock[0] + 0.25)
    learner.cost_s = 0.5
    publisher.publish(step=5)
    assert not publisher.due(step=6, now_s=clock[0] + 1.0)  # behind: within the 2 s wait
    publisher.behind = False  # caught up: every_steps and every_s alone decide
    assert publisher.due(step=6, now_s=clock[0] + 0.01)
    unbounded, _ = _publisher(_SlowLearner(4, clock, cost_s=0.5), every_steps=1)
    unbounded.behind = True
    unbounded.publish(step=0)
    assert unbounded.wait_s == 0.0 and unbounded.due(step=1, now_s=clock[0])  # max_share 1 (the default): no wait
    with pytest.raises(ValueError, match=r"max_share must be in \(0, 1\], got 0"):
        Publisher(_Learner(1), None, max_share=0)  # type: ignore[arg-type]
