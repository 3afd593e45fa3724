"""Growing id maps and table growth with consistent optimizer state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from learner.core.idmap import IdMap, grow_buffer, grow_parameter, next_capacity

torch.set_num_threads(1)


def test_rows_are_stable_and_unknown_maps_to_padding() -> None:
    ids = IdMap()
    assert ids.add(["x", "y", "x", "z"]).tolist() == [1, 2, 1, 3]
    assert ids.add(["z", "w"]).tolist() == [3, 4]
    assert ids.rows(["w", "nope", "x"]).tolist() == [4, 0, 1]
    assert (len(ids), ids.n_rows, ids.ids()) == (4, 5, ["x", "y", "z", "w"])
    assert "y" in ids and "nope" not in ids
    assert ids.row("nope") == 0
    with pytest.raises(KeyError, match=r"row 0 is not a known id row; known rows are 1..4"):
        ids.item_id(0)


def test_state_round_trip() -> None:
    ids = IdMap()
    ids.add(["b", "a", "c"])
    copy = IdMap.from_state_dict(ids.state_dict())
    assert copy.ids() == ["b", "a", "c"]
    assert copy.rows(["a", "c"]).tolist() == [2, 3]


def test_next_capacity_doubles() -> None:
    assert [next_capacity(4, n) for n in (1, 4, 5, 9, 17)] == [4, 4, 8, 16, 32]


class Table(torch.nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(rows * 2, dtype=torch.float32).view(rows, 2))
        self.register_buffer("count", torch.arange(rows))


def sparse_step(table: Table, opt: torch.optim.Optimizer, rows: list[int]) -> None:
    opt.zero_grad()
    F.embedding(torch.tensor(rows), table.weight, sparse=True).sum().backward()
    opt.step()


def test_grow_parameter_keeps_rows_and_pads_optimizer_state() -> None:
    torch.manual_seed(0)
    table = Table(4)
    opt = torch.optim.SparseAdam([table.weight], lr=0.1)
    sparse_step(table, opt, [1, 2])
    old = table.weight
    old_rows = old.detach().clone()
    old_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[old].items()}
    new = grow_parameter(table, "weight", 8, init_std=0.5, optimizers=[opt])
    assert table.weight is new and new.shape == (8, 2)
    assert torch.equal(new.detach()[:4], old_rows)
    assert float(new.detach()[4:].abs().sum()) > 0  # new rows drawn from N(0, 0.5^2)
    assert opt.param_groups[0]["params"] == [new] and old not in opt.state
    state = opt.state[new]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == (8, 2)
        assert torch.equal(state[key][:4], old_state[key])
        assert torch.equal(state[key][4:], torch.zeros(4, 2))
    # the optimizer keeps working on the new parameter, including new rows
    before = new.detach().clone()
    sparse_step(table, opt, [6])
    changed = (table.weight.detach() != before).any(dim=1).tolist()
    assert changed == [False] * 6 + [True, False]


def test_grow_parameter_never_shrinks_and_grow_buffer_fills() -> None:
    table = Table(4)
    assert grow_parameter(table, "weight", 3, 0.1, []) is table.weight
    grow_buffer(table, "count", 6, fill=-1)
    assert table.count.tolist() == [0, 1, 2, 3, -1, -1]
    assert "count" in dict(table.named_buffers())


def test_lazy_adam_matches_sparse_adam_and_survives_growth() -> None:
    from learner.core.optim import LazyAdam

    torch.manual_seed(1)
    ours, ref = Table(6), Table(6)
    opt_ours = LazyAdam([ours.weight], lr=0.05)
    opt_ref = torch.optim.SparseAdam([ref.weight], lr=0.05)
    steps = [[1, 2, 2], [4], [1, 5, 0], [2]]
    for rows in steps:
        for table, opt in ((ours, opt_ours), (ref, opt_ref)):
            opt.zero_grad()
            idx = torch.tensor(rows)
            (F.embedding(idx, table.weight, sparse=True) * torch.arange(1.0, 1.0 + 2 * len(rows)).view(-1, 2)).sum().backward()
            opt.step()
    torch.testing.assert_close(ours.weight.detach(), ref.weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(opt_ours.state[ours.weight]["exp_avg_sq"], opt_ref.state[ref.weight]["exp_avg_sq"],
                               atol=1e-6, rtol=0)
    grow_parameter(ours, "weight", 12, 0.1, [opt_ours])
    sparse_step(ours, opt_ours, [11, 1])
    assert opt_ours.state[ours.weight]["step"] == len(steps) + 1


def test_lazy_adam_skip_zero_rows_leaves_a_row_with_zero_gradient_alone() -> None:
    from learner.core.optim import LazyAdam

    def run(skip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        table = Table(4)
        torch.nn.init.zeros_(table.weight)
        opt = LazyAdam([table.weight], lr=0.1, skip_zero_rows=skip)
        for rows, weights in (([1, 2], [1.0, 1.0]), ([1, 2], [1.0, 0.0])):  # row 2: a gradient, then a zero one
            opt.zero_grad()
            looked_up = F.embedding(torch.tensor(rows), table.weight, sparse=True)  # (2, D)
            (looked_up * torch.tensor(weights).view(-1, 1)).sum().backward()
            opt.step()
        return table.weight.detach().clone(), opt.state[table.weight]["exp_avg"].clone()

    moved, moments = run(skip=False)
    kept, kept_moments = run(skip=True)
    torch.testing.assert_close(kept[1], moved[1])  # a row with a gradient moves the same either way
    # without the skip, row 2 moved a second time on its momentum alone (-0.1, then -0.067 more)
    assert float(moved[2, 0]) < -0.15 and float(kept[2, 0]) == pytest.approx(-0.1, abs=1e-6)
    torch.testing.assert_close(kept_moments[2], torch.full_like(kept_moments[2], 0.1))  # moments not decayed
    assert float(moments[2, 0]) == pytest.approx(0.09, abs=1e-6)
    assert not kept[[0, 3]].any()  # rows never looked up stay where they were
