"""Drift detection on the learner's signals: per-step losses and prequential metrics, the input distribution
(domain mix, item popularity) and the prototype-assignment distributions. Plain Python, no Ray, no torch.

Three kinds of signal, three methods of :class:`DriftMonitor`:

- ``observe_step(stats, step)``: after the first ``burn_in_steps`` steps (a fresh model's learning curve is
  not drift), each configured scalar of a learner step (``loss``, ``loss_main``,
  ``loss_i2i``, ``loss_i2c``, ``prequential_hr_at_<k>``, ``prequential_ndcg_at_<k>``) feeds two detectors:
  River's ADWIN (an adaptive window that cuts when two sub-windows' means differ by more than a
  Hoeffding/Bernstein bound; scale-free, catches both sudden and gradual changes) and Page-Hinkley (a CUSUM
  of deviations from the running mean; O(1) per value, the quickest to catch a sudden level shift).
  Page-Hinkley is preferred over KSWIN here: KSWIN runs a Kolmogorov-Smirnov test with a fixed ``alpha``
  at *every* value, so on a long stationary stream it alarms at a steady rate from multiple testing, and
  each test sorts its window. Both detectors see each signal divided by its standard deviation over its
  first ``min_observations`` values (a warm-up without alarms): ``ph_delta_std`` and ``ph_threshold_std``
  are then in standard deviations, and one setting fits a loss near 5 and a hit rate near 0.1. NaN and
  infinite values are skipped. Both assume roughly independent values: a windowed metric (the
  prequential HR over the last 2000 events) is autocorrelated and alarms more readily (bench/bench_drift.py
  measures the rate).
- ``observe_events(domains, item_ids)``: the input distribution, in tumbling windows counted in events.
  ``input_domain_mix`` is the histogram of domains; ``input_items_<domain>`` the histogram of that
  domain's items over the ``top_items`` most frequent items of the reference window plus one "other"
  bin (its windows count that domain's events only). A reference window of ``reference_window_events``
  is collected first; then every full current window of ``current_window_events`` is compared with it
  by PSI and Jensen-Shannon divergence, and either one above its threshold is an alarm. After an alarm
  the signal collects a new reference from the events that follow (no checks meanwhile), so one
  sudden shift alarms once. Memory is bounded: at most ``reference_window_events`` distinct keys while
  a reference is collected, then ``top_items`` keys; at most ``max_domains`` domains are tracked.
- ``observe_assignments(name, counts)``: members per prototype (e.g. ``proto_user_k16``'s sizes after a
  re-clustering), by default sorted largest first (``assignment_compare="sorted"``: the distribution's
  shape, so a collapse onto few prototypes or a spread alarms, a relabelling does not). The first
  non-empty histogram is the reference; each later one is compared with it
  by PSI and JS; after an alarm the current histogram becomes the reference. A change in the number of
  prototypes re-baselines without an alarm.

Every alarm is a :class:`DriftAlarm`: it increments ``sitn_drift_alarms_total{signal, detector}``, sets
``sitn_drift_alarm_active{signal}`` to 1 and appends one JSON line to the drift log, if one is set.
``sitn_drift_alarm_active`` goes back to 0 at the signal's next check without alarm; for a step signal the
first check after an alarm is the first value after its ``cooldown_steps``. ``sitn_drift_score{signal}``
is the latest PSI of a distribution signal, or the Page-Hinkley statistic (in standard deviations) of a
step signal. ``sitn_drift_detector_state{signal, detector}`` is, per detector: ``adwin``, the ADWIN window
width in values; ``page_hinkley``, the test statistic; ``psi`` and ``js``, the latest divergence values.

>>> monitor = DriftMonitor(DriftSettings(reference_window_events=4, current_window_events=4, top_items=2))
>>> monitor.observe_events(["movie", "book"] * 4, ["m1", "b1"] * 4)  # reference, then a window like it
[]
>>> for a in monitor.observe_events(["book"] * 4, ["b1", "b1", "b2", "b2"]):  # all books, a new book
...     print(a.signal, a.detector, a.index, round(a.value, 3), a.threshold)
input_domain_mix psi 12 0.799 0.2
input_domain_mix js 12 0.311 0.03
input_items_book psi 12 0.879 0.2
input_items_book js 12 0.311 0.03
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math
import pickle
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from river.drift import ADWIN, PageHinkley

from learner.core.checkpoint import unpickle

log = logging.getLogger(__name__)

STATE_VERSION = 1

# -- metrics, defined once; labels are bounded (signal names come from settings, domains, prototype sets) --
DRIFT_ALARMS = PromCounter("sitn_drift_alarms", "Drift alarms raised, by signal and detector.", ["signal", "detector"])
DRIFT_ALARM_ACTIVE = Gauge(
    "sitn_drift_alarm_active", "1 from a drift alarm until the signal's next check without alarm.", ["signal"]
)
DRIFT_SCORE = Gauge(
    "sitn_drift_score", "Latest PSI (distribution signals) or Page-Hinkley statistic in std units (step signals).",
    ["signal"],
)
DRIFT_DETECTOR_STATE = Gauge(
    "sitn_drift_detector_state",
    "Detector state: adwin = window width (values), page_hinkley = statistic (std), psi / js = latest value.",
    ["signal", "detector"],
)


class DriftSettings(BaseSettings):
    """Drift detector thresholds and windows. Environment prefix ``SITN_DRIFT_``."""

    model_config = SettingsConfigDict(env_prefix="SITN_DRIFT_", frozen=True, extra="forbid")

    # -- step signals (losses, prequential metrics) -------------------------------------------------
    step_signals: tuple[str, ...] = Field(
        default=("loss", "loss_main", "loss_i2i", "loss_i2c", "prequential_hr_at_*", "prequential_ndcg_at_*"),
        description="keys of the step statistics to watch (fnmatch patterns)",
    )
    adwin_delta: float = Field(default=0.002, gt=0, lt=1, description="ADWIN confidence; smaller = fewer alarms")
    ph_delta_std: float = Field(default=0.1, ge=0, description="Page-Hinkley tolerated drift per value, in std")
    ph_threshold_std: float = Field(default=50.0, gt=0, description="Page-Hinkley alarm threshold, in std")
    ph_alpha: float = Field(
        default=1.0, gt=0, le=1,
        description="Page-Hinkley forgetting factor; 1 = the classic test (river's 0.9999 turns the sums into an "
        "AR(1) with a stationary spread of ~70 std, which crosses 50 every ~15k stationary values)",
    )
    min_observations: int = Field(
        default=100, ge=2, description="values of a step signal that estimate its scale; no alarms meanwhile"
    )
    cooldown_steps: int = Field(default=100, ge=0, description="steps after an alarm before the same detector alarms again")
    burn_in_steps: int = Field(
        default=1000, ge=0,
        description="learner steps not watched at all: a fresh model's learning curve is not drift (a restored "
        "model past this step is watched at once)",
    )
    # -- input distribution -------------------------------------------------------------------------
    reference_window_events: int = Field(default=20_000, ge=1, description="events in a reference window")
    current_window_events: int = Field(default=5_000, ge=1, description="events in each compared window")
    top_items: int = Field(default=100, ge=1, description="items with their own bin; the rest share 'other'")
    max_domains: int = Field(default=8, ge=1, description="domains tracked; further ones are ignored")
    psi_threshold: float = Field(default=0.2, gt=0, description="PSI above this is an alarm (0.2: the usual 'major shift')")
    js_threshold: float = Field(default=0.03, gt=0, le=1, description="Jensen-Shannon divergence (bits) above this is an alarm")
    pseudo_count: float = Field(default=0.5, ge=0, description="added to every bin before PSI (empty bins)")
    # -- prototype assignments ----------------------------------------------------------------------
    assignment_compare: Literal["sorted", "matched"] = Field(
        default="sorted",
        description="sorted: compare the size histograms sorted largest first (the shape: collapse or spread, "
        "whichever prototype it is); matched: prototype by prototype (alarms on most re-clusterings while the "
        "model is still learning, bench/bench_drift.py)",
    )
    assignment_psi_threshold: float = Field(default=0.2, gt=0)
    assignment_js_threshold: float = Field(default=0.03, gt=0, le=1)
    # -- output -------------------------------------------------------------------------------------
    log_path: Path | None = Field(default=None, description="JSON-lines drift log, appended to; unset = none")


@dataclass(frozen=True)
class DriftAlarm:
    """One alarm. ``index`` counts ``index_unit``: the learner step, the events observed so far (including
    the one that completed the window), or the step / call number of an assignment histogram."""

    signal: str
    detector: str  # "adwin" | "page_hinkley" | "psi" | "js"
    index: int
    index_unit: Literal["step", "event", "observation"]
    value: float
    threshold: float
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- divergences ------------------------------------------------------------------------------------


def _probabilities(counts: Sequence[float] | np.ndarray, pseudo_count: float, name: str) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or len(c) == 0:
        raise ValueError(f"{name} must be a non-empty 1-d histogram, got shape {c.shape}")
    if (c < 0).any():
        raise ValueError(f"{name} must have no negative counts, got min {c.min()}")
    c = c + pseudo_count
    total = c.sum()
    if total <= 0:
        raise ValueError(f"{name} is empty (all counts 0 and pseudo_count 0)")
    return c / total


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray,
        pseudo_count: float = 0.0) -> float:
    """Population stability index of two histograms (counts): ``sum (c - r) * ln(c / r)`` over the bins,
    each histogram normalised after adding ``pseudo_count`` to every bin. Infinite if a bin is empty in
    one histogram only and ``pseudo_count`` is 0.

    >>> round(psi([50, 50], [25, 75]), 5)  # 0.25 ln 2 + 0.25 ln 1.5
    0.27465
    >>> psi([1, 2, 3], [2, 4, 6])
    0.0
    >>> round(psi([10, 0], [5, 5], pseudo_count=0.5), 5)
    1.38387
    """
    r = _probabilities(reference, pseudo_count, "reference")
    c = _probabilities(current, pseudo_count, "current")
    if len(r) != len(c):
        raise ValueError(f"histograms differ in length: reference {len(r)}, current {len(c)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(r == c, 0.0, (c - r) * np.log(c / r))
    return float(terms.sum())


def js_divergence(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (in [0, 1]) of two histograms (counts, normalised here).

    >>> js_divergence([1, 0], [0, 1])
    1.0
    >>> round(js_divergence([50, 50], [25, 75]), 5)
    0.04879
    >>> js_divergence([3, 1], [6, 2])
    0.0
    """
    p = _probabilities(reference, 0.0, "reference")
    q = _probabilities(current, 0.0, "current")
    if len(p) != len(q):
        raise ValueError(f"histograms differ in length: reference {len(p)}, current {len(q)}")
    m = 0.5 * (p + q)

    def kl_to_m(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, min(1.0, 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)))


