"""A warm-start model file: a learner checkpoint with the record of what it was trained on.

``sitn train`` (``learner.offline.warm_start``) writes it; ``sitn run --warm-start MODEL`` reads it, the driver for
the model's config (:func:`warm_start_config`) and the learner actor for the model (:func:`load_warm_start`).
The record is ``extra["warm_start"]``: the cut-off (every event at or before it was trained on), the event
count, the epochs and the validation NDCG@10. A checkpoint without it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.core.config import SITNConfig

EXTRA_KEY = "warm_start"


@dataclass
class WarmStart:
    """An offline-trained learner and what it was trained on."""

    learner: Any  # learner.core.learner.SITNLearner
    trained_until: float  # unix seconds: every event at or before it was trained on
    events: int
    epochs: int
    validation_ndcg_at_10: float | None = None


def save_warm_start(warm: WarmStart, path: Path) -> None:
    """Write ``warm``'s learner to ``path`` as a checkpoint holding the record of what it was trained on."""
    extra = {EXTRA_KEY: {"trained_until": warm.trained_until, "events": warm.events, "epochs": warm.epochs,
                         "validation_ndcg_at_10": warm.validation_ndcg_at_10}}
    warm.learner.save(path, extra=extra)


def _warm_state(path: Path | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's state and its ``sitn train`` record; a checkpoint of another kind is refused."""
    from learner.core.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    info = state.get("extra", {}).get(EXTRA_KEY)
    if not isinstance(info, dict) or "trained_until" not in info:
        raise ValueError(f"{path} is not a `sitn train` model (no {EXTRA_KEY!r} record of what it was trained on)")
    return state, info


def warm_start_config(path: Path | str) -> tuple[SITNConfig, dict[str, Any]]:
    """The model's config and what it was trained on, without building the model (for ``sitn run``'s driver)."""
    state, info = _warm_state(path)
    return SITNConfig.from_dict(state["config"]), info


def load_warm_start(path: Path | str) -> WarmStart:
    """A model written by ``sitn train``, rebuilt; a checkpoint of another kind is refused with the reason."""
    from learner.core.learner import SITNLearner

    state, info = _warm_state(path)
    learner = SITNLearner.from_state_dict(state)
    return WarmStart(learner, float(info["trained_until"]), int(info["events"]), int(info["epochs"]),
                     info.get("validation_ndcg_at_10"))
