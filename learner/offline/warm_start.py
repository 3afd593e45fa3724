"""Warm start: SITN trained offline on the start of a log, then handed to the live pipeline.

Production streaming recommenders rarely start from random weights: one pass over a stream is too little
training for id embeddings (issue 9), so the stream learner starts from a model trained in epochs on the
history so far. ``sitn train`` does that here, honestly:

1. Keep the events up to a cut-off time (``--until-fraction`` of the events, or ``--until-timestamp``);
   every event at the cut-off second is kept, so the cut is a clean one in time.
2. Choose the epoch count on a validation split *inside* that prefix (``learner.offline.eval_split``: each user's
   second-to-last target event before the cut is validation, the last one test, never read here) with
   early stopping, exactly as ``sitn eval`` selects it.
3. Retrain from the same initial state for that many epochs over the causal examples of *every* event
   up to the cut (the standard "retrain on everything with the selected budget").
4. Save the learner with its history store emptied (the live run rebuilds every history in event order)
   and ``extra["warm_start"]``: the cut-off, the event count, the epochs and the validation figure
   (``learner.core.warm_checkpoint``, the file format the live run reads).

``sitn run --warm-start MODEL`` then replays the whole file; the learner burns in the events up to the
cut-off (histories and shadow baselines learn them, no step, no ranking: ``OnlineTrainer.warm_start``),
and test-then-train starts with the first event after it, for the model and the baselines alike.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from learner.core.config import SITNConfig
from learner.core.history import RecentHistories
from learner.core.warm_checkpoint import WarmStart
from learner.offline.eval_split import chronological_split
from learner.offline.evaluate import select_epoch
from learner.offline.sitn_ranker import DEFAULT_BATCH_BY
from stream.events import InteractionEvent
from stream.user_state import UserStateStore

log = logging.getLogger(__name__)


def cut_off(events: list[InteractionEvent], until_fraction: float | None = None,
            until_timestamp: float | None = None) -> float:
    """The cut-off time: ``until_timestamp``, or the timestamp of the event at ``until_fraction`` of the
    chronological ``events`` (every event of that second is then inside).

    >>> from stream.events import InteractionEvent as E
    >>> evs = [E(str(i), "u", "i", "book", t) for i, t in enumerate([10, 20, 20, 30])]
    >>> cut_off(evs, until_fraction=0.5), cut_off(evs, until_timestamp=25)
    (20.0, 25.0)
    """
    if (until_fraction is None) == (until_timestamp is None):
        raise ValueError("give exactly one of until_fraction and until_timestamp")
    if until_timestamp is not None:
        return float(until_timestamp)
    assert until_fraction is not None
    if not 0 < until_fraction < 1:
        raise ValueError(f"until_fraction must be in (0, 1), got {until_fraction}")
    if not events:
        raise ValueError("no events to cut")
    return float(events[max(0, int(until_fraction * len(events)) - 1)].timestamp)


def train_warm_start(
    events: list[InteractionEvent],
    source: str,
    target: str,
    config: SITNConfig,
    trained_until: float,
    *,
    batch_size: int = 512,
    batch_by: str = DEFAULT_BATCH_BY,
    max_epochs: int = 30,
    patience: int = 3,
    workdir: Path | None = None,
) -> WarmStart:
    """Steps 1-4 of the module docstring over chronological ``events``; returns the trained learner."""
    from learner.offline.sitn_ranker import SITNRanker  # torch only here

    prefix = [e for e in events if e.timestamp <= trained_until]
    if not any(e.domain == target for e in prefix):
        raise ValueError(f"no {target!r} events at or before {trained_until}: nothing to train on")
    split = chronological_split(prefix, source, target, max_len=config.max_len, probe_users=0)
    if not split.validation:
        raise ValueError("no user has 3 target events before the cut-off: no validation split to choose epochs on")
    with tempfile.TemporaryDirectory(prefix="sitn-train-", dir=workdir) as tmp:
        ranker = SITNRanker("sitn", config, split, batch_size, tmp, batch_by=batch_by)
        start_s = time.perf_counter()
        selection = select_epoch(ranker, split, max_epochs=max_epochs, patience=patience, keep_initial=True)
        log.info("epochs chosen on validation epochs=%d val_ndcg@10=%.4f curve=%s", selection.epoch,
                 selection.val.get("ndcg@10", float("nan")), [round(v, 4) for v in selection.curve])
        ranker.restore(selection.initial)
        store = UserStateStore((source, target), max_len=config.max_len, max_users=max(1, split.n_users))
        examples = [store.observe(e) for e in prefix]  # causal: each sees only the events before it
        for _ in range(selection.epoch):
            ranker.learn_many(examples)
        selection.apply(ranker)  # the query-time transfer scale chosen on validation travels with the model
        log.info("retrained on every event up to the cut-off events=%d epochs=%d transfer_scale=%s s=%.1f",
                 len(prefix), selection.epoch, ranker.transfer_scale, time.perf_counter() - start_s)
    learner = ranker.learner
    # learn_many recorded every epoch's shuffled examples; the live run rebuilds histories in event order
    learner.histories = RecentHistories((source, target), config.max_len, config.max_users)
    return WarmStart(learner, float(trained_until), len(prefix), selection.epoch, selection.val.get("ndcg@10"))