# -- step signals -----------------------------------------------------------------------------------


class _StepSignal:
    """ADWIN and Page-Hinkley on one scalar of the learner steps, both fed ``value / scale``.

    ``scale`` is the standard deviation of the first ``min_observations`` values (a constant run, such as a
    loss that is not switched on yet, does not count: the warm-up starts again); it is fixed from then on
    (PH restarts after each of its alarms, on the same scale). Standardising matters for ADWIN too: its
    bound has a term for values in [0, 1], which would make it slow on a hit rate that moves by 0.01.
    """

    def __init__(self, settings: DriftSettings) -> None:
        self.adwin = ADWIN(delta=settings.adwin_delta)
        self.ph = self._page_hinkley(settings)
        self.values = 0
        self.alarms = 0
        self.last_alarm_step: dict[str, int] = {}
        self.active_until_step: int | None = None
        self.scale: float | None = None
        self._n, self._mean, self._m2 = 0, 0.0, 0.0  # Welford over the warm-up

    @staticmethod
    def _page_hinkley(settings: DriftSettings) -> PageHinkley:
        return PageHinkley(min_instances=1, delta=settings.ph_delta_std, threshold=settings.ph_threshold_std,
                           alpha=settings.ph_alpha)

    def ph_statistic(self) -> float:
        """The larger of PH's upward and downward test statistics (0 before it has values)."""
        if self.ph._x_mean.n == 0:
            return 0.0
        up = self.ph._sum_increase - self.ph._min_increase
        down = self.ph._max_decrease - self.ph._sum_decrease
        return float(max(up, down, 0.0))

    def observe(self, value: float, step: int, settings: DriftSettings) -> list[tuple[str, float, float]]:
        """Feed one value; returns (detector, value, threshold) of each alarm."""
        self.values += 1
        if self.scale is None:
            self._n += 1
            d = value - self._mean
            self._mean += d / self._n
            self._m2 += d * (value - self._mean)
            if self._n >= settings.min_observations:
                std = math.sqrt(self._m2 / (self._n - 1))
                if std <= 1e-9 * max(1.0, abs(self._mean)):
                    # Constant so far (a loss not switched on yet, e.g. loss_i2c before its warm-up): not a
                    # signal yet. Estimate the scale once it moves, or its switch-on reads as a huge shift.
                    self._n, self._mean, self._m2 = 0, 0.0, 0.0
                else:
                    self.scale = max(std, 1e-6 * abs(self._mean), 1e-12)
            return []
        z = value / self.scale
        fired: list[tuple[str, float, float]] = []
        self.adwin.update(z)
        if self.adwin.drift_detected:
            fired.append(("adwin", float(self.adwin.estimation) * self.scale, settings.adwin_delta))
        self.ph.update(z)
        if self.ph.drift_detected:
            fired.append(("page_hinkley", self.ph_statistic(), settings.ph_threshold_std))
            self.ph = self._page_hinkley(settings)  # the level has moved: measure from the new one
        out = []
        for detector, v, threshold in fired:
            last = self.last_alarm_step.get(detector)
            if last is not None and step - last < settings.cooldown_steps:
                continue
            self.last_alarm_step[detector] = step
            out.append((detector, v, threshold))
        return out


