"""The SITN module: two domain encoders, gated transfer in both directions, projection heads.

Roles, not domain names, key the modules: ``"source"`` and ``"target"`` (the learner maps names).

Query vectors of a domain combine that domain's own interests with a learned map of the other
domain's interests, view by view (view v of one domain is mapped onto view v of the other; the view
queries of both encoders are learned jointly, so they can align):

    m_v = W_map other_v (+ b_map)                (D -> D; b_map only with transfer_map_bias)
    g_v = sigmoid(W_gate [own_v ; m_v] + b)      (use_transfer_gate; else g_v = 1; b starts at
                                                  gate_init_bias < 0, so transfer starts nearly closed)
    q_v = own_v + g_v * m_v                      -> (B, V, D)

A user with no target history has ``own_v = 0``, so the target queries come from the source side
alone (the cold-start case). Without ``b_map`` (the default) an empty other-domain history transfers
nothing (``m_v = 0``), and a user with no history at all gets ``q_v = 0``: the items rank by their
learned bias (``item_bias``). With ``b_map`` every query carries ``g_v * b_map``, a learned global offset
that Adam grows each step whatever the histories hold (issue 9, Movie->Book validation, seed 0: with no
cross-domain history anywhere in training, that offset alone took NDCG@10 from 0.0171 to 0.0155; its norm
reached about 12 after 900 steps, against about 8 for a user's own interest vector).

Summaries for I2I and I2C: mean of a domain's *own* views (before transfer, so the two sides are not
trivially equal) -> 2-layer projection head (one per domain) -> L2 normalisation. The I2I loss aligns
the two heads' outputs, so source and target summaries live in one shared space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from learner.core.config import SITNConfig
from learner.core.encoder import DomainEncoder

ROLES = ("source", "target")


def with_bias_coordinate(queries: torch.Tensor) -> torch.Tensor:
    """``queries`` (..., D) with the last coordinate set to 1, so that <q, e_i> = <q', e_i'> + e_i[-1]:
    the last coordinate of every item row is that item's learned bias (``SITNConfig.item_bias``). The
    score stays one inner product, so serving's FAISS index needs nothing new.

    >>> with_bias_coordinate(torch.tensor([[0.5, -2.0, 3.0]])).tolist()
    [[0.5, -2.0, 1.0]]
    """
    return torch.cat([queries[..., :-1], torch.ones_like(queries[..., -1:])], dim=-1)


class InterestTransfer(nn.Module):
    """Adds the gated, mapped interests of the other domain to a domain's own interests."""

    def __init__(self, dim: int, gated: bool, gate_init_bias: float = 0.0, map_bias: bool = True,
                 rank: int = 0) -> None:
        super().__init__()
        # no bias: an empty other-domain history maps to 0; rank > 0: W = U V^T through a rank-r bottleneck
        self.map: nn.Module = (
            nn.Linear(dim, dim, bias=map_bias) if rank <= 0
            else nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=map_bias))
        )
        self.gate = nn.Linear(2 * dim, dim) if gated else None
        if self.gate is not None:
            nn.init.constant_(self.gate.bias, gate_init_bias)  # negative: the gate starts (nearly) closed

    def forward(self, own: torch.Tensor, other: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``own``, ``other`` (B, V, D) -> queries (B, V, D); ``scale`` (a number or (B, 1, 1)) multiplies the
        transferred part (the query-time transfer scale, ``SITNModel.transfer_scale``)."""
        mapped = self.map(other)  # (B, V, D)
        if self.gate is not None:
            mapped = torch.sigmoid(self.gate(torch.cat([own, mapped], dim=-1))) * mapped  # (B, V, D)
        return own + mapped if isinstance(scale, float) and scale == 1.0 else own + scale * mapped


class ProjectionHead(nn.Module):
    """Mean of views -> Linear -> GELU -> Linear -> L2 normalise."""

    def __init__(self, dim: int, proj_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """``views`` (B, V, D) -> (B, P), unit norm."""
        return F.normalize(self.net(views.mean(dim=1)), dim=-1)


@dataclass
class SequenceBatch:
    """Tensors of one domain's histories, all (B, L); see :mod:`learner.core.batch`."""

    items: torch.Tensor  # long, item rows, 0 = padding
    positions: torch.Tensor  # long, recency (0 = newest)
    gaps: torch.Tensor  # long, time-gap bucket + 1, 0 = padding
    valid: torch.Tensor  # bool


@dataclass
class Interests:
    """What the model computes for a batch of users; each dict is keyed by role."""

    views: dict[str, torch.Tensor]  # (B, V, D) own interests, zero where no history
    has_history: dict[str, torch.Tensor]  # (B,) bool
    queries: dict[str, torch.Tensor]  # (B, V, D) after transfer
    own_queries: dict[str, torch.Tensor] | None = None  # (B, V, D) own interests alone (transfer_residual training)


class SITNModel(nn.Module):
    """Both domain encoders (only the target one when ``use_source=False``), transfer and heads."""

    def __init__(self, config: SITNConfig) -> None:
        super().__init__()
        self.config = config
        # Query-time transfer scale of the target queries, (warm, cold): the transferred part is multiplied by
        # ``warm`` for a user with target history and by ``cold`` for one without. Training always uses 1; the
        # offline evaluation chooses both on validation (learner.offline.evaluate.tune_transfer_scale) and checkpoints
        # carry them, so a source that helps the training fit but not held-out events can be turned down
        # without retraining. Not a parameter: no gradient, not in state_dict (SITNLearner saves it).
        self.transfer_scale: tuple[float, float] = (1.0, 1.0)
        roles = ROLES if config.use_source else ("target",)
        self.roles = roles
        self.encoders = nn.ModuleDict({role: DomainEncoder(config) for role in roles})
        if config.use_source:
            # transfer[role] builds role's queries from the *other* role's interests
            self.transfer = nn.ModuleDict(
                {
                    role: InterestTransfer(config.dim, config.use_transfer_gate, config.gate_init_bias,
                                           config.transfer_map_bias, config.transfer_rank)
                    for role in roles
                }
            )
            self.heads = nn.ModuleDict({role: ProjectionHead(config.dim, config.proj_dim) for role in roles})

    def encoder(self, role: str) -> DomainEncoder:
        enc = self.encoders[role]
        assert isinstance(enc, DomainEncoder)
        return enc

    def forward(self, sequences: dict[str, SequenceBatch]) -> Interests:
        return self.interests(*self.encode(sequences))

    def encode(self, sequences: dict[str, SequenceBatch]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each role's views (B, V, D) and has-history flags (B,): the encoders' part of ``forward``."""
        views: dict[str, torch.Tensor] = {}
        has: dict[str, torch.Tensor] = {}
        for role in self.roles:
            s = sequences[role]
            views[role], has[role] = self.encoder(role)(s.items, s.positions, s.gaps, s.valid)
        return views, has

    def interests(self, views: dict[str, torch.Tensor], has: dict[str, torch.Tensor]) -> Interests:
        """The queries from ``encode``'s views: the transfer (at ``transfer_scale`` in eval) and bias coordinate."""
        own_queries: dict[str, torch.Tensor] | None = None
        if not self.config.use_source:
            queries = dict(views)
        else:
            other = {role: views[role].detach() if self.config.transfer_detach_other else views[role]
                     for role in self.roles}
            if self.config.transfer_detach_target:  # what the source queries read of the target interests
                other["target"] = views["target"].detach()
            scale: torch.Tensor | float = 1.0
            if not self.training and self.transfer_scale != (1.0, 1.0):
                warm, cold = self.transfer_scale
                scale = torch.where(has["target"], warm, cold).to(views["target"].dtype).view(-1, 1, 1)
            residual = self.training and self.config.transfer_residual
            own = {role: views[role].detach() if residual else views[role] for role in self.roles}
            queries = {
                "source": self.transfer["source"](own["source"], other["target"]),
                "target": self.transfer["target"](own["target"], other["source"], scale),
            }
            if residual:
                own_queries = dict(views)
        if self.config.item_bias:
            queries = {role: with_bias_coordinate(q) for role, q in queries.items()}
            if own_queries is not None:
                own_queries = {role: with_bias_coordinate(q) for role, q in own_queries.items()}
        return Interests(views, has, queries, own_queries)

    def summaries(self, interests: Interests) -> dict[str, torch.Tensor]:
        """(B, P) unit-norm summary per role (only meaningful where that role has history)."""
        views = dict(interests.views)
        if not self.config.contrastive_target_grad:
            views["target"] = views["target"].detach()
        return {role: self.heads[role](views[role]) for role in self.roles}
