"""Is one row better than another on the same test queries? A paired bootstrap over the queries.

The eval table's standard deviations are over training seeds: they say how much a row moves when it is
trained again, not how much its figure would move on another sample of users. Two rows ranked on the same
15,000 test queries, where NDCG@10 is nonzero for a few hundred of them, differ by sampling noise that the
seeds never see. Here each query's NDCG@10 is averaged over a row's seeds, the two rows' per-query values
are subtracted (paired: the same user, history and held-out item), and the mean difference is resampled
over queries (seeded, percentile interval), as significance tests for ranking metrics do (Sakai, "Statistical
reform in information retrieval?", SIGIR Forum 2014; Smucker, Allan and Carterette, CIKM 2007). Ties and
misses were already settled by the ranks (``learner.offline.evaluate``), so a miss contributes 0.

>>> a = np.array([[1, 50, 3, 2**31 - 1]]); b = np.array([[2, 50, 9, 1]])
>>> out = paired_bootstrap(a, b, n_boot=200, seed=0)
>>> round(out["diff"], 4) == round(float(ndcg_per_query(a).mean() - ndcg_per_query(b).mean()), 4)
True
>>> out["queries"], out["seeds_a"], out["seeds_b"]
(4, 1, 1)
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BOOT = 2000
CONFIDENCE = 0.95
_CHUNK = 100  # bootstrap replicates drawn at a time (bounds memory: _CHUNK x queries indices)


def ndcg_per_query(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """NDCG@k of each query (one relevant item): ``1 / log2(rank + 1)`` within the cut-off, else 0; any
    leading axes (seeds) are kept.

    >>> ndcg_per_query(np.array([1, 3, 11])).round(4).tolist()
    [1.0, 0.5, 0.0]
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def paired_bootstrap(ranks_a: np.ndarray, ranks_b: np.ndarray, k: int = 10, n_boot: int = N_BOOT,
                     seed: int = 0, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean NDCG@k difference a - b over the queries, its bootstrap standard error and percentile interval.

    ``ranks_a`` ``(S_a, N)`` and ``ranks_b`` ``(S_b, N)``: each row's full-protocol ranks per seed, the same N
    queries in the same order (a counting row has identical seeds; one seed is fine). ``verdict`` says whether
    the interval lies above 0, below 0 or spans it.
    """
    a = np.atleast_2d(np.asarray(ranks_a))
    b = np.atleast_2d(np.asarray(ranks_b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows ranked different queries: {a.shape[1]} and {b.shape[1]}")
    d = ndcg_per_query(a, k).mean(axis=0) - ndcg_per_query(b, k).mean(axis=0)  # (N,)
    n = len(d)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_boot, _CHUNK):
        idx = rng.integers(0, n, size=(min(_CHUNK, n_boot - start), n))
        means.append(d[idx].mean(axis=1))
    boot = np.concatenate(means)
    tail = (1.0 - confidence) / 2.0
    lo, hi = (float(x) for x in np.quantile(boot, [tail, 1.0 - tail]))
    verdict = "better (interval above 0)" if lo > 0 else "worse (interval below 0)" if hi < 0 else "within noise"
    return {"diff": float(d.mean()), "se": float(boot.std(ddof=1)), "lo": lo, "hi": hi, "confidence": confidence,
            "n_boot": n_boot, "queries": n, "seeds_a": a.shape[0], "seeds_b": b.shape[0], "verdict": verdict}
