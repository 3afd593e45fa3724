"""The learner's batched fast paths against the simple formulations they replaced (issue 13).

Each test runs the fast path and a slow, obviously-correct version on the same random input and the same
torch random stream, and requires the same values (floats: relative 1e-5) and the same gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from learner import SITNConfig, SITNLearner
from learner.core import encoder
from learner.core.batch import build_training_batch
from learner.core.encoder import Dropout, LengthGroups, SelfAttentionBlock, dropout_scale
from learner.core.idmap import IdMap
from learner.core.model import Interests
from stream.user_state import Example

torch.set_num_threads(1)
TOL = {"rtol": 1e-5, "atol": 1e-6}


def assert_same_gradient(fast: torch.Tensor, slow: torch.Tensor) -> None:
    """Equal up to float summation order: 1e-5 of the tensor's largest entry (a weight gradient is a sum
    over every token, accumulated in another order by the batched path)."""
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))


class MaskRecorder:
    """Stands in for ``encoder.dropout_scale``: draws the real masks and keeps each, in order, so the padded
    reference below can apply the very masks the grouped block drew."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []

    def __call__(self, shape: tuple[int, ...], p: float) -> torch.Tensor:
        mask = dropout_scale(shape, p)
        self.masks.append(mask)
        return mask


def padded_attention_block(block: SelfAttentionBlock, x: torch.Tensor, valid: torch.Tensor, causal: bool,
                           masks: list[torch.Tensor]) -> torch.Tensor:
    """The block on the padded (B, W) layout: every row padded to W, an empty row attending to its (zero)
    first slot. In training it applies ``masks``, the grouped block's: one (H * b, w, w) attention mask per
    length group (placed on that group's rows and first w slots), then the two (N, D) output masks."""
    b, width = valid.shape
    dim = x.shape[1]
    heads = block.n_heads
    flat_index = valid.reshape(-1).nonzero().squeeze(1)
    attend = valid.clone()
    attend[:, 0] |= ~valid.any(dim=1)
    allowed = attend[:, None, None, :]  # (B, 1, 1, W)
    if causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool).tril()
    qkv = block.qkv(block.ln_attn(x))
    padded = qkv.new_zeros(b * width, 3 * dim).index_copy(0, flat_index, qkv)
    q, k, v = padded.view(b, width, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # each (B, H, W, Dh)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out_mask = ffn_mask = torch.ones(())
    if block.training:
        groups = LengthGroups.of(valid).groups
        assert len(masks) == len(groups) + 2, "one attention mask per group, then the two output masks"
        keep = torch.ones(b, heads, width, width)
        for (rows, w, _, _), mask in zip(groups, masks, strict=False):
            keep[rows, :, :w, :w] = mask.view(heads, rows.numel(), w, w).transpose(0, 1)
        probs = probs * keep
        out_mask, ffn_mask = masks[-2:]
    att = (probs @ v).transpose(1, 2).reshape(b * width, dim).index_select(0, flat_index)
    x = x + block.out(att) * out_mask
    return x + block.ffn(block.ln_ffn(x)) * ffn_mask


@pytest.mark.parametrize("p", [0.2, 0.1, 0.37, 0.5, 0.9])
def test_dropout_drops_each_entry_with_probability_p_and_keeps_the_expectation(p: float) -> None:
    torch.manual_seed(5)
    mask = dropout_scale((4, 250_001), p)  # an odd size: the last 64-bit draw is only partly used
    kept = mask > 0
    share_kept = float(kept.float().mean())
    # within 5 binomial standard errors of 1 - p over the 1,000,004 entries (seeded, so the same draws each run)
    assert abs(share_kept - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5
    assert torch.equal(torch.unique(mask[kept]), torch.tensor([float(mask.max())]))  # one scale for all kept
    assert abs(float(mask.max()) * (1 - p) - 1) < 1e-4  # p quantised to 1/65,536
    assert abs(float(mask.mean()) - 1.0) < 5 * (p / (1 - p) / mask.numel()) ** 0.5  # an expectation of 1
    # every quarter of a 64-bit draw drops alike (no lane is biased), and neighbours are independent
    lanes = kept.reshape(-1)[: 4 * 250_000].view(-1, 4).float()
    assert (lanes.mean(0) - (1 - p)).abs().max() < 5 * (p * (1 - p) / 250_000) ** 0.5
    both = float((lanes[:, 0] * lanes[:, 1]).mean())
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / 250_000) ** 0.5
    torch.manual_seed(5)
    assert torch.equal(dropout_scale((4, 250_001), p), mask)  # the torch seed reproduces it
    x = torch.randn(37, 64)
    torch.manual_seed(6)
    dropped = Dropout(p)(x)
    torch.manual_seed(6)
    assert torch.equal(dropped, x * dropout_scale((37, 64), p))
    assert torch.equal(Dropout(p).eval()(x), x)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        Dropout(1.0)


def random_valid(rng: np.random.Generator, b: int, width: int) -> torch.Tensor:
    lengths = rng.integers(0, width + 1, size=b)
    lengths[:3] = (0, width, 1)  # an empty row, a full one and a single item
    return torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_grouped_attention_equals_the_padded_block_with_the_same_dropout_masks(
        causal: bool, training: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    block = SelfAttentionBlock(dim=16, n_heads=2, ffn_mult=2, dropout=0.3).train(training)
    valid = random_valid(np.random.default_rng(1), b=40, width=13)
    x = torch.randn(int(valid.sum()), 16)

    recorder = MaskRecorder()

    def run(fast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        xi = x.clone().requires_grad_(True)
        if fast:
            monkeypatch.setattr(encoder, "dropout_scale", recorder)
            out = block(xi, LengthGroups.of(valid), causal)
            monkeypatch.undo()
        else:
            out = padded_attention_block(block, xi, valid, causal, recorder.masks)
        block.zero_grad(set_to_none=True)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert xi.grad is not None
        return out, [xi.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None]

    fast_out, fast_grads = run(fast=True)
    assert len(recorder.masks) == (len(LengthGroups.of(valid).groups) + 2 if training else 0)
    slow_out, slow_grads = run(fast=False)
    torch.testing.assert_close(fast_out, slow_out, **TOL)
    assert len(fast_grads) == len(slow_grads) == 1 + len(list(block.parameters()))
    for fast, slow in zip(fast_grads, slow_grads, strict=True):
        assert_same_gradient(fast, slow)


def test_length_groups_cover_every_token_once_and_need_left_aligned_rows() -> None:
    valid = random_valid(np.random.default_rng(2), b=64, width=50)
    groups = LengthGroups.of(valid)
    lengths = valid.sum(dim=1)
    assert sorted(groups.gather.tolist()) == sorted(set(groups.gather.tolist()))  # one slot per token
    assert groups.gather.numel() == int(lengths.sum())
    for rows, width, _, key_padding in groups.groups:
        assert width == int(lengths[rows].max()) and (lengths[rows] > width // 4).all()
        assert key_padding.shape == (1, rows.numel(), 1, width)
    assert sum(rows.numel() for rows, *_ in groups.groups) == int((lengths > 0).sum())
    with pytest.raises(ValueError, match="valid must be left-aligned"):
        LengthGroups.of(torch.tensor([[False, True]]))


SMALL = SITNConfig(dim=16, max_len=8, n_views=2, view_hidden=16, proj_dim=16, cluster_counts=(4,), reservoir_size=64,
                   n_item_clusters=4, n_sampled_negatives=16, initial_item_capacity=64)


def random_examples(rng: np.random.Generator, n: int, n_items: int = 40) -> list[Example]:
    out = []
    for i in range(n):
        history = {}
        for domain in ("movie", "book"):
            k = int(rng.integers(0, 6))
            items = tuple(f"{domain[0]}{j}" for j in rng.integers(0, n_items, size=k))
            history[domain] = (items, tuple(range(1_000, 1_000 + k)))
        domain = "book" if rng.random() < 0.6 else "movie"
        label = f"{domain[0]}{int(rng.integers(0, 2 * n_items))}"  # about half of them new
        out.append(Example(f"e{i}", f"u{int(rng.integers(0, 20))}", domain, label, 2_000 + i, history))
    return out


def test_new_rows_start_at_the_mean_of_the_last_examples_history_like_the_per_example_loop() -> None:
    rng = np.random.default_rng(3)
    # the label rule alone: a row first met in a history (init_history_items) has its own test (test_learner)
    learner = SITNLearner(SMALL.replace(init_history_items=False), "movie", "book")
    learner.learn_many(random_examples(rng, 32))
    batch = random_examples(rng, 64)
    batch += [Example("dup", "u1", "book", batch[-1].item_id, 9_999, batch[0].history)]  # a label twice
    known = {role: len(m) for role, m in learner.idmaps.items()}
    tb = build_training_batch(batch, learner.domains, learner.idmaps, SMALL.max_len, SMALL.n_time_gap_buckets)
    learner._ensure_capacity()
    before = {role: learner.model.encoder(role).item_weight.detach().clone() for role in learner.domains}
    expected = {role: w.clone() for role, w in before.items()}
    for role, idx in (("source", 0), ("target", 1)):  # the per-example loop, in batch order
        first = known[role] + 1
        seq = tb.sequences[role]
        for b in range(len(batch)):
            rows = seq.items[b][seq.valid[b] & (seq.items[b] < first)]
            if tb.event_role[b] == idx and tb.label_rows[b] >= first and rows.numel():
                expected[role][tb.label_rows[b]] = expected[role].index_select(0, rows).mean(dim=0)
    learner._init_new_rows(tb, known)
    for role in learner.domains:
        torch.testing.assert_close(learner.model.encoder(role).item_weight.detach(), expected[role], **TOL)
    initialised = sum(int((expected[r] != before[r]).any(dim=1).sum()) for r in learner.domains)
    assert initialised >= 10  # the batch has new labels with old history items in both domains


def test_main_loss_with_log_q_of_the_candidates_equals_log_q_over_the_whole_table() -> None:
    rng = np.random.default_rng(4)
    learner = SITNLearner(SMALL, "movie", "book")
    for _ in range(3):
        learner.learn_many(random_examples(rng, 48))
    tb = build_training_batch(random_examples(rng, 48), learner.domains, learner.idmaps, SMALL.max_len,
                              SMALL.n_time_gap_buckets)
    learner._ensure_capacity()
    learner.model.eval()
    with torch.no_grad():
        interests: Interests = learner.model(tb.sequences)
    torch.manual_seed(11)
    fast = learner._main_loss(tb, interests)
    torch.manual_seed(11)
    parts = []
    for role, idx in (("source", 0), ("target", 1)):  # the former formulation: log q of every table row
        mask = tb.event_role == idx
        n, n_items, enc = int(mask.sum()), len(learner.idmaps[role]), learner.model.encoder(role)
        pos_rows = tb.label_rows[mask]
        cand_rows = torch.cat([pos_rows, torch.randint(1, n_items + 1, (SMALL.n_sampled_negatives,))])
        counts = enc.item_count[: n_items + 1].to(torch.float64)
        log_q = torch.log(n * counts / counts.sum() + SMALL.n_sampled_negatives / n_items).to(torch.float32)
        q = interests.queries[role][mask]
        vectors = enc.item_vectors(cand_rows)
        best = torch.einsum("bvd,bd->bv", q, vectors[:n]).argmax(dim=1)
        chosen = q[torch.arange(n), best]
        pos = (chosen * vectors[:n]).sum(-1) - log_q[pos_rows]
        cand = (chosen @ vectors.T - log_q[cand_rows]).masked_fill(pos_rows[:, None] == cand_rows[None, :], -torch.inf)
        logits = torch.cat([pos[:, None], cand], dim=1)
        parts.append(F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)) * (n / len(tb.label_rows)))
    torch.testing.assert_close(fast, torch.stack(parts).sum(), **TOL)


def test_label_rows_are_assigned_in_example_order_per_domain() -> None:
    batch = random_examples(np.random.default_rng(5), 30)
    idmaps = {"source": IdMap(), "target": IdMap()}
    tb = build_training_batch(batch, {"source": "movie", "target": "book"}, idmaps, 8, 16)
    expected_maps = {"source": IdMap(), "target": IdMap()}
    expected = [int(expected_maps["target" if ex.domain == "book" else "source"].add([ex.item_id])[0]) for ex in batch]
    assert tb.label_rows.tolist() == expected
    assert tb.event_role.tolist() == [int(ex.domain == "book") for ex in batch]
    first_seen: dict[str, int] = {}
    assert tb.user_keys.tolist() == [first_seen.setdefault(ex.user_id, len(first_seen)) for ex in batch]
