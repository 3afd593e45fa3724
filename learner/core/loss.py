"""SITN losses: sampled softmax (main), symmetric InfoNCE (I2I), swapped cross-domain ProtoNCE (I2C).

All three are pure functions of tensors; ``tests/test_loss.py`` checks each against a slow loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_view(queries: torch.Tensor, positive_vectors: torch.Tensor) -> torch.Tensor:
    """The view scoring highest on each row's positive item (ComiRec's hard view selection).

    ``queries`` (B, V, D), ``positive_vectors`` (B, D) -> (B, D). The choice carries no gradient; the
    chosen view does. With V=1 this is the single view.

    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    >>> select_view(q, torch.tensor([[0.0, 1.0]])).tolist()
    [[0.0, 2.0]]
    """
    with torch.no_grad():
        best = torch.einsum("bvd,bd->bv", queries, positive_vectors).argmax(dim=1)  # (B,)
    return queries[torch.arange(queries.shape[0]), best]  # (B, D)


def sampled_softmax_loss(
    queries: torch.Tensor,
    positive_vectors: torch.Tensor,
    positive_ids: torch.Tensor,
    positive_log_q: torch.Tensor,
    candidate_vectors: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_log_q: torch.Tensor,
) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy of each row's positive against a shared candidate set.

    ``queries`` (B, V, D): the view scoring highest on the positive is used (:func:`select_view`).
    ``positive_vectors`` (B, D), ``positive_ids`` (B,), ``positive_log_q`` (B,);
    ``candidate_vectors`` (C, D), ``candidate_ids`` (C,), ``candidate_log_q`` (C,): the negatives
    (in-batch positives and sampled items). ``log_q`` is the log of the expected number of times the
    item is drawn into the candidate set; it is subtracted from every logit (logQ correction), so
    popular items are not over-penalised for being frequent in-batch negatives. A candidate equal to
    the row's positive (an accidental hit, including the row's own in-batch column) is masked out.

    Row i's logits: ``[s(i, pos_i) - log_q(pos_i), s(i, c_j) - log_q(c_j) for j with c_j != pos_i]``,
    label 0.

    >>> q = torch.tensor([[[1.0]]])
    >>> loss = sampled_softmax_loss(q, torch.tensor([[1.0]]), torch.tensor([5]), torch.tensor([0.0]),
    ...                             torch.tensor([[1.0], [0.0]]), torch.tensor([5, 7]), torch.zeros(2))
    >>> round(loss.item(), 4)  # log(1 + e^-1): candidate 5 is the positive itself and is masked
    0.3133
    """
    chosen = select_view(queries, positive_vectors)  # (B, D)
    pos_logit = (chosen * positive_vectors).sum(dim=-1) - positive_log_q  # (B,)
    cand_logit = chosen @ candidate_vectors.T - candidate_log_q  # (B, C)
    hit = positive_ids[:, None] == candidate_ids[None, :]  # (B, C)
    cand_logit = cand_logit.masked_fill(hit, float("-inf"))
    logits = torch.cat([pos_logit[:, None], cand_logit], dim=1)  # (B, 1 + C)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def info_nce_i2i(
    z_source: torch.Tensor,
    z_target: torch.Tensor,
    user_keys: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, int]:
    """Symmetric InfoNCE between each user's source and target summaries; returns (loss, pairs).

    ``z_source``, ``z_target`` (B, P), unit norm; ``user_keys`` (B,) long, equal for rows of the same
    user; ``valid`` (B,) bool: rows with history in both domains (the only rows taking part). Among valid
    rows, row i's positive is column i; another row of the *same* user is masked (it is neither a
    negative nor a second positive). Loss = (CE(S/tau) + CE(S^T/tau)) / 2 with S = Z_s Z_t^T. With fewer
    than two valid rows there is no negative: the loss is 0.

    >>> z = torch.eye(2)
    >>> loss, pairs = info_nce_i2i(z, z, torch.tensor([0, 1]), torch.tensor([True, True]), tau=1.0)
    >>> pairs, round(loss.item(), 4)  # log(1 + e^-1)
    (2, 0.3133)
    >>> info_nce_i2i(z, z, torch.tensor([3, 3]), torch.tensor([True, True]), tau=1.0)[0].item()
    0.0
    """
    zs, zt, keys = z_source[valid], z_target[valid], user_keys[valid]
    n = int(zs.shape[0])
    if n < 2:
        return z_source.sum() * 0.0, n
    sim = zs @ zt.T / tau  # (n, n)
    same_user = keys[:, None] == keys[None, :]  # (n, n)
    same_user.fill_diagonal_(False)
    sim = sim.masked_fill(same_user, float("-inf"))
    labels = torch.arange(n)
    loss = 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))
    return loss, n


def swapped_proto_nce(
    z_source: torch.Tensor,
    z_target: torch.Tensor,
    centroids_source: torch.Tensor,
    concentration_source: torch.Tensor,
    centroids_target: torch.Tensor,
    concentration_target: torch.Tensor,
    labels_source: torch.Tensor,
    labels_target: torch.Tensor,
) -> torch.Tensor:
    """Swapped cross-domain ProtoNCE for one granularity (rows: users with both histories).

    The source summary of user u is classified against the *target* prototypes with u's target
    assignment as the label, and the target summary against the source prototypes with u's source
    assignment; PCL logits are ``<z, c_k> / phi_k``. Centroids and concentrations carry no gradient.

    ``z_*`` (B, P) unit norm; ``centroids_*`` (K, P) unit norm; ``concentration_*`` (K,) > 0;
    ``labels_*`` (B,) long: the prototype of the row's *own* summary in that domain.

    >>> c = torch.eye(2)
    >>> z = torch.eye(2)
    >>> phi = torch.ones(2)
    >>> labels = torch.tensor([0, 1])
    >>> round(swapped_proto_nce(z, z, c, phi, c, phi, labels, labels).item(), 4)
    0.3133
    """
    ct, phit = centroids_target.detach(), concentration_target.detach()
    cs, phis = centroids_source.detach(), concentration_source.detach()
    loss_st = F.cross_entropy(z_source @ ct.T / phit, labels_target)  # (B, K) logits
    loss_ts = F.cross_entropy(z_target @ cs.T / phis, labels_source)
    return 0.5 * (loss_st + loss_ts)
