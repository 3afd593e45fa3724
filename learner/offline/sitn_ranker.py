"""The SITN learner behind the offline evaluation's ranker interface (``learner.offline.baselines.Ranker``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from learner.offline.baselines import History
from stream.user_state import Example

if TYPE_CHECKING:
    from learner.core.config import SITNConfig
    from learner.offline.eval_split import Split


BATCH_BY = ("target", "examples")
DEFAULT_BATCH_BY = "target"  # sitn eval, sitn train and bench_transfer.py default to it too
# With batch_by="target", a mini-batch closes at this many times batch_size examples even short of batch_size
# target ones: a log whose target domain is rare would otherwise make one batch of most of an epoch.
MAX_BATCH_FACTOR = 4


class SITNRanker:
    """SITN (or one of its ablations) trained in epochs on causal examples.

    ``learn_many`` shuffles the examples (seeded, a fresh order per call) and takes one
    ``SITNLearner.learn_many`` step per mini-batch at the config's learning rate; a single-domain config
    (``use_source=False``) trains on target-domain examples only. With ``batch_by="target"`` (the default) a
    mini-batch holds ``batch_size`` *target-domain* examples and the source-domain examples shuffled among
    them (at most ``MAX_BATCH_FACTOR * batch_size`` examples in all), so the target path takes the steps of
    the single-domain model whatever share of the events the target domain has; ``"examples"``: a mini-batch
    is ``batch_size`` examples of either domain. The refit before test
    (``learner.offline.evaluate.refit``) retrains from the saved initial state or continues with more passes.
    Scores come from ``embed_histories`` on the query history (the learner's own per-user state is never
    used), so cold-start queries see exactly the history they are given.
    """

    iterative = True

    def __init__(
        self,
        name: str,
        config: SITNConfig,
        split: Split,
        batch_size: int,
        workdir: str | Path,
        on_step: Callable[[dict[str, float]], None] | None = None,
        batch_by: str = DEFAULT_BATCH_BY,
    ) -> None:
        from learner.core.learner import SITNLearner  # torch is imported only when SITN rows run

        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        if batch_by not in BATCH_BY:
            raise ValueError(f"batch_by must be one of {list(BATCH_BY)}, got {batch_by!r}")
        self._learner_cls = SITNLearner
        self.name = name
        self.config = config
        self.source, self.target = split.source, split.target
        self.catalogue = list(split.catalogue)
        self.batch_size = batch_size
        self.batch_by = batch_by
        self.workdir = Path(workdir)
        self.on_step = on_step
        # Items get rows as the training (and refit) examples bring them, not up front: a row that first
        # arrives with an example starts at the mean of its history items (init_new_items_from_history),
        # which is what lets one refit pass place the validation-period items.
        self.learner = SITNLearner(config, split.source, split.target)
        self._rng = random.Random(config.seed)
        self._items: np.ndarray | None = None
        self._trained = np.zeros(0, dtype=bool)
        self.last_stats: dict[str, float] = {}

    @property
    def transfer_scale(self) -> tuple[float, float] | None:
        """(warm, cold) query-time transfer scale (``SITNModel.transfer_scale``); None without a source path."""
        return self.learner.model.transfer_scale if self.config.use_source else None

    @transfer_scale.setter
    def transfer_scale(self, value: tuple[float, float]) -> None:
        self.learner.model.transfer_scale = (float(value[0]), float(value[1]))

    def learn_many(self, examples: Sequence[Example]) -> None:
        examples = [ex for ex in examples if self.config.use_source or ex.domain == self.target]
        self._rng.shuffle(examples)
        for batch in mini_batches(examples, self.target, self.batch_size, self.batch_by):
            if len(batch) < 2:
                continue
            self.last_stats = self.learner.learn_many(batch)
            if self.on_step is not None:
                self.on_step(self.last_stats)
        self._items = None

    def _catalogue_items(self) -> np.ndarray:
        """``(C, D)`` target item vectors in catalogue order (cached until the weights change)."""
        if self._items is None:
            item_ids, vectors = self.learner.embed_items(self.target)
            counts = self.learner.model.encoder("target").item_count[1 : len(item_ids) + 1].numpy()
            position = {item_id: j for j, item_id in enumerate(item_ids)}
            order = np.array([position.get(i, -1) for i in self.catalogue], dtype=np.int64)  # -1: no row yet
            has_row = order >= 0
            self._items = np.zeros((len(self.catalogue), vectors.shape[1]), dtype=np.float32)
            self._items[has_row] = vectors[order[has_row]]
            self._trained = np.zeros(len(self.catalogue), dtype=bool)  # (C,) a training label at least once
            self._trained[has_row] = counts[order[has_row]] > 0
        return self._items

    def score(
        self, user_ids: Sequence[str | None], histories: Sequence[History], columns: np.ndarray | None = None
    ) -> np.ndarray:
        """Max over views of <q_v, e_i>, the learner's ``score_items`` rule, as one BLAS matmul (over the
        requested ``columns`` only: the matmul is most of a validation pass)."""
        queries = self.learner.embed_histories(list(histories), self.target)  # (N, V, D)
        n, v, d = queries.shape
        items = self._catalogue_items() if columns is None else self._catalogue_items()[columns]  # (C, D)
        trained = self._trained if columns is None else self._trained[columns]  # (C,)
        scores = (queries.reshape(n * v, d) @ items.T).reshape(n, v, -1).max(axis=1)  # (N, C)
        if trained.any() and not trained.all():
            # An item never trained has no row or still its random initial row, and a random score would
            # put it anywhere; the model knows nothing of it, so it ties with the row's lowest trained score
            # among the columns asked for (below every trained item; ties count against a held-out item).
            floor = np.where(trained[None, :], scores, np.inf).min(axis=1, keepdims=True)  # (N, 1)
            scores = np.where(trained[None, :], scores, floor)
        return scores

    def snapshot(self, tag: str = "best") -> object:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.name}-{tag}.pt"
        self.learner.save(path)
        return path

    def restore(self, state: object) -> None:
        assert isinstance(state, Path)
        self.learner = self._learner_cls.load(state)
        self._items = None


def mini_batches(examples: Sequence[Example], target: str, batch_size: int, batch_by: str) -> list[Sequence[Example]]:
    """``examples`` cut, in order, into the mini-batches of ``SITNRanker.learn_many`` (the last one may be short).

    >>> exs = [Example(str(i), "u", d, "x", i, {}) for i, d in enumerate("ttsssstt")]
    >>> [[e.domain for e in b] for b in mini_batches(exs, "t", 2, "target")]
    [['t', 't'], ['s', 's', 's', 's', 't', 't']]
    >>> [[e.domain for e in b] for b in mini_batches(exs, "t", 1, "target")]  # at most 4 examples a batch
    [['t'], ['t'], ['s', 's', 's', 's'], ['t'], ['t']]
    >>> [len(b) for b in mini_batches(exs, "t", 3, "examples")]
    [3, 3, 2]
    """
    if batch_by == "examples":
        return [examples[start:start + batch_size] for start in range(0, len(examples), batch_size)]
    batches, start, n_target = [], 0, 0
    for i, example in enumerate(examples):
        n_target += example.domain == target
        if n_target == batch_size or i + 1 - start == MAX_BATCH_FACTOR * batch_size:
            batches.append(examples[start:i + 1])
            start, n_target = i + 1, 0
    if start < len(examples):
        batches.append(examples[start:])
    return batches
