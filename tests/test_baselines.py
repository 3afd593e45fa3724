"""Popularity and river's online MF behind the evaluation's ranker interface."""

from __future__ import annotations

import numpy as np
import pytest

from learner.baselines import OnlineMF, Popularity
from stream.events import InteractionEvent


def _events() -> list[InteractionEvent]:
    rows = [("u1", "b1", "book"), ("u2", "b1", "book"), ("u1", "m1", "movie"), ("u3", "b2", "book"),
            ("u3", "b1", "book"), ("u2", "m1", "movie")]
    return [InteractionEvent(f"e{i}", u, item, d, 1_000 + i) for i, (u, item, d) in enumerate(rows)]


def test_popularity_counts_training_target_events() -> None:
    pop = Popularity("book", ["b1", "b2", "b3"])
    pop.partial_fit(_events())
    scores = pop.score(["u1", None], [{}, {}])
    assert scores.tolist() == [[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]]
    state = pop.snapshot()
    pop.partial_fit(_events())
    assert pop.counts.tolist() == [6.0, 2.0, 0.0]
    pop.restore(state)
    assert pop.counts.tolist() == [3.0, 1.0, 0.0]


def test_online_mf_learns_a_separable_pattern() -> None:
    # Two groups of users: group A reads a0..a4, group B reads b0..b4. After training, each group's
    # held-out users must rank their own group's items above the other group's.
    catalogue = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    events, t = [], 0
    for epoch_user in range(40):
        group = "a" if epoch_user % 2 == 0 else "b"
        for i in range(5):
            events.append(InteractionEvent(f"e{t}", f"u{epoch_user}", f"{group}{i}", "book", t))
            t += 1
    mf = OnlineMF("book", catalogue, n_factors=4, learning_rate=0.05, negatives_per_positive=2, seed=1)
    for _ in range(30):
        mf.partial_fit(events)
    scores = mf.score(["u0", "u1"], [{}, {}])
    assert scores.shape == (2, 10) and scores.dtype == np.float32
    assert scores[0, :5].min() > scores[0, 5:].max()
    assert scores[1, 5:].min() > scores[1, :5].max()
    # Cold start: fold-in from a history of group-B items ranks group B first.
    cold = mf.score([None], [{"book": (("b0", "b1"), (1, 2))}])
    assert cold[0, 5:].min() > cold[0, :5].max()


def test_online_mf_untrained_items_score_zero_and_snapshot_restores() -> None:
    mf = OnlineMF("book", ["b1", "never"], n_factors=3, seed=0)
    mf.partial_fit(_events())
    scores = mf.score([None], [{}])  # no history -> user vector 0 -> item bias only
    assert scores[0, 1] == 0.0
    state = mf.snapshot()
    before = mf.score(["u1"], [{}])
    mf.partial_fit(_events())
    assert not np.allclose(mf.score(["u1"], [{}]), before)
    mf.restore(state)
    np.testing.assert_allclose(mf.score(["u1"], [{}]), before, rtol=0, atol=1e-7)


def test_online_mf_rejects_negative_negatives() -> None:
    with pytest.raises(ValueError, match="negatives_per_positive must be >= 0, got -1"):
        OnlineMF("book", ["b1"], negatives_per_positive=-1)
