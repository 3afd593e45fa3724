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
from collections.abc import Sequence
from pathlib import Path

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
        n = len(self._served)
        if n < 2:
            return math.nan
        diffs = np.fromiter(self._live, np.float64, n) - np.fromiter(self._served, np.float64, n)  # (n,)
        mean = float(diffs.mean())
        var = float(diffs.var(ddof=1))
        if var == 0.0:
            return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return mean / math.sqrt(var / n)

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
