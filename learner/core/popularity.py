"""Label counts decayed with a half-life, for the popularity prior (``SITNConfig.popularity_half_lives``).

A stream's popular items change: on the shipped Movie->Book replay, running popularity with counts halved every
3,000 book labels ranks the next book at NDCG@10 0.0084 against 0.0054 with all-time counts. The prior may read
such counts instead of the all-time ones (``SITNLearner.popularity_half_life``; the stream chooses the half-life
online, ``learner.online.prior_tuner``).

Time is the domain's label count ``n`` (so ordinal logs work as well as clock times). A label at count ``n`` adds
``2^((n - offset) / h)`` to its item's stored sum, so nothing else is touched per label. The decayed count read
out is the stored sum times ``2^(-(n_tick - offset) / h)``, where ``n_tick`` is ``n`` rounded down to a multiple
of ``h`` (a tick): between ticks an item no label touched keeps its value, so a publish sends only the rows a
step moved; at each tick every counted item halves at once, and its new value must reach serving. So ticks are
whole half-lives, and a count that falls below ``MIN_COUNT`` reads 0: an item stops moving a few ticks after its
last label instead of being sent again at every tick. (A label within a tick counts ``2^((n - n_tick) / h)``,
between 1 and 2, until the tick.) On the shipped stream with ticks of h / 4 and no floor, the end-to-end
benchmark at full speed fell from 762 to 417 events/s: serving re-inserted most of the catalogue into its index
several times per half-life. The offset moves forward (and the sums shrink to match) before the weights could
overflow a float64.

>>> import numpy as np
>>> recent, offset = np.zeros(3), 0.0
>>> offset = add_labels(recent, offset, np.array([1, 1, 2]), n_before=0, half_life=4)  # a tick is 4 labels
>>> decayed_counts(recent, offset, n=3, half_life=4).tolist()  # before the first tick: no decay yet
[0.0, 2.0, 1.0]
>>> offset = add_labels(recent, offset, np.array([2]), n_before=2, half_life=4)  # 2^(2/4) until the tick
>>> [round(c, 3) for c in decayed_counts(recent, offset, n=4, half_life=4).tolist()]  # one tick: halved
[0.0, 1.0, 1.207]
>>> decayed_counts(recent, offset, n=4 * 8, half_life=4).tolist()  # 8 ticks: below MIN_COUNT, read as 0
[0.0, 0.0, 0.0]
"""

from __future__ import annotations

import numpy as np

# the offset moves on once the newest weight passes 2^REBASE_EXPONENT (float64 holds up to about 2^1023)
REBASE_EXPONENT = 512.0
# A decayed count below this reads 0. An item labelled once is then sent again 4 times, not 7 as with 0.01; on
# the shipped stream (in-process) the fused ranker's data-time NDCG@10 was the same, 0.0187 with either.
MIN_COUNT = 0.1


def tick(half_life: int) -> int:
    """Labels between two decay steps: one half-life."""
    return half_life


def add_labels(recent: np.ndarray, offset: float, rows: np.ndarray, n_before: int, half_life: int) -> float:
    """Add one label per entry of ``rows`` (repeats count) to ``recent`` in place, each at label count
    ``n_before`` (a step's labels share one time); returns the offset, moved forward if the weights grew too
    large (``recent`` rescaled in place to match, so every decayed count stays what it was)."""
    if half_life < 1:
        raise ValueError(f"half_life must be >= 1, got {half_life}")
    n_tick = n_before - n_before % tick(half_life)
    if (n_before - offset) / half_life > REBASE_EXPONENT and n_tick > offset:
        recent *= 2.0 ** (-(n_tick - offset) / half_life)
        offset = float(n_tick)
    if len(rows):
        np.add.at(recent, rows, 2.0 ** ((n_before - offset) / half_life))
    return offset


def decayed_counts(recent: np.ndarray, offset: float, n: int, half_life: int) -> np.ndarray:
    """(rows,) float64 counts decayed to the last tick at or before label count ``n`` (below ``MIN_COUNT``: 0)."""
    n_tick = n - n % tick(half_life)
    counts = recent * 2.0 ** (-(n_tick - offset) / half_life)
    counts[counts < MIN_COUNT] = 0.0
    return counts
