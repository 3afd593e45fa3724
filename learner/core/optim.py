"""Lazy Adam for the item tables: the update of ``torch.optim.SparseAdam``, done with index operations.

Only rows present in the (sparse) gradient move; their moments decay only when they are touched, and
bias correction uses the table's step count (as SparseAdam does). ``torch.optim.SparseAdam`` spends
most of its time in ``sparse_mask`` over the whole table; gathering the touched rows, updating them and
scattering back is several times cheaper for a 100k-row table and a few thousand touched rows.
State keys (``step``, ``exp_avg``, ``exp_avg_sq``) are SparseAdam's, so table growth
(:func:`learner.core.idmap.grow_parameter`) pads them the same way.

>>> w = torch.nn.Parameter(torch.zeros(3, 2))
>>> opt = LazyAdam([w], lr=0.1)
>>> torch.nn.functional.embedding(torch.tensor([1]), w, sparse=True).sum().backward()
>>> opt.step()
>>> [[round(x, 4) for x in row] for row in w.detach().tolist()]  # row 1 moves by -lr * sign(grad)
[[0.0, 0.0], [-0.1, -0.1], [0.0, 0.0]]
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam over the rows a sparse gradient touches, with optional decoupled weight decay on those rows
    (AdamW's ``row *= 1 - lr * weight_decay``, applied only to the touched rows: an item that is not in
    the batch is neither updated nor decayed)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        skip_zero_rows: bool = False,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        # True: a row whose gradient is exactly zero (looked up, but nothing downstream needed it: a dropped
        # history token, a detached path) is not touched, so it neither decays its moments nor keeps moving on
        # its old momentum. After a single gradient g on a fresh row, a zero touch leaves m / sqrt(v) =
        # 0.9 * 0.1 g / sqrt(0.999 * 0.001 g^2) = 2.85 (default betas), so once the bias corrections are near 1
        # it moves the row by about 2.85 x lr along g, and by beta1 times that at each further zero touch.
        self.skip_zero_rows = skip_zero_rows

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("LazyAdam needs sparse gradients (F.embedding(..., sparse=True))")
                grad = p.grad.coalesce()
                rows = grad.indices()[0]  # (R,) unique touched rows
                values = grad.values()  # (R, D)
                if self.skip_zero_rows:
                    moved = values.ne(0).any(dim=1)  # (R,)
                    rows, values = rows[moved], values[moved]
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                m = exp_avg.index_select(0, rows).mul_(beta1).add_(values, alpha=1 - beta1)  # (R, D)
                v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                exp_avg.index_copy_(0, rows, m)
                exp_avg_sq.index_copy_(0, rows, v)
                decay = group.get("weight_decay", 0.0)
                if decay > 0:
                    p.index_copy_(0, rows, p.index_select(0, rows).mul_(1.0 - group["lr"] * decay))
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)
