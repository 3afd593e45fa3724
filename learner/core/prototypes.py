"""Streaming interest prototypes (granularity (b)) and coarse item clusters (granularity (a)).

A stream has no epochs, so instead of PCL's per-epoch clustering:

- a ring buffer (the "reservoir") keeps the most recent ``reservoir_size`` user summaries of both
  domains, row-aligned: row r holds one example's source and target summaries and whether each exists;
- every R steps, faiss spherical k-means per domain per K runs over the buffered summaries of that
  domain, warm-started from the previous centroids; the new centroids are then matched to the previous
  ones (Hungarian assignment on cosine similarity) and renumbered so a prototype keeps its id;
- between re-clusterings each centroid moves by an EMA of the batch summaries assigned to it.

**Cross-domain matching** (for agreement): summaries of both domains live in one projection space (the
I2I loss aligns them), so for each K the source prototypes are matched one-to-one to the target
prototypes by a Hungarian assignment on centroid cosine similarity. A user *agrees* when the prototype
of their source summary is matched to the prototype of their target summary. Agreement is the fraction
of users (with both histories) who agree; 1/K is chance level.

Concentrations follow PCL: ``phi_k = sum_{z in k} ||z - c_k|| / (n_k log(n_k + alpha))``; clusters with
fewer than two members get the largest phi of the others; phi is clipped to its 10th-90th percentile
and rescaled so its mean is ``tau``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

ROLES = ("source", "target")


def match_to_previous(previous: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Permutation ``perm`` so that ``new[perm]`` lines up with ``previous`` (max total similarity).

    >>> prev = np.eye(3, dtype=np.float32)
    >>> match_to_previous(prev, prev[[2, 0, 1]]).tolist()
    [1, 2, 0]
    """
    sim = previous @ new.T  # (K, K)
    rows, cols = linear_sum_assignment(-sim)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def assign(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid by inner product (unit vectors: cosine) -> (N,) int64.

    >>> assign(np.array([[0.0, 1.0], [1.0, 0.1]]), np.eye(2)).tolist()
    [1, 0]
    """
    # torch matmul: respects the process's torch thread setting, unlike numpy's BLAS pool
    sim = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)) @ torch.from_numpy(
        np.ascontiguousarray(centroids, dtype=np.float32)
    ).T  # (N, K)
    return sim.argmax(dim=1).numpy().astype(np.int64)


def pcl_concentration(
    z: np.ndarray, centroids: np.ndarray, labels: np.ndarray, alpha: float, tau: float
) -> np.ndarray:
    """PCL concentration per prototype, clipped to the 10th-90th percentile and rescaled to mean ``tau``.

    >>> z = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> c = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> np.round(pcl_concentration(z, c, np.array([0, 1, 1]), alpha=10.0, tau=0.1).astype(float), 6).tolist()
    [0.1, 0.1]
    """
    k = centroids.shape[0]
    dist = np.linalg.norm(z - centroids[labels], axis=1)  # (N,)
    sums = np.bincount(labels, weights=dist, minlength=k)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    phi = np.zeros(k)
    big = counts > 1
    phi[big] = sums[big] / (counts[big] * np.log(counts[big] + alpha))
    fill = phi[big].max() if big.any() and phi[big].max() > 0 else tau
    phi[~big] = fill
    phi = np.where(phi > 0, phi, fill)  # identical members: treat as the loosest cluster
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    return (tau * phi / phi.mean()).astype(np.float32)


def kmeans(x: np.ndarray, k: int, iters: int, seed: int, spherical: bool, init: np.ndarray | None) -> np.ndarray:
    """faiss k-means centroids (k, d), warm-started from ``init`` when given."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    # faiss subsamples to 256 points per centroid (seeded): bounds the cost of item clustering
    km = faiss.Kmeans(
        x.shape[1], k, niter=iters, seed=seed, spherical=spherical, min_points_per_centroid=1,
        max_points_per_centroid=256,
    )
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).copy()


def entropy_normalised(sizes: np.ndarray) -> float:
    """Entropy of the size distribution divided by log K (1 = uniform, 0 = one cluster holds all).

    >>> entropy_normalised(np.array([5, 5])), entropy_normalised(np.array([10, 0]))
    (1.0, 0.0)
    """
    total = sizes.sum()
    if total == 0 or len(sizes) < 2:
        return float("nan")
    p = sizes[sizes > 0] / total
    return max(0.0, float(-(p * np.log(p)).sum() / np.log(len(sizes))))


