"""RecommendationService without HTTP: view merging, exclusions, popularity fallback, snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.service import RecommendationService, validate_update
from stream.events import EmbeddingUpdate

TOL = 1e-6


def item(key: str, *vector: float, version: int = 1) -> EmbeddingUpdate:
    return EmbeddingUpdate("item", key, version, 1, tuple(vector))


def user(key: str, *views: tuple[float, ...], version: int = 1) -> EmbeddingUpdate:
    return EmbeddingUpdate("user", key, version, len(views), tuple(x for view in views for x in view))


def as_pairs(service: RecommendationService, user_id: str, k: int) -> list[tuple[str, float]]:
    return [(s.item_id, round(s.score, 6)) for s in service.recommend(user_id, k).items]


@pytest.fixture
def service() -> RecommendationService:
    service = RecommendationService(dim=2, popularity_refresh_s=0.0)
    service.apply_updates(
        [
            item("a", 1.0, 0.0),
            item("b", 0.0, 1.0),
            item("c", 0.6, 0.6),
            item("d", -1.0, 0.0),
            user("u1", (1.0, 0.0), (0.0, 0.9)),  # two views
            user("u2", (0.0, 1.0)),
        ]
    )
    return service


def test_views_merge_by_max_score_per_item(service: RecommendationService) -> None:
    # view 1 scores a=1.0 c=0.6 b=0 d=-1; view 2 scores b=0.9 c=0.54 a=0 d=0 -> max per item
    assert as_pairs(service, "u1", 4) == [("a", 1.0), ("b", 0.9), ("c", 0.6), ("d", 0.0)]
    rec = service.recommend("u1", 2)
    assert (rec.served_by, rec.index_version, rec.index_size) == ("model", 1, 4)


def test_consumed_items_are_excluded_and_bounded_per_user() -> None:
    service = RecommendationService(dim=2, max_consumed_per_user=2, popularity_refresh_s=0.0)
    service.apply_updates(
        [item("a", 1.0, 0.0), item("b", 0.9, 0.0), item("c", 0.8, 0.0), user("u", (1.0, 0.0))]
    )
    service.record_consumed("u", ["a", "b"])
    assert as_pairs(service, "u", 3) == [("c", 0.8)]
    service.record_consumed("u", ["c"])  # bound 2: "a" is forgotten and comes back
    assert as_pairs(service, "u", 3) == [("a", 1.0)]
    assert as_pairs(service, "other", 3) == [("a", 1.0), ("b", 1.0), ("c", 1.0)]  # popularity counts


def test_unknown_user_gets_popularity_minus_consumed(service: RecommendationService) -> None:
    service.record_popularity(["c", "c", "c", "b", "b", "a"])
    service.record_consumed("stranger", ["c"])  # also counts: c=4
    rec = service.recommend("stranger", 2)
    assert rec.served_by == "popularity"
    assert [(s.item_id, s.score) for s in rec.items] == [("b", 2.0), ("a", 1.0)]
    assert service.recommend("new-user", 1).items[0].item_id == "c"
    assert service.recommend("u2", 1).served_by == "model"


def test_known_user_with_an_empty_index_falls_back_to_popularity() -> None:
    service = RecommendationService(dim=2, popularity_refresh_s=0.0)
    service.apply_updates([user("u", (1.0, 0.0))])
    service.record_popularity(["x"])
    rec = service.recommend("u", 5)
    assert (rec.served_by, [s.item_id for s in rec.items], rec.index_size) == ("popularity", ["x"], 0)


def test_snapshot_round_trip_gives_a_new_instance_the_same_answers(
    service: RecommendationService, tmp_path: Path
) -> None:
    service.apply_updates([item("a", 2.0, 0.0, version=3), user("u2", (0.5, 0.5), version=2)])
    service.record_consumed("u1", ["b"])
    service.record_popularity(["d", "d", "c"])
    info = service.save_snapshot(tmp_path / "snap.npz")
    assert (info.version, info.items, info.users) == (3, 4, 2)
    replica = RecommendationService.from_snapshot(tmp_path / "snap.npz", popularity_refresh_s=0.0)
    for user_id in ("u1", "u2", "nobody"):
        for k in (1, 3, 10):
            original, restored = service.recommend(user_id, k), replica.recommend(user_id, k)
            assert restored.items == original.items
            assert (restored.served_by, restored.index_version, restored.index_size) == (
                original.served_by,
                original.index_version,
                original.index_size,
            )
    # Replays of older updates after a restore are ignored, as on the original.
    stats = replica.apply_updates([item("a", 9.0, 0.0, version=2), user("u2", (9.0, 9.0), version=1)])
    assert (stats.items_applied, stats.users_applied, stats.stale_ignored) == (0, 0, 2)
    assert as_pairs(replica, "u1", 1) == [("a", 2.0)]


def test_restore_rejects_a_snapshot_of_another_dimension(
    service: RecommendationService, tmp_path: Path
) -> None:
    service.save_snapshot(tmp_path / "snap.npz")
    other = RecommendationService(dim=3)
    with pytest.raises(ValueError, match="format 1 dim 2, this service reads format 1 dim 3"):
        other.restore_snapshot(tmp_path / "snap.npz")


def test_user_vectors_are_reshaped_views_major() -> None:
    service = RecommendationService(dim=3)
    service.apply_updates([EmbeddingUpdate("user", "u", 1, 2, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0))])
    stored = service.users.get("u")
    assert stored is not None
    np.testing.assert_array_equal(stored, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (
            EmbeddingUpdate("item", "a", 1, 1, (0.0,)),
            "item 'a': vector must have views*dim = 1*2 = 2 floats, got 1",
        ),
        (EmbeddingUpdate("user", "u", 1, 0, ()), "user 'u': views must be >= 1, got 0"),
        (EmbeddingUpdate("user", "u", -1, 1, (0.0, 0.0)), "user 'u': version must be >= 0, got -1"),
        (EmbeddingUpdate("item", "", 1, 1, (0.0, 0.0)), "item '': key must have 1..256 characters, got 0"),
        (EmbeddingUpdate("item", "a", 1, 1, (0.0, float("nan"))), "item 'a': vector has a non-finite value"),
        (
            EmbeddingUpdate("shop", "a", 1, 1, (0.0, 0.0)),
            "update 'a': kind must be 'item' or 'user', got 'shop'",
        ),
    ],
)
def test_invalid_updates_are_rejected_with_a_message(update: EmbeddingUpdate, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_update(update, dim=2)
    assert str(info.value) == message


def test_a_batch_with_one_bad_update_applies_nothing() -> None:
    service = RecommendationService(dim=2)
    with pytest.raises(ValueError, match="views must be 1 for items, got 2"):
        service.apply_updates([item("a", 1.0, 0.0), EmbeddingUpdate("item", "b", 1, 2, (0.0,) * 4)])
    assert service.index.size == 0


@pytest.mark.parametrize(
    ("user_id", "k", "message"),
    [
        ("u", 0, "k must be an integer in 1..1000, got 0"),
        ("u", 1001, "k must be an integer in 1..1000, got 1001"),
        ("", 5, "user_id must be a string of 1..256 characters, got 0"),
        ("x" * 257, 5, "user_id must be a string of 1..256 characters, got 257"),
    ],
)
def test_recommend_validates_arguments(
    service: RecommendationService, user_id: str, k: int, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        service.recommend(user_id, k)
    assert str(info.value) == message
