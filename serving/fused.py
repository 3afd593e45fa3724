"""The fused ranker's score, one definition for the learner (which measures it) and serving (which serves it).

For a user and every item ``j`` of the served index::

    fused_j = z(model)_j + weight * z(cooc)_j

``model_j`` is the served model's score, the max over the user's views of ``<q_v, e_j>`` (for a user without
vectors there is none, and the score is ``z(cooc)_j`` whatever the weight, 0 included), ``cooc_j`` the target-history item co-occurrence score (``ItemCooccurrence.scores(history,
"target")``, 0 for an item it has never seen) and ``z`` standardises a score vector over *all* items of the
index, the user's consumed ones included (mean 0, std 1; a constant vector gives zeros). Consumed items are
removed from the candidates after scoring. The learner ranks each target event with this score
(``learner.online.shadow.FusedShadow``) and ``/recommend`` answers with it (``served_by="fused"``), both through
:func:`fused_scores`, so what is measured is what is served.

>>> [round(x, 3) for x in fused_scores(np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 6.0]), 0.5).tolist()]
[-1.578, -0.354, 1.932]
>>> fused_scores(None, np.array([0.0, 1.0]), 0.0).tolist()  # no vectors: the co-occurrence order
[-1.0, 1.0]
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
    """``z(model) + weight * z(cooc)`` (both (N,), aligned on the same items); ``model`` None: ``z(cooc)``."""
    if not weight >= 0 or not np.isfinite(weight):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if model is not None and np.shape(model) != np.shape(cooc):
        raise ValueError(f"model and cooc scores must align, got shapes {np.shape(model)} and {np.shape(cooc)}")
    return combine(None if model is None else standardise(model), standardise(cooc), weight)


def combine(z_model: np.ndarray | None, z_cooc: np.ndarray, weight: float) -> np.ndarray:
    """``z_model + weight * z_cooc`` from standardised vectors; ``z_model`` None (a user without vectors):
    ``z_cooc`` whatever the weight, since a weight of 0 (the model alone, users with no target history) would
    otherwise rank every item alike. The learner standardises once per event and combines once per weight,
    with the same arithmetic as serving."""
    if z_model is None:
        return np.array(z_cooc, dtype=np.float64)
    return z_model + weight * z_cooc


class CoocAlignment:
    """Maps a sequence of item ids onto the rows of an :class:`ItemCooccurrence`, to read its scores in
    that order. Rows never move once assigned and new items only append rows, so once the ids are looked
    up, a grown co-occurrence is caught up by reading its new rows alone: O(new items) per call, not
    O(ids still without a row) (the learner ranks every target event this way; looking the unresolved ids
    up again on every call cost 4.3 of 25.8 s of the learner's step in a profile of the shipped data).
    Another co-occurrence object is looked up afresh.

    >>> co = ItemCooccurrence("s", "t")
    >>> co.learn({"t": ()}, "t", "a"); co.learn({"t": ("a",)}, "t", "b")
    >>> align = CoocAlignment(("b", "zz", "a"))
    >>> [round(x, 6) for x in align.gather(co, co.scores({"t": ("a",)}, "target")).tolist()]  # zz: unseen, 0
    [1.0, 0.0, 0.0]
    >>> align.rows(co).tolist()
    [1, -1, 0]
    >>> co.learn({"t": ()}, "t", "zz"); align.rows(co).tolist()  # zz gets a row: caught up from the new rows
    [1, 2, 0]
    """

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.item_ids = item_ids
        self._rows = np.full(len(item_ids), -1, dtype=np.int64)
        self._cooc: ItemCooccurrence | None = None  # the co-occurrence the rows belong to
        self._cooc_size = 0  # its rows read so far
        self._pending: dict[str, list[int]] = {}  # item id without a row -> its positions in item_ids

    def rows(self, cooc: ItemCooccurrence) -> np.ndarray:
        """(N,) row of each item in ``cooc``, -1 where it has none."""
        n = len(cooc)
        if cooc is not self._cooc:  # first call, or another co-occurrence: look every id up
            index = cooc.row
            rows = np.full(len(self.item_ids), -1, dtype=np.int64)
            pending: dict[str, list[int]] = {}
            for position, item_id in enumerate(self.item_ids):
                row = index(item_id)
                if row is None:
                    pending.setdefault(item_id, []).append(position)
                else:
                    rows[position] = row
            # complete before it is shared: a concurrent reader sees the old state or this one
            self._rows, self._pending, self._cooc_size, self._cooc = rows, pending, n, cooc
        elif n > self._cooc_size:
            if self._pending:
                new_ids = cooc.item_ids
                for row in range(self._cooc_size, n):
                    positions = self._pending.pop(new_ids[row], None)
                    if positions is not None:
                        self._rows[positions] = row
            self._cooc_size = n
        return self._rows

    def extended(self, item_ids: Sequence[str]) -> CoocAlignment:
        """The alignment of ``item_ids``: when they are this one's ids with more appended (served items only
        grow), built from this one's rows plus a look-up of the new ids alone; otherwise a fresh one.

        >>> co = ItemCooccurrence("s", "t")
        >>> co.learn({"t": ()}, "t", "a"); co.learn({"t": ()}, "t", "b")
        >>> align = CoocAlignment(("b",)); _ = align.rows(co)
        >>> grown = align.extended(("b", "a", "c")); grown.rows(co).tolist()
        [1, 0, -1]
        """
        n_old = len(self.item_ids)
        if self._cooc is None or len(item_ids) < n_old or tuple(item_ids[:n_old]) != tuple(self.item_ids):
            return CoocAlignment(item_ids)
        out = CoocAlignment(item_ids)
        index = self._cooc.row
        rows = np.full(len(item_ids), -1, dtype=np.int64)
        rows[:n_old] = self._rows
        pending = {item_id: list(positions) for item_id, positions in self._pending.items()}
        for position in range(n_old, len(item_ids)):
            row = index(item_ids[position])
            if row is None:
                pending.setdefault(item_ids[position], []).append(position)
            else:
                rows[position] = row
        # Caught up as far as this one was: rows added since are read at the next ``rows`` call, for the old
        # ids still pending (the new ids were looked up in the co-occurrence as it is now).
        out._rows, out._pending, out._cooc_size, out._cooc = rows, pending, self._cooc_size, self._cooc
        return out

    def gather(self, cooc: ItemCooccurrence, scores: np.ndarray) -> np.ndarray:
        """``scores`` (one per row of ``cooc``) in this item order, 0 for items ``cooc`` has not seen."""
        padded = np.append(np.asarray(scores, dtype=np.float64), 0.0)  # row -1 reads the trailing 0
        return padded[self.rows(cooc)]
