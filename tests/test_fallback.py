"""Serving never worse than the simple ranker: the fallback decision (exact expectations), and serving
switching ``served_by`` with what the learner publishes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from learner.online.gate import RankerFallback, paired_z
from serving.actor import ServingCore
from serving.settings import ServingSettings
from stream.events import EmbeddingBatch

BASELINES = ("popularity", "cooccurrence")


def fallback(**kwargs: float) -> RankerFallback:
    options = {"window": 8, "min_events": 4, "z_critical": 2.0, "recover_z": 0.0, **kwargs}
    return RankerFallback(BASELINES, int(options["window"]), int(options["min_events"]), options["z_critical"],
                          options["recover_z"])


def test_keeps_the_model_until_min_events() -> None:
    fb = fallback()
    fb.record([0.0] * 3, {"popularity": [1.0] * 3, "cooccurrence": [1.0] * 3})
    assert (fb.events, fb.decide(), fb.switches) == (3, "model", 0)
    fb.record([0.0], {"popularity": [1.0], "cooccurrence": [0.0]})
    # popularity: 4 of 4 events better than the model, no spread: z = -inf
    assert (fb.decide(), fb.switches, fb.best()) == ("popularity", 1, "popularity")


def test_a_worse_but_not_significantly_worse_model_keeps_serving() -> None:
    fb = fallback()
    model = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    cooc = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    fb.record(model, {"popularity": [0.0] * 6, "cooccurrence": cooc})
    # diffs 0, -1, 0, 0, -1, 1: mean -1/6, sd sqrt(0.5667), z = -0.542 > -2
    assert fb.z_against("cooccurrence") == pytest.approx(-0.5423, abs=1e-4)
    assert (fb.best(), fb.decide()) == ("cooccurrence", "model")


def test_switches_to_the_best_baseline_then_back_once_the_model_is_as_good(tmp_path: Path) -> None:
    log_path = tmp_path / "alarms.jsonl"
    fb = RankerFallback(BASELINES, window=10, min_events=4, z_critical=2.0, recover_z=0.0, log_path=log_path)
    fb.record([0.0, 0.0, 0.0, 0.0, 0.0], {"popularity": [0.5, 0.0, 0.0, 0.0, 0.0],
                                          "cooccurrence": [1.0, 1.0, 0.5, 1.0, 1.0]})
    assert fb.decide() == "cooccurrence"
    # The model improves but is still worse on the window (z < 0): hysteresis keeps the baseline.
    fb.record([1.0, 1.0, 1.0], {"popularity": [0.0] * 3, "cooccurrence": [1.0, 1.0, 1.0]})
    model_minus_cooc = [-1.0, -1.0, -0.5, -1.0, -1.0, 0.0, 0.0, 0.0]
    assert fb.z_against("cooccurrence") == pytest.approx(paired_z(model_minus_cooc, [0.0] * 8), abs=1e-12)
    assert fb.z_against("cooccurrence") < -2.0
    assert fb.decide() == "cooccurrence"
    fb.record([1.0] * 5, {"popularity": [0.0] * 5, "cooccurrence": [0.0] * 5})
    # window (10): model [0, 0, 1, 1, 1, 1, 1, 1, 1, 1] vs co-occurrence [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert fb.ndcg("model") == pytest.approx(0.8, abs=1e-12)
    assert fb.ndcg("cooccurrence") == pytest.approx(0.5, abs=1e-12)
    assert (fb.decide(), fb.switches) == ("model", 2)
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(a["from"], a["to"]) for a in lines] == [("model", "cooccurrence"), ("cooccurrence", "model")]
    assert lines[0]["signal"] == "serving_ranker" and lines[0]["best_baseline"] == "cooccurrence"


def test_moves_to_a_significantly_better_baseline_only() -> None:
    fb = fallback(window=20, min_events=4)
    fb.record([0.0] * 4, {"popularity": [1.0] * 4, "cooccurrence": [0.0] * 4})
    assert fb.decide() == "popularity"
    fb.record([0.0] * 2, {"popularity": [0.0, 1.0], "cooccurrence": [1.0, 1.0]})
    # co-occurrence (2/6) is not better than popularity (5/6): stay
    assert fb.decide() == "popularity"
    fb.record([0.0] * 6, {"popularity": [0.0] * 6, "cooccurrence": [1.0] * 6})
    # co-occurrence 8/12 vs popularity 5/12 is better, but not significantly: z(cooc - pop) = 0.897 < 2
    assert fb.z_against("popularity", ranker="cooccurrence") == pytest.approx(0.8971, abs=1e-4)
    assert fb.decide() == "popularity"
    fb.record([0.0] * 6, {"popularity": [0.0] * 6, "cooccurrence": [1.0] * 6})
    # 14/18 vs 5/18: z(cooc - pop) = 2.474 >= 2
    assert fb.z_against("popularity", ranker="cooccurrence") == pytest.approx(2.4739, abs=1e-4)
    assert (fb.decide(), fb.switches) == ("cooccurrence", 2)


def test_state_round_trip_and_validation() -> None:
    fb = fallback()
    fb.record([0.0] * 4, {"popularity": [1.0] * 4, "cooccurrence": [0.0] * 4})
    fb.decide()
    again = fallback()
    again.load_state_dict(fb.state_dict())
    assert (again.served, again.switches, again.events, again.state()) == (fb.served, 1, 4, fb.state())
    with pytest.raises(ValueError, match=r"need 2 <= min_events <= window, got min_events=9 window=8"):
        RankerFallback(BASELINES, window=8, min_events=9)
    with pytest.raises(ValueError, match=r"recover_z > -z_critical, got z_critical=2.0 recover_z=-2.0"):
        RankerFallback(BASELINES, z_critical=2.0, recover_z=-2.0)
    with pytest.raises(ValueError, match=r"gains must be given for the rankers \[.popularity., .cooccurrence.\], got \[.popularity.\]"):
        fb.record([1.0], {"popularity": [1.0]})


def learnt_fallback() -> RankerFallback:
    return RankerFallback(("cooccurrence",), window=10, min_events=4, z_critical=2.0, recover_z=0.0, learnt=("fused",))


def test_moves_between_learnt_rankers_only_when_significantly_better() -> None:
    fb = learnt_fallback()
    # fused better than the model on 2 of 4 events, never worse: z(fused - model) = 1.732 < 2, stay
    fb.record([0.0, 0.0, 1.0, 1.0], {"fused": [1.0, 1.0, 1.0, 1.0], "cooccurrence": [0.0, 1.0, 1.0, 1.0]})
    assert fb.z_against("model", ranker="fused") == pytest.approx(1.7321, abs=1e-4)
    assert (fb.learnt_best(), fb.decide()) == ("fused", "model")
    fb.record([0.0, 0.0], {"fused": [1.0, 1.0], "cooccurrence": [0.0, 0.0]})
    # now 4 of 6 better: diffs [1, 1, 0, 0, 1, 1], mean 2/3, sd sqrt(4/15): z = 3.162 >= 2
    assert fb.z_against("model", ranker="fused") == pytest.approx(3.1623, abs=1e-4)
    assert (fb.decide(), fb.switches, fb.state()["fallback_serving_baseline"]) == ("fused", 1, 0.0)


def test_a_model_worse_than_the_baseline_hands_over_to_fused_and_both_worse_to_the_baseline() -> None:
    fb = learnt_fallback()
    # the model misses all, co-occurrence hits all (z = -inf); fused is as good as co-occurrence
    fb.record([0.0] * 4, {"fused": [1.0] * 4, "cooccurrence": [1.0] * 4})
    assert (fb.decide(), fb.switches) == ("fused", 1)
    # fused falls behind too: window (10) fused [1, 1, 1, 1, 0 x 6] vs co-occurrence all 1: diffs [0 x 4, -1 x 6],
    # mean -0.6, sd sqrt(0.24 * 10 / 9): z = -3.674
    fb.record([0.0] * 6, {"fused": [0.0] * 6, "cooccurrence": [1.0] * 6})
    assert fb.z_against("cooccurrence", ranker="fused") == pytest.approx(-0.6 / math.sqrt(0.24 / 9), abs=1e-12)
    assert (fb.decide(), fb.switches, fb.state()["fallback_serving_baseline"]) == ("cooccurrence", 2, 1.0)
    # fused catches up on the window (10 events: fused 1 x 10, co-occurrence 1 x 10): back to the best learnt
    fb.record([0.0] * 10, {"fused": [1.0] * 10, "cooccurrence": [1.0] * 10})
    assert (fb.learnt_best(), fb.z_against("cooccurrence", ranker="fused"), fb.decide()) == ("fused", 0.0, "fused")
    with pytest.raises(ValueError, match=r"gains must be given for the rankers \['fused', 'cooccurrence'\], got \['cooccurrence'\]"):
        fb.record([1.0], {"cooccurrence": [1.0]})
    with pytest.raises(ValueError, match=r"baselines must be distinct names other than 'model' and \['fused'\]"):
        RankerFallback(("fused",), learnt=("fused",))


def _batch(version: int, served_by: str, consumed: list[tuple[str, str]]) -> EmbeddingBatch:
    items = ["a", "b", "c", "d"]
    return EmbeddingBatch(version=version, full=version == 1, item_ids=items if version == 1 else [],
                          item_vectors=np.eye(4, dtype=np.float32)[: 4 if version == 1 else 0],
                          user_ids=["u"], user_vectors=np.array([[[0.0, 0.0, 0.0, 1.0]]], np.float32),
                          popularity=[], created_at_s=0.0, consumed=consumed, served_by=served_by)


def switches_total() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("sitn_serving_ranker_switches_total") or 0.0


def test_serving_switches_served_by_with_the_published_batches() -> None:
    from prometheus_client import REGISTRY

    settings = ServingSettings(dim=4, index_factory="Flat", index_search_params={}, popularity_refresh_s=0.0)
    core = ServingCore(settings, start_http=False)
    switches0 = switches_total()
    core.apply_batch(_batch(1, "model", [("v", "a"), ("v", "b"), ("w", "b"), ("w", "c"), ("u", "a")]))
    rec = core.recommend("u", k=3)
    assert (rec["served_by"], rec["items"][0][0]) == ("model", "d")  # by u's vector; a (consumed) left out
    assert sorted(i for i, _ in rec["items"]) == ["b", "c", "d"]
    core.apply_batch(_batch(2, "cooccurrence", [("w", "b")]))  # b is more popular now
    rec = core.recommend("u", k=3)
    # u consumed a; a co-occurs with b (user v) only; then c by popularity order, d never consumed
    assert (rec["served_by"], [i for i, _ in rec["items"]]) == ("cooccurrence", ["b", "c"])
    assert core.recommend("stranger", k=2)["served_by"] == "popularity"
    core.apply_batch(_batch(3, "popularity", []))
    rec = core.recommend("u", k=3)
    assert (rec["served_by"], [i for i, _ in rec["items"]]) == ("popularity", ["b", "c"])  # counts b 3, c 1
    core.apply_batch(_batch(4, "model", []))
    assert core.recommend("u", k=1)["served_by"] == "model"
    assert core.stats()["served_by"] == "model" and core.stats()["ranker_switches"] == 3.0
    assert switches_total() - switches0 == 3
    assert REGISTRY.get_sample_value("sitn_serving_ranker", {"served_by": "model"}) == 1.0
    assert REGISTRY.get_sample_value("sitn_serving_ranker", {"served_by": "cooccurrence"}) == 0.0
    with pytest.raises(ValueError, match=r"ranker must be one of \('model', 'fused', 'popularity', 'cooccurrence'\), got 'x'"):
        core.service.set_ranker("x")
