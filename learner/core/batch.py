"""Tensorising examples: histories -> padded (B, L) tensors, with numpy scatter instead of token loops.

Layout of one domain's histories: items left-aligned, oldest first, padded on the right to the longest
history in the batch (at most ``max_len``; longer histories keep their last ``max_len`` items).
``positions`` count recency (0 = newest item). ``gaps`` hold ``time_gap_bucket(reference - item time)``
where the reference is the event's timestamp for a training example, and the newest timestamp in the
user's histories for a query (the next event's time is unknown when serving).

>>> ids = IdMap()
>>> seq = encode_histories([(("a", "b"), (0, 86_400)), ((), ())], np.array([86_400, 0]), ids,
...                        max_len=50, n_gap_buckets=16, add=True)
>>> seq.items.tolist(), seq.positions.tolist(), seq.gaps.tolist(), seq.valid.tolist()
([[1, 2], [0, 0]], [[1, 0], [0, 0]], [[2, 1], [0, 0]], [[True, True], [False, False]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from learner.core.idmap import IdMap
from learner.core.model import SequenceBatch
from stream.user_state import Example

History = tuple[tuple[str, ...], tuple[int, ...]]  # (item_ids, timestamps), oldest first
SECONDS_PER_DAY = 86_400


def time_gap_bucket(gap_s: np.ndarray, n_buckets: int) -> np.ndarray:
    """``floor(log2(1 + gap_days))`` clipped to ``[0, n_buckets - 1]``, plus 1 (0 is padding).

    >>> time_gap_bucket(np.array([0, 86_400, 3 * 86_400, -5, 10**9]), 4).tolist()
    [1, 2, 3, 1, 4]
    """
    days = np.maximum(gap_s, 0).astype(np.float64) / SECONDS_PER_DAY
    bucket = np.floor(np.log2(1.0 + days)).astype(np.int64)
    return np.minimum(bucket, n_buckets - 1) + 1


def encode_histories(
    histories: Sequence[History],
    reference_ts: np.ndarray,
    idmap: IdMap,
    max_len: int,
    n_gap_buckets: int,
    add: bool,
    trained_rows: np.ndarray | None = None,
) -> SequenceBatch:
    """Pad one domain's histories into a :class:`SequenceBatch`.

    ``add=True`` registers unknown items (training); ``add=False`` drops them from the history
    (inference: an item the model never saw carries no information). ``trained_rows`` (inference only,
    bool per row) also drops items registered but never trained: their rows are still random.
    """
    b = len(histories)
    kept = [(h[0][-max_len:], h[1][-max_len:]) for h in histories]
    lengths = np.fromiter((len(h[0]) for h in kept), dtype=np.int64, count=b)
    flat_items = chain.from_iterable(h[0] for h in kept)
    rows = idmap.add(flat_items) if add else idmap.rows(flat_items)
    ts = np.fromiter(chain.from_iterable(h[1] for h in kept), dtype=np.int64, count=int(lengths.sum()))
    owner = np.repeat(np.arange(b), lengths)  # batch row of each token
    if not add:
        known = rows != 0
        if trained_rows is not None:
            known &= trained_rows[rows]
        rows, ts, owner = rows[known], ts[known], owner[known]
        lengths = np.bincount(owner, minlength=b).astype(np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    starts = np.cumsum(lengths) - lengths  # (B,)
    col = np.arange(rows.shape[0]) - np.repeat(starts, lengths)  # column of each token
    items = np.zeros((b, width), dtype=np.int64)
    items[owner, col] = rows
    valid = np.zeros((b, width), dtype=bool)
    valid[owner, col] = True
    positions = np.where(valid, lengths[:, None] - 1 - np.arange(width)[None, :], 0)  # (B, W)
    gaps = np.zeros((b, width), dtype=np.int64)
    gaps[owner, col] = time_gap_bucket(reference_ts[owner] - ts, n_gap_buckets)
    return SequenceBatch(
        items=torch.from_numpy(items),
        positions=torch.from_numpy(positions),
        gaps=torch.from_numpy(gaps),
        valid=torch.from_numpy(valid),
    )


def latest_timestamp(histories: Sequence[Mapping[str, History]], domains: Sequence[str] | None = None) -> np.ndarray:
    """Newest timestamp over ``domains`` (default: all) of each user's histories (0 for an empty history)."""
    def newest(per_domain: Mapping[str, History]) -> int:
        seqs = per_domain.values() if domains is None else (per_domain.get(d, ((), ())) for d in domains)
        return max((h[1][-1] for h in seqs if h[1]), default=0)

    return np.fromiter(
        (newest(per_domain) for per_domain in histories),
        dtype=np.int64,
        count=len(histories),
    )


@dataclass
class TrainingBatch:
    """Tensors for one ``learn_many`` step."""

    sequences: dict[str, SequenceBatch]  # per role
    event_role: torch.Tensor  # (B,) long: 0 = source-domain event, 1 = target-domain event
    label_rows: torch.Tensor  # (B,) long: row of the event item in its domain's table
    user_keys: torch.Tensor  # (B,) long: equal for examples of the same user


def build_training_batch(
    examples: Sequence[Example],
    domains: Mapping[str, str],
    idmaps: Mapping[str, IdMap],
    max_len: int,
    n_gap_buckets: int,
) -> TrainingBatch:
    """Tensorise ``examples``; registers every history and label item in ``idmaps``.

    ``domains`` and ``idmaps`` are keyed by role (``"source"``/``"target"``, or only ``"target"`` for
    a single-domain model). An example whose domain is not among ``domains`` is a ``ValueError``.
    """
    role_of = {name: role for role, name in domains.items()}
    for ex in examples:
        if ex.domain not in role_of:
            raise ValueError(f"example {ex.event_id!r} has domain {ex.domain!r}; allowed: {sorted(role_of)}")
    event_role = np.fromiter((role_of[ex.domain] == "target" for ex in examples), dtype=np.int64,
                             count=len(examples))  # 0 = source, 1 = target
    label_rows = np.empty(len(examples), dtype=np.int64)
    for role, idx in (("source", 0), ("target", 1)):
        if role in domains:
            mine = np.flatnonzero(event_role == idx)  # in example order: new ids get rows as they come
            label_rows[mine] = idmaps[role].add([examples[int(i)].item_id for i in mine])
    user_keys: dict[str, int] = {}
    keys = np.fromiter((user_keys.setdefault(ex.user_id, len(user_keys)) for ex in examples), dtype=np.int64,
                       count=len(examples))
    reference = np.fromiter((ex.timestamp for ex in examples), dtype=np.int64, count=len(examples))
    empty: History = ((), ())
    sequences = {
        role: encode_histories(
            [ex.history.get(name, empty) for ex in examples], reference, idmaps[role], max_len,
            n_gap_buckets, add=True,
        )
        for role, name in domains.items()
    }
    return TrainingBatch(
        sequences=sequences,
        event_role=torch.from_numpy(event_role),
        label_rows=torch.from_numpy(label_rows),
        user_keys=torch.from_numpy(keys),
    )