# -- distribution signals ---------------------------------------------------------------------------


class _WindowSignal:
    """A categorical distribution in tumbling windows of events, compared with a reference window."""

    def __init__(self, max_bins: int) -> None:
        self.max_bins = max_bins
        self.alarms = 0
        self.active = False
        self.last_alarm_index: int | None = None
        self.last_psi: float | None = None
        self.last_js: float | None = None
        self.checks = 0
        self._start_reference()

    def _start_reference(self) -> None:
        self.collecting = True
        self.filled = 0  # events in the window being filled
        self._keys: Counter[str] = Counter()  # while collecting: at most reference_window_events keys
        self.bins: dict[str, int] = {}
        self.reference = np.zeros(0, dtype=np.int64)
        self.current = np.zeros(0, dtype=np.int64)

    def _finish_reference(self) -> None:
        top = sorted(self._keys.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_bins]  # ties by key: deterministic
        self.bins = {key: i for i, (key, _) in enumerate(top)}
        other = self.filled - sum(n for _, n in top)
        self.reference = np.array([n for _, n in top] + [other], dtype=np.int64)  # (bins + 1,)
        self.current = np.zeros_like(self.reference)
        self._keys = Counter()
        self.collecting = False
        self.filled = 0

    def feed(self, keys: Sequence[str], ends: np.ndarray, start: int,
             settings: DriftSettings) -> tuple[int, tuple[int, float, float] | None]:
        """Count ``keys[start:]`` up to the end of the first window that fills; ``ends[i]`` is the event count
        at key i. Returns where it stopped and, if a current window was completed, (index, psi, js)."""
        i = start
        while i < len(keys):
            size = settings.reference_window_events if self.collecting else settings.current_window_events
            take = min(size - self.filled, len(keys) - i)
            part = keys[i : i + take]
            if self.collecting:
                self._keys.update(part)
            else:
                other = len(self.bins)
                codes = np.fromiter(map(self.bins.get, part, itertools.repeat(other, take)), np.int64, take)
                self.current += np.bincount(codes, minlength=other + 1)
            self.filled += take
            i += take
            if self.filled < size:
                continue
            if self.collecting:
                self._finish_reference()
                continue
            self.last_psi = psi(self.reference, self.current, settings.pseudo_count)
            self.last_js = js_divergence(self.reference, self.current)
            self.checks += 1
            self.current[:] = 0
            self.filled = 0
            return i, (int(ends[i - 1]), self.last_psi, self.last_js)
        return i, None

    def rebaseline(self) -> None:
        """Collect a new reference from the events that follow."""
        self._start_reference()


