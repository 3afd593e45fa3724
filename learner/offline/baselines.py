"""Baselines of the offline evaluation, behind the evaluation's tiny ranker interface.

Every ranker is built with the target catalogue (a fixed list of target item ids; its order is the
column order of the scores) and offers:

- ``learn_many(examples)``: learn causal examples (``stream.user_state.Example``: an event plus the
  user's history strictly before it), in the order given;
- ``score(user_ids, histories, columns=None) -> (N, C)`` float scores of every catalogue item for N
  queries, where a query is a user id (``None`` for an anonymous, cold-start user) and that user's
  history before the held-out event (``{domain: (item_ids, timestamps)}``, oldest first); with
  ``columns`` (catalogue column indices) only those items, ``(N, len(columns))``, in that order;
- ``iterative``: True for a model that improves with more passes over the same examples (it is trained
  in epochs with early stopping and needs ``snapshot()`` / ``restore(state)`` to go back to the best
  epoch); False for a counting model, which learns each example exactly once (a second pass would
  count every event twice).

>>> pop = Popularity("book", ["b1", "b2", "b3"])
>>> pop.learn_many([Example("e1", "u", "book", "b2", 1, {}), Example("e2", "u", "movie", "m1", 2, {})])
>>> pop.score(["u"], [{"book": ((), ())}]).tolist()
[[0.0, 1.0, 0.0]]
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from river import optim, reco

from stream.cooccurrence import DEFAULT_MAX_NEIGHBOURS, MODES, ItemCooccurrence
from stream.user_state import Example, Sequence_

History = dict[str, Sequence_]


class Ranker(Protocol):
    """What the offline evaluation needs from a model."""

    name: str
    iterative: bool

    def learn_many(self, examples: Sequence[Example]) -> None: ...

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray: ...

    def snapshot(self, tag: str = "best") -> object: ...

    def restore(self, state: object) -> None: ...


class Popularity:
    """Scores a target item by how often it occurs in the training target events; ignores the user."""

    name = "popularity"
    iterative = False

    def __init__(self, target: str, catalogue: Sequence[str]) -> None:
        self.target = target
        self.catalogue = list(catalogue)
        self._index = {item_id: i for i, item_id in enumerate(self.catalogue)}
        self.counts = np.zeros(len(self.catalogue), dtype=np.float32)  # (C,)

    def learn_many(self, examples: Sequence[Example]) -> None:
        for ex in examples:
            if ex.domain == self.target and ex.item_id in self._index:
                self.counts[self._index[ex.item_id]] += 1.0

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        counts = self.counts if columns is None else self.counts[columns]
        return np.broadcast_to(counts, (len(user_ids), len(counts))).copy()  # (N, C)

    def snapshot(self, tag: str = "best") -> object:
        return self.counts.copy()

    def restore(self, state: object) -> None:
        assert isinstance(state, np.ndarray)
        self.counts = state.copy()


class OnlineMF:
    """river's biased matrix factorisation (``river.reco.BiasedMF``), trained online on implicit feedback.

    One user vector is shared by both domains, so this is a (shallow) cross-domain model too. Each
    training event is a positive (``y = 1``) followed by ``negatives_per_positive`` items of the same
    domain drawn uniformly from the items that domain has shown so far (``y = 0``), squared loss, SGD.
    The score of a catalogue item for a known user is ``b_i + <p_u, q_i>`` (the global mean and the user
    bias do not change a user's ranking); items never trained score 0.

    Cold-start queries (``user_id`` None, or a user never trained) fold in a user vector from the query
    history: ridge regression of ``1 - mean - b_i`` on the item vectors of the history's trained items,
    item side frozen; with no trained item in the history the user vector is 0 (pure item-bias ranking).
    """

    name = "online_mf"
    iterative = True

    def __init__(
        self,
        target: str,
        catalogue: Sequence[str],
        n_factors: int = 32,
        learning_rate: float = 0.05,
        l2: float = 1e-4,
        negatives_per_positive: int = 4,
        fold_in_l2: float = 1.0,
        seed: int = 0,
    ) -> None:
        if negatives_per_positive < 0:
            raise ValueError(f"negatives_per_positive must be >= 0, got {negatives_per_positive}")
        self.target = target
        self.catalogue = list(catalogue)
        self.n_factors = n_factors
        self.negatives_per_positive = negatives_per_positive
        self.fold_in_l2 = fold_in_l2
        self.model = reco.BiasedMF(
            n_factors=n_factors,
            bias_optimizer=optim.SGD(learning_rate),
            latent_optimizer=optim.SGD(learning_rate),
            l2_bias=l2,
            l2_latent=l2,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
            seed=seed,
        )
        self._rng = random.Random(seed)
        self._domain_items: dict[str, list[str]] = {}
        self._domain_seen: dict[str, set[str]] = {}
        self._item_cache: tuple[np.ndarray, np.ndarray] | None = None

    def learn_many(self, examples: Sequence[Example]) -> None:
        model = self.model
        for e in examples:
            items = self._domain_items.setdefault(e.domain, [])
            seen = self._domain_seen.setdefault(e.domain, set())
            if e.item_id not in seen:
                seen.add(e.item_id)
                items.append(e.item_id)
            model.learn_one(e.user_id, e.item_id, 1.0)
            for _ in range(self.negatives_per_positive):
                negative = items[self._rng.randrange(len(items))]
                if negative != e.item_id:
                    model.learn_one(e.user_id, negative, 0.0)
        self._item_cache = None

    def _item_side(self) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue item biases ``(C,)`` and vectors ``(C, F)``; zeros for items never trained."""
        if self._item_cache is None:
            biases = np.zeros(len(self.catalogue), dtype=np.float64)
            vectors = np.zeros((len(self.catalogue), self.n_factors), dtype=np.float64)
            latents, item_biases = self.model.i_latents, self.model.i_biases
            for i, item_id in enumerate(self.catalogue):
                if item_id in latents:  # `in` does not create an entry in the defaultdict
                    vectors[i] = latents[item_id]
                    biases[i] = item_biases.get(item_id, 0.0)
            self._item_cache = (biases, vectors)
        return self._item_cache

    def fold_in(self, history: History) -> np.ndarray:
        """A user vector ``(F,)`` from a history alone (cold start); see the class docstring."""
        mean = self.model.global_mean.get()
        rows, targets = [], []
        for item_ids, _ in history.values():
            for item_id in item_ids:
                if item_id in self.model.i_latents:
                    rows.append(self.model.i_latents[item_id])
                    targets.append(1.0 - mean - self.model.i_biases.get(item_id, 0.0))
        if not rows:
            return np.zeros(self.n_factors)
        a = np.asarray(rows)  # (H, F)
        gram = a.T @ a + self.fold_in_l2 * np.eye(self.n_factors)
        return np.linalg.solve(gram, a.T @ np.asarray(targets))

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        biases, vectors = self._item_side()
        if columns is not None:
            biases, vectors = biases[columns], vectors[columns]
        users = np.empty((len(user_ids), self.n_factors))  # (N, F)
        for n, (user_id, history) in enumerate(zip(user_ids, histories, strict=True)):
            if user_id is not None and user_id in self.model.u_latents:
                users[n] = self.model.u_latents[user_id]
            else:
                users[n] = self.fold_in(history)
        return (users @ vectors.T + biases[None, :]).astype(np.float32)  # (N, C)

    def snapshot(self, tag: str = "best") -> object:
        return copy.deepcopy((self.model, self._rng, self._domain_items, self._domain_seen))

    def restore(self, state: object) -> None:
        self.model, self._rng, self._domain_items, self._domain_seen = copy.deepcopy(state)  # type: ignore[misc]
        self._item_cache = None


class ItemKNN:
    """Item co-occurrence kNN (``stream.cooccurrence.ItemCooccurrence``, the stream's shadow baseline)
    behind the ranker interface.

    ``mode`` picks the history a query is scored from: ``"target"`` (the user's target items),
    ``"target+source"`` or ``"source"`` (source items only). Learning counts each example once against
    the causal history it carries, so the model has no epochs. Catalogue items the co-occurrence model
    has not seen score 0, below every seen item (their popularity tie-break is > 0). Scores stay float64:
the tie-break (``1e-9`` relative) would vanish in float32 next to a co-occurrence score.

    >>> knn = ItemKNN("itemknn_target", "target", "movie", "book", ["b1", "b2", "b3"])
    >>> knn.learn_many([Example("e1", "u", "book", "b1", 1, {"book": ((), ())}),
    ...                 Example("e2", "u", "book", "b2", 2, {"book": (("b1",), (1,))})])
    >>> [round(float(s), 6) for s in knn.score([None], [{"book": (("b1",), (1,))}])[0]]
    [0.0, 1.0, 0.0]
    """

    iterative = False

    def __init__(
        self,
        name: str,
        mode: str,
        source: str,
        target: str,
        catalogue: Sequence[str],
        *,
        alpha: float = 0.5,
        max_history: int = 50,
        max_neighbours: int | None = DEFAULT_MAX_NEIGHBOURS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.name = name
        self.mode = mode
        self.catalogue = list(catalogue)
        self._index = {item_id: i for i, item_id in enumerate(self.catalogue)}
        self.model = ItemCooccurrence(source, target, alpha=alpha, max_history=max_history,
                                      max_neighbours=max_neighbours)
        self._columns = np.zeros(0, dtype=np.int64)  # co-occurrence row -> catalogue column

    def learn_many(self, examples: Sequence[Example]) -> None:
        self.model.learn_many(examples)

    def columns(self) -> np.ndarray:
        """``(n_seen,)`` catalogue column of each co-occurrence row (the items seen so far)."""
        item_ids = self.model.item_ids
        if len(self._columns) < len(item_ids):
            missing = [i for i in item_ids[len(self._columns):] if i not in self._index]
            if missing:
                raise ValueError(f"items {missing[:5]} were learnt but are not in the catalogue")
            new = np.array([self._index[i] for i in item_ids[len(self._columns):]], dtype=np.int64)
            self._columns = np.concatenate([self._columns, new])
        return self._columns

    def score_mode(self, histories: Sequence[History], mode: str, columns: np.ndarray | None = None) -> np.ndarray:
        """``(N, C)`` scores of ``histories`` in ``mode`` (the ranker's own mode or another one); with
        ``columns``, ``(N, len(columns))`` for those catalogue columns."""
        dest = self.columns()  # co-occurrence row -> output column
        keep: slice | np.ndarray = slice(None)
        width = len(self.catalogue)
        if columns is not None:
            position = np.full(len(self.catalogue), -1, dtype=np.int64)
            position[columns] = np.arange(len(columns))
            dest = position[dest]
            keep = dest >= 0
            dest, width = dest[keep], len(columns)
        out = np.zeros((len(histories), width), dtype=np.float64)  # (N, C)
        for n, history in enumerate(histories):
            out[n, dest] = self.model.scores(history, mode)[keep]
        return out

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        return self.score_mode(histories, self.mode, columns)

    def snapshot(self, tag: str = "best") -> object:
        return self.model.state_dict()

    def restore(self, state: object) -> None:
        assert isinstance(state, dict)
        self.model = ItemCooccurrence.from_state_dict(state)
        self._columns = np.zeros(0, dtype=np.int64)
