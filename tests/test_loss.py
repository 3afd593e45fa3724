"""The three SITN losses against slow, obviously-correct loops (tolerance 1e-5 absolute)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.core.loss import info_nce_i2i, sampled_softmax_loss, select_view, swapped_proto_nce

torch.set_num_threads(1)
TOL = 1e-5


def logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a.tolist(), b.tolist(), strict=True))


def reference_sampled_softmax(q, pos, pos_ids, pos_lq, cand, cand_ids, cand_lq) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        view_scores = [dot(q[i, v], pos[i]) for v in range(q.shape[1])]
        v_best = max(range(len(view_scores)), key=lambda v: view_scores[v])
        query = q[i, v_best]
        logits = [dot(query, pos[i]) - float(pos_lq[i])]
        for j in range(cand.shape[0]):
            if int(cand_ids[j]) != int(pos_ids[i]):
                logits.append(dot(query, cand[j]) - float(cand_lq[j]))
        total += logsumexp(logits) - logits[0]
    return total / q.shape[0]


def random_case(seed: int, b: int = 6, v: int = 3, d: int = 5, s: int = 4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, v, d, generator=g)
    pos_ids = torch.tensor([3, 7, 3, 9, 1, 7][:b])  # duplicates: rows 0/2 and 1/5 share items
    table = torch.randn(12, d, generator=g)
    sampled = torch.tensor([7, 2, 11, 3][:s])  # includes accidental hits
    cand_ids = torch.cat([pos_ids, sampled])
    log_q = torch.randn(12, generator=g)
    return q, table[pos_ids], pos_ids, log_q[pos_ids], table[cand_ids], cand_ids, log_q[cand_ids]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_softmax_matches_reference_loop(seed: int) -> None:
    args = random_case(seed)
    fast = sampled_softmax_loss(*args).item()
    assert fast == pytest.approx(reference_sampled_softmax(*args), abs=TOL)


def test_select_view_picks_view_scoring_highest_on_positive() -> None:
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]])
    assert select_view(q, torch.tensor([[1.0, 0.2]])).tolist() == [[1.0, 0.0]]
    assert select_view(q, torch.tensor([[0.1, 1.0]])).tolist() == [[0.0, 1.0]]


def test_single_view_is_plain_sampled_softmax() -> None:
    q, pos, pos_ids, pos_lq, cand, cand_ids, cand_lq = random_case(3, v=1)
    fast = sampled_softmax_loss(q, pos, pos_ids, pos_lq, cand, cand_ids, cand_lq).item()
    assert fast == pytest.approx(reference_sampled_softmax(q, pos, pos_ids, pos_lq, cand, cand_ids, cand_lq), abs=TOL)


def test_logq_constant_shift_changes_nothing_and_popular_negative_costs_less() -> None:
    q, pos, pos_ids, pos_lq, cand, cand_ids, cand_lq = random_case(4)
    base = sampled_softmax_loss(q, pos, pos_ids, pos_lq, cand, cand_ids, cand_lq).item()
    shifted = sampled_softmax_loss(q, pos, pos_ids, pos_lq + 2.5, cand, cand_ids, cand_lq + 2.5).item()
    assert shifted == pytest.approx(base, abs=TOL)
    # Item 11 (sampled only, never a positive) becomes very frequent: its logit drops by log q, so
    # it is penalised less and the loss falls.
    popular = cand_lq.clone()
    popular[cand_ids == 11] += 3.0
    corrected = sampled_softmax_loss(q, pos, pos_ids, pos_lq, cand, cand_ids, popular).item()
    assert corrected < base - 1e-3
    assert corrected == pytest.approx(
        reference_sampled_softmax(q, pos, pos_ids, pos_lq, cand, cand_ids, popular), abs=TOL
    )


def test_accidental_hits_are_masked() -> None:
    # one row, the positive (id 5) also appears twice among the candidates: both copies are ignored
    q = torch.tensor([[[1.0, 0.0]]])
    pos = torch.tensor([[1.0, 0.0]])
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    loss = sampled_softmax_loss(q, pos, torch.tensor([5]), torch.zeros(1), cand, torch.tensor([5, 6, 5]),
                                torch.zeros(3))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=TOL)


def reference_info_nce(zs, zt, keys, valid, tau) -> float:
    rows = [i for i in range(zs.shape[0]) if valid[i]]
    if len(rows) < 2:
        return 0.0
    total = 0.0
    for a, b in ((zs, zt), (zt, zs)):
        for i in rows:
            logits = []
            for j in rows:
                if j != i and int(keys[j]) == int(keys[i]):
                    continue  # another row of the same user: neither positive nor negative
                logits.append((dot(a[i], b[j]) / tau, j == i))
            pos = next(v for v, is_pos in logits if is_pos)
            total += logsumexp([v for v, _ in logits]) - pos
    return total / (2 * len(rows))


def unit_rows(seed: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_info_nce_matches_reference_with_duplicates_and_one_sided_users() -> None:
    zs, zt = unit_rows(0, 7, 4), unit_rows(1, 7, 4)
    keys = torch.tensor([0, 1, 0, 2, 3, 1, 4])  # users 0 and 1 appear twice
    valid = torch.tensor([True, True, True, False, True, True, False])  # rows 3, 6 lack a domain
    loss, pairs = info_nce_i2i(zs, zt, keys, valid, tau=0.1)
    assert pairs == 5
    assert loss.item() == pytest.approx(reference_info_nce(zs, zt, keys, valid, 0.1), abs=TOL)


def test_info_nce_ignores_rows_without_both_domains() -> None:
    zs, zt = unit_rows(2, 5, 3), unit_rows(3, 5, 3)
    keys = torch.arange(5)
    valid = torch.tensor([True, False, True, True, False])
    loss, pairs = info_nce_i2i(zs, zt, keys, valid, tau=0.2)
    only, only_pairs = info_nce_i2i(zs[valid], zt[valid], keys[valid], torch.ones(3, dtype=torch.bool), tau=0.2)
    assert (pairs, only_pairs) == (3, 3)
    assert loss.item() == pytest.approx(only.item(), abs=TOL)


def test_info_nce_duplicate_user_is_not_a_negative() -> None:
    # Two rows of the same user with identical summaries: unmasked, each would be a hard negative.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss, _ = info_nce_i2i(z, z, torch.tensor([0, 0, 1]), torch.ones(3, dtype=torch.bool), tau=1.0)
    # rows 0 and 1 each see only {self: 1, user 1: 0}; row 2 sees {self: 1, 0, 0}
    expected = (2 * math.log(1 + math.exp(-1.0)) + math.log(1 + 2 * math.exp(-1.0))) / 3
    assert loss.item() == pytest.approx(expected, abs=TOL)


def reference_swapped_proto(zs, zt, cs, phis, ct, phit, ls, lt) -> float:
    total = 0.0
    for i in range(zs.shape[0]):
        logits = [dot(zs[i], ct[k]) / float(phit[k]) for k in range(ct.shape[0])]
        total += 0.5 * (logsumexp(logits) - logits[int(lt[i])])
        logits = [dot(zt[i], cs[k]) / float(phis[k]) for k in range(cs.shape[0])]
        total += 0.5 * (logsumexp(logits) - logits[int(ls[i])])
    return total / zs.shape[0]


def test_swapped_proto_nce_matches_reference_and_blocks_centroid_gradients() -> None:
    zs = unit_rows(4, 6, 5).requires_grad_(True)
    zt = unit_rows(5, 6, 5)
    cs, ct = unit_rows(6, 3, 5).requires_grad_(True), unit_rows(7, 3, 5)
    phis, phit = torch.tensor([0.05, 0.1, 0.2]), torch.tensor([0.15, 0.1, 0.05])
    ls, lt = torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([1, 1, 0, 2, 0, 2])
    loss = swapped_proto_nce(zs, zt, cs, phis, ct, phit, ls, lt)
    assert loss.item() == pytest.approx(reference_swapped_proto(zs, zt, cs, phis, ct, phit, ls, lt), abs=TOL)
    loss.backward()
    assert zs.grad is not None and float(zs.grad.abs().sum()) > 0
    assert cs.grad is None  # centroids carry no gradient
