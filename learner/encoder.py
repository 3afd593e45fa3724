"""Per-domain encoder: growing item table, self-attention over the history, multi-view extraction.

One :class:`DomainEncoder` per domain. A history of up to L items becomes V interest vectors:

    token_l   = item_emb[item_l] + coarse_emb[cluster(item_l)] + pos_emb[recency_l] + gap_emb[gap_l]
    h_1..h_L  = TransformerBlocks(tokens)          (padding masked, bidirectional unless causal)
    a_v       = softmax_l( W2 tanh(W1 h_l) )_v     (ComiRec-SA: V learned queries over the sequence)
    view_v    = sum_l a_{v,l} h_l                  -> (B, V, D)

``recency_l`` is 0 for the most recent item. An empty history gives all-zero views and
``has_history=False``; the caller (the transfer in :mod:`learner.model`) fills them from the other domain.

The item table ``item_weight`` is also the output embedding scored against the user's query vectors
(tied weights). It is looked up with sparse gradients so the optimizer touches only the rows a batch
used. Rows beyond the id map are initialised N(0, item_init_std^2) and are what a registered but never
trained item scores with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learner.config import SITNConfig
from learner.idmap import grow_buffer, grow_parameter


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: multi-head self-attention then a feed-forward layer."""

    def __init__(self, dim: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, D); ``attn_mask`` bool, True = may attend, broadcastable to (B, H, L, L)."""
        b, length, dim = x.shape
        qkv = self.qkv(self.ln_attn(x))  # (B, L, 3D)
        qkv = qkv.view(b, length, 3, self.n_heads, dim // self.n_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        att = att.transpose(1, 2).reshape(b, length, dim)  # (B, L, D)
        x = x + self.drop(self.out(att))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class MultiViewExtractor(nn.Module):
    """ComiRec-SA: V attention distributions over the sequence, one interest vector per distribution."""

    def __init__(self, dim: int, n_views: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_views, bias=False)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``h`` (B, L, D), ``valid`` (B, L) bool with at least one True per row -> (B, V, D)."""
        scores = self.w2(torch.tanh(self.w1(h)))  # (B, L, V)
        scores = scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(scores, dim=1).transpose(1, 2)  # (B, V, L)
        return weights @ h  # (B, V, D)


class DomainEncoder(nn.Module):
    """Item table, sequence encoder and view extractor of one domain."""

    item_cluster: torch.Tensor
    item_count: torch.Tensor

    def __init__(self, config: SITNConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        cap = config.initial_item_capacity
        self.item_weight = nn.Parameter(torch.empty(cap, d).normal_(0.0, config.item_init_std))
        # Per item row: coarse cluster id + 1 (0 = not clustered yet) and the number of times the row
        # was a training label (the frequency behind the logQ correction).
        self.register_buffer("item_cluster", torch.zeros(cap, dtype=torch.long))
        self.register_buffer("item_count", torch.zeros(cap, dtype=torch.long))
        self.coarse_emb = (
            nn.Embedding(config.n_item_clusters + 1, d, padding_idx=0) if config.use_coarse_level else None
        )
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.gap_emb = nn.Embedding(config.n_time_gap_buckets + 1, d, padding_idx=0) if config.use_time_gap else None
        self.input_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(d, config.n_heads, config.ffn_mult, config.dropout) for _ in range(config.n_layers)
        )
        self.ln_out = nn.LayerNorm(d)
        self.views = MultiViewExtractor(d, config.n_views, config.view_hidden)
        for emb in (self.coarse_emb, self.pos_emb, self.gap_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, 0.0, config.item_init_std)
                if emb.padding_idx is not None:
                    with torch.no_grad():
                        emb.weight[emb.padding_idx].zero_()

    @property
    def capacity(self) -> int:
        return int(self.item_weight.shape[0])

    def grow(self, new_rows: int, optimizers: list[torch.optim.Optimizer]) -> None:
        """Grow the item table and its per-row buffers to ``new_rows`` rows (see :mod:`learner.idmap`)."""
        grow_parameter(self, "item_weight", new_rows, self.config.item_init_std, optimizers)
        grow_buffer(self, "item_cluster", new_rows, 0)
        grow_buffer(self, "item_count", new_rows, 0)

    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Output embeddings of item ``rows`` (any shape S) -> (*S, D), sparse gradient."""
        return F.embedding(rows, self.item_weight, sparse=True)

    def forward(
        self, items: torch.Tensor, positions: torch.Tensor, gaps: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode histories.

        ``items``, ``positions`` (recency, 0 = newest), ``gaps`` (time-gap bucket + 1, 0 = padding):
        (B, L) long; ``valid`` (B, L) bool. Returns views (B, V, D), zero where the history is empty,
        and ``has_history`` (B,) bool.
        """
        has_history = valid.any(dim=1)  # (B,)
        # Empty rows attend to their first (padding) slot so softmax stays finite; zeroed below.
        valid = valid.clone()
        valid[:, 0] |= ~has_history
        x = F.embedding(items, self.item_weight, sparse=True)  # (B, L, D)
        x = x + self.pos_emb(positions)
        if self.coarse_emb is not None:
            x = x + self.coarse_emb(self.item_cluster[items])
        if self.gap_emb is not None:
            x = x + self.gap_emb(gaps)
        x = self.input_drop(x)
        length = items.shape[1]
        attn_mask = valid[:, None, None, :]  # (B, 1, 1, L): keys that may be attended
        if self.config.causal:
            causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
            attn_mask = attn_mask & causal  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, attn_mask)
        h = self.ln_out(x)  # (B, L, D)
        views = self.views(h, valid)  # (B, V, D)
        return views * has_history[:, None, None].to(views.dtype), has_history
