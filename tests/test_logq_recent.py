"""The logQ correction's decayed label counts (``SITNConfig.logq_half_life_events``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from learner.core.config import SITNConfig
from learner.core.learner import SITNLearner


def _direct(steps: list[list[int]], half_life: float, n_rows: int) -> np.ndarray:
    """Each label weighted 2^-(labels counted after its step / half-life), normalised: the definition."""
    total_after = sum(len(s) for s in steps)
    weights = np.zeros(n_rows)
    seen = 0
    for step in steps:
        seen += len(step)
        for row in step:
            weights[row] += 2.0 ** (-(total_after - seen + len(step)) / half_life)
    return weights / weights.sum()


def test_decayed_frequencies_follow_the_definition_through_rescaling() -> None:
    half_life = 1  # the weight passes 1e150 after ~500 labels: the rescale runs several times below
    learner = SITNLearner(SITNConfig(dim=8, proj_dim=8, logq_half_life_events=half_life), "movie", "book")
    enc = learner.model.encoder("target")
    rng = np.random.default_rng(0)
    steps = [rng.integers(1, 20, size=int(rng.integers(0, 12))).tolist() for _ in range(300)]
    for step in steps:
        learner._count_labels(enc, torch.tensor(step, dtype=torch.long))
    assert sum(map(len, steps)) > 1500 and float(enc.recent_state[0]) < 1e151  # rescaled, finite
    got = (enc.item_recent[:20] / enc.recent_state[1]).numpy()
    np.testing.assert_allclose(got, _direct(steps, half_life, 20), rtol=1e-9, atol=1e-300)
    assert int(enc.item_count.sum()) == sum(map(len, steps))  # all-time counts unchanged in meaning


def test_recent_labels_dominate_and_off_means_no_extra_state() -> None:
    learner = SITNLearner(SITNConfig(dim=8, proj_dim=8, logq_half_life_events=100), "movie", "book")
    enc = learner.model.encoder("target")
    learner._count_labels(enc, torch.full((1000,), 3, dtype=torch.long))  # item 3 was popular long ago
    for _ in range(10):
        learner._count_labels(enc, torch.full((100,), 5, dtype=torch.long))  # item 5 is popular now
    freq = enc.item_recent / enc.recent_state[1]
    assert float(freq[5]) > 0.99 and math.isclose(float(freq.sum()), 1.0, rel_tol=1e-12)
    off = SITNLearner(SITNConfig(dim=8, proj_dim=8), "movie", "book").model.encoder("target")
    assert not hasattr(off, "item_recent") and "item_recent" not in off.state_dict()
