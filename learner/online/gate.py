"""The publish gate: a new embedding version reaches serving only if it ranks no worse than what is served.

Shadow evaluation, test-then-train: before the learner trains on a batch, a sample of its target-domain
events is ranked twice, with the vectors *served* (the prequential evaluator's rank, passed in) and with
the *live model's* vectors (what the next publish would send). Both gains go into one window of paired
results, so the two NDCG@k figures are measured on exactly the same events and neither has seen them.

The window holds only events ranked since the served version was published (``published()`` empties
it): gains of an older served version, or of the model lineage before that publish, say nothing about
the next version. At publish time ``allows()`` compares them: if the live model's windowed NDCG@k has dropped by more than
``max_drop`` (a fraction) below the served version's on the same window, *and* the drop is significant
(one-sided paired z-test on the per-event gain differences, ``z <= -z_critical``), the version is held
back, the alarm counter and gauge move, and a line goes to the JSON-lines alarm log; serving keeps the
last good version. The test matters: NDCG@10 of a real catalogue is around 0.01, so a window holds a few
dozen hits and a 50% swing between two good models happens by chance alone. The gate opens again as soon as the live model is back within the bound (the window slides, so
recovery is seen within about ``window`` target events).

>>> gate = PublishGate(max_drop=0.2, window=40, min_events=10, z_critical=2.33)
>>> gate.record([1.0, 0.0] * 5, [1.0, 0.0] * 5)
>>> gate.allows()
True
>>> gate.record([1.0, 0.0] * 5, [0.0, 0.0] * 5)  # the live model stopped finding the items
>>> gate.allows(), round(gate.served_ndcg, 3), round(gate.live_ndcg, 3), round(gate.z, 2)
(False, 0.5, 0.25, -2.52)
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

log = logging.getLogger(__name__)


def ndcg_gain(rank: int | None, k: int) -> float:
    """NDCG@k of one positive at 1-based ``rank`` (0 when outside the top k or unrankable).

    >>> ndcg_gain(1, 10), round(ndcg_gain(3, 10), 3), ndcg_gain(11, 10), ndcg_gain(None, 10)
    (1.0, 0.5, 0.0, 0.0)
    """
    if rank is None or rank > k:
        return 0.0
    return 1.0 / math.log2(rank + 1)


def paired_z(a: Sequence[float], b: Sequence[float]) -> float:
    """z statistic of the mean paired difference ``a - b`` (one pair per event): mean / (std / sqrt(n)).

    nan with fewer than two pairs; with no spread, 0 for equal means and +-inf otherwise.

    >>> round(paired_z([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]), 3)
    1.732
    >>> paired_z([0.0, 0.0], [0.0, 0.0]), paired_z([0.0, 0.0], [1.0, 1.0])
    (0.0, -inf)
    """
    n = len(a)
    if n != len(b):
        raise ValueError(f"paired values differ in length: {n} vs {len(b)}")
    if n < 2:
        return math.nan
    diffs = np.fromiter(a, np.float64, n) - np.fromiter(b, np.float64, n)  # (n,)
    mean = float(diffs.mean())
    var = float(diffs.var(ddof=1))
    if var == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(var / n)


class PublishGate:
    """Paired window of (served, live) NDCG gains; decides whether a new version may be published."""

    def __init__(
        self,
        max_drop: float = 0.5,
        window: int = 2000,
        min_events: int = 200,
        k: int = 10,
        log_path: Path | None = None,
        z_critical: float = 2.33,
    ) -> None:
        if not 0.0 < max_drop <= 1.0:
            raise ValueError(f"max_drop must be in (0, 1], got {max_drop}")
        if min_events < 1 or window < min_events:
            raise ValueError(f"need 1 <= min_events <= window, got min_events={min_events} window={window}")
        self.max_drop = max_drop
        self.z_critical = z_critical
        self.k = k
        self.min_events = min_events
        self.log_path = log_path
        self._served: deque[float] = deque(maxlen=window)
        self._live: deque[float] = deque(maxlen=window)
        self.closed = False
        self.held_total = 0  # publish attempts held back
        self.judged_total = 0  # publish attempts with enough paired events to judge

    def published(self) -> None:
        """A new version is being served: start a fresh paired window for it."""
        self._served.clear()
        self._live.clear()

    def record(self, served_gains: Sequence[float], live_gains: Sequence[float]) -> None:
        """Add paired gains of the same events (ranked before training on them)."""
        if len(served_gains) != len(live_gains):
            raise ValueError(f"paired gains differ in length: {len(served_gains)} vs {len(live_gains)}")
        self._served.extend(served_gains)
        self._live.extend(live_gains)

    @property
    def events(self) -> int:
        return len(self._served)

    @property
    def served_ndcg(self) -> float:
        return sum(self._served) / len(self._served) if self._served else math.nan

    @property
    def live_ndcg(self) -> float:
        return sum(self._live) / len(self._live) if self._live else math.nan

    @property
    def z(self) -> float:
        """Paired z statistic of mean(live - served) gain; negative = the live model ranks worse."""
        return paired_z(self._live, self._served)

    def allows(self, version: int | None = None) -> bool:
        """True when the live model may be published; False (and an alarm) when it would be a regression."""
        if self.events < self.min_events:
            ok = True
        else:
            self.judged_total += 1
            dropped = self.live_ndcg < self.served_ndcg * (1.0 - self.max_drop)
            ok = not (dropped and self.z <= -self.z_critical)
        if not ok:
            self.held_total += 1
            if not self.closed:  # one alarm line per closing, a counter per held version
                self._alarm(version)
        elif self.closed:
            log.warning("publish gate open again live_ndcg=%.4f served_ndcg=%.4f", self.live_ndcg, self.served_ndcg)
        self.closed = not ok
        return ok

    def _alarm(self, version: int | None) -> None:
        record = {
            "time_s": time.time(),
            "signal": "publish_gate",
            "detector": "paired_ndcg_drop",
            "version_held": version,
            "served_ndcg": self.served_ndcg,
            "live_ndcg": self.live_ndcg,
            "max_drop": self.max_drop,
            "z": self.z,
            "events": self.events,
        }
        log.error("publish gate closed: holding new versions back %s", record)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as fh:
                fh.write(orjson.dumps(record) + b"\n")

    def state(self) -> dict[str, float]:
        return {
            "gate_closed": float(self.closed),
            "gate_held_total": float(self.held_total),
            "gate_served_ndcg": self.served_ndcg,
            "gate_live_ndcg": self.live_ndcg,
            "gate_events": float(self.events),
            "gate_z": self.z,
        }


class RankerFallback:
    """Which ranker serving uses: the best learnt ranker (the model, or one built on it such as ``fused``), or
    the best servable baseline while every learnt ranker is significantly worse than it.

    Paired and windowed, like the version check above: the NDCG@k gains of each *learnt* ranker as serving
    answers with it and of each servable baseline (one serving can compute itself) on the same target
    events, the last ``window`` of them. The trainer passes the learnt rankers' gains at data time
    (``model_live``, ``fused_live``: the event's own history, as the baselines rank; see ``learner.online.trainer``). The
    window slides across published versions: a version is served for about a second, far too few events
    to judge it alone, and the model changes little between two versions.

    ``decide()`` (at each publish) picks the ranker for the next version. ``learnt`` is the best learnt
    ranker by windowed NDCG@k, ``best`` the best baseline (ties: the first listed); ``z(a - b)`` is the
    one-sided paired z of the gains of ``a`` minus ``b``:

    - fewer than ``min_events`` paired events: keep the current ranker;
    - serving a learnt ranker ``cur``: if ``z(cur - best) <= -z_critical`` (significantly worse than the
      best baseline), switch to ``learnt`` when that one is not significantly worse
      (``z(learnt - best) > -z_critical``), else to ``best``; otherwise move to ``learnt`` only when it is
      significantly better than ``cur`` (``z(learnt - cur) >= z_critical``: no flapping between two
      learnt rankers of equal merit);
    - serving a baseline: back to ``learnt`` once ``z(learnt - best) >= recover_z`` (default 0: at least
      as good as the best baseline on the window; the gap between the two thresholds keeps a ranker that
      hovers at the edge from switching to and fro); else to ``best`` if it is another baseline and
      significantly better than the current one (``z(best - current) >= z_critical``).

    So after each decision serving is never significantly worse than the best servable baseline on the
    window, and it serves a learnt ranker whenever one is not.

    Each switch is one log line (and one JSON line in ``log_path``) and counts in ``switches``.

    >>> fb = RankerFallback(("popularity", "cooccurrence"), window=8, min_events=4, z_critical=1.0)
    >>> fb.record([0.0, 0.0, 1.0, 0.0], {"popularity": [1.0, 0.0, 1.0, 1.0], "cooccurrence": [0.0, 0.0, 1.0, 0.0]})
    >>> fb.decide(), round(fb.z_against("popularity"), 3)
    ('popularity', -1.732)
    >>> fb.record([1.0] * 4, {"popularity": [0.0] * 4, "cooccurrence": [0.0] * 4})  # the model recovers
    >>> fb.decide(), fb.switches
    ('model', 2)

    With a second learnt ranker, a model worse than the baseline hands over to it, not to the baseline:

    >>> fb = RankerFallback(("cooccurrence",), window=8, min_events=4, z_critical=1.0, learnt=("fused",))
    >>> fb.record([0.0] * 4, {"fused": [1.0, 1.0, 0.0, 1.0], "cooccurrence": [1.0, 0.0, 0.0, 1.0]})
    >>> fb.decide(), fb.learnt_best()
    ('fused', 'fused')
    """

    def __init__(
        self,
        baselines: Sequence[str] = ("popularity", "cooccurrence"),
        window: int = 2000,
        min_events: int = 200,
        z_critical: float = 2.33,
        recover_z: float = 0.0,
        log_path: Path | None = None,
        model: str = "model",
        learnt: Sequence[str] = (),
    ) -> None:
        """``learnt``: learnt rankers besides ``model`` (e.g. ``("fused",)``); ``model`` is served first."""
        names = (model, *learnt, *baselines)
        if not baselines or len(set(names)) != len(names):
            raise ValueError(f"baselines must be distinct names other than {model!r} and {list(learnt)}, "
                             f"got {list(baselines)}")
        if min_events < 2 or window < min_events:
            raise ValueError(f"need 2 <= min_events <= window, got min_events={min_events} window={window}")
        if z_critical <= 0 or recover_z <= -z_critical:
            raise ValueError(f"need z_critical > 0 and recover_z > -z_critical, got z_critical={z_critical} "
                             f"recover_z={recover_z}")
        self.model = model
        self.learnt = (model, *learnt)
        self.baselines = tuple(baselines)
        self.min_events = min_events
        self.z_critical = z_critical
        self.recover_z = recover_z
        self.log_path = log_path
        self._gains = {name: deque[float](maxlen=window) for name in names}
        self.served = model
        self.switches = 0

    @property
    def events(self) -> int:
        return len(self._gains[self.model])

    def record(self, model_gains: Sequence[float], other_gains: Mapping[str, Sequence[float]]) -> None:
        """Add the NDCG@k gains of the same events: the served model's, and each other learnt ranker's
        and baseline's (``other_gains``)."""
        others = (*self.learnt[1:], *self.baselines)
        if set(other_gains) != set(others):
            raise ValueError(f"gains must be given for the rankers {list(others)}, got {sorted(other_gains)}")
        for name, gains in other_gains.items():
            if len(gains) != len(model_gains):
                raise ValueError(f"{name}: {len(gains)} gains for {len(model_gains)} model gains")
        self._gains[self.model].extend(model_gains)
        for name, gains in other_gains.items():
            self._gains[name].extend(gains)

    def ndcg(self, ranker: str) -> float:
        """Windowed mean NDCG@k gain of ``ranker`` (nan before any event)."""
        gains = self._gains[ranker]
        return sum(gains) / len(gains) if gains else math.nan

    def _argmax(self, names: Sequence[str]) -> str:
        scores = {b: self.ndcg(b) for b in names}
        return max(names, key=lambda b: -math.inf if math.isnan(scores[b]) else scores[b])

    def best(self) -> str:
        """The baseline with the highest windowed NDCG@k (ties: the first listed)."""
        return self._argmax(self.baselines)

    def learnt_best(self) -> str:
        """The learnt ranker with the highest windowed NDCG@k (ties: the first listed, the model)."""
        return self._argmax(self.learnt)

    def z_against(self, baseline: str, ranker: str | None = None) -> float:
        """Paired z of ``ranker`` (default the model) minus ``baseline``; negative = ``ranker`` is worse."""
        return paired_z(self._gains[ranker or self.model], self._gains[baseline])

    def decide(self) -> str:
        """The ranker serving should use from now on (see the class docstring); logs a switch."""
        if self.events < self.min_events:
            return self.served
        best, learnt, cur = self.best(), self.learnt_best(), self.served
        chosen = cur
        if cur in self.learnt:
            if self.z_against(best, ranker=cur) <= -self.z_critical:
                chosen = learnt if self.z_against(best, ranker=learnt) > -self.z_critical else best
            elif learnt != cur and self.z_against(cur, ranker=learnt) >= self.z_critical:
                chosen = learnt
        elif self.z_against(best, ranker=learnt) >= self.recover_z:
            chosen = learnt
        elif best != cur and self.z_against(cur, ranker=best) >= self.z_critical:
            chosen = best
        if chosen != cur:
            self._switch(chosen, best, self.z_against(best, ranker=learnt))
        return self.served

    def _switch(self, to: str, best: str, z: float) -> None:
        record = {
            "time_s": time.time(),
            "signal": "serving_ranker",
            "detector": "paired_ndcg_vs_baseline",
            "from": self.served,
            "to": to,
            "model_ndcg": self.ndcg(self.model),
            "best_learnt": self.learnt_best(),
            "best_learnt_ndcg": self.ndcg(self.learnt_best()),
            "best_baseline": best,
            "best_baseline_ndcg": self.ndcg(best),
            "z": z,
            "z_critical": self.z_critical,
            "recover_z": self.recover_z,
            "events": self.events,
        }
        log.warning("serving ranker switched %s", record)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as fh:
                fh.write(orjson.dumps(record) + b"\n")
        self.served = to
        self.switches += 1

    def state(self) -> dict[str, float]:
        best = self.best()
        return {
            "fallback_serving_baseline": float(self.served in self.baselines),
            "fallback_switches_total": float(self.switches),
            "fallback_events": float(self.events),
            "fallback_model_ndcg": self.ndcg(self.model),
            "fallback_served_ndcg": self.ndcg(self.served),
            "fallback_best_baseline_ndcg": self.ndcg(best),
            "fallback_z": self.z_against(best, ranker=self.learnt_best()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served, "switches": self.switches,
                "gains": {name: list(g) for name, g in self._gains.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: the ranker it served, its switch count and paired window."""
        if state["served"] in (*self.learnt, *self.baselines):
            self.served = state["served"]
        self.switches = int(state["switches"])
        for name, gains in state["gains"].items():
            if name in self._gains:
                self._gains[name].clear()
                self._gains[name].extend(gains)
