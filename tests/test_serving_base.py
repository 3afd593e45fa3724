"""A serving replica that starts mid-run from a full version and its base (the consumed state the learner's
publisher keeps) answers like a replica fed every version: exclusions, popularity, co-occurrence, fused.

Real data: the book events of the shipped data set's first rows, published in versions by the real
:class:`Publisher` (a stand-in learner supplies vectors: one fixed vector per item and per user, so any two
replicas holding the newest vectors hold the same ones)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from learner.online.publisher import CallableTransport, Publisher
from serving.service import RANKERS, RecommendationService
from serving.settings import ServingSettings
from stream.dataset import load_events
from stream.events import EmbeddingBatch, ServingBase

DIM = 8
ROWS = 12_000
PAIRS_PER_VERSION = 150


def _vector(key: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(key.encode())).normal(size=DIM).astype(np.float32)


class _Learner:
    """The items and users seen so far, each with its own fixed vector (SITNLearner's publishing contract)."""

    class config:
        n_views, dim = 1, DIM

    def __init__(self) -> None:
        self.items: dict[str, None] = {}
        self.users: dict[str, None] = {}

    def embed_items(self) -> tuple[list[str], np.ndarray]:
        ids = list(self.items)
        return ids, np.array([_vector("i" + i) for i in ids], np.float32).reshape(len(ids), DIM)

    def known_users(self) -> list[str]:
        return list(self.users)

    def embed_users(self, user_ids: list[str]) -> np.ndarray:
        return np.array([_vector("u" + u) for u in user_ids], np.float32).reshape(len(user_ids), 1, DIM)


def _service(max_consumed_per_user: int = 500) -> RecommendationService:
    return RecommendationService.from_settings(ServingSettings(
        dim=DIM, index_factory="Flat", index_search_params={}, popularity_refresh_s=0.0,
        max_consumed_per_user=max_consumed_per_user))


def _versions(events_csv: Path, max_consumed_per_user: int = 500) -> tuple[list[EmbeddingBatch], Publisher]:
    """Every version the publisher sends for the book events (the last one forced full, as for a new replica)."""
    learner, sent = _Learner(), []
    publisher = Publisher(learner, CallableTransport(sent.append), max_consumed_per_user=max_consumed_per_user)
    books = [e for e in load_events(events_csv, "movie", "book", limit=ROWS) if e.domain == "book"]
    for start in range(0, len(books), PAIRS_PER_VERSION):
        chunk = books[start : start + PAIRS_PER_VERSION]
        for event in chunk:
            learner.items[event.item_id] = None
            learner.users[event.user_id] = None
        publisher.touch([e.user_id for e in chunk], [(e.user_id, e.item_id) for e in chunk], ingest_wall_s=0.0)
        publisher.publish(step=start)
    learner.items["never-consumed"] = None  # an item that moved since: the last version is a full one anyway
    publisher.touch([books[0].user_id], [(books[0].user_id, books[-1].item_id)], ingest_wall_s=0.0)
    publisher.publish(step=len(books), force_full=True)
    return sent, publisher


def _assert_same_answers(want: RecommendationService, got: RecommendationService, user_ids: list[str]) -> None:
    assert got.consumed.export() == want.consumed.export()
    assert got.popularity.export() == want.popularity.export()
    for ranker in RANKERS:
        want.set_ranker(ranker), got.set_ranker(ranker)
        for user_id in user_ids:
            a, b = want.recommend(user_id, 10), got.recommend(user_id, 10)
            assert (b.served_by, b.items) == (a.served_by, a.items), (ranker, user_id)  # scores exactly


def test_a_replica_started_at_a_full_version_answers_like_one_fed_every_version(events_csv: Path) -> None:
    versions, _ = _versions(events_csv)
    assert versions[-1].full and versions[-1].base is not None and len(versions) > 20
    assert not any(b.full for b in versions[1:-1])
    every, late = _service(), _service()
    for batch in versions:
        every.apply(batch)
    late.apply(versions[-1])  # joined at the end: the full version alone, with its base
    slow = RecommendationService.from_settings(ServingSettings(  # popularity re-ranked at most once a minute
        dim=DIM, index_factory="Flat", index_search_params={}, popularity_refresh_s=60.0))
    slow.apply(versions[0])  # the run's first version: full, its base empty, its own pairs counted at once
    first = _service()
    first.apply(versions[0])
    assert slow.recommend("stranger", 3).items == first.recommend("stranger", 3).items != ()
    users = sorted({u for b in versions for u, _ in b.consumed})
    assert len(users) > 200 and len(late.consumed) == len(users)
    _assert_same_answers(every, late, [*users[:: max(1, len(users) // 150)], "stranger"])


def test_a_replica_that_missed_versions_replaces_its_state_and_one_that_did_not_ignores_the_base(
    events_csv: Path,
) -> None:
    versions, _ = _versions(events_csv)
    every, gap = _service(), _service()
    for batch in versions:
        every.apply(batch)
    for batch in versions[: len(versions) // 2]:  # then it misses versions (e.g. its node was restarting)
        gap.apply(batch)
    gap.apply(versions[-1])
    users = sorted({u for b in versions for u, _ in b.consumed})
    _assert_same_answers(every, gap, users[::40])
    # One that applied the version before counts the base's pairs only once: applying the base again would
    # double every count, so popularity is the proof.
    counts = dict(every.popularity.export())
    assert sum(counts.values()) == sum(len(b.consumed) for b in versions)


def test_the_base_is_bounded_like_serving_and_survives_the_publishers_checkpoint(events_csv: Path) -> None:
    versions, publisher = _versions(events_csv, max_consumed_per_user=3)
    every, late = _service(3), _service(3)
    for batch in versions:
        every.apply(batch)
    late.apply(versions[-1])
    assert max(len(late.consumed.history(u)) for u, _ in late.consumed.export()) == 3
    assert late.consumed.export() == every.consumed.export()
    restored = Publisher(_Learner(), CallableTransport(lambda _b: None), max_consumed_per_user=3)
    publisher.touch(["u-pending"], [("u-pending", "b-pending")], ingest_wall_s=0.0)  # not published yet
    restored.load_state_dict(publisher.state_dict())
    restored.learner.users["u-pending"] = None
    batch = restored.publish(step=0, force_full=True)
    assert batch.base is not None and batch.base.consumed == every.consumed.export()
    assert batch.consumed == [("u-pending", "b-pending")]  # the pending pair goes out with the next version


def test_a_bad_base_is_refused_whole() -> None:
    service = _service()
    bad = EmbeddingBatch(1, True, [], np.zeros((0, DIM), np.float32), [], np.zeros((0, 1, DIM), np.float32), [],
                         0.0, base=ServingBase([("u", "i")], [("i", -1)]))
    with pytest.raises(ValueError, match="base popularity"):
        service.apply(bad)
    assert len(service.consumed) == 0