@dataclass
class PrototypeSet:
    """Prototypes of one domain at one cluster count."""

    centroids: np.ndarray  # (K, P) float32, unit norm
    concentration: np.ndarray  # (K,) float32
    sizes: np.ndarray  # (K,) int64, members at the last re-clustering


@dataclass
class StreamingPrototypes:
    """Ring buffer of recent summaries + prototypes per domain per K, with stable ids."""

    cluster_counts: tuple[int, ...]
    dim: int
    reservoir_size: int = 4096
    ema: float = 0.9
    alpha: float = 10.0
    tau: float = 0.1
    use_concentration: bool = True
    kmeans_iters: int = 20
    seed: int = 0
    n_reclusters: int = 0
    sets: dict[tuple[str, int], PrototypeSet] = field(default_factory=dict)
    cross_match: dict[int, np.ndarray] = field(default_factory=dict)  # K -> target id of each source id
    reservoir_agreement: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._z = np.zeros((2, self.reservoir_size, self.dim), dtype=np.float32)
        self._has = np.zeros((2, self.reservoir_size), dtype=bool)
        self._filled = 0
        self._next = 0

    # -- reservoir ---------------------------------------------------------------------------------
    def push(self, z_source: np.ndarray, z_target: np.ndarray, has_source: np.ndarray, has_target: np.ndarray) -> None:
        """Append a batch of summaries (B, P) per domain and their has-history flags (B,)."""
        n = z_source.shape[0]
        if n >= self.reservoir_size:
            z_source, z_target = z_source[-self.reservoir_size :], z_target[-self.reservoir_size :]
            has_source, has_target = has_source[-self.reservoir_size :], has_target[-self.reservoir_size :]
            n = self.reservoir_size
        idx = (self._next + np.arange(n)) % self.reservoir_size
        self._z[0, idx], self._z[1, idx] = z_source, z_target
        self._has[0, idx], self._has[1, idx] = has_source, has_target
        self._next = int((self._next + n) % self.reservoir_size)
        self._filled = min(self._filled + n, self.reservoir_size)

    def reservoir(self, role: str) -> np.ndarray:
        """Buffered summaries of ``role`` that exist (N, P)."""
        r = ROLES.index(role)
        return self._z[r, : self._filled][self._has[r, : self._filled]]

    # -- clustering --------------------------------------------------------------------------------
    def recluster(self) -> None:
        """k-means per domain per K over the buffer (warm start + matching), then cross-domain matching."""
        self.n_reclusters += 1
        for role in ROLES:
            x = self.reservoir(role)
            for k in self.cluster_counts:
                if x.shape[0] < k:
                    continue
                prev = self.sets.get((role, k))
                init = prev.centroids if prev is not None else None
                centroids = kmeans(x, k, self.kmeans_iters, self.seed + self.n_reclusters, True, init)
                if prev is not None:
                    centroids = centroids[match_to_previous(prev.centroids, centroids)]
                centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
                labels = assign(x, centroids)
                conc = (
                    pcl_concentration(x, centroids, labels, self.alpha, self.tau)
                    if self.use_concentration
                    else np.full(k, self.tau, dtype=np.float32)
                )
                self.sets[(role, k)] = PrototypeSet(centroids, conc, np.bincount(labels, minlength=k))
        self._match_domains()

    def _match_domains(self) -> None:
        both = self._has[0, : self._filled] & self._has[1, : self._filled]
        for k in self.cluster_counts:
            src, tgt = self.sets.get(("source", k)), self.sets.get(("target", k))
            if src is None or tgt is None:
                continue
            self.cross_match[k] = match_to_previous(src.centroids, tgt.centroids)
            if both.any():
                a_s = assign(self._z[0, : self._filled][both], src.centroids)
                a_t = assign(self._z[1, : self._filled][both], tgt.centroids)
                self.reservoir_agreement[k] = self.agreement(k, a_s, a_t)

    def ready(self, k: int) -> bool:
        """Both domains have prototypes at K and they are matched."""
        return k in self.cross_match

    def assign(self, role: str, k: int, z: np.ndarray) -> np.ndarray:
        return assign(z, self.sets[(role, k)].centroids)

    def agreement(self, k: int, labels_source: np.ndarray, labels_target: np.ndarray) -> float:
        """Fraction of users whose source prototype is matched to their target prototype.

        >>> p = StreamingPrototypes(cluster_counts=(2,), dim=2)
        >>> p.cross_match[2] = np.array([1, 0])
        >>> p.agreement(2, np.array([0, 0, 1]), np.array([1, 0, 0]))
        0.6666666666666666
        """
        if labels_source.size == 0:
            return float("nan")
        return float(np.mean(self.cross_match[k][labels_source] == labels_target))

    def ema_update(self, role: str, k: int, z: np.ndarray, labels: np.ndarray) -> None:
        """Move each centroid with members in ``z`` toward their mean by ``1 - ema``; renormalise."""
        proto = self.sets[(role, k)]
        counts = np.bincount(labels, minlength=k)
        sums = torch.zeros(proto.centroids.shape).index_add_(0, torch.from_numpy(labels), torch.from_numpy(z)).numpy()
        hit = counts > 0
        means = sums[hit] / counts[hit, None]
        c = proto.centroids
        c[hit] = self.ema * c[hit] + (1.0 - self.ema) * means
        c[hit] /= np.maximum(np.linalg.norm(c[hit], axis=1, keepdims=True), 1e-12)

    # -- monitoring --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_reclusters": self.n_reclusters, "reservoir_filled": self._filled}
        for (role, k), proto in sorted(self.sets.items()):
            out[f"{role}_k{k}_sizes"] = proto.sizes.tolist()
            out[f"{role}_k{k}_nonempty"] = int((proto.sizes > 0).sum())
            out[f"{role}_k{k}_entropy"] = entropy_normalised(proto.sizes)
            out[f"{role}_k{k}_concentration_mean"] = float(proto.concentration.mean())
            out[f"{role}_k{k}_concentration_min"] = float(proto.concentration.min())
            out[f"{role}_k{k}_concentration_max"] = float(proto.concentration.max())
        for k, value in sorted(self.reservoir_agreement.items()):
            out[f"agreement_k{k}"] = value
        return out

    def mean_entropy(self) -> float:
        values = [entropy_normalised(p.sizes) for p in self.sets.values()]
        return float(np.mean(values)) if values else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_reclusters": self.n_reclusters,
            "sets": {f"{role}:{k}": vars(p).copy() for (role, k), p in self.sets.items()},
            "cross_match": dict(self.cross_match),
            "reservoir_agreement": dict(self.reservoir_agreement),
            "z": self._z.copy(),
            "has": self._has.copy(),
            "filled": self._filled,
            "next": self._next,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_reclusters = int(state["n_reclusters"])
        self.sets = {}
        for key, value in state["sets"].items():
            role, k = key.split(":")
            self.sets[(role, int(k))] = PrototypeSet(**value)
        self.cross_match = dict(state["cross_match"])
        self.reservoir_agreement = dict(state["reservoir_agreement"])
        self._z, self._has = state["z"].copy(), state["has"].copy()
        self._filled, self._next = int(state["filled"]), int(state["next"])


