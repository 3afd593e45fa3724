"""Transfer works when the data has it, and only then: SITN on synthetic streams with and without shared
interests between the domains (``stream.synthetic``'s ``shared_interest``), judged by the offline
evaluation (``learner.offline.evaluate``) next to the single-domain model and popularity on the same events.

The run is ``bench/bench_transfer.py``'s ``run_strength`` at a small size (1,500 users, ~24 events each
of which ~15% in the target domain, so a test user's target history holds 2-4 items and the source
history ~12; SITN dim 32, max_len 16, lr 3e-3, at most 6 epochs, every other field the model's default),
seed 0. It takes about 1.5 minutes on two shared cores.

Measured with ``python bench/bench_transfer.py --users 1500 --max-epochs 6 --patience 2 --strengths 0,1
--seeds 3`` on the code of commit 6d4d4f5 (SITN n_views 1; seeds 0, 1, 2; seed 0 is the one this test runs;
full-ranking NDCG@10):

| strength | row | SITN | single-domain | popularity | item-kNN (target + source) |
| --- | --- | --- | --- | --- | --- |
| 1 | overlap | 0.1698, 0.1705, 0.1487 | 0.0377, 0.0388, 0.0431 | 0.0323, 0.0381, 0.0398 | 0.2209, 0.2192, 0.2176 |
| 1 | cold-start | 0.1643, 0.1867, 0.1724 | 0 (no query) | 0.0323, 0.0381, 0.0398 | 0.2175, 0.2234, 0.2208 |
| 0 | overlap | 0.0388, 0.0338, 0.0450 | 0.0478, 0.0467, 0.0396 | 0.0386, 0.0363, 0.0431 | 0.0426, 0.0280, 0.0417 |
| 0 | cold-start | 0.0350, 0.0259, 0.0341 | 0 (no query) | 0.0386, 0.0363, 0.0431 | 0.0095, 0.0084, 0.0081 |

Ratios: SITN / single-domain 4.50, 4.40, 3.45 at strength 1 and 0.81, 0.72, 1.14 at 0; SITN cold-start /
popularity 5.09, 4.91, 4.33 at strength 1 and 0.91, 0.71, 0.79 at 0. The margins below sit well inside
these, so a change of seed, machine or thread count does not flip them; a model change that does is a
change of the mechanism and must be re-measured. (With the previous default n_views 4, the same run gave
2.58-3.06x and 3.67-3.88x at strength 1, and 0.66-0.97x SITN / single-domain at 0.)

The single-domain model has no query without a target history: every score ties, and ties count against
the held-out item. Item co-occurrence over both histories, ranked on the same events, stays above SITN
at strength 1: SITN learns the transfer, but not yet as well as counting does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.bench_transfer import Workload, run_strength
from learner.offline.evaluate import RunResult

torch.set_num_threads(1)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Batches of 128 examples of either domain, the rule this test was calibrated with: with 15 % target events,
# batches counted in target examples (SITNRanker's default) hold 512 examples, so 6 epochs give SITN a quarter
# of the steps, and seed 0 at strength 1 measured SITN 0.0807 against single-domain 0.0599 (1.35x), still
# climbing at its last epoch. The test checks the mechanism at a small budget; bench_transfer.py measures the
# default rule at full size (1.81-1.83x).
WORKLOAD = Workload(users=1_500, max_epochs=6, patience=2, batch_by="examples")
MODELS = ("sitn", "single_domain", "popularity")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[float, dict[str, RunResult]]:
    workdir = Path(tmp_path_factory.mktemp("transfer"))
    return {strength: run_strength(WORKLOAD, strength, seed=0, workdir=workdir, models=MODELS)
            for strength in (1.0, 0.0)}


def ndcg(run: RunResult, setting: str) -> float:
    return run.test[setting]["ndcg@10"]


def test_with_shared_interests_sitn_beats_the_single_domain_model(runs: dict[float, dict[str, RunResult]]) -> None:
    shared = runs[1.0]
    # 1.5x: the source history (~12 items of the same clusters) must add far more than the 2-4 target
    # items say on their own; measured 3.45-4.50x.
    assert ndcg(shared["sitn"], "full/overlap") >= 1.5 * ndcg(shared["single_domain"], "full/overlap")
    assert shared["sitn"].test["full/overlap"]["hr@10"] > shared["single_domain"].test["full/overlap"]["hr@10"]


def test_with_shared_interests_cold_start_users_are_served_far_better_than_popularity(
    runs: dict[float, dict[str, RunResult]],
) -> None:
    shared = runs[1.0]
    # 2x: with the target history hidden only the source speaks; popularity cannot tell users apart.
    # Measured 4.33-5.09x.
    assert ndcg(shared["sitn"], "full/cold_start") >= 2.0 * ndcg(shared["popularity"], "full/cold_start")
    assert shared["sitn"].test["full/cold_start"]["hr@10"] >= 2.0 * shared["popularity"].test["full/cold_start"]["hr@10"]


def test_without_shared_interests_the_gain_vanishes(runs: dict[float, dict[str, RunResult]]) -> None:
    apart, shared = runs[0.0], runs[1.0]
    # The source says nothing about the target: no gain over single-domain (measured 0.72-1.14x; 1.3x
    # leaves room for one seed's noise and is far below the 3.45x+ of strength 1) ...
    assert ndcg(apart["sitn"], "full/overlap") < 1.3 * ndcg(apart["single_domain"], "full/overlap")
    # ... and cold-start users get nothing better than popularity (measured 0.71-0.91x).
    assert ndcg(apart["sitn"], "full/cold_start") < 1.3 * ndcg(apart["popularity"], "full/cold_start")
    # The same model and budget: what moved is the data, so the gain is the shared interest's.
    assert ndcg(shared["sitn"], "full/cold_start") >= 2.0 * ndcg(apart["sitn"], "full/cold_start")


def test_without_shared_interests_sitn_is_not_much_worse_than_single_domain(
    runs: dict[float, dict[str, RunResult]],
) -> None:
    apart = runs[0.0]
    # An uninformative source must not drown the target path (source-history dropout, a gate that starts
    # closed). Measured 0.72-1.14x while the offline ranker registered the whole catalogue up front; since
    # items get rows as examples bring them, single-domain learns faster and seed 0 measures 0.58x
    # (SITN 0.0396, single-domain 0.0685): SITN is *below* single-domain without shared interests, the
    # open part of issue 9. This is a regression floor, not the goal: 0.45x still fails a source path that
    # more than halves the target's figure.
    assert ndcg(apart["sitn"], "full/overlap") >= 0.45 * ndcg(apart["single_domain"], "full/overlap")
