"""The query-time transfer scale chosen online, test-then-train (the stream's counterpart of
``learner.offline.evaluate.tune_transfer_scale``).

``SITNModel.transfer_scale = (warm, cold)`` multiplies the transferred (other-domain) part of a target query:
``warm`` for a user with target history, ``cold`` for one without. Offline it is chosen on a validation split;
a stream has none, so each step's target events, before the model trains on them, are ranked at every scale of
the grid from two forward passes (own interests alone, ``q0``, and own plus the whole transfer, ``q1``: the
query at scale ``s`` is ``q0 + s (q1 - q0)``, so its scores are ``S0 + s (S1 - S0)``). Each (slot, scale)
keeps a windowed NDCG@k tally (``learner.online.prequential.RankTally``: ties against the item, consumed items
excluded, an item the model has no row for a miss). Once a slot has ``min_events`` events in its window, the
scale with the best windowed NDCG is used from the next step on, for ranking and for what is published; until
then the slot keeps its initial scale (1, or a warm start's offline choice). Another scale takes over only
when its windowed NDCG beats the current one's by more than ``min_gain`` (relative, default 2 %), so noise
does not flip it back and forth (on the shipped Movie->Book replay the four warm scales' windowed figures
differed by 0.1 % and the plain argmax switched 38 times); ties go to the earlier grid value.

>>> tuner = TransferScaleTuner(grid=(1.0, 0.0), window=4, min_events=2, initial=(1.0, 1.0))
>>> s0 = np.array([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])  # own interests alone rank item 1 first
>>> s1 = np.array([[2.0, 1.0, 0.5], [2.0, 1.0, 0.5]])  # the transfer pushes item 0 above it
>>> tuner.observe(s0, s1, positives=[1, 1], excluded=[[], []], warm=[True, True])
>>> tuner.choose()
(0.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learner.core.config import TRANSFER_SCALES
from learner.online.prequential import RankTally
from stream.cooccurrence import ranks_with_ties_against

SLOTS = ("warm", "cold")


class TransferScaleTuner:
    """Windowed NDCG@k of the target queries at each transfer scale, per slot (module docstring)."""

    def __init__(
        self,
        grid: Sequence[float] = TRANSFER_SCALES,
        window: int = 5000,
        min_events: int = 1000,
        k: int = 10,
        initial: tuple[float, float] = (1.0, 1.0),
        sample_per_step: int = 64,
        min_gain: float = 0.02,
    ) -> None:
        if not grid or len(set(grid)) != len(grid) or any(not np.isfinite(s) or s < 0 for s in grid):
            raise ValueError(f"grid must be distinct finite scales >= 0, got {tuple(grid)}")
        check_tuner_settings(window, min_events, sample_per_step, min_gain)
        self.grid = tuple(float(s) for s in grid)
        self.window, self.min_events, self.k = window, min_events, k
        self.sample_per_step = sample_per_step
        self.min_gain = min_gain
        self.scale = {"warm": float(initial[0]), "cold": float(initial[1])}
        self.tallies = {slot: {s: RankTally(k, window) for s in self.grid} for slot in SLOTS}
        self.switches = 0

    def observe(
        self,
        s0: np.ndarray,
        s1: np.ndarray,
        positives: Sequence[int | None],
        excluded: Sequence[Sequence[int]],
        warm: Sequence[bool],
    ) -> None:
        """Rank up to ``sample_per_step`` events (the first ones) at every scale: ``s0``/``s1`` (B, N) scores
        of the own-only and fully transferred queries, ``positives`` the item's column (None: a miss),
        ``excluded`` the consumed columns, ``warm`` whether the event's user has target history."""
        grid = np.asarray(self.grid, dtype=np.float32)[:, None]  # (G, 1)
        for j in range(min(len(positives), self.sample_per_step)):
            tallies = self.tallies["warm" if warm[j] else "cold"]
            positive = positives[j]
            if positive is None:
                for tally in tallies.values():
                    tally.record(None, False)
                continue
            scores = s0[j][None, :] + grid * (s1[j] - s0[j])[None, :]  # (G, N): every scale at once
            ranks = ranks_with_ties_against(scores, positive, excluded[j]).tolist()
            for scale, rank in zip(self.grid, ranks, strict=True):
                tallies[scale].record(int(rank), True)

    def choose(self) -> tuple[float, float]:
        """The (warm, cold) scale to use from now on (module docstring)."""
        for slot in SLOTS:
            best = windowed_choice(self.tallies[slot], self.scale[slot], self.min_events, self.min_gain)
            if best != self.scale[slot]:
                self.scale[slot] = best
                self.switches += 1
        return self.scale["warm"], self.scale["cold"]

    def stats(self) -> dict[str, float]:
        out = {"transfer_scale_warm": self.scale["warm"], "transfer_scale_cold": self.scale["cold"],
               "transfer_scale_switches": float(self.switches)}
        for slot in SLOTS:
            for scale, tally in self.tallies[slot].items():
                out[f"transfer_scale_{slot}_{scale:g}_ndcg_window"] = tally.figures("window")["window"]["ndcg"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "scale": dict(self.scale), "switches": self.switches,
                "tallies": {slot: {f"{s:g}": t.state_dict() for s, t in per.items()}
                            for slot, per in self.tallies.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a checkpoint's tallies and scales (scales not in this grid start from zero)."""
        self.scale = {slot: float(state["scale"][slot]) for slot in SLOTS}
        self.switches = int(state["switches"])
        for slot in SLOTS:
            for scale in self.grid:
                saved = state["tallies"][slot].get(f"{scale:g}")
                if saved is not None:
                    self.tallies[slot][scale] = RankTally.from_state_dict(saved, self.window)


def check_tuner_settings(window: int, min_events: int, sample_per_step: int, min_gain: float) -> None:
    """The online tuners' shared settings (here and ``learner.online.prior_tuner``), refused when out of range."""
    if min_events < 1 or min_events > window:
        raise ValueError(f"min_events must be in [1, window={window}], got {min_events}")
    if sample_per_step < 1:
        raise ValueError(f"sample_per_step must be >= 1, got {sample_per_step}")
    if not min_gain >= 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")


def windowed_choice(tallies: Mapping[Any, RankTally], current: Any, min_events: int, min_gain: float) -> Any:
    """The option (a key of ``tallies``, in grid order) to use from now on: ``current`` until the window holds
    ``min_events`` events, then the best windowed NDCG@k, but only if it beats ``current``'s by more than
    ``min_gain`` (relative); ties go to the earlier option. Shared by the online tuners (transfer scale here,
    the popularity prior's half-life in ``learner.online.prior_tuner``)."""
    grid = list(tallies)
    if tallies[grid[0]].figures("window")["window"]["events"] < min_events:
        return current
    ndcg = {option: tally.figures("window")["window"]["ndcg"] for option, tally in tallies.items()}
    best = max(grid, key=lambda option: (ndcg[option], -grid.index(option)))
    if best != current and ndcg[best] > ndcg.get(current, 0.0) * (1.0 + min_gain):
        return best
    return current
