"""``SITNLearner``: the online learner contract (one optimizer step per ``learn_many``) around SITNModel.

Optimisation: dense parameters use AdamW; the growing item tables get *sparse* gradients and a lazy
Adam (:class:`learner.core.optim.LazyAdam`, SparseAdam's update: only rows a batch touched are updated, no
weight decay). A dense AdamW over 100k x 64 table rows every step would cost more than the rest of it.

Defined behaviour at the edges:

- unknown user: an all-empty history -> a zero query bar the item-bias coordinate: items rank by their
  learned bias (see :mod:`learner.core.model`);
- an item seen in a query history but never learned is dropped from that history;
- an item registered (``register_items``) but never trained has its initial N(0, item_init_std^2) row;
- ``consumed`` and ``recommend(exclude_consumed=True)`` use the stored, bounded (``max_len``) history.

Randomness: each learner owns a torch RNG stream (seeded by ``config.seed``, saved in checkpoints), so
two learners with the same seed and data give identical weights even when interleaved, and a restored
learner continues exactly like the original.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.core import popularity
from learner.core.batch import (
    History,
    TrainingBatch,
    build_training_batch,
    encode_histories,
    latest_timestamp,
)
from learner.core.checkpoint import encode_checkpoint, load_checkpoint, write_checkpoint
from learner.core.config import SITNConfig
from learner.core.encoder import DomainEncoder
from learner.core.history import EMPTY, RecentHistories
from learner.core.idmap import IdMap, next_capacity
from learner.core.loss import info_nce_i2i, sampled_softmax_loss, swapped_proto_nce
from learner.core.model import Interests, SITNModel
from learner.core.optim import LazyAdam
from learner.core.prototypes import ItemClusters, StreamingPrototypes
from stream.errors import CheckpointError
from stream.user_state import Example

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
EMBED_CHUNK = 4096  # users per forward pass in embed_histories


class SITNLearner:
    """Cross-domain SITN learner; see the module docstring and ../shared/SITN_SPEC.md."""

    def __init__(self, config: SITNConfig, source: str, target: str) -> None:
        if not isinstance(config, SITNConfig):
            raise TypeError(f"config must be a SITNConfig, got {type(config).__name__}")
        for name, value in (("source", source), ("target", target)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty domain name, got {value!r}")
        if source == target:
            raise ValueError(f"source and target domains must differ, got {source!r} twice")
        self.config = config
        self.source = source
        self.target = target
        self.step = 0
        self.extra: dict[str, Any] = {}
        # the counts the popularity prior reads (SITNConfig.popularity_half_life; the stream's tuner moves it)
        self._popularity_half_life = config.popularity_half_life
        self.domains = {"source": source, "target": target} if config.use_source else {"target": target}
        self._role_of = {name: role for role, name in self.domains.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = SITNModel(config)
            self._rng_state = torch.get_rng_state()
        self.idmaps = {role: IdMap() for role in self.domains}
        self._dense_opt = torch.optim.AdamW(
            self._dense_parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
        self._sparse_opt = LazyAdam(
            [self.model.encoder(role).item_weight for role in self.domains], lr=config.lr,
            weight_decay=config.item_weight_decay, skip_zero_rows=config.item_skip_zero_grad,
        )
        self.prototypes = (
            StreamingPrototypes(
                cluster_counts=config.cluster_counts, dim=config.proj_dim, reservoir_size=config.reservoir_size,
                ema=config.proto_ema, alpha=config.pcl_alpha, tau=config.tau_proto,
                use_concentration=config.use_pcl_concentration, kmeans_iters=config.kmeans_iters, seed=config.seed,
            )
            if config.use_source
            else None
        )
        self.item_clusters = (
            {role: ItemClusters(config.n_item_clusters, config.kmeans_iters, config.seed) for role in self.domains}
            if config.use_coarse_level
            else {}
        )
        self.histories = RecentHistories((source, target), config.max_len, config.max_users)
        # the last replay_buffer_size trained examples; each step also replays a sample of them
        self._replay: deque[Example] = deque(maxlen=config.replay_buffer_size)

    @property
    def popularity_half_life(self) -> int:
        """The counts the popularity prior reads now: 0 all-time, h one of ``SITNConfig.popularity_half_lives``."""
        return self._popularity_half_life

    @popularity_half_life.setter
    def popularity_half_life(self, value: int) -> None:
        if value != 0 and value not in self.config.popularity_half_lives:
            raise ValueError(f"popularity_half_life must be 0 or one of {list(self.config.popularity_half_lives)}, "
                             f"got {value}")
        self._popularity_half_life = int(value)

    # -- internals ---------------------------------------------------------------------------------
    def _dense_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if not name.endswith("item_weight")]

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            yield
            self._rng_state = torch.get_rng_state()

    def _role(self, domain: str | None) -> str:
        domain = self.target if domain is None else domain
        role = self._role_of.get(domain)
        if role is None:
            raise ValueError(f"domain {domain!r} is not served by this learner; allowed: {sorted(self._role_of)}")
        return role

    def _ensure_capacity(self) -> None:
        for role, idmap in self.idmaps.items():
            enc = self.model.encoder(role)
            if idmap.n_rows > enc.capacity:
                new_rows = next_capacity(enc.capacity, idmap.n_rows)
                enc.grow(new_rows, [self._sparse_opt])
                log.info("grew item table role=%s rows=%d items=%d", role, new_rows, len(idmap))

    # -- catalogue ---------------------------------------------------------------------------------
    def register_items(self, domain: str, item_ids: Iterable[str]) -> None:
        """Give ``item_ids`` rows now (they are scored with their initial rows until trained)."""
        role = self._role(domain)
        with self._own_rng():
            self.idmaps[role].add(item_ids)
            self._ensure_capacity()

    # -- learning ----------------------------------------------------------------------------------
    def learn_many(self, batch: Sequence[Example]) -> dict[str, float]:
        """One optimizer step on ``batch`` with every enabled loss, then record the events.

        Returns the step's statistics (see the contract); ``loss_i2i``/``loss_i2c`` are 0.0 when the
        loss is off or has no pairs / prototypes yet; ``proto_agreement`` is NaN before prototypes exist.
        A single-domain learner (``use_source=False``) trains on target events only; a batch with none
        records the histories and returns NaN losses without a step.
        """
        start_s = time.perf_counter()
        examples = list(batch)
        if not examples:
            raise ValueError("learn_many needs at least one example, got an empty batch")
        for ex in examples:
            if ex.domain not in (self.source, self.target):
                raise ValueError(
                    f"example {ex.event_id!r} has domain {ex.domain!r}; allowed: {[self.source, self.target]}"
                )
        trained = examples if self.config.use_source else [ex for ex in examples if ex.domain == self.target]
        stats: dict[str, float] = {
            "loss": math.nan, "loss_main": math.nan, "loss_i2i": 0.0, "loss_i2c": 0.0, "i2i_pairs": 0.0,
            "proto_agreement": math.nan,
        }
        replayed: list[Example] = []
        if trained:
            with self._own_rng():
                replayed = self._sample_replay(len(trained))
                stats.update(self._train_step(trained + replayed, n_fresh=len(trained)))
            self.step += 1
            self._maybe_recluster()
            self._replay.extend(trained)
        for ex in examples:
            self.histories.record(ex.user_id, ex.domain, ex.item_id, ex.timestamp, ex.history)
        stats["step"] = float(self.step)
        stats["batch_size"] = float(len(examples))
        stats["trained_examples"] = float(len(trained))
        stats["replayed_examples"] = float(len(replayed))
        if self.prototypes is not None:
            stats["proto_entropy"] = self.prototypes.mean_entropy()
            for (role, k), proto in self.prototypes.sets.items():
                stats[f"proto_nonempty_{role}_k{k}"] = float((proto.sizes > 0).sum())
        else:
            stats["proto_entropy"] = math.nan
        stats["examples_per_s"] = len(examples) / max(time.perf_counter() - start_s, 1e-9)
        return stats

    def _sample_replay(self, n_fresh: int) -> list[Example]:
        """``replay_ratio * n_fresh`` earlier examples drawn uniformly (with replacement) from the buffer."""
        n = min(round(self.config.replay_ratio * n_fresh), len(self._replay)) if self._replay else 0
        if n == 0:
            return []
        picks = torch.randint(0, len(self._replay), (n,)).tolist()
        return [self._replay[i] for i in picks]

    def _train_step(self, examples: list[Example], n_fresh: int) -> dict[str, float]:
        """One step on ``examples``; the first ``n_fresh`` are new, the rest replayed (not counted again
        in the label frequencies behind the logQ correction)."""
        cfg = self.config
        known_rows = {role: len(idmap) for role, idmap in self.idmaps.items()}  # rows 1..n existed before
        tb = build_training_batch(examples, self.domains, self.idmaps, cfg.max_len, cfg.n_time_gap_buckets)
        self._ensure_capacity()
        if cfg.init_new_items_from_history:
            self._init_new_rows(tb, known_rows)
        if cfg.use_source and (cfg.source_dropout > 0 or cfg.own_history_dropout > 0):
            self._drop_other_history(tb)
        for role, idx in (("source", 0), ("target", 1)):
            if role in self.domains:
                self._count_labels(self.model.encoder(role), tb.label_rows[:n_fresh][tb.event_role[:n_fresh] == idx])
        if not self.model.training:  # train() walks every module: only after an eval (embed_histories)
            self.model.train()
        interests = self.model(tb.sequences)
        loss_main = self._main_loss(tb, interests)
        total = loss_main
        out = {"loss_main": loss_main.item()}
        if self.prototypes is not None:
            z = self.model.summaries(interests)
            both = interests.has_history["source"] & interests.has_history["target"]
            labels = self._prototype_labels(z, interests)
            if cfg.use_i2i:
                loss_i2i, pairs = info_nce_i2i(z["source"], z["target"], tb.user_keys, both, cfg.tau_i2i)
                total = total + cfg.lambda_i2i * loss_i2i
                out["loss_i2i"], out["i2i_pairs"] = loss_i2i.item(), float(pairs)
            if cfg.use_i2c and self.step >= cfg.i2c_warmup_steps and labels and bool(both.any()):
                loss_i2c = self._i2c_loss(z, both, labels)
                total = total + cfg.lambda_i2c * loss_i2c
                out["loss_i2c"] = loss_i2c.item()
            out["proto_agreement"] = self._agreement(both, labels)
            self._update_prototypes(z, interests, labels)
        self._dense_opt.zero_grad(set_to_none=True)
        self._sparse_opt.zero_grad(set_to_none=True)
        total.backward()
        self._dense_opt.step()
        self._sparse_opt.step()
        out["loss"] = total.item()
        return out

    def _count_labels(self, enc: DomainEncoder, rows: torch.Tensor) -> None:
        """Count a step's fresh labels: ``item_count`` (all-time) and, with ``logq_half_life_events``, the
        decayed counts behind the logQ correction. Decay without touching every row: each label adds the
        current weight, which then grows by 2^(n / half-life); the frequencies are ratios, so only the
        weight's growth relative to older labels matters. Rescaled long before float64 could overflow."""
        n_before = int(enc.item_count.sum()) if self.config.popularity_half_lives else 0
        enc.item_count.index_add_(0, rows, torch.ones_like(rows))
        for h in self.config.popularity_half_lives:  # the prior's decayed counts (learner.core.popularity)
            offset = getattr(enc, f"pop_offset_{h}")
            offset.fill_(popularity.add_labels(getattr(enc, f"pop_recent_{h}").numpy(), float(offset),
                                               rows.numpy(), n_before, h))
        half_life = self.config.logq_half_life_events
        if half_life <= 0 or len(rows) == 0:
            return
        state = enc.recent_state  # [weight of the next label, total weight]
        enc.item_recent.index_add_(0, rows, torch.full(rows.shape, float(state[0]), dtype=torch.float64))
        state[1] += state[0] * len(rows)
        state[0] *= 2.0 ** (len(rows) / half_life)
        if state[0] > 1e150:
            enc.item_recent.div_(state[0])
            state.div_(state[0].clone())

    def _init_new_rows(self, tb: TrainingBatch, known_rows: Mapping[str, int]) -> None:
        """Start each item row first seen as a label in this batch at the mean of the rows of the
        same-domain items in its example's history that existed before the batch (random if none).

        A row that is the label of several such examples takes the mean of the last one's history (as
        if the examples were applied in order). New rows are never read here (only rows < first are), so
        one batched gather gives each example's mean.
        """
        for role, idx in (("source", 0), ("target", 1)):
            if role not in self.domains:
                continue
            first = known_rows[role] + 1  # rows >= first were added by this batch
            seq = tb.sequences[role]
            old = seq.valid & (seq.items < first)  # (B, L) history items with trained rows
            if self.config.init_history_items:
                self._init_history_rows(role, seq.items, seq.valid & (seq.items >= first), old)
            take = (tb.label_rows >= first) & (tb.event_role == idx) & old.any(dim=1)  # (B,)
            if not bool(take.any()):
                continue
            examples = take.nonzero().squeeze(1)  # (n,)
            labels = tb.label_rows[examples].numpy()  # (n,)
            _, last_from_end = np.unique(labels[::-1], return_index=True)
            examples = examples[torch.from_numpy(np.sort(len(labels) - 1 - last_from_end))]  # last per label
            weight = self.model.encoder(role).item_weight
            with torch.no_grad():
                weight.index_copy_(0, tb.label_rows[examples], _history_means(weight, seq.items[examples], old[examples]))

    def _init_history_rows(self, role: str, items: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> None:
        """Start each row first seen in a history (``new`` (B, L): the slots holding rows this batch added) at
        the mean of the older rows of that history (``old`` (B, L)), the last such history if several; a row
        that is also a new label in the batch is set again from its example afterwards (``_init_new_rows``).
        Offline epochs are shuffled, so a book first met in another example's history, before its own event,
        would otherwise keep a random row, and one labelled once learns from a single example."""
        take = new & old.any(dim=1, keepdim=True)  # (B, L)
        if not bool(take.any()):
            return
        examples, slots = take.nonzero(as_tuple=True)  # (n,) each
        rows = items[examples, slots].numpy()  # (n,)
        _, last_from_end = np.unique(rows[::-1], return_index=True)
        keep = torch.from_numpy(np.sort(len(rows) - 1 - last_from_end))  # the last occurrence of each row
        examples = examples[keep]
        weight = self.model.encoder(role).item_weight
        with torch.no_grad():
            weight.index_copy_(0, items[examples, slots[keep]], _history_means(weight, items[examples], old[examples]))

    def _drop_other_history(self, tb: TrainingBatch) -> None:
        """Blank the other domain's history of a random ``source_dropout`` share of the examples and the
        event's own domain's history of a disjoint ``own_history_dropout`` share."""
        draw = torch.rand(tb.label_rows.shape[0])  # (B,)
        drop_other = draw < self.config.source_dropout
        drop_own = draw >= 1.0 - self.config.own_history_dropout
        for role, idx in (("source", 0), ("target", 1)):
            seq = tb.sequences[role]
            seq.valid[drop_other & (tb.event_role != idx)] = False  # role's history of the other role's events
            seq.valid[drop_own & (tb.event_role == idx)] = False  # role's history of its own events

    def _main_loss(self, tb: TrainingBatch, interests: Interests) -> torch.Tensor:
        """Sampled softmax per event domain, weighted by the domain's share of the batch."""
        n_neg = self.config.n_sampled_negatives
        parts = []
        for role, idx in (("source", 0), ("target", 1)):
            if role not in self.domains:
                continue
            mask = tb.event_role == idx  # (B,)
            n = int(mask.sum())
            if n == 0:
                continue
            enc = self.model.encoder(role)
            n_items = len(self.idmaps[role])
            pos_rows = tb.label_rows[mask]  # (n,)
            sampled = torch.randint(1, n_items + 1, (n_neg,))  # (S,) uniform over known items
            cand_rows = torch.cat([pos_rows, sampled])  # (n + S,)
            # expected copies of each item in the candidate set: n in-batch draws from the label
            # distribution plus S uniform draws (computed for the candidates only, not the whole table)
            if self.config.logq_half_life_events > 0:  # recent label frequencies (_count_labels)
                freq = enc.item_recent[cand_rows] / enc.recent_state[1]  # (n + S,)
            else:
                total = float(enc.item_count[: n_items + 1].sum())
                freq = enc.item_count[cand_rows].to(torch.float64) / total  # (n + S,)
            log_q = torch.log(n * freq + n_neg / n_items).to(torch.float32)  # (n + S,); the first n: positives
            vectors = enc.item_vectors(cand_rows)  # (n + S, D); the first n are the positives
            scored = vectors
            share = self.config.transfer_item_grad
            if interests.own_queries is not None and share < 1.0:  # the same values, a share of the gradient
                scored = vectors.detach() + share * (vectors - vectors.detach())
            loss = sampled_softmax_loss(
                interests.queries[role][mask], scored[:n], pos_rows, log_q[:n], scored, cand_rows, log_q,
            )
            if interests.own_queries is not None:  # transfer_residual: the own interests must also stand alone
                loss = loss + sampled_softmax_loss(
                    interests.own_queries[role][mask], vectors[:n], pos_rows, log_q[:n], vectors, cand_rows, log_q,
                )
            parts.append(loss * (n / tb.label_rows.shape[0]))
        return torch.stack(parts).sum()

    def _prototype_labels(
        self, z: dict[str, torch.Tensor], interests: Interests
    ) -> dict[int, dict[str, np.ndarray]]:
        """For every ready K, each row's prototype per domain (computed for all rows)."""
        assert self.prototypes is not None
        out: dict[int, dict[str, np.ndarray]] = {}
        z_np = {role: z[role].detach().numpy() for role in self.domains}
        for k in self.config.cluster_counts:
            if self.prototypes.ready(k):
                out[k] = {role: self.prototypes.assign(role, k, z_np[role]) for role in self.domains}
        return out

    def _i2c_loss(
        self, z: dict[str, torch.Tensor], both: torch.Tensor, labels: dict[int, dict[str, np.ndarray]]
    ) -> torch.Tensor:
        assert self.prototypes is not None
        both_np = both.numpy()
        losses = []
        for k, per_role in labels.items():
            ps, pt = self.prototypes.sets[("source", k)], self.prototypes.sets[("target", k)]
            losses.append(
                swapped_proto_nce(
                    z["source"][both], z["target"][both],
                    torch.from_numpy(ps.centroids), torch.from_numpy(ps.concentration),
                    torch.from_numpy(pt.centroids), torch.from_numpy(pt.concentration),
                    torch.from_numpy(per_role["source"][both_np]), torch.from_numpy(per_role["target"][both_np]),
                )
            )
        return torch.stack(losses).mean()

    def _agreement(self, both: torch.Tensor, labels: dict[int, dict[str, np.ndarray]]) -> float:
        assert self.prototypes is not None
        both_np = both.numpy()
        if not labels or not both_np.any():
            return math.nan
        values = [
            self.prototypes.agreement(k, per_role["source"][both_np], per_role["target"][both_np])
            for k, per_role in labels.items()
        ]
        return float(np.mean(values))

    def _update_prototypes(
        self, z: dict[str, torch.Tensor], interests: Interests, labels: dict[int, dict[str, np.ndarray]]
    ) -> None:
        assert self.prototypes is not None
        z_np = {role: z[role].detach().numpy() for role in self.domains}
        has = {role: interests.has_history[role].numpy() for role in self.domains}
        for k, per_role in labels.items():
            for role in self.domains:
                if has[role].any():
                    self.prototypes.ema_update(role, k, z_np[role][has[role]], per_role[role][has[role]])
        self.prototypes.push(z_np["source"], z_np["target"], has["source"], has["target"])

    def _maybe_recluster(self) -> None:
        if self.step % self.config.recluster_every_steps != 0:
            return
        started_s = time.perf_counter()
        if self.prototypes is not None:
            self.prototypes.recluster()
        for role, clusters in self.item_clusters.items():
            n = len(self.idmaps[role])
            enc = self.model.encoder(role)
            labels = clusters.recluster(enc.item_weight[1 : n + 1].detach().numpy())
            if labels is not None:
                enc.item_cluster[1 : n + 1] = torch.from_numpy(labels + 1)
        log.info(
            "reclustered step=%d elapsed_s=%.3f agreement=%s", self.step, time.perf_counter() - started_s,
            self.prototypes.reservoir_agreement if self.prototypes is not None else None,
        )

    # -- inference ---------------------------------------------------------------------------------
    def embed_histories(self, histories: Sequence[Mapping[str, History]], domain: str | None = None) -> np.ndarray:
        """(N, V, D) float32 query vectors of ``domain`` (default: target) from explicit histories."""
        return self.embed_histories_at(histories, [self.model.transfer_scale], domain)[0]

    def embed_histories_at(self, histories: Sequence[Mapping[str, History]], scales: Sequence[tuple[float, float]],
                           domain: str | None = None) -> list[np.ndarray]:
        """``embed_histories`` at each query-time transfer scale (``SITNModel.transfer_scale``) of ``scales``,
        from one pass of the encoders; the model's own scale is left as it was."""
        role = self._role(domain)
        cfg = self.config
        out = [np.zeros((len(histories), cfg.n_views, cfg.dim), dtype=np.float32) for _ in scales]
        current = self.model.transfer_scale
        # rows that were a training label at least once; a registered but never trained item (its row is
        # still its random initialisation) is dropped from a query history like an unknown one
        trained = {r: (self.model.encoder(r).item_count > 0).numpy() for r in self.domains}
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(histories), EMBED_CHUNK):
                    chunk = histories[start : start + EMBED_CHUNK]
                    reference = latest_timestamp(chunk, list(self.domains.values()))  # only what the model reads
                    sequences = {
                        r: encode_histories(
                            [h.get(name, EMPTY) for h in chunk], reference, self.idmaps[r], cfg.max_len,
                            cfg.n_time_gap_buckets, add=False, trained_rows=trained[r],
                        )
                        for r, name in self.domains.items()
                    }
                    views, has = self.model.encode(sequences)
                    for i, scale in enumerate(scales):
                        self.model.transfer_scale = scale
                        out[i][start : start + len(chunk)] = self.model.interests(views, has).queries[role].numpy()
        finally:
            self.model.transfer_scale = current
        return out

    def embed_users(self, user_ids: Sequence[str], domain: str | None = None) -> np.ndarray:
        """(N, V, D) from stored histories; an unknown user has an empty history (module docstring)."""
        return self.embed_histories([self.histories.get(u) for u in user_ids], domain)

    def embed_items(self, domain: str | None = None) -> tuple[list[str], np.ndarray]:
        """All known item ids of ``domain`` (default: target) in row order and their (N, D) vectors."""
        role = self._role(domain)
        n = len(self.idmaps[role])
        vectors = self.model.encoder(role).item_weight[1 : n + 1].detach().numpy().copy()
        prior = self._popularity_prior(role, n)
        if prior is not None:
            vectors[:, -1] += prior  # the bias coordinate: what every query's last coordinate (1) multiplies
        return self.idmaps[role].ids(), vectors

    def _popularity_prior(self, role: str, n: int) -> np.ndarray | None:
        """(n,) float32 ``popularity_prior * log(1 + label count)`` per item in row order, None without a prior
        (``SITNConfig.popularity_prior``, with ``item_bias`` only: added to every inference score, never to
        training's)."""
        beta = self.config.popularity_prior
        if beta == 0.0 or not self.config.item_bias:  # no bias coordinate: no inner product can carry it
            return None
        return (beta * np.log1p(self.prior_counts(role, self.popularity_half_life, n))).astype(np.float32)

    def prior_counts(self, role: str, half_life: int, n: int) -> np.ndarray:
        """(n,) float64 label counts of items 1..n in row order: all-time (``half_life`` 0) or decayed with
        ``half_life``, one of ``SITNConfig.popularity_half_lives`` (learner.core.popularity)."""
        enc = self.model.encoder(role)
        if half_life == 0:
            return enc.item_count[1 : n + 1].numpy().astype(np.float64)
        if half_life not in self.config.popularity_half_lives:
            raise ValueError(f"half_life must be 0 or one of {list(self.config.popularity_half_lives)}, "
                             f"got {half_life}")
        total = int(enc.item_count.sum())
        return popularity.decayed_counts(getattr(enc, f"pop_recent_{half_life}")[1 : n + 1].numpy(),
                                         float(getattr(enc, f"pop_offset_{half_life}")), total, half_life)

    def score_items(self, queries: np.ndarray, domain: str | None = None) -> np.ndarray:
        """(N, n_items) scores: max over views of <q_v, e_i>, items in ``embed_items`` order (its popularity prior
        included)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 3 or queries.shape[2] != self.config.dim:
            raise ValueError(f"queries must have shape (N, V, {self.config.dim}), got {queries.shape}")
        role = self._role(domain)
        with torch.no_grad():  # a view of the table: no copy, no id list (the publish gate calls this per step)
            items = self.model.encoder(role).item_weight[1 : len(self.idmaps[role]) + 1].detach().numpy()
        n, v, d = queries.shape
        scores = (queries.reshape(n * v, d) @ items.T).reshape(n, v, -1).max(axis=1)  # (N, n_items), BLAS
        prior = self._popularity_prior(role, items.shape[0])
        if prior is not None:  # as embed_items' bias coordinate: the same for every view, so after the max
            scores += prior[None, :]
        return scores

    def recommend(self, user_id: str, k: int = 10, exclude_consumed: bool = True) -> list[tuple[str, float]]:
        """Top-``k`` target items for ``user_id`` by score, best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        item_ids, _ = self.embed_items()
        if not item_ids:
            return []
        scores = self.score_items(self.embed_users([user_id]))[0]
        if exclude_consumed:
            rows = self.idmaps["target"].rows(self.consumed(user_id, self.target))
            scores[rows[rows > 0] - 1] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        return [(item_ids[i], float(scores[i])) for i in top if np.isfinite(scores[i])]

    def consumed(self, user_id: str, domain: str) -> set[str]:
        """Items in the user's stored (bounded) history of ``domain``."""
        if domain not in (self.source, self.target):
            raise ValueError(f"domain {domain!r} is not one of {[self.source, self.target]}")
        return set(self.histories.get(user_id)[domain][0])

    def known_users(self) -> list[str]:
        """Users with a stored history, least recently learned first."""
        return self.histories.user_ids()

    def prototype_stats(self) -> dict[str, object]:
        """Sizes, concentrations, entropy and agreement per domain and granularity."""
        out: dict[str, object] = {"step": self.step}
        if self.prototypes is not None:
            out.update(self.prototypes.stats())
        for role, clusters in self.item_clusters.items():
            out[f"item_clusters_{role}_reclusters"] = clusters.n_reclusters
            sizes = np.bincount(self.model.encoder(role).item_cluster[1 : len(self.idmaps[role]) + 1].numpy(),
                                minlength=self.config.n_item_clusters + 1)
            out[f"item_clusters_{role}_sizes"] = sizes[1:].tolist()
            out[f"item_clusters_{role}_unassigned"] = int(sizes[0])
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "source": self.source,
            "target": self.target,
            "step": self.step,
            "capacity": {role: self.model.encoder(role).capacity for role in self.domains},
            "model": self.model.state_dict(),
            "dense_opt": self._dense_opt.state_dict(),
            "sparse_opt": self._sparse_opt.state_dict(),
            "idmaps": {role: m.state_dict() for role, m in self.idmaps.items()},
            "prototypes": self.prototypes.state_dict() if self.prototypes is not None else None,
            "item_clusters": {role: c.state_dict() for role, c in self.item_clusters.items()},
            "histories": self.histories.state_dict(),
            "rng_state": self._rng_state,
            "replay": list(self._replay),
            "extra": self.extra,
            "transfer_scale": list(self.model.transfer_scale),
            "popularity_half_life": self.popularity_half_life,
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Atomic checkpoint of everything; ``extra`` (e.g. stream offsets) replaces ``self.extra`` first."""
        write_checkpoint(path, self.encode(extra))
        log.info("saved checkpoint path=%s step=%d", path, self.step)

    def encode(self, extra: dict[str, Any] | None = None) -> bytes:
        """The checkpoint payload of everything now (``save`` writes it; ``learner.online.checkpoint_store`` can write it
        on another thread while training goes on); ``extra`` replaces ``self.extra`` first."""
        if extra is not None:
            self.extra = dict(extra)
        return encode_checkpoint(self.state_dict())

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SITNLearner:
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
        out = cls(SITNConfig.from_dict(state["config"]), state["source"], state["target"])
        for role, capacity in state["capacity"].items():
            out.model.encoder(role).grow(capacity, [out._sparse_opt])
        out.model.load_state_dict(state["model"])
        out._dense_opt.load_state_dict(state["dense_opt"])
        out._sparse_opt.load_state_dict(state["sparse_opt"])
        out.idmaps = {role: IdMap.from_state_dict(s) for role, s in state["idmaps"].items()}
        if out.prototypes is not None:
            out.prototypes.load_state_dict(state["prototypes"])
        for role, s in state["item_clusters"].items():
            out.item_clusters[role].load_state_dict(s)
        out.histories = RecentHistories.from_state_dict(state["histories"])
        out._rng_state = state["rng_state"]
        out._replay.extend(state.get("replay", ()))
        out.step = int(state["step"])
        out.extra = dict(state["extra"])
        warm, cold = state.get("transfer_scale", (1.0, 1.0))  # older checkpoints: transfer as trained
        out.model.transfer_scale = (float(warm), float(cold))
        out.popularity_half_life = int(state.get("popularity_half_life", out.config.popularity_half_life))
        return out

    @classmethod
    def load(cls, path: str | Path) -> SITNLearner:
        """Rebuild a learner from :meth:`save` output (same scores, same continuation)."""
        learner = cls.from_state_dict(load_checkpoint(path))
        log.info("loaded checkpoint path=%s step=%d", path, learner.step)
        return learner


def _history_means(weight: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(n, D)`` mean of ``weight``'s rows ``rows`` (n, L) where ``mask`` (n, L) holds, each row of ``mask``
    with at least one True (the starting vector of a new item row: the items it was met with)."""
    history = weight.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)  # (n, L, D)
    history = history * mask.unsqueeze(-1).to(history.dtype)
    return history.sum(dim=1) / mask.sum(dim=1, keepdim=True).to(history.dtype)