class _AssignmentSignal:
    def __init__(self) -> None:
        self.reference: np.ndarray | None = None
        self.observations = 0
        self.alarms = 0
        self.active = False
        self.last_alarm_index: int | None = None
        self.last_psi: float | None = None
        self.last_js: float | None = None


# -- the monitor ------------------------------------------------------------------------------------


class DriftMonitor:
    """Watches step statistics, input events and prototype assignments; see the module docstring.

    ``log_path`` (or ``settings.log_path``) is the JSON-lines drift log, one line per alarm, appended to.
    """

    def __init__(self, settings: DriftSettings | None = None, log_path: str | Path | None = None) -> None:
        self.settings = settings if settings is not None else DriftSettings()
        self.log_path = Path(log_path) if log_path is not None else self.settings.log_path
        self._fresh()

    def _fresh(self) -> None:
        self.events_seen = 0
        self.alarms_total = 0
        self._steps: dict[str, _StepSignal] = {}
        self._windows: dict[str, _WindowSignal] = {}
        self._assignments: dict[str, _AssignmentSignal] = {}
        self._watched: dict[str, bool] = {}  # stat key -> matches step_signals (cache)

    # -- step signals -------------------------------------------------------------------------------
    def observe_step(self, stats: Mapping[str, float], step: int) -> list[DriftAlarm]:
        """Feed the statistics of one learner step (``learn_many``'s dict, with the prequential ones)."""
        alarms: list[DriftAlarm] = []
        s = self.settings
        if s.burn_in_steps > 0 and step <= s.burn_in_steps:
            return alarms
        for key, raw in stats.items():
            watched = self._watched.get(key)
            if watched is None:
                watched = self._watched[key] = any(fnmatch.fnmatchcase(key, p) for p in s.step_signals)
            if not watched:
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                continue
            signal = self._steps.get(key)
            if signal is None:
                signal = self._steps[key] = _StepSignal(s)
            fired = signal.observe(value, step, s)
            for detector, v, threshold in fired:
                alarms.append(self._alarm(key, detector, step, "step", v, threshold))
                signal.alarms += 1
                signal.active_until_step = step + s.cooldown_steps
            if not fired and signal.active_until_step is not None and step >= signal.active_until_step:
                signal.active_until_step = None
                DRIFT_ALARM_ACTIVE.labels(key).set(0)
            statistic = signal.ph_statistic()
            DRIFT_SCORE.labels(key).set(statistic)
            DRIFT_DETECTOR_STATE.labels(key, "page_hinkley").set(statistic)
            DRIFT_DETECTOR_STATE.labels(key, "adwin").set(float(signal.adwin.width))
        return alarms

    # -- input distribution -------------------------------------------------------------------------
    def observe_events(self, domains: Sequence[str], item_ids: Sequence[str]) -> list[DriftAlarm]:
        """Feed the domains and item ids of a batch of events, in stream order."""
        n = len(domains)
        if len(item_ids) != n:
            raise ValueError(f"domains and item_ids must have the same length, got {n} and {len(item_ids)}")
        if n == 0:
            return []
        base = self.events_seen
        self.events_seen += n
        ends = np.arange(base + 1, base + n + 1, dtype=np.int64)  # (n,) events observed at each event
        alarms = self._feed_window("input_domain_mix", domains, ends, self.settings.max_domains)
        by_domain: dict[str, tuple[list[str], list[int]]] = {}
        for i, (domain, item_id) in enumerate(zip(domains, item_ids, strict=True)):
            group = by_domain.get(domain)
            if group is None:
                group = by_domain[domain] = ([], [])
            group[0].append(item_id)
            group[1].append(i)
        for domain, (items, positions) in by_domain.items():
            name = f"input_items_{domain}"
            if name not in self._windows and self._tracked_domains() >= self.settings.max_domains:
                continue  # bounded: labels and memory
            alarms += self._feed_window(name, items, ends[positions], self.settings.top_items)
        return alarms

    def _tracked_domains(self) -> int:
        return sum(1 for name in self._windows if name.startswith("input_items_"))

    def _feed_window(self, name: str, keys: Sequence[str], ends: np.ndarray, max_bins: int) -> list[DriftAlarm]:
        s = self.settings
        signal = self._windows.get(name)
        if signal is None:
            signal = self._windows[name] = _WindowSignal(max_bins)
        alarms: list[DriftAlarm] = []
        i = 0
        while i < len(keys):
            i, check = signal.feed(keys, ends, i, s)
            if check is None:
                break
            index, psi_value, js_value = check
            fired = self._check(name, index, "event", psi_value, js_value, s.psi_threshold, s.js_threshold)
            alarms += fired
            if fired:
                signal.alarms += len(fired)
                signal.active = True
                signal.last_alarm_index = index
                signal.rebaseline()  # the events after this window start the new reference
        return alarms

    # -- prototype assignments ----------------------------------------------------------------------
    def observe_assignments(self, name: str, counts: Sequence[int] | np.ndarray, step: int | None = None) -> list[DriftAlarm]:
        """Feed one histogram of members per prototype (``counts``, (K,)) of the prototype set ``name``.

        ``step`` (the learner step) becomes the alarms' index; without it, the number of histograms seen.
        """
        c = np.asarray(counts, dtype=np.int64)
        if c.ndim != 1 or len(c) < 1:
            raise ValueError(f"counts must be a non-empty 1-d histogram, got shape {c.shape}")
        if (c < 0).any():
            raise ValueError(f"counts must be >= 0, got min {int(c.min())}")
        signal = self._assignments.get(name)
        if signal is None:
            signal = self._assignments[name] = _AssignmentSignal()
        if c.sum() == 0:
            return []  # nothing clustered yet
        if self.settings.assignment_compare == "sorted":
            c = np.sort(c)[::-1].copy()  # (K,) largest first
        signal.observations += 1
        unit: Literal["step", "observation"] = "step" if step is not None else "observation"
        index = step if step is not None else signal.observations
        if signal.reference is None or len(signal.reference) != len(c):
            if signal.reference is not None:
                log.info("drift re-baseline signal=%s reason=prototype_count_changed from=%d to=%d",
                         name, len(signal.reference), len(c))
            signal.reference = c.copy()
            return []
        s = self.settings
        signal.last_psi = psi(signal.reference, c, s.pseudo_count)
        signal.last_js = js_divergence(signal.reference, c)
        fired = self._check(name, index, unit, signal.last_psi, signal.last_js,
                            s.assignment_psi_threshold, s.assignment_js_threshold)
        if fired:
            signal.alarms += len(fired)
            signal.active = True
            signal.last_alarm_index = index
            signal.reference = c.copy()
        else:
            signal.active = False
        return fired

    # -- shared -------------------------------------------------------------------------------------
    def _check(self, name: str, index: int, unit: Literal["step", "event", "observation"], psi_value: float,
               js_value: float, psi_threshold: float, js_threshold: float) -> list[DriftAlarm]:
        DRIFT_SCORE.labels(name).set(psi_value)
        DRIFT_DETECTOR_STATE.labels(name, "psi").set(psi_value)
        DRIFT_DETECTOR_STATE.labels(name, "js").set(js_value)
        fired = []
        if psi_value > psi_threshold:
            fired.append(self._alarm(name, "psi", index, unit, psi_value, psi_threshold))
        if js_value > js_threshold:
            fired.append(self._alarm(name, "js", index, unit, js_value, js_threshold))
        if not fired:
            DRIFT_ALARM_ACTIVE.labels(name).set(0)
            window = self._windows.get(name)
            if window is not None:
                window.active = False
        return fired

    def _alarm(self, signal: str, detector: str, index: int, unit: Literal["step", "event", "observation"],
               value: float, threshold: float) -> DriftAlarm:
        alarm = DriftAlarm(signal, detector, int(index), unit, float(value), float(threshold), time.time())
        self.alarms_total += 1
        DRIFT_ALARMS.labels(signal, detector).inc()
        DRIFT_ALARM_ACTIVE.labels(signal).set(1)
        log.warning("drift alarm signal=%s detector=%s %s=%d value=%.6g threshold=%.6g",
                    signal, detector, unit, index, value, threshold)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as fh:
                fh.write(orjson.dumps(alarm.to_dict()) + b"\n")
                fh.flush()
        return alarm

    # -- status and checkpoints ---------------------------------------------------------------------
    def alarms_active(self) -> int:
        """Signals in alarm now: those whose ``sitn_drift_alarm_active`` is 1 (``sum(sitn_drift_alarm_active)``)."""
        return (sum(st.active_until_step is not None for st in self._steps.values())
                + sum(w.active for w in self._windows.values()) + sum(a.active for a in self._assignments.values()))

    def state(self) -> dict[str, Any]:
        """A JSON-able summary for status displays."""
        signals: dict[str, dict[str, Any]] = {}
        for name, st in self._steps.items():
            signals[name] = {
                "kind": "step", "values": st.values, "alarms": st.alarms, "active": st.active_until_step is not None,
                "last_alarm_step": max(st.last_alarm_step.values(), default=None),
                "adwin_width": int(st.adwin.width), "adwin_mean": float(st.adwin.estimation),
                "page_hinkley": st.ph_statistic(),
            }
        for name, w in self._windows.items():
            signals[name] = {
                "kind": "events", "alarms": w.alarms, "active": w.active, "last_alarm_event": w.last_alarm_index,
                "checks": w.checks, "collecting_reference": w.collecting, "psi": w.last_psi, "js": w.last_js,
            }
        for name, a in self._assignments.items():
            signals[name] = {
                "kind": "assignments", "observations": a.observations, "alarms": a.alarms, "active": a.active,
                "last_alarm_index": a.last_alarm_index, "psi": a.last_psi, "js": a.last_js,
            }
        return {"events_seen": self.events_seen, "alarms_total": self.alarms_total, "signals": signals}

    def _settings_key(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json", exclude={"log_path"})

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the settings it was built with and the pickled detectors."""
        detectors = {
            "events_seen": self.events_seen, "alarms_total": self.alarms_total, "steps": self._steps,
            "windows": self._windows, "assignments": self._assignments,
        }
        return {"version": STATE_VERSION, "settings": self._settings_key(), "detectors": pickle.dumps(detectors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> bool:
        """Resume from :meth:`state_dict`; returns False (and starts fresh) if the detector settings changed,
        since river detectors carry their parameters. Only load state this process or its checkpoints wrote:
        the detectors are pickled."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"drift state version {version!r} is not supported; expected {STATE_VERSION}")
        if state["settings"] != self._settings_key():
            log.warning("drift settings changed since the checkpoint; drift detectors start fresh")
            self._fresh()
            return False
        detectors = unpickle(state["detectors"])  # detectors pickled before issue 10 name learner.drift
        self.events_seen = int(detectors["events_seen"])
        self.alarms_total = int(detectors["alarms_total"])
        self._steps = detectors["steps"]
        self._windows = detectors["windows"]
        self._assignments = detectors["assignments"]
        self._watched = {}
        for name, active in self._active_flags():
            DRIFT_ALARM_ACTIVE.labels(name).set(1 if active else 0)
        return True

    def _active_flags(self) -> Iterable[tuple[str, bool]]:
        for name, st in self._steps.items():
            yield name, st.active_until_step is not None
        for name, w in self._windows.items():
            yield name, w.active
        for name, a in self._assignments.items():
            yield name, a.active
