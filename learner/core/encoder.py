"""Per-domain encoder: growing item table, self-attention over the history, multi-view extraction.

One :class:`DomainEncoder` per domain. A history of up to L items becomes V interest vectors:

    token_l   = item_emb[item_l] + coarse_emb[cluster(item_l)] + pos_emb[recency_l] + gap_emb[gap_l]
    h_1..h_L  = TransformerBlocks(tokens)          (padding masked, bidirectional unless causal)
    a_v       = softmax_l( W2 tanh(W1 h_l) )_v     (ComiRec-SA: V learned queries over the sequence)
    view_v    = sum_l a_{v,l} h_l                  -> (B, V, D)

``recency_l`` is 0 for the most recent item. An empty history gives all-zero views and
``has_history=False``; the caller (the transfer in :mod:`learner.core.model`) fills them from the other domain.

The item table ``item_weight`` is also the output embedding scored against the user's query vectors
(tied weights). It is looked up with sparse gradients so the optimizer touches only the rows a batch
used. Rows beyond the id map are initialised N(0, item_init_std^2) and are what a registered but never
trained item scores with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learner.core.config import SITNConfig
from learner.core.idmap import grow_buffer, grow_parameter

DROPOUT_LEVELS = 1 << 16  # a dropout draw is a 16-bit integer; p is quantised to 1/65,536


def dropout_scale(shape: tuple[int, ...], p: float) -> torch.Tensor:
    """A dropout mask of ``shape`` (float32): each entry independently 0 with probability ``p`` (quantised
    to a multiple of 1/65,536) and otherwise ``1 / (1 - p)``, so the mask's expectation is exactly 1.

    ``nn.Dropout`` on CPU takes one 64-bit draw from the generator per entry (``bernoulli_``); dropout
    masks were a sixth of a full-history training step. Each 64-bit draw here gives four independent
    uniform 16-bit integers, and an entry is dropped when its integer falls in the lowest ``p`` share of
    the range: a quarter of the draws. Measured on one thread: a masked (512, 50, 50) tensor 6.2 -> 2.8 ms,
    ``learn_many`` at L=50 with full histories about 15 % faster (``bench/bench_learner.py``).
    Masks come from the torch generator, so ``torch.manual_seed`` makes them reproducible.

    >>> _ = torch.manual_seed(0)
    >>> sorted(set(dropout_scale((1000,), 0.2).tolist()))
    [0.0, 1.249995231628418]
    """
    n = math.prod(shape)
    dropped = min(round(p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)  # of the DROPOUT_LEVELS values a draw takes
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # every 64-bit value alike
    halves = draws.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    keep = halves >= dropped - DROPOUT_LEVELS // 2
    return keep.to(torch.float32).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped))


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout_scale`'s cheaper masks."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        return x * dropout_scale(tuple(x.shape), self.p)


@dataclass(frozen=True)
class LengthGroups:
    """Where each row's tokens go for attention: the non-empty rows of a (B, W) history batch in groups of
    similar length, each group padded only to its own longest history.

    A history attends only within itself, so padding every row to the batch's longest one (W) costs
    ``B * W^2`` scores where the rows need ``sum_b len_b^2``. Real histories are short and ragged (the
    Amazon streams: a few items, W about 10), so most of that is padding; empty rows (no history, or
    blanked by source dropout) need no attention at all. Rows with ``4^(g-1) < len <= 4^g`` form group g
    (widths 1, 2-4, 5-16, 17-64: at most four groups for max_len=50); a batch of full histories is one group
    of width W. Powers of 4 rather than 2: on the real stream (L=20) fewer, slightly wider groups cost less
    than the per-group operations they save (8,250-8,680 -> 8,790-9,100 examples/s, CPU time, 3 runs each).

    ``groups``: per group ``(rows, width, tokens, key_padding)``: ``rows`` (b,) long, batch rows;
    ``tokens`` (b * width,) long, the packed token at each slot (a padding slot repeats the row's first
    token: its key is masked and its query's output is not read); ``key_padding`` (1, b, 1, width) bool,
    True = padding. ``gather`` (N,) long: each packed token's slot in the concatenation of the groups'
    ``b * width`` slots.

    >>> groups = LengthGroups.of(torch.tensor([[True, True, True], [False, False, False], [True, False, False]]))
    >>> [(rows.tolist(), width, tokens.tolist()) for rows, width, tokens, _ in groups.groups]
    [([2], 1, [3]), ([0], 3, [0, 1, 2])]
    >>> groups.gather.tolist()  # packed tokens 0-2 (row 0) sit in slots 1-3, token 3 (row 2) in slot 0
    [1, 2, 3, 0]
    """

    batch: int  # B
    width: int  # W
    groups: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]
    gather: torch.Tensor

    @classmethod
    def of(cls, valid: torch.Tensor) -> LengthGroups:
        """Groups of ``valid`` (B, W) bool, whose rows are left-aligned (a row's tokens come first)."""
        valid_np = valid.numpy()
        b, width = valid_np.shape
        lengths = valid_np.sum(axis=1)  # (B,)
        if not np.array_equal(valid_np, np.arange(width)[None, :] < lengths[:, None]):
            raise ValueError("valid must be left-aligned: each row's True entries must come first")
        starts = np.cumsum(lengths) - lengths  # (B,) first packed token of each row
        bucket = np.ceil(np.log2(np.maximum(lengths, 1)) / 2).astype(np.int64)  # (B,) group: ceil(log4(len))
        order = np.argsort(bucket, kind="stable")
        order = order[lengths[order] > 0]  # non-empty rows, by group
        cuts = np.flatnonzero(np.diff(bucket[order])) + 1
        gather = np.empty(int(lengths.sum()), dtype=np.int64)
        groups = []
        offset = 0
        for rows in np.split(order, cuts) if order.size else []:
            n_rows, group_len = rows.size, lengths[rows]  # (b,)
            w = int(group_len.max())
            col = np.arange(w)[None, :]  # (1, w)
            real = col < group_len[:, None]  # (b, w)
            tokens = starts[rows, None] + np.where(real, col, 0)  # (b, w)
            gather[tokens[real]] = offset + np.flatnonzero(real.reshape(-1))
            groups.append((
                torch.from_numpy(rows), w, torch.from_numpy(tokens.reshape(-1)),
                torch.from_numpy(~real).view(1, n_rows, 1, w),
            ))
            offset += n_rows * w
        return cls(b, width, groups, torch.from_numpy(gather))


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block over *packed* tokens: self-attention then a feed-forward layer.

    Token-wise layers (LayerNorm, projections, feed-forward) run on the N real tokens only; the attention
    runs per :class:`LengthGroups` group, on that group's rows padded to its own width. Real histories are
    short, so this removes most of the work a padded (B, W) layout would spend on padding.

    Attention dropout draws a mask per group for that group's (H * b, w, w) probabilities only
    (:func:`dropout_scale`), never for padding. With the same masks the block equals the padded (B, W)
    implementation (tested in ``tests/test_learner_vectorised.py``).
    """

    def __init__(self, dim: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))
        self.drop: nn.Module = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, groups: LengthGroups, causal: bool) -> torch.Tensor:
        """``x`` (N, D) packed tokens (row-major over the valid slots of ``groups``' batch) -> (N, D)."""
        n, dim = x.shape
        heads, head_dim = self.n_heads, dim // self.n_heads
        attn_dropout = self.attn_dropout if self.training else 0.0
        qkv = self.qkv(self.ln_attn(x)).view(n, 3, heads, head_dim).permute(1, 2, 0, 3).contiguous()  # (3, H, N, Dh)
        outputs = []
        for rows, w, tokens, key_padding in groups.groups:
            b = rows.shape[0]
            q, k, v = qkv.index_select(2, tokens).view(3, heads * b, w, head_dim)  # each (H*b, w, Dh)
            # Plain matmul attention: for L <= 50 it is several times faster on CPU than the fused
            # scaled_dot_product_attention kernel (whose backward dominated the step).
            scores = (q @ k.transpose(1, 2)) * (head_dim**-0.5)  # (H*b, w, w)
            masked = key_padding
            if causal:
                masked = masked | torch.ones(w, w, dtype=torch.bool).triu(1)  # (1, b, w, w)
            scores = scores.view(heads, b, w, w).masked_fill(masked, float("-inf"))
            probs = torch.softmax(scores, dim=-1).view(heads * b, w, w)
            if attn_dropout > 0:
                probs = probs * dropout_scale((heads * b, w, w), attn_dropout)
            outputs.append((probs @ v).view(heads, b * w, head_dim))
        if outputs:
            att = torch.cat(outputs, dim=1).index_select(1, groups.gather)  # (H, N, Dh)
        else:
            att = x.new_zeros(heads, 0, head_dim)
        att = att.transpose(0, 1).reshape(n, dim)  # (N, D), heads concatenated
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
        """``h`` (N, D) packed tokens (see :class:`SelfAttentionBlock`) at slots ``flat_index`` (N,) of the
        flattened ``shape`` = (B, L) layout; ``attend`` (B, L) bool with at least one True per row (slots
        that take part; a slot without a token counts as a zero vector) -> (B, V, D).

        Only the (tiny) attention scores are padded, for the softmax; the weighted sum runs over the
        packed tokens (a padded ``weights @ h`` spends most of its work, and its backward, on padding).
        """
        b, length = shape
        scores = self.w2(torch.tanh(self.w1(h)))  # (N, V)
        n_views = scores.shape[1]
        scores = scores.new_zeros(b * length, n_views).index_copy(0, flat_index, scores)  # (B*L, V)
        scores = scores.view(b, length, n_views).masked_fill(~attend.unsqueeze(-1), float("-inf"))  # (B, L, V)
        weights = torch.softmax(scores, dim=1).view(b * length, n_views).index_select(0, flat_index)  # (N, V)
        weighted = weights.unsqueeze(-1) * h.unsqueeze(1)  # (N, V, D)
        return h.new_zeros(b, n_views, h.shape[1]).index_add(0, flat_index // length, weighted)  # (B, V, D)


class DomainEncoder(nn.Module):
    """Item table, sequence encoder and view extractor of one domain."""

    item_cluster: torch.Tensor
    item_count: torch.Tensor
    item_recent: torch.Tensor  # only with logq_half_life_events > 0
    recent_state: torch.Tensor  # (2,) float64: the weight of the next label (grows instead of decaying the rows), total

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
        if config.logq_half_life_events > 0:  # decayed label counts for the logQ correction (learner._count_labels)
            self.register_buffer("item_recent", torch.zeros(cap, dtype=torch.float64))
            self.register_buffer("recent_state", torch.tensor([1.0, 0.0], dtype=torch.float64))
        for h in config.popularity_half_lives:  # the popularity prior's decayed label counts (learner.core.popularity)
            self.register_buffer(f"pop_recent_{h}", torch.zeros(cap, dtype=torch.float64))
            self.register_buffer(f"pop_offset_{h}", torch.zeros((), dtype=torch.float64))
        self.coarse_emb = (
            nn.Embedding(config.n_item_clusters + 1, d, padding_idx=0) if config.use_coarse_level else None
        )
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.gap_emb = nn.Embedding(config.n_time_gap_buckets + 1, d, padding_idx=0) if config.use_time_gap else None
        self.input_drop: nn.Module = Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
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
        """Grow the item table and its per-row buffers to ``new_rows`` rows (see :mod:`learner.core.idmap`)."""
        grow_parameter(self, "item_weight", new_rows, self.config.item_init_std, optimizers)
        grow_buffer(self, "item_cluster", new_rows, 0)
        grow_buffer(self, "item_count", new_rows, 0)
        if self.config.logq_half_life_events > 0:
            grow_buffer(self, "item_recent", new_rows, 0)
        for h in self.config.popularity_half_lives:
            grow_buffer(self, f"pop_recent_{h}", new_rows, 0)

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
        groups = LengthGroups.of(valid)
        for block in self.blocks:
            x = block(x, groups, self.config.causal)
        h = self.ln_out(x)  # (N, D)
        views = self.views(h, flat_index, (b, length), attend)  # (B, V, D)
        return views * has_history[:, None, None].to(views.dtype), has_history
