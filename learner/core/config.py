"""SITN model hyperparameters: one dataclass with commented defaults, saved in every checkpoint.

Every component of the spec (../shared/SITN_SPEC.md) has a switch here so it can be ablated:

- ``n_views=1``            -> a plain single-vector sequence model (attention pooling, no view selection;
                              the default, chosen on validation; ``n_views>1`` is the multi-view model)
- ``cluster_counts=(K,)``  -> one prototype granularity (M=1)
- ``use_source=False``     -> single-domain model: the same target encoder, target events only
- ``use_i2i=False`` / ``use_i2c=False`` -> drop the instance-to-instance / instance-to-cluster losses

>>> SITNConfig(n_views=4, cluster_counts=(32,)).n_views
4
>>> SITNConfig(n_layers=3)
Traceback (most recent call last):
...
ValueError: n_layers must be 1 or 2 (the spec's encoder), got 3
>>> SITNConfig.from_dict(SITNConfig(dim=32).to_dict()) == SITNConfig(dim=32)
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# the query-time transfer scales (``SITNModel.transfer_scale``) tried, offline on validation
# (learner.offline.evaluate.tune_transfer_scale) and online (learner.online.transfer_scale); the first is
# the scale training uses, and ties keep the earlier
TRANSFER_SCALES = (1.0, 0.5, 0.25, 0.0)


@dataclass(frozen=True)
class SITNConfig:
    # -- encoder -----------------------------------------------------------------------------------
    dim: int = 64  # d: item embedding, sequence encoder and interest vector width
    max_len: int = 50  # L: last L items per domain kept and encoded
    n_layers: int = 1  # self-attention layers (spec: 1-2; 1 is the default for stream throughput)
    n_heads: int = 2  # attention heads; must divide dim
    ffn_mult: int = 2  # feed-forward hidden width = ffn_mult * dim
    dropout: float = 0.2  # dropout on the history tokens (embeddings) and inside the encoder blocks; ids are
    #                      sparse (most items occur once), so without it the model memorises (issue 9)
    causal: bool = False  # False: bidirectional attention over the history (it is all in the past)
    n_views: int = 1  # V: interest vectors per user per domain (ComiRec-SA learned queries). 1 chosen on
    #                  validation (Movie->Book, lr 2e-3, dropout 0.2): V=4 reached NDCG@10 0.0039 after 4 epochs,
    #                  V=1 0.0070 (0.0113 after 12); hard view selection splits the sparse labels between views
    view_hidden: int = 64  # hidden width of the ComiRec-SA view scorer (W2 tanh(W1 h))
    use_time_gap: bool = True  # add an embedding of log2-bucketed (reference time - item time)
    n_time_gap_buckets: int = 16  # buckets of floor(log2(1 + gap_days)), the last one open-ended
    item_init_std: float = 0.05  # new item rows are drawn from N(0, item_init_std^2)
    initial_item_capacity: int = 1024  # rows preallocated per domain; tables double when full
    # -- cross-domain transfer ---------------------------------------------------------------------
    use_source: bool = True  # False: single-domain model (target events and target history only)
    use_transfer_gate: bool = True  # gate the mapped other-domain interests (False: plain addition)
    gate_init_bias: float = -4.0  # the gate starts closed (sigmoid(-4) = 0.018): transfer must earn its way in
    transfer_map_bias: bool = False  # True: the transfer map W other + b has a bias b (learner.core.model), so every
    #                                 query carries a gated learned offset, even with no other-domain history.
    #                                 Off (issue 9, seed 0 validation NDCG@10, defaults otherwise): Movie->Book
    #                                 0.0149 vs 0.0136, Book->Movie 0.0191 vs 0.0180
    transfer_rank: int = 0  # 0: the transfer map is a full D x D matrix; r > 0: W = U V^T of rank r, so only
    #                         r directions of the other domain's interests can cross (coarse interests, not a
    #                         user fingerprint)
    transfer_residual: bool = True  # each domain's own interests take the next-item loss on their own (as in the
    #                                single-domain model), and the transferred part is learned as a residual on
    #                                top of them (the own interests detached in the combined query), so the other
    #                                domain cannot take over what the own history predicts. Issue 9, seed 0
    #                                validation NDCG@10 at query-time transfer scale 1 / tuned, with
    #                                contrastive_target_grad off: Movie->Book 0.0168 / see results (both
    #                                switches off: 0.0144 / 0.0163), Book->Movie 0.0219 / 0.0229 (single-domain
    #                                0.0181 and 0.0230)
    transfer_item_grad: float = 1.0  # with transfer_residual: the share of the combined (own + transferred)
    #                                  query's loss gradient that reaches the item table (rows and biases); 0: the
    #                                  items learn from the own interests alone, as in the single-domain model,
    #                                  and the transfer map fits a residual against them. 1 (issue 9, seed 0,
    #                                  validation NDCG@10 at the tuned transfer scale, Movie->Book / Book->Movie):
    #                                  at 0, 0.0190 / 0.0231 against 0.0188 / 0.0232, within validation's
    #                                  seed-to-seed spread (about 0.0007), while on the synthetic check
    #                                  (tests/test_transfer_synthetic.py) SITN fell to 1.2x the single-domain
    #                                  model: the items then never learn where the transferred interests point.
    #                                  0 only for users with own history: 0.0188 / 0.0229, synthetic check passed;
    #                                  0.25: 0.0189 / 0.0230, synthetic check passed
    transfer_detach_other: bool = False  # True: the transfer map reads the other domain's interests without
    #                                      passing gradients back into that domain's encoder, so each encoder
    #                                      learns only from its own domain's items (and I2I/I2C). With
    #                                      transfer_item_grad 0, Movie->Book seed 0 validation 0.0191; the
    #                                      synthetic check fell to 1.4x. Over 3 seeds with transfer_item_grad
    #                                      0: validation +1.0 % (Movie->Book) / +1.3 % (Book->Movie), but the
    #                                      synthetic SITN / single-domain ratio at strength 1 fell from
    #                                      1.94-2.36x to 1.37-1.68x (cold start / popularity 3.4-4.6x to
    #                                      2.3-2.8x): off, so the transfer stays where the data has it
    transfer_detach_target: bool = False  # True: the source domain's queries read the target domain's interests
    #                                       detached (transfer_detach_other for that direction only), so the
    #                                       source events' loss never reaches the target encoder, while the
    #                                       target events' loss still trains the source encoder through the map.
    #                                       Off: seed 0 validation 0.0189 / 0.0232 (0.0190 with
    #                                       transfer_item_grad 0 on Movie->Book), synthetic check passed
    source_dropout: float = 0.5  # share of training examples whose *other* domain's history is blanked (for a
    #                              target event: the source history), so each domain's path must stand alone
    #                              and the other side cannot serve as a user fingerprint
    item_bias: bool = True  # the last of the dim coordinates is a learned per-item bias: every query's last
    #                        coordinate is 1 (score = <q', e'> + b_i), so popularity has a place of its own and
    #                        a user with a weak query (cold start) still gets the items the softmax favours
    popularity_prior: float = 1.0  # beta: at inference (embed_items, score_items; so serving's inner products
    #                               too) every item's bias coordinate gains beta * log(1 + n_i), n_i the times it
    #                               was a training label; training is unchanged. Only with item_bias (the
    #                               queries' last coordinate is 1, so the prior stays one inner product;
    #                               without it there is no coordinate for a prior, and none is added). 1: the scores
    #                               then estimate log p(item | user), which the logQ-corrected softmax learns
    #                               without the items' popularity. Chosen on the first half of the shipped
    #                               stream (sitn/settings.py); offline, Movie->Book seed 0, validation NDCG@10
    #                               at the chosen epoch 0.0162 without, 0.0168 with (cold start 0.0027 / 0.0037)
    popularity_half_lives: tuple[int, ...] = ()  # label counts decayed with each of these half-lives (in labels of
    #                                            the item's domain; learner.core.popularity) are kept beside the
    #                                            all-time counts, for the prior to read (popularity_half_life). The
    #                                            stream keeps several and chooses among them online
    #                                            (learner.online.prior_tuner; sitn/settings.py); offline training
    #                                            shuffles the examples, so decay means nothing there: none
    popularity_half_life: int = 0  # the counts the prior reads: 0 all-time, h > 0 the ones decayed with half-life h
    #                               (one of popularity_half_lives). The learner's starting value; the stream's
    #                               tuner moves SITNLearner.popularity_half_life
    own_history_dropout: float = 0.0  # share of training examples (disjoint from the source_dropout share) whose
    #                                   *own* domain's history is blanked, so the transfer path must predict the
    #                                   item from the other domain alone, as for a cold-start user (DropoutNet).
    #                                   Off: on Movie->Book validation (seed 0) 0.2 peaked at NDCG@10 0.0122 and 0.4
    #                                   at 0.0086 against 0.0136 at 0, and cold-start validation stayed at
    #                                   popularity's level (0.0031) and fell with the epochs either way
    # -- multi-granularity (a): item level + coarse level (item cluster ids) ------------------------
    use_coarse_level: bool = True  # add an embedding of the item's cluster id to each history token
    n_item_clusters: int = 64  # k of the periodic k-means over item embeddings (the data has no categories)
    # -- multi-granularity (b): prototypes at several cluster counts --------------------------------
    cluster_counts: tuple[int, ...] = (16, 64, 256)  # {K_1..K_M}; M=1 is one count
    # -- losses ------------------------------------------------------------------------------------
    n_sampled_negatives: int = 256  # uniform negatives per domain per step, on top of in-batch ones
    use_i2i: bool = True  # symmetric InfoNCE between a user's source and target summaries
    use_i2c: bool = True  # swapped cross-domain ProtoNCE against the other domain's prototypes
    tau_i2i: float = 0.1  # I2I temperature
    tau_proto: float = 0.1  # I2C temperature: mean of the PCL concentrations, or the fixed fallback
    use_pcl_concentration: bool = True  # False: every prototype uses tau_proto
    pcl_alpha: float = 10.0  # alpha in phi = sum ||z - c|| / (n log(n + alpha))
    proj_dim: int = 64  # output width of the 2-layer projection head used by I2I and I2C
    contrastive_target_grad: bool = False  # False: I2I/I2C read the target encoder's interests detached (its
    #                                         projection head still learns), so the alignment moves the source side
    #                                         toward the target's interests and the target encoder learns from
    #                                         target items alone (issue 9: with it on, the target path lost about
    #                                         0.001-0.002 of validation NDCG@10 on Movie->Book, seed 0)
    lambda_i2i: float = 0.1  # weight of the I2I loss
    lambda_i2c: float = 0.1  # weight of the I2C loss
    i2c_warmup_steps: int = 200  # W: steps before the I2C loss switches on
    # -- streaming prototypes ----------------------------------------------------------------------
    recluster_every_steps: int = 100  # R: k-means (users and items) every R optimizer steps
    reservoir_size: int = 4096  # recent user summaries kept for k-means
    proto_ema: float = 0.9  # between re-clusterings c <- ema * c + (1 - ema) * mean(assigned batch members)
    kmeans_iters: int = 20  # faiss k-means iterations per re-clustering
    # -- optimisation ------------------------------------------------------------------------------
    lr: float = 2e-3  # AdamW (dense parameters) and lazy Adam (item tables) learning rate
    weight_decay: float = 1e-4  # AdamW weight decay on dense parameters
    item_weight_decay: float = 0.0  # decoupled weight decay on the item-table rows a step touches (lazy)
    item_skip_zero_grad: bool = False  # the item tables' lazy Adam leaves a row whose gradient is exactly zero
    #                                   alone (looked up, nothing downstream needed it: a history token dropped
    #                                   out, an other-domain history read detached) instead of moving it on its
    #                                   old momentum (learner.core.optim.LazyAdam.skip_zero_rows)
    init_new_items_from_history: bool = True  # a new item row starts at the mean of the rows of the same
    #                                           domain's items in the history it first arrives with (the items
    #                                           it co-occurs with), not at random
    init_history_items: bool = True  # also a new row first seen in a history (not as a label) starts at the mean
    #                                  of that history's older rows (offline epochs are shuffled: about half the
    #                                  books of Movie->Book are first met in another example's history, and a
    #                                  random start there cost the long tail: README, offline results)
    logq_half_life_events: int = 0  # 0: the logQ correction's label frequencies are cumulative counts (offline
    #                                 training shuffles, so every batch draws from the whole label distribution);
    #                                 > 0: exponentially decayed counts with this half-life in the domain's fresh
    #                                 events (a stream's in-batch candidates are its recent labels, not all-time
    #                                 ones; streaming frequency estimation as in Yi et al., RecSys 2019)
    replay_buffer_size: int = 0  # last N trained examples kept; 0 = no replay (offline training has epochs)
    replay_ratio: float = 1.0  # replayed examples added to each step, per fresh example (stream: each event
    #                           then trains about 1 + replay_ratio times while it is in the buffer)
    seed: int = 0  # seeds torch (own RNG stream per learner) and faiss k-means
    # -- state bounds ------------------------------------------------------------------------------
    max_users: int = 1_000_000  # stored per-user histories; least recently seen users are evicted

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{field} must be {allowed}, got {getattr(self, field)!r}")

        positive_ints = (
            "dim", "max_len", "n_heads", "ffn_mult", "n_views", "view_hidden", "n_time_gap_buckets",
            "initial_item_capacity", "n_item_clusters", "proj_dim", "recluster_every_steps",
            "reservoir_size", "kmeans_iters", "max_users",
        )
        for name in positive_ints:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1")
        need(isinstance(self.transfer_rank, int) and self.transfer_rank >= 0, "transfer_rank", "an int >= 0")
        need(self.n_layers in (1, 2), "n_layers", "1 or 2 (the spec's encoder)")
        need(self.dim % self.n_heads == 0, "n_heads", f"a divisor of dim={self.dim}")
        need(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(0.0 <= self.source_dropout <= 1.0, "source_dropout", "in [0, 1]")
        need(0.0 <= self.own_history_dropout <= 1.0 - self.source_dropout, "own_history_dropout",
             f"in [0, 1 - source_dropout = {1.0 - self.source_dropout:g}] (the two shares are disjoint)")
        need(isinstance(self.replay_buffer_size, int) and self.replay_buffer_size >= 0, "replay_buffer_size",
             "an int >= 0")
        need(self.replay_ratio >= 0, "replay_ratio", ">= 0")
        need(self.item_init_std > 0, "item_init_std", "> 0")
        need(
            isinstance(self.cluster_counts, tuple)
            and len(self.cluster_counts) >= 1
            and all(isinstance(k, int) and k >= 2 for k in self.cluster_counts)
            and len(set(self.cluster_counts)) == len(self.cluster_counts),
            "cluster_counts", "a non-empty tuple of distinct ints >= 2",
        )
        need(self.reservoir_size >= max(self.cluster_counts), "reservoir_size",
             f">= the largest cluster count {max(self.cluster_counts)}")
        need(self.n_item_clusters >= 2, "n_item_clusters", "an int >= 2")
        need(isinstance(self.n_sampled_negatives, int) and self.n_sampled_negatives >= 0,
             "n_sampled_negatives", "an int >= 0")
        for name in ("tau_i2i", "tau_proto", "pcl_alpha", "lr"):
            need(getattr(self, name) > 0, name, "> 0")
        need(0.0 <= self.transfer_item_grad <= 1.0, "transfer_item_grad", "in [0, 1]")
        for name in ("lambda_i2i", "lambda_i2c", "weight_decay", "item_weight_decay"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(isinstance(self.i2c_warmup_steps, int) and self.i2c_warmup_steps >= 0, "i2c_warmup_steps",
             "an int >= 0")
        need(0.0 <= self.proto_ema < 1.0, "proto_ema", "in [0, 1)")
        need(0.0 <= self.popularity_prior < math.inf, "popularity_prior", "a finite number >= 0")
        need(
            isinstance(self.popularity_half_lives, tuple)
            and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.popularity_half_lives)
            and len(set(self.popularity_half_lives)) == len(self.popularity_half_lives),
            "popularity_half_lives", "a tuple of distinct ints >= 1",
        )
        need(self.popularity_half_life == 0 or self.popularity_half_life in self.popularity_half_lives,
             "popularity_half_life", f"0 or one of popularity_half_lives {list(self.popularity_half_lives)}")
        need(isinstance(self.seed, int), "seed", "an int")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["cluster_counts"] = list(self.cluster_counts)
        out["popularity_half_lives"] = list(self.popularity_half_lives)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SITNConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a checkpoint from another version). A
        missing ``item_bias`` means False (checkpoints older than that field were trained without it), a missing
        ``transfer_map_bias`` True (older checkpoints have the map's bias), a missing ``transfer_residual`` False and
        ``contrastive_target_grad`` True and ``init_history_items`` False (how older checkpoints were trained)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SITNConfig field(s) {unknown}; allowed: {sorted(known)}")
        values = dict(values)
        values.setdefault("item_bias", False)  # a checkpoint written before the bias coordinate existed
        values.setdefault("transfer_map_bias", True)  # one written before the map's bias could be switched off
        values.setdefault("transfer_residual", False)  # ones written before these switches existed train on as
        values.setdefault("contrastive_target_grad", True)  # they were trained
        values.setdefault("popularity_prior", 0.0)  # and ranked (no prior at inference)
        values.setdefault("init_history_items", False)
        for name in ("cluster_counts", "popularity_half_lives"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> SITNConfig:
        """A copy with ``changes`` applied (and validated), e.g. for ablations."""
        return dataclasses.replace(self, **changes)