@dataclass
class ItemClusters:
    """Coarse level for granularity (a): periodic k-means over one domain's item embeddings.

    Cluster ids are kept stable across re-clusterings by warm start plus matching, like prototypes.
    """

    k: int
    kmeans_iters: int = 20
    seed: int = 0
    centroids: np.ndarray | None = None
    n_reclusters: int = 0

    def recluster(self, item_vectors: np.ndarray) -> np.ndarray | None:
        """Cluster id (0..k-1) per row of ``item_vectors`` (N, D); None while N < k."""
        if item_vectors.shape[0] < self.k:
            return None
        self.n_reclusters += 1
        centroids = kmeans(item_vectors, self.k, self.kmeans_iters, self.seed + self.n_reclusters, False,
                           self.centroids)
        if self.centroids is not None:
            # match on negative squared distance (item vectors are not normalised)
            d2 = ((self.centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (K, K)
            rows, cols = linear_sum_assignment(d2)
            perm = np.empty(len(rows), dtype=np.int64)
            perm[rows] = cols
            centroids = centroids[perm]
        self.centroids = centroids
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        _, labels = index.search(np.ascontiguousarray(item_vectors, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"centroids": self.centroids, "n_reclusters": self.n_reclusters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centroids = state["centroids"]
        self.n_reclusters = int(state["n_reclusters"])
