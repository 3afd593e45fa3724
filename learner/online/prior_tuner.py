"""The popularity prior's half-life chosen online, test-then-train.

The prior adds ``beta * log(1 + n_i)`` to every item's score (``SITNConfig.popularity_prior``), ``n_i`` the
item's label count: all-time, or decayed with a half-life (``learner.core.popularity``). Which one ranks best
depends on how fast a data set's popular items change, so the stream keeps the decayed counts for a grid of
half-lives (``SITNConfig.popularity_half_lives``) and chooses as it does the transfer scale
(``learner.online.transfer_scale``): each step's target events, before the model trains on them, are ranked with
each option's prior in place of the one in use (the prior is a per-item term, so the scores without it are the
live scores minus the active prior), each option keeps a windowed NDCG@k tally (ties against the item, consumed
items excluded, an item the model has no row for a miss), and once the window holds ``min_events`` events the best
option takes over if it beats the one in use by more than ``min_gain`` (relative).

>>> tuner = PriorTuner(half_lives=(100,), window=4, min_events=2, initial=0)
>>> priors = np.array([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]], dtype=np.float32)  # all-time, half-life 100
>>> live = np.array([[2.0, 0.0, 1.0]] * 2, dtype=np.float32)  # the model adds nothing: the active prior alone
>>> tuner.observe(live, priors, positives=[1, 1], excluded=[[], []])  # recent item 1 is read twice
>>> tuner.choose()
100
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learner.online.prequential import RankTally
from learner.online.transfer_scale import check_tuner_settings, windowed_choice
from stream.cooccurrence import ranks_with_ties_against


class PriorTuner:
    """Windowed NDCG@k of the target events ranked with each half-life's prior (module docstring)."""

    def __init__(
        self,
        half_lives: Sequence[int],
        window: int = 5000,
        min_events: int = 1000,
        k: int = 10,
        initial: int = 0,
        sample_per_step: int = 32,
        min_gain: float = 0.02,
    ) -> None:
        options = (0, *half_lives)
        if len(set(options)) != len(options) or any(not isinstance(h, int) or h < 1 for h in half_lives):
            raise ValueError(f"half_lives must be distinct ints >= 1, got {tuple(half_lives)}")
        if initial not in options:
            raise ValueError(f"initial must be 0 or one of {list(half_lives)}, got {initial}")
        check_tuner_settings(window, min_events, sample_per_step, min_gain)
        self.options: tuple[int, ...] = options
        self.window, self.min_events, self.k = window, min_events, k
        self.sample_per_step, self.min_gain = sample_per_step, min_gain
        self.half_life = initial
        self.tallies = {h: RankTally(k, window) for h in options}
        self.switches = 0

    def observe(
        self,
        scores: np.ndarray,
        priors: np.ndarray,
        positives: Sequence[int | None],
        excluded: Sequence[Sequence[int]],
    ) -> None:
        """Rank up to ``sample_per_step`` events (the first ones) with every option's prior: ``scores`` (B, N)
        the live scores (the active option's prior included), ``priors`` (options, N) each option's prior per
        item, ``positives`` the item's column (None: a miss), ``excluded`` the consumed columns."""
        if priors.shape[0] != len(self.options):
            raise ValueError(f"priors must have one row per option {list(self.options)}, got {priors.shape[0]}")
        active = priors[self.options.index(self.half_life)]  # (N,)
        for j in range(min(len(positives), self.sample_per_step)):
            positive = positives[j]
            if positive is None:
                for tally in self.tallies.values():
                    tally.record(None, False)
                continue
            ranked = (scores[j] - active)[None, :] + priors  # (options, N)
            ranks = ranks_with_ties_against(ranked, positive, excluded[j]).tolist()
            for h, rank in zip(self.options, ranks, strict=True):
                self.tallies[h].record(int(rank), True)

    def choose(self) -> int:
        """The half-life the prior reads from now on (0: all-time counts)."""
        best = windowed_choice(self.tallies, self.half_life, self.min_events, self.min_gain)
        if best != self.half_life:
            self.half_life = best
            self.switches += 1
        return self.half_life

    def stats(self) -> dict[str, float]:
        out = {"popularity_half_life": float(self.half_life), "popularity_half_life_switches": float(self.switches)}
        for h, tally in self.tallies.items():
            out[f"popularity_half_life_{h}_ndcg_window"] = tally.figures("window")["window"]["ndcg"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"options": list(self.options), "half_life": self.half_life, "switches": self.switches,
                "tallies": {str(h): t.state_dict() for h, t in self.tallies.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a checkpoint's tallies and choice (a half-life not in this grid falls back to all-time
        counts; options the checkpoint lacks start from zero)."""
        half_life = int(state["half_life"])
        self.half_life = half_life if half_life in self.options else 0
        self.switches = int(state["switches"])
        for h in self.options:
            saved = state["tallies"].get(str(h))
            if saved is not None:
                self.tallies[h] = RankTally.from_state_dict(saved, self.window)
