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
    """Pre-LayerNorm transformer block over *packed* tokens: self-attention then a feed-forward layer.

    Token-wise layers (LayerNorm, projections, feed-forward) run on the N real tokens only; only the
    attention itself scatters them into the padded (B, L) layout. Real histories are short (a few
    items), so this removes most of the work a padded layout would spend on padding.
    """

    def __init__(self, dim: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attn_drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, flat_index: torch.Tensor, shape: tuple[int, int],
                attn_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (N, D) packed tokens; ``flat_index`` (N,) their slots in the flattened (B * L) layout;
        ``shape`` = (B, L); ``attn_mask`` bool, True = may attend, broadcastable to (B, H, L, L)."""
        b, length = shape
        dim = x.shape[1]
        qkv = self.qkv(self.ln_attn(x))  # (N, 3D)
        padded = qkv.new_zeros(b * length, 3 * dim).index_copy(0, flat_index, qkv)  # (B*L, 3D)
        padded = padded.view(b, length, 3, self.n_heads, dim // self.n_heads)  # (B, L, 3, H, Dh)
        q, k, v = padded.permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        # Plain matmul attention: for L <= 50 it is several times faster on CPU than the fused
        # scaled_dot_product_attention kernel (whose backward dominated the step).
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, L, L)
        probs = torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1)
        att = self.attn_drop(probs) @ v  # (B, H, L, Dh)
        att = att.transpose(1, 2).reshape(b * length, dim).index_select(0, flat_index)  # (N, D)
        x = x + self.drop(self.out(att))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class MultiViewExtractor(nn.Module):
    """ComiRec-SA: V attention distributions over the sequence, one interest vector per distribution."""

    def __init__(self, dim: int, n_views: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, n_views, bias=False)

    def forward(self, h: torch.Tensor, flat_index: torch.Tensor, shape: tuple[int, int],
                attend: torch.Tensor) -> torch.Tensor:
        """``h`` (N, D) packed tokens (see :class:`SelfAttentionBlock`); ``attend`` (B, L) bool with at
        least one True per row (slots that take part; a padding slot holds a zero vector) -> (B, V, D)."""
        b, length = shape
        dim = h.shape[1]
        scores = self.w2(torch.tanh(self.w1(h)))  # (N, V)
        n_views = scores.shape[1]
        scores = scores.new_zeros(b * length, n_views).index_copy(0, flat_index, scores)  # (B*L, V)
        scores = scores.view(b, length, n_views).masked_fill(~attend.unsqueeze(-1), float("-inf"))  # (B, L, V)
        weights = torch.softmax(scores, dim=1).transpose(1, 2)  # (B, V, L)
        h_padded = h.new_zeros(b * length, dim).index_copy(0, flat_index, h).view(b, length, dim)  # (B, L, D)
        return weights @ h_padded  # (B, V, D)


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
        self.input_drop: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
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
        b, length = items.shape
        has_history = valid.any(dim=1)  # (B,)
        flat_index = valid.reshape(-1).nonzero().squeeze(1)  # (N,) slots of the real tokens
        tokens = items.reshape(-1)[flat_index]  # (N,)
        x = F.embedding(tokens, self.item_weight, sparse=True)  # (N, D)
        x = x + self.pos_emb(positions.reshape(-1)[flat_index])
        if self.coarse_emb is not None:
            x = x + self.coarse_emb(self.item_cluster[tokens])
        if self.gap_emb is not None:
            x = x + self.gap_emb(gaps.reshape(-1)[flat_index])
        x = self.input_drop(x)
        # Empty rows attend to their first slot (a zero vector) so softmax stays finite; zeroed below.
        attend = valid.clone()
        attend[:, 0] |= ~has_history
        attn_mask = attend[:, None, None, :]  # (B, 1, 1, L): keys that may be attended
        if self.config.causal:
            causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
            attn_mask = attn_mask & causal  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, flat_index, (b, length), attn_mask)
        h = self.ln_out(x)  # (N, D)
        views = self.views(h, flat_index, (b, length), attend)  # (B, V, D)
        return views * has_history[:, None, None].to(views.dtype), has_history
