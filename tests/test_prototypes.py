"""Streaming prototypes: stable ids under permutation, EMA, PCL concentrations, cross-domain agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learner.core.prototypes import (
    ItemClusters,
    PrototypeSet,
    StreamingPrototypes,
    entropy_normalised,
    match_to_previous,
    pcl_concentration,
)

TOL = 1e-6


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(seed: int, k: int, per: int, dim: int, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well separated unit-norm clusters of ``per`` points each; returns (points, true centres)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(k, dim)))
    points = unit(np.repeat(centres, per, axis=0) + spread * rng.normal(size=(k * per, dim)))
    return points, centres


def test_match_to_previous_recovers_a_permutation() -> None:
    rng = np.random.default_rng(0)
    prev = unit(rng.normal(size=(16, 8)))
    perm = rng.permutation(16)
    noisy = unit(prev[perm] + 0.01 * rng.normal(size=(16, 8)))
    # noisy[j] is prev[perm[j]]; matching must return inverse(perm) so that noisy[result] == prev
    result = match_to_previous(prev, noisy)
    assert np.array_equal(perm[result], np.arange(16))


def test_recluster_keeps_ids_when_previous_centroids_are_permuted() -> None:
    points, centres = blobs(1, k=4, per=40, dim=6)
    protos = StreamingPrototypes(cluster_counts=(4,), dim=6, reservoir_size=256, seed=3)
    protos.push(points, points, np.ones(160, bool), np.ones(160, bool))
    order = np.array([2, 0, 3, 1])
    for role in ("source", "target"):
        # previous prototypes: the true centres in a chosen order
        protos.sets[(role, 4)] = PrototypeSet(centres[order].copy(), np.ones(4, np.float32), np.zeros(4, np.int64))
    protos.recluster()
    for role in ("source", "target"):
        new = protos.sets[(role, 4)].centroids
        # prototype id j still sits on true centre order[j]
        assert np.all(np.sum(new * centres[order], axis=1) > 0.99)
        assert protos.sets[(role, 4)].sizes.tolist() == [40, 40, 40, 40]
    assert protos.cross_match[4].tolist() == [0, 1, 2, 3]
    assert protos.reservoir_agreement[4] == 1.0


def test_ema_update_exact_on_toy_case() -> None:
    protos = StreamingPrototypes(cluster_counts=(2,), dim=2, ema=0.5)
    protos.sets[("source", 2)] = PrototypeSet(
        np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.ones(2, np.float32), np.zeros(2, np.int64)
    )
    protos.ema_update("source", 2, np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), np.array([0, 0]))
    c = protos.sets[("source", 2)].centroids
    s = 1 / math.sqrt(2)
    # centroid 0: normalise(0.5 * [1, 0] + 0.5 * [0, 1]); centroid 1 has no member and stays put
    np.testing.assert_allclose(c, [[s, s], [0.0, 1.0]], atol=TOL)


def test_pcl_concentration_formula_singletons_clip_and_rescale() -> None:
    z = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    c = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    labels = np.array([0, 0, 1, 1, 2, 3])
    alpha, tau = 10.0, 0.1
    raw = []
    for k in range(4):
        members = z[labels == k]
        n = len(members)
        raw.append(np.linalg.norm(members - c[k], axis=1).sum() / (n * math.log(n + alpha)) if n > 1 else None)
    dmax = max(r for r in raw if r is not None)
    raw = np.array([dmax if r is None else r for r in raw])  # singleton clusters 2 and 3 get dmax
    lo, hi = np.percentile(raw, 10), np.percentile(raw, 90)
    expected = np.clip(raw, lo, hi)
    expected = tau * expected / expected.mean()
    got = pcl_concentration(z, c, labels, alpha, tau)
    np.testing.assert_allclose(got, expected, atol=TOL)
    assert float(got.mean()) == pytest.approx(tau, abs=TOL)


def test_agreement_exact_on_toy_case() -> None:
    protos = StreamingPrototypes(cluster_counts=(2,), dim=2, reservoir_size=8)
    e0, e1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    protos.sets[("source", 2)] = PrototypeSet(np.stack([e0, e1]).astype(np.float32), np.ones(2, np.float32),
                                              np.zeros(2, np.int64))
    # target prototypes in the opposite order: source 0 <-> target 1, source 1 <-> target 0
    protos.sets[("target", 2)] = PrototypeSet(np.stack([e1, e0]).astype(np.float32), np.ones(2, np.float32),
                                              np.zeros(2, np.int64))
    z_s = np.array([[1.0, 0.1], [0.9, 0.2], [0.1, 1.0], [0.2, 0.9], [1.0, 0.0]], np.float32)
    z_t = np.array([[1.0, 0.0], [1.0, 0.3], [0.0, 1.0], [1.0, 0.1], [0.5, 0.5]], np.float32)
    has_t = np.array([True, True, True, True, False])  # the last user has no target history
    protos.push(z_s, z_t, np.ones(5, bool), has_t)
    protos._match_domains()
    assert protos.cross_match[2].tolist() == [1, 0]
    # users 0, 1, 2 agree; user 3 (source proto 1 -> target proto 0 = e1, but z_t is near e0) does not
    assert protos.reservoir_agreement[2] == pytest.approx(3 / 4, abs=TOL)
    assert protos.agreement(2, np.array([0, 1]), np.array([1, 1])) == pytest.approx(0.5, abs=TOL)


def test_recluster_skips_counts_larger_than_the_reservoir_and_round_trips_state() -> None:
    points, _ = blobs(2, k=3, per=5, dim=4)
    protos = StreamingPrototypes(cluster_counts=(3, 32), dim=4, reservoir_size=64, seed=1)
    protos.push(points, points, np.ones(15, bool), np.ones(15, bool))
    protos.recluster()
    assert sorted(protos.sets) == [("source", 3), ("target", 3)]
    assert protos.ready(3) and not protos.ready(32)
    copy = StreamingPrototypes(cluster_counts=(3, 32), dim=4, reservoir_size=64, seed=1)
    copy.load_state_dict(protos.state_dict())
    assert copy.stats() == protos.stats()
    np.testing.assert_array_equal(copy.reservoir("source"), protos.reservoir("source"))


def test_reservoir_keeps_the_most_recent_rows() -> None:
    protos = StreamingPrototypes(cluster_counts=(2,), dim=1, reservoir_size=4)
    for start in (0, 3):
        z = np.arange(start, start + 3, dtype=np.float32)[:, None]
        protos.push(z, z, np.ones(3, bool), np.array([True, False, True]))
    assert sorted(protos.reservoir("source")[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
    assert sorted(protos.reservoir("target")[:, 0].tolist()) == [2.0, 3.0, 5.0]


def test_entropy_normalised() -> None:
    assert entropy_normalised(np.array([1, 1, 1, 1])) == pytest.approx(1.0, abs=TOL)
    assert entropy_normalised(np.array([2, 2, 0, 0])) == pytest.approx(0.5, abs=TOL)
    assert math.isnan(entropy_normalised(np.array([0, 0])))


def test_item_clusters_ids_stay_stable_across_reclusterings() -> None:
    points, centres = blobs(3, k=5, per=30, dim=8, spread=0.02)
    order = np.array([3, 1, 4, 0, 2])
    clusters = ItemClusters(k=5, seed=0, centroids=centres[order].copy())  # warm start, ids chosen by us
    first = clusters.recluster(points)
    assert first is not None
    # point i belongs to true centre i // 30, which is cluster id j with order[j] == i // 30
    assert first.tolist() == np.argsort(order)[np.arange(150) // 30].tolist()
    second = clusters.recluster(points[::-1].copy())[::-1]  # same items, new order
    assert np.array_equal(first, second)
    assert ItemClusters(k=500).recluster(points) is None  # fewer items than clusters: not yet
