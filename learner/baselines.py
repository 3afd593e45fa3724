"""Baselines of the offline evaluation, behind the evaluation's tiny ranker interface.

Every ranker is built with the target catalogue (a fixed list of target item ids; its order is the
column order of the scores) and offers:

- ``partial_fit(events)``: one chronological pass over training events (both domains), online;
- ``score(user_ids, histories) -> (N, C)`` float32 scores of every catalogue item for N queries, where a
  query is a user id (``None`` for an anonymous, cold-start user) and that user's history before the
  held-out event (``{domain: (item_ids, timestamps)}``, oldest first);
- ``snapshot()`` / ``restore(state)`` so early stopping can go back to the best epoch.

>>> pop = Popularity("book", ["b1", "b2", "b3"])
>>> pop.partial_fit([InteractionEvent("e1", "u", "b2", "book", 1), InteractionEvent("e2", "u", "m1", "movie", 2)])
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

from stream.events import InteractionEvent
from stream.user_state import Sequence_

History = dict[str, Sequence_]


class Ranker(Protocol):
    """What the offline evaluation needs from a model."""

    name: str

    def partial_fit(self, events: Sequence[InteractionEvent]) -> None: ...

    def score(self, user_ids: Sequence[str | None], histories: Sequence[History]) -> np.ndarray: ...

    def snapshot(self) -> object: ...

    def restore(self, state: object) -> None: ...


class Popularity:
    """Scores a target item by how often it occurs in the training target events; ignores the user."""

    name = "popularity"

    def __init__(self, target: str, catalogue: Sequence[str]) -> None:
        self.target = target
        self.catalogue = list(catalogue)
        self._index = {item_id: i for i, item_id in enumerate(self.catalogue)}
        self.counts = np.zeros(len(self.catalogue), dtype=np.float32)  # (C,)

    def partial_fit(self, events: Sequence[InteractionEvent]) -> None:
        for e in events:
            if e.domain == self.target and e.item_id in self._index:
                self.counts[self._index[e.item_id]] += 1.0

    def score(self, user_ids: Sequence[str | None], histories: Sequence[History]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(user_ids), len(self.counts))).copy()  # (N, C)

    def snapshot(self) -> object:
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

    def partial_fit(self, events: Sequence[InteractionEvent]) -> None:
        model = self.model
        for e in events:
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

    def score(self, user_ids: Sequence[str | None], histories: Sequence[History]) -> np.ndarray:
        biases, vectors = self._item_side()
        users = np.empty((len(user_ids), self.n_factors))  # (N, F)
        for n, (user_id, history) in enumerate(zip(user_ids, histories, strict=True)):
            if user_id is not None and user_id in self.model.u_latents:
                users[n] = self.model.u_latents[user_id]
            else:
                users[n] = self.fold_in(history)
        return (users @ vectors.T + biases[None, :]).astype(np.float32)  # (N, C)

    def snapshot(self) -> object:
        return copy.deepcopy((self.model, self._rng, self._domain_items, self._domain_seen))

    def restore(self, state: object) -> None:
        self.model, self._rng, self._domain_items, self._domain_seen = copy.deepcopy(state)  # type: ignore[misc]
        self._item_cache = None
