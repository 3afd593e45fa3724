"""The fused ranker's score, one definition for the learner (which measures it) and serving (which serves it).

For a user and every item ``j`` of the served index::

    fused_j = z(model)_j + weight * z(cooc)_j

``model_j`` is the served model's score, the max over the user's views of ``<q_v, e_j>`` (zeros for a user
without vectors), ``cooc_j`` the target-history item co-occurrence score (``ItemCooccurrence.scores(history,
"target")``, 0 for an item it has never seen) and ``z`` standardises a score vector over *all* items of the
index, the user's consumed ones included (mean 0, std 1; a constant vector gives zeros). Consumed items are
removed from the candidates after scoring. The learner ranks each target event with this score
(``learner.shadow.FusedShadow``) and ``/recommend`` answers with it (``served_by="fused"``), both through
:func:`fused_scores`, so what is measured is what is served.

>>> [round(x, 3) for x in fused_scores(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 6.0]), 0.5).tolist()]
[-1.578, -0.354, 1.932]
>>> fused_scores(None, np.array([0.0, 1.0]), 2.0).tolist()  # no vectors: the co-occurrence order
[-2.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream.cooccurrence import ItemCooccurrence

# The weights the learner measures (per-weight tallies); it serves the one with the best recent NDCG@10.
FUSED_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)


def standardise(scores: np.ndarray) -> np.ndarray:
    """``(s - mean) / std`` over the vector, float64; a constant (or empty) vector gives zeros.

    >>> standardise(np.array([1.0, 3.0])).tolist(), standardise(np.array([2.0, 2.0])).tolist()
    ([-1.0, 1.0], [0.0, 0.0])
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s.copy()
    std = float(s.std())
    if std == 0.0 or not np.isfinite(std):
        return np.zeros_like(s)
    return (s - float(s.mean())) / std


def fused_scores(model: np.ndarray | None, cooc: np.ndarray, weight: float) -> np.ndarray:
    """``z(model) + weight * z(cooc)`` (both (N,), aligned on the same items); ``model`` None: zeros."""
    if not weight >= 0 or not np.isfinite(weight):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if model is not None and np.shape(model) != np.shape(cooc):
        raise ValueError(f"model and cooc scores must align, got shapes {np.shape(model)} and {np.shape(cooc)}")
    return combine(None if model is None else standardise(model), standardise(cooc), weight)


def combine(z_model: np.ndarray | None, z_cooc: np.ndarray, weight: float) -> np.ndarray:
    """``z_model + weight * z_cooc`` from standardised vectors (``z_model`` None: zeros); the learner
    standardises once per event and combines once per weight, with the same arithmetic as serving."""
    if z_model is None:
        return weight * z_cooc
    return z_model + weight * z_cooc


class CoocAlignment:
    """Maps a sequence of item ids onto the rows of an :class:`ItemCooccurrence`, to read its scores in
    that order. Rows never move once assigned, so only ids without a row yet are looked up again, and
    only when the co-occurrence has grown since.

    >>> co = ItemCooccurrence("s", "t")
    >>> co.learn({"t": ()}, "t", "a"); co.learn({"t": ("a",)}, "t", "b")
    >>> align = CoocAlignment(("b", "zz", "a"))
    >>> [round(x, 6) for x in align.gather(co, co.scores({"t": ("a",)}, "target")).tolist()]  # zz: unseen, 0
    [1.0, 0.0, 0.0]
    >>> align.rows(co).tolist()
    [1, -1, 0]
    """

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids = item_ids
        self._rows = np.full(len(item_ids), -1, dtype=np.int64)
        self._unresolved = np.arange(len(item_ids))
        self._cooc_size = -1

    def rows(self, cooc: ItemCooccurrence) -> np.ndarray:
        """(N,) row of each item in ``cooc``, -1 where it has none."""
        if self._unresolved.size and len(cooc) != self._cooc_size:
            index = cooc.row
            found = np.fromiter((-1 if (r := index(self.item_ids[i])) is None else r for i in self._unresolved.tolist()),
                                dtype=np.int64, count=self._unresolved.size)
            self._rows[self._unresolved] = found
            self._unresolved = self._unresolved[found < 0]
            self._cooc_size = len(cooc)
        return self._rows

    def gather(self, cooc: ItemCooccurrence, scores: np.ndarray) -> np.ndarray:
        """``scores`` (one per row of ``cooc``) in this item order, 0 for items ``cooc`` has not seen."""
        padded = np.append(np.asarray(scores, dtype=np.float64), 0.0)  # row -1 reads the trailing 0
        return padded[self.rows(cooc)]
