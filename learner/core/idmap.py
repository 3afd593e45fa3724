"""Growing id maps (string id -> table row) and growth of the tables and optimizer state behind them.

Row 0 is padding and never belongs to an id; the first id gets row 1. Rows are never reused or
reordered, so a row number stays valid for the life of the map (and across checkpoints).

Tables grow by doubling their *capacity* (preallocated rows), so growth is rare (log2 of the catalogue
size times). Growing replaces the ``nn.Parameter`` by a larger one holding the old rows, and in every
optimizer that owns it moves the per-parameter state (Adam moments) to the new parameter, zero-padded
for the new rows. New rows start exactly like a fresh optimizer state would.

>>> ids = IdMap()
>>> ids.add(["a", "b", "a"]).tolist()
[1, 2, 1]
>>> ids.rows(["b", "zzz"]).tolist()  # unknown -> 0 (padding)
[2, 0]
>>> len(ids), ids.item_id(2)
(2, 'b')
>>> next_capacity(1024, 1025)
2048
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

PADDING_ROW = 0


class IdMap:
    """String id -> row (>= 1), append-only."""

    def __init__(self) -> None:
        self._row: dict[str, int] = {}
        self._ids: list[str] = [""]  # row 0: padding

    def __len__(self) -> int:
        """Number of real ids (rows 1..len)."""
        return len(self._ids) - 1

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    @property
    def n_rows(self) -> int:
        """Rows in use including padding, i.e. the table needs at least this many rows."""
        return len(self._ids)

    def add(self, item_ids: Iterable[str]) -> np.ndarray:
        """Rows of ``item_ids``, adding the unknown ones (int64 array)."""
        row = self._row
        item_ids = list(item_ids)
        out = list(map(row.get, item_ids))  # one C-level pass; None for the ids not known yet
        if None in out:
            ids = self._ids
            for k, r in enumerate(out):
                if r is None:  # new ids get rows in order of first occurrence
                    item_id = item_ids[k]
                    r = row.get(item_id)
                    if r is None:
                        r = len(ids)
                        row[item_id] = r
                        ids.append(item_id)
                    out[k] = r
        return np.asarray(out, dtype=np.int64)

    def rows(self, item_ids: Iterable[str]) -> np.ndarray:
        """Rows of ``item_ids`` without adding; unknown ids map to the padding row 0."""
        get = self._row.get
        return np.asarray([get(i, PADDING_ROW) for i in item_ids], dtype=np.int64)

    def row(self, item_id: str) -> int:
        return self._row.get(item_id, PADDING_ROW)

    def item_id(self, row: int) -> str:
        if not 1 <= row < len(self._ids):
            raise KeyError(f"row {row} is not a known id row; known rows are 1..{len(self)}")
        return self._ids[row]

    def ids(self) -> list[str]:
        """All ids in row order (row 1 first)."""
        return self._ids[1:]

    def state_dict(self) -> dict[str, Any]:
        return {"ids": self.ids()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> IdMap:
        out = cls()
        out.add(state["ids"])
        if len(out) != len(state["ids"]):
            raise ValueError("id map state has duplicate ids")
        return out


def next_capacity(capacity: int, needed_rows: int) -> int:
    """Smallest ``capacity * 2**k`` (k >= 0) holding ``needed_rows`` rows."""
    while capacity < needed_rows:
        capacity *= 2
    return capacity


def grow_parameter(
    module: torch.nn.Module,
    name: str,
    new_rows: int,
    init_std: float,
    optimizers: Sequence[torch.optim.Optimizer],
) -> torch.nn.Parameter:
    """Replace ``module.<name>`` (a 2-D parameter) by one with ``new_rows`` rows and fix the optimizers.

    Old rows are copied; new rows are drawn from N(0, init_std^2) with the current torch RNG. Every
    optimizer holding the old parameter gets the new one in its param group, and its per-parameter
    state tensors shaped like the parameter are zero-padded (``step`` counters are kept).
    """
    old: torch.nn.Parameter = getattr(module, name)
    old_rows = old.shape[0]
    if new_rows <= old_rows:
        return old
    with torch.no_grad():
        data = torch.empty((new_rows, *old.shape[1:]), dtype=old.dtype)
        data[:old_rows] = old.detach()
        data[old_rows:].normal_(0.0, init_std)
    new = torch.nn.Parameter(data, requires_grad=old.requires_grad)
    setattr(module, name, new)
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = opt.state.pop(old, None)
        if state is not None:
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == old.shape:
                    padded = torch.zeros((new_rows, *old.shape[1:]), dtype=value.dtype)
                    padded[:old_rows] = value
                    state[key] = padded
            opt.state[new] = state
    return new


def grow_buffer(module: torch.nn.Module, name: str, new_rows: int, fill: float | int = 0) -> None:
    """Replace buffer ``module.<name>`` by one with ``new_rows`` rows, new rows set to ``fill``."""
    old: torch.Tensor = getattr(module, name)
    if new_rows <= old.shape[0]:
        return
    new = torch.full((new_rows, *old.shape[1:]), fill, dtype=old.dtype)
    new[: old.shape[0]] = old
    module.register_buffer(name, new)
