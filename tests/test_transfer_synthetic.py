"""Transfer works when the data has it, and only then: SITN on synthetic streams with and without shared
interests between the domains (``stream.synthetic``'s ``shared_interest``), judged by the offline
evaluation (``learner.evaluate``) next to the single-domain model and popularity on the same events.

The run is ``bench/bench_transfer.py``'s ``run_strength`` at a small size (1,500 users, ~24 events each
of which ~15% in the target domain, so a test user's target history holds 2-4 items and the source
history ~12; SITN dim 32, max_len 16, lr 3e-3, at most 6 epochs), seed 0. It takes about 1.5 minutes on
two shared cores.

Measured with ``python bench/bench_transfer.py --users 1500 --max-epochs 6 --patience 2 --strengths 0,1
--seeds 3``
(seeds 0, 1, 2; seed 0 is the one this test runs; full-ranking NDCG@10):

| strength | row | SITN | single-domain | popularity | item-kNN (target + source) |
| --- | --- | --- | --- | --- | --- |
| 1 | overlap | 0.1240, 0.1454, 0.1563 | 0.0480, 0.0475, 0.0510 | 0.0323, 0.0381, 0.0398 | 0.2209, 0.2192, 0.2176 |
| 1 | cold-start | 0.1254, 0.1445, 0.1464 | 0 (no query) | 0.0323, 0.0381, 0.0398 | 0.2175, 0.2234, 0.2208 |
| 0 | overlap | 0.0311, 0.0394, 0.0379 | 0.0465, 0.0407, 0.0577 | 0.0386, 0.0363, 0.0431 | 0.0426, 0.0280, 0.0417 |
| 0 | cold-start | 0.0277, 0.0340, 0.0232 | 0 (no query) | 0.0386, 0.0363, 0.0431 | 0.0095, 0.0084, 0.0081 |

(The single-domain model has no query without a target history: every score ties, and ties count
against the held-out item. Item co-occurrence over both histories, ranked on the same events, is far
above SITN at strength 1: SITN learns the transfer but not yet as well as counting does.)

Ratios: SITN / single-domain 2.58, 3.06, 3.06 at strength 1 and 0.67, 0.97, 0.66 at 0; SITN cold-start
/ popularity 3.88, 3.80, 3.67 at strength 1 and 0.72, 0.94, 0.54 at 0. The margins below sit well inside
these (the weakest seed clears each by a third or more), so a change of seed, machine or thread count
does not flip them; a model change that does is a change of the mechanism and must be re-measured.

At strength 0, SITN does not merely lose its gain: it ranks below the single-domain model (best epoch
1 on every seed, validation falls as training goes on), i.e. the source path adds noise it cannot learn
to ignore. The issue asks for "within noise"; that check is an expected failure until the model copes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.bench_transfer import Workload, run_strength
from learner.evaluate import RunResult

torch.set_num_threads(1)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORKLOAD = Workload(users=1_500, max_epochs=6, patience=2)
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
    # items say on their own; measured 2.58-3.06x.
    assert ndcg(shared["sitn"], "full/overlap") >= 1.5 * ndcg(shared["single_domain"], "full/overlap")
    assert shared["sitn"].test["full/overlap"]["hr@10"] > shared["single_domain"].test["full/overlap"]["hr@10"]


def test_with_shared_interests_cold_start_users_are_served_far_better_than_popularity(
    runs: dict[float, dict[str, RunResult]],
) -> None:
    shared = runs[1.0]
    # 2x: with the target history hidden only the source speaks; popularity cannot tell users apart.
    # Measured 3.67-3.88x.
    assert ndcg(shared["sitn"], "full/cold_start") >= 2.0 * ndcg(shared["popularity"], "full/cold_start")
    assert shared["sitn"].test["full/cold_start"]["hr@10"] >= 2.0 * shared["popularity"].test["full/cold_start"]["hr@10"]


def test_without_shared_interests_the_gain_vanishes(runs: dict[float, dict[str, RunResult]]) -> None:
    apart, shared = runs[0.0], runs[1.0]
    # The source says nothing about the target: no gain over single-domain (measured 0.66-0.97x) ...
    assert ndcg(apart["sitn"], "full/overlap") < 1.2 * ndcg(apart["single_domain"], "full/overlap")
    # ... and cold-start users get nothing better than popularity (measured 0.54-0.94x).
    assert ndcg(apart["sitn"], "full/cold_start") < 1.3 * ndcg(apart["popularity"], "full/cold_start")
    # The same model and budget: what moved is the data, so the gain is the shared interest's.
    assert ndcg(shared["sitn"], "full/cold_start") >= 2.0 * ndcg(apart["sitn"], "full/cold_start")


@pytest.mark.xfail(strict=True, reason="SITN ranks below single-domain when the source is uninformative "
                                       "(measured 0.67x, 0.97x, 0.66x on seeds 0-2); the issue asks for within noise")
def test_without_shared_interests_sitn_is_no_worse_than_single_domain(runs: dict[float, dict[str, RunResult]]) -> None:
    apart = runs[0.0]
    # 0.8x: a loss beyond one seed-to-seed standard deviation of the single-domain figure (0.0087 on 0.048,
    # 18%). When this passes, the model copes: drop the xfail.
    assert ndcg(apart["sitn"], "full/overlap") >= 0.8 * ndcg(apart["single_domain"], "full/overlap")
